"""Checks for assignment A4, classifier-free guidance: condition dropout, the CFG combination, a guided denoiser.

References: minidiff.guidance.condition_dropout and minidiff.guidance.CFGDenoiser. The test denoiser is an exact
class-conditional Gaussian denoiser (class k has mean m_k; the null class has mean 0), so no network is needed.
Wrong variants are written out on purpose, to name a mistake.
"""
from __future__ import annotations

import torch

from minidiff import guidance, schedules
from minidiff.course.checks import Mismatch, call, expect, task
from minidiff.course.checks.diagnose import name_drop_fraction, probe_inputs
from minidiff.utils import append_dims

F64 = torch.float64
NUM_CLASSES = 3
NULL = NUM_CLASSES  # the null ("unconditional") class id, as in minidiff.models.unet


class _ClassDenoiser:
    """E[x0 | x_t, class] for x0 ~ N(m_class, 0.25 I); counts the batch size of every call."""

    def __init__(self, g: torch.Generator, shape=(2, 4, 4)):
        self.means = torch.randn(NUM_CLASSES + 1, *shape, generator=g, dtype=F64)
        self.means[NULL] = 0.0
        self.batches = []

    def __call__(self, x, sigma, *, class_labels):
        B = x.shape[0]
        self.batches.append(B)
        sigma = torch.as_tensor(sigma, dtype=F64).reshape(-1)
        sigma = sigma.expand(B) if sigma.numel() == 1 else sigma
        labels = torch.as_tensor(class_labels)
        if sigma.shape != (B,) or labels.shape != (B,):
            raise ValueError(f"the denoiser needs sigma and class_labels of shape ({B},) to match x of shape "
                             f"{tuple(x.shape)}, got {tuple(sigma.shape)} and {tuple(labels.shape)}")
        a, b = (append_dims(c, x.ndim) for c in schedules.vp_coefficients(sigma))
        mu = self.means[labels]
        return (mu + a * 0.25 / (a**2 * 0.25 + b**2) * (x.double() - a * mu)).to(x.dtype)


# ----------------------------------------------------------------------------- condition dropout
def _dropout_statistics(student) -> None:
    """Accept a different random recipe only if it is deterministic per seed and drops a fraction p."""
    labels = torch.arange(20000) % NUM_CLASSES
    runs = [call(student, labels, 0.1, NULL, generator=torch.Generator().manual_seed(9)) for _ in range(2)]
    if not torch.equal(runs[0], runs[1]):
        raise Mismatch("ignores the generator: the same seed must give the same dropout mask "
                       "(pass generator=generator to torch.rand)")
    other = call(student, labels, 0.1, NULL, generator=torch.Generator().manual_seed(11))
    if torch.equal(runs[0], other):
        raise Mismatch("ignores the generator: two different generators gave the same dropout mask (a fixed "
                       "torch.manual_seed inside the function?); draw with torch.rand(..., generator=generator)")
    for p in (0.1, 0.7):
        out = call(student, labels, p, NULL, generator=torch.Generator().manual_seed(10))
        name_drop_fraction((out == NULL).double().mean().item(), p, len(labels), "labels")


@task("A4.condition_dropout", func="condition_dropout", points=2, references=("minidiff.guidance.condition_dropout",))
def check_condition_dropout(student) -> str:
    g = torch.Generator().manual_seed(7)
    cases = [("B = 4000, p = 0.1", 4000, 0.1), ("B = 16, p = 0.3", 16, 0.3), ("p = 0: nothing is dropped", 12, 0.0),
             ("p = 1: every label is dropped", 12, 1.0), ("batch of 1, p = 0.5", 1, 0.5)]
    exact = True
    for n, (case, B, p) in enumerate(cases):
        labels = torch.randint(0, NUM_CLASSES, (B,), generator=g)
        seed = 300 + n
        got = call(student, labels, p, NULL, generator=torch.Generator().manual_seed(seed))
        want = guidance.condition_dropout(labels, p, NULL, generator=torch.Generator().manual_seed(seed))
        r = torch.rand(labels.shape, generator=torch.Generator().manual_seed(seed))
        wrong = [
            ("drops a label with probability 1 - p: drop where torch.rand(...) < p, keep it otherwise",
             torch.where(r >= p, NULL, labels)),
            ("replaces dropped labels with 0, which is a real class; use null_id", torch.where(r < p, 0, labels)),
            ("drops every label; each label is dropped independently with probability p",
             torch.full_like(labels, NULL)),
            ("never drops a label; each label is dropped independently with probability p", labels),
        ]
        try:
            # a batch of 1 matches a wrong variant by chance half the time: name mistakes on large batches only
            expect(got, want, case=case, what="labels", wrong=wrong if B >= 12 else [], rtol=0, atol=0,
                   dtype_hint="Labels are int64 class ids.")
        except Mismatch as e:
            if torch.is_tensor(got) and got.shape == want.shape and str(e).startswith("wrong labels"):
                if not ((got == labels) | (got == NULL)).all():
                    raise Mismatch(f"returns labels that are neither the original label nor null_id [case: {case}]")
                if (p == 0 and not torch.equal(got, labels)) or (p == 1 and not (got == NULL).all()):
                    raise
                exact = False
                continue
            raise
    if not exact:
        _dropout_statistics(student)
        return ("drops labels independently with probability p (your random draws differ from the recipe "
                "torch.rand(labels.shape, generator=generator) < p, but the statistics are right)")
    return f"matches minidiff.guidance.condition_dropout on {len(cases)} cases (p = 0, p = 1, batch of 1)"


# ----------------------------------------------------------------------------- the CFG combination
SCALES = [("guidance_scale = 3", 3.0, 4, torch.float32),
          ("guidance_scale = 7.5, batch of 1", 7.5, 1, torch.float32),
          ("guidance_scale = 1 (must equal the conditional prediction: no guidance)", 1.0, 3, torch.float32),
          ("guidance_scale = 0 (must equal the unconditional prediction)", 0.0, 3, torch.float32),
          ("float64, guidance_scale = 2.5", 2.5, 2, F64)]


def _guidance_cases(seed: int):
    g = torch.Generator().manual_seed(seed)
    for case, w, B, dtype in SCALES:
        den = _ClassDenoiser(g)
        x = torch.randn((B, 2, 4, 4), generator=g, dtype=dtype)
        sigma = (0.5 + 3 * torch.rand(B, generator=g, dtype=F64)).to(dtype)
        labels = torch.randint(0, NUM_CLASSES, (B,), generator=g)
        want = guidance.CFGDenoiser(den, w, uncond={"class_labels": torch.tensor(NULL)})(x, sigma, class_labels=labels)
        cond, uncond = den(x, sigma, class_labels=labels), den(x, sigma, class_labels=torch.full_like(labels, NULL))
        den.batches.clear()
        yield case, w, den, x, sigma, labels, want, cond, uncond


def _cfg_wrong(w, cond, uncond):
    return [
        ("is inverted: it starts from the conditional prediction and moves towards the unconditional one; "
         "use uncond + guidance_scale * (cond - uncond)", lambda: cond + w * (uncond - cond)),
        ("uses cond + w (cond - uncond), where w = 0 means no guidance; in minidiff guidance_scale = 1 means no "
         "guidance: uncond + guidance_scale * (cond - uncond)", lambda: cond + w * (cond - uncond)),
        ("forgot to add the unconditional prediction: uncond + guidance_scale * (cond - uncond)",
         lambda: w * (cond - uncond)),
        ("has the wrong sign: it moves away from the conditional prediction; use uncond + w (cond - uncond)",
         lambda: uncond + w * (uncond - cond)),
    ]


def reference_cfg_combine(x0_cond, x0_uncond, guidance_scale):
    """The reference combination, put in place of a student's cfg_combine to test their cfg_denoise alone."""
    return x0_uncond + guidance_scale * (x0_cond - x0_uncond)


@task("A4.cfg_combine", func="cfg_combine", points=2, references=("minidiff.guidance.CFGDenoiser",))
def check_cfg_combine(student) -> str:
    for n, (case, w, den, x, sigma, labels, want, cond, uncond) in enumerate(_guidance_cases(8)):
        def probe(cond=cond, uncond=uncond, w=w, case=case):
            probe_inputs(student, (cond, uncond, w), {}, {2: (w + 2.0, "the result moves with guidance_scale")},
                         reference_cfg_combine, call=call, case=case)
        got = call(student, cond, uncond, w)
        expect(got, want, case=case, what="guided prediction", wrong=_cfg_wrong(w, cond, uncond), probe=probe,
               dtype_hint="Keep the dtype of the predictions.")
    return f"matches minidiff.guidance.CFGDenoiser on {len(SCALES)} scales, the scale-1 and scale-0 identities included"


@task("A4.cfg_denoise", func="cfg_denoise", points=3, references=("minidiff.guidance.CFGDenoiser",),
      helpers={"cfg_combine": reference_cfg_combine})
def check_cfg_denoise(student) -> str:
    for case, w, den, x, sigma, labels, want, cond, uncond in _guidance_cases(9):
        got = call(student, den, x, sigma, labels, NULL, w,
                   hint="concatenate x, sigma and the labels on the batch axis (torch.cat) so all have 2B entries")
        B = x.shape[0]

        def probe(den=den, x=x, sigma=sigma, labels=labels, w=w, case=case):
            probe_inputs(student, (den, x, sigma, labels, NULL, w), {}, {
                5: (w + 2.0, "pass guidance_scale on to the combination")}, call=call, case=case)
        expect(got, want, case=case, what="guided prediction", probe=probe, wrong=_cfg_wrong(w, cond, uncond) + [
            ("gives the class labels to both halves of the batch; the unconditional half needs null_id", cond),
            ("gives null_id to both halves of the batch; the conditional half needs the class labels", uncond),
        ], dtype_hint="Keep the dtype of x.")
        one_batched_call = den.batches == [2 * B] or (w in (0.0, 1.0) and den.batches == [B])
        if not one_batched_call:
            raise Mismatch(f"calls the denoiser with batch sizes {den.batches}; classifier-free guidance needs one "
                           f"forward pass of batch 2B = {2 * B} (cond and uncond concatenated) [case: {case}]")
    return f"matches minidiff.guidance.CFGDenoiser with one batched forward on {len(SCALES)} scales (1 and 0 included)"
