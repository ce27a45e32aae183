"""Checks for assignment A7, editing: the image-to-image start level, and one training-free inpainting step.

References: minidiff.inpainting.img2img_start / img2img_start_latents (SDEdit's start, Meng et al. 2022, with
diffusers' rule for the index) and minidiff.inpainting.InpaintDenoiser (the replacement method, Song et al. 2021,
App. I.2; Lugmayr et al. 2022, Eq. 8). The probes make every listed mistake distinguishable: step counts where
int, round and ceil of N * strength differ, a large and a moderate first level, per-sample noise levels, a mask
that is neither all ones nor all zeros, and a denoiser that mixes neighbouring cells, so that what it is fed
matters. Wrong variants are written out on purpose, to name a mistake.

| symbol | code name  | meaning                                                             |
|--------|------------|---------------------------------------------------------------------|
| N      | ``len(sigmas) - 1`` | sampling steps; ``sigmas`` (N + 1,) descending, ends in 0  |
| s      | ``strength``| in [0, 1]: start at index N - int(N * s)                           |
| a, b   |            | 1 / sqrt(1 + sigma^2), sigma / sqrt(1 + sigma^2): x = a z0 + b eps  |
| m      | ``mask``   | latent mask (B, 1, h, w): 1 = generate, 0 = keep z0                 |
"""
from __future__ import annotations

import math

import torch

from minidiff.course.checks import Mismatch, call, expect, expect_pair, task
from minidiff.course.checks.diagnose import probe_inputs
from minidiff.inpainting import InpaintDenoiser, img2img_start

F64 = torch.float64
LIBRARY_START = ("minidiff.inpainting.img2img_start", "minidiff.inpainting.img2img_start_latents")


def _vp(sigma: float) -> tuple[float, float]:
    return 1 / math.sqrt(1 + sigma**2), sigma / math.sqrt(1 + sigma**2)


# ----------------------------------------------------------------------------- the start level
def reference_img2img_start(z0, sigmas, strength, noise):
    """(x, tail): tail = sigmas[N - int(N s):]; x = noise at strength 1, else a z0 + b noise at tail[0]."""
    n = len(sigmas) - 1
    start = img2img_start(n, strength)
    tail = sigmas[start:]
    if start == 0:
        return noise.clone(), tail
    a, b = _vp(float(tail[0]))
    return a * z0 + b * noise, tail


def _start_wrong(z0, sigmas, strength, noise):
    """(message, thunk -> (x, tail)) for the usual mistakes."""
    n = len(sigmas) - 1

    def at(start, noising="vp"):
        start = min(max(start, 0), n)
        tail = sigmas[start:]
        s = float(tail[0])
        a, b = _vp(s)
        x = {"vp": a * z0 + b * noise, "ve": z0 + s * noise, "ab": a**2 * z0 + b**2 * noise,
             "lerp": a * z0 + (1 - a) * noise, "sqrt1ma": a * z0 + math.sqrt(1 - a) * noise,
             "a_sq": a**2 * z0 + b * noise, "sigma": a * z0 + s * noise}[noising]
        return x, tail
    right = n - min(int(n * strength), n)
    return [
        ("at strength 1 noises z0 to the first level; strength 1 ignores the input and starts from the noise "
         "itself (x = noise), so that it is text-to-image with the same noise", lambda: at(0) if right == 0 else None),
        ("starts at index int(N * strength): that many steps are *skipped*, so strength 0.8 would redo only 20% of "
         "the schedule; start at N - int(N * strength), so that strength is the fraction of steps run",
         lambda: at(int(n * strength))),
        ("rounds N * strength; diffusers' rule truncates: start = N - int(N * strength)",
         lambda: at(n - round(n * strength))),
        ("rounds N * strength up (ceil); diffusers' rule truncates: start = N - int(N * strength)",
         lambda: at(n - math.ceil(n * strength))),
        ("starts one level late, at N - int(N * strength) + 1: strength is the fraction of the N steps that run, "
         "start = N - int(N * strength)", lambda: at(right + 1) if right < n else None),
        ("starts one level early, at N - int(N * strength) - 1: strength is the fraction of the N steps that run, "
         "start = N - int(N * strength)", lambda: at(right - 1) if right > 0 else None),
        ("noises z0 at the level after the start, sigmas[start + 1]; x is the state at tail[0] = sigmas[start], "
         "the level the sampler steps from", lambda: (at(right + 1)[0], sigmas[right:]) if right < n else None),
        ("drops the final level 0 from tail; keep it, tail = sigmas[start:]: the sampler's last step goes to "
         "sigma = 0", lambda: (at(right)[0], sigmas[right:-1])),
        ("returns the levels after the start, sigmas[start + 1:]; the start level itself is the first one the "
         "sampler steps from: tail = sigmas[start:]", lambda: (at(right)[0], sigmas[right + 1:])),
        ("noises z0 at the start level but returns the levels from one earlier, sigmas[start - 1:]: x and tail[0] "
         "must be the same level", lambda: (at(right)[0], sigmas[max(right - 1, 0):])),
        ("noises z0 to the VE state z0 + sigma * noise; the samplers' state is the VP one, x = a z0 + b noise with "
         "a = 1 / sqrt(1 + sigma^2), b = sigma / sqrt(1 + sigma^2)", lambda: at(right, "ve")),
        ("uses alpha_bar = a^2 and 1 - alpha_bar = b^2 as the coefficients; DDPM Eq. 4 uses their square roots: "
         "x = sqrt(alpha_bar) z0 + sqrt(1 - alpha_bar) noise", lambda: at(right, "ab")),
        ("mixes z0 and noise with weights a and 1 - a; the noise weight is b = sqrt(1 - a^2), so that x has unit "
         "variance", lambda: at(right, "lerp")),
        ("uses sqrt(1 - a) as the noise weight; with a = sqrt(alpha_bar) it is b = sqrt(1 - a^2) = "
         "sqrt(1 - alpha_bar)", lambda: at(right, "sqrt1ma")),
        ("uses 1 / (1 + sigma^2) as the signal weight; it is its square root, a = 1 / sqrt(1 + sigma^2)",
         lambda: at(right, "a_sq")),
        ("uses sigma as the noise weight (the VE state's); in the VP state it is b = sigma / sqrt(1 + sigma^2)",
         lambda: at(right, "sigma")),
        ("noises z0 at the first level sigma_0 whatever the strength; the start state is at the start level "
         "tail[0] = sigmas[N - int(N * strength)]",
         lambda: (_vp(float(sigmas[0]))[0] * z0 + _vp(float(sigmas[0]))[1] * noise, sigmas[right:])),
    ]


def _start_cases(g: torch.Generator):
    cosine = torch.tensor([2.0e4, 19.7, 6.14, 2.9, 1.56, 0.88, 0.49, 0.25, 0.11, 0.03, 0.0], dtype=F64)
    karras = torch.tensor([80.0, 30.1, 10.4, 3.25, 0.89, 0.2, 0.02, 0.0], dtype=F64)  # N = 7
    nine = torch.tensor([14.6, 8.0, 4.3, 2.3, 1.2, 0.6, 0.3, 0.12, 0.04, 0.0], dtype=F64)  # N = 9
    yield "N = 10 levels of the cosine table, strength 0.6", cosine, 0.6
    yield "N = 9, strength 0.35: N * strength = 3.15", nine, 0.35
    yield "N = 9, strength 0.4: N * strength = 3.6", nine, 0.4
    yield "N = 7 (Karras), strength 0.5: N * strength = 3.5", karras, 0.5
    yield "N = 9, strength 0.8", nine, 0.8
    yield "strength 1: the whole schedule, from a first level of 80", karras, 1.0
    yield "strength 0: no step at all", nine, 0.0
    yield "N = 7, strength 0.1: int(0.7) = 0 steps", karras, 0.1
    yield "N = 10, strength 0.95, float32", cosine.float(), 0.95


@task("A7.img2img_start", func="img2img_start", points=2, references=LIBRARY_START)
def check_img2img_start(student) -> str:
    g = torch.Generator().manual_seed(71)
    n = 0
    for case, sigmas, strength in _start_cases(g):
        n += 1
        dtype = sigmas.dtype
        z0 = (0.5 + torch.randn(2, 4, 3, 3, generator=g, dtype=F64)).to(dtype)
        noise = torch.randn(2, 4, 3, 3, generator=g, dtype=F64).to(dtype)
        want_x, want_tail = reference_img2img_start(z0, sigmas, strength, noise)
        got_x, got_tail = expect_pair(call(student, z0, sigmas, strength, noise), "x, tail", case)
        if got_x.ndim == 1 and got_tail.shape == z0.shape:
            raise Mismatch(f"returns (tail, x); return them in the order (x, tail) [case: {case}]")
        _name_start_pair(got_x, got_tail, (want_x, want_tail), _start_wrong(z0, sigmas, strength, noise), case)
        wrong = [(msg, (lambda f=f: _pick(f(), 1))) for msg, f in _start_wrong(z0, sigmas, strength, noise)]
        if got_tail.shape != want_tail.shape or not torch.equal(got_tail.double(), want_tail.double()):
            expect(got_tail, want_tail, case=case, what="tail", wrong=wrong)
        wrong = [(msg, (lambda f=f: _pick(f(), 0))) for msg, f in _start_wrong(z0, sigmas, strength, noise)]

        def probe(z0=z0, sigmas=sigmas, strength=strength, noise=noise, case=case):
            probe_inputs(student, (z0, sigmas, strength, noise), {}, {
                3: (torch.randn(noise.shape, generator=torch.Generator().manual_seed(3), dtype=noise.dtype),
                    "x = a z0 + b noise uses the noise you are given; do not draw your own"),
                0: (z0 + 1.0, "below strength 1 the start keeps a share a of the input z0")},
                reference_img2img_start, call=call, case=case)
        expect(got_x, want_x, case=case, what="x", wrong=wrong, probe=probe, rtol=1e-5, atol=1e-6,
               dtype_hint="Keep the dtype of z0.")
    for bad in (1.5, -0.1):
        try:
            call(student, z0, sigmas, bad, noise)
        except Exception as err:  # noqa: BLE001 -- any clear error counts; the library raises ValueError
            if "raised" in str(err):
                continue
            raise
        raise Mismatch(f"accepts strength = {bad}; strength must lie in [0, 1]: raise a ValueError that says so")
    return f"matches minidiff.inpainting.img2img_start_latents on {n} cases (round/int/ceil apart, strength 0 and 1)"


def _name_start_pair(got_x, got_tail, want, wrong, case: str) -> None:
    """Name the mistake whose x *and* tail the student returned (one level late, or only the tail late, ...)."""
    def same(a, b):
        return a.shape == b.shape and torch.allclose(a.detach().double(), b.double(), rtol=1e-5, atol=1e-6)
    for message, f in wrong:
        v = f()
        if v is not None and same(got_x, v[0]) and same(got_tail, v[1]) and not (same(v[0], want[0]) and
                                                                               same(v[1], want[1])):
            raise Mismatch(f"{message} [case: {case}]")


def _pick(pair, k):
    return None if pair is None else pair[k]


# ----------------------------------------------------------------------------- one inpainting step
class _Mixing(torch.nn.Module):
    """A fixed denoiser whose x0_hat at a cell depends on its neighbours and on sigma (B,)."""

    def forward(self, x, sigma, **cond):
        if sigma.ndim != 0 and sigma.shape != x.shape[:1]:  # a scalar is fine, as for the library's Denoiser
            raise ValueError(f"the denoiser takes sigma of shape (B,) = ({x.shape[0]},), one level per sample, got "
                             f"{tuple(sigma.shape)}: pass sigma itself, and reshape only the copy that multiplies "
                             f"the latents")
        s = sigma.to(x.dtype).view(-1, 1, 1, 1)
        blur = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        return torch.tanh(blur / (1 + s) + 0.1 * x.roll(1, dims=1))


def reference_inpaint_denoise(denoiser, x, sigma, z0, mask, noise):
    """m * D(m x + (1 - m) (a z0 + b noise), sigma) + (1 - m) z0, with a, b per sample from sigma (B,)."""
    return InpaintDenoiser(denoiser, z0, mask, noise)(x, sigma)


def _inpaint_wrong(denoiser, x, sigma, z0, mask, noise):
    m = mask
    s = sigma.to(x.dtype).view(-1, 1, 1, 1)
    a, b = 1 / torch.sqrt(1 + s**2), s / torch.sqrt(1 + s**2)
    known = a * z0 + b * noise

    def out(x_in, *, keep=z0, region=m):
        return region * denoiser(x_in, sigma) + (1 - region) * keep
    s0 = float(sigma[0])
    a0, b0 = _vp(s0)
    return [
        ("inverts the mask: m = 1 marks the region to *generate*; keep z0 where m = 0",
         lambda: out((1 - m) * x + m * known, region=1 - m)),
        ("inverts the mask of the output: keep the denoiser's estimate where m = 1 (generate) and z0 where m = 0",
         lambda: (1 - m) * denoiser(m * x + (1 - m) * known, sigma) + m * z0),
        ("inverts the mask of the denoiser's input: the state x stays where m = 1 (generate) and the noised "
         "original goes where m = 0", lambda: out((1 - m) * x + m * known)),
        ("keeps the state x in the known region of the output; the denoiser contract returns x0_hat, and in the "
         "known region that is z0", lambda: out(m * x + (1 - m) * known, keep=x)),
        ("mixes z0 and noise with weights a and 1 - a in the known region; the noise weight is b = sqrt(1 - a^2)",
         lambda: out(m * x + (1 - m) * (a * z0 + (1 - a) * noise))),
        ("uses sqrt(1 - a) as the noise weight in the known region; it is b = sqrt(1 - a^2) = sqrt(1 - alpha_bar)",
         lambda: out(m * x + (1 - m) * (a * z0 + torch.sqrt(1 - a) * noise))),
        ("does not put z0 back in the output: return m * x0_hat + (1 - m) * z0, so that the known region ends at "
         "z0 exactly", lambda: denoiser(m * x + (1 - m) * known, sigma)),
        ("feeds the denoiser the state x unchanged; its known region must be replaced by the noised original "
         "a z0 + b noise, so that the network sees the real context at this noise level", lambda: out(x)),
        ("feeds the clean z0 in the known region; the network expects every cell at the current noise level: use "
         "a z0 + b noise", lambda: out(m * x + (1 - m) * z0)),
        ("noises the known region to the VE state z0 + sigma * noise; the state is x = a z0 + b noise with "
         "a = 1 / sqrt(1 + sigma^2), b = sigma / sqrt(1 + sigma^2)", lambda: out(m * x + (1 - m) * (z0 + s * noise))),
        ("uses alpha_bar = a^2 and 1 - alpha_bar = b^2 as the coefficients; use their square roots a and b",
         lambda: out(m * x + (1 - m) * (a**2 * z0 + b**2 * noise))),
        ("leaves out the signal weight a in the known region: the noised original is a z0 + b noise, with "
         "a = 1 / sqrt(1 + sigma^2)", lambda: out(m * x + (1 - m) * (z0 + b * noise))),
        ("returns the noised original a z0 + b noise in the known region; the denoiser contract returns x0_hat, "
         "so the known region's estimate is z0 itself", lambda: out(m * x + (1 - m) * known, keep=known)),
        ("uses sigma[0] for every sample; sigma has one level per sample, shape (B,): reshape it to (B, 1, 1, 1)",
         lambda: out(m * x + (1 - m) * (a0 * z0 + b0 * noise))),
    ]


def _inpaint_cases(g: torch.Generator):
    def mask(B, h, w):
        m = torch.zeros(B, 1, h, w)
        m[0, :, 1:4, 2:6] = 1
        m[1:, :, h // 2:, :] = 1
        return m
    yield "B = 3, sigmas (8, 1.5, 0.2) per sample, a box and a half-image mask", 3, (8.0, 1.5, 0.2), (4, 6, 6), mask
    yield "B = 2, one sigma (3, 3), a 16x16 latent", 2, (3.0, 3.0), (4, 16, 16), mask
    yield "float64, B = 2, sigmas (40, 0.05)", 2, (40.0, 0.05), (4, 5, 7), mask


@task("A7.inpaint_denoise", func="inpaint_denoise", points=3, references=("minidiff.inpainting.InpaintDenoiser",))
def check_inpaint_denoise(student) -> str:
    g, denoiser, n = torch.Generator().manual_seed(72), _Mixing(), 0
    for case, B, sigmas, shape, make_mask in _inpaint_cases(g):
        n += 1
        dtype = F64 if case.startswith("float64") else torch.float32
        x, z0, noise = (torch.randn(B, *shape, generator=g, dtype=F64).to(dtype) for _ in range(3))
        sigma, m = torch.tensor(sigmas, dtype=dtype), make_mask(B, *shape[1:]).to(dtype)
        args = (denoiser, x, sigma, z0, m, noise)
        want = reference_inpaint_denoise(*args)

        def probe(args=args, case=case):
            probe_inputs(student, args, {}, {
                5: (torch.randn(noise.shape, generator=torch.Generator().manual_seed(4), dtype=dtype),
                    "the known region is noised with the noise you are given (the same at every step)"),
                3: (z0 + 1.0, "the known region comes from z0")},
                reference_inpaint_denoise, call=call, case=case)
        got = call(student, *args, hint="sigma has shape (B,): reshape it to (B, 1, 1, 1) before it multiplies "
                                      "tensors of shape (B, C, h, w)")
        expect(got, want, case=case, what="x0_hat", wrong=_inpaint_wrong(*args), probe=probe,
               rtol=1e-5, atol=1e-6, dtype_hint="Keep the dtype of x.")
    return f"matches minidiff.inpainting.InpaintDenoiser on {n} cases (per-sample sigma, float64)"
