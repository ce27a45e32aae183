"""Why 10-step DPM-Solver++(2M) at guidance 5 loses prompts that DDIM and Euler keep on the same 10 levels.

    python benchmarks/guided_multistep.py --n 100 --threads 1 --out docs/benchmarks/guided_multistep.json
    python benchmarks/guided_multistep.py --objects 2 --n 200 --out docs/benchmarks/guided_multistep_2obj.json

DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095, Alg. 2) is DDIM with x0_hat replaced by a linear
extrapolation from the last two estimates, D_i + (D_i - D_{i-1}) / (2 r_i). That is second order when x0_hat
changes smoothly with the noise level, which is what unguided models do. Classifier-free guidance (Ho & Salimans
2022, Eq. 6) at w = 5 makes the guided x0_hat swing over the first levels (the layout is decided there), and the
extrapolation then keeps pushing in the direction of the last swing. With many steps the swings are small; at 10
steps they are large and the extrapolation overshoots.

The script measures, on the shipped text model and the judge of ``minidiff.eval.text`` (prompts of seen
combinations, one object or ``--objects 2``, all-correct):

1. all-correct for samplers x spacings x guidance at 10 and 20 steps (the same prompts, the same start noise);
2. the same 10 levels with the second-order term switched off on some steps (an ablation written out below,
   checked against ``sample_dpmpp_2m`` bit for bit when nothing is switched off);
3. per step, the relative change of x0_hat between consecutive levels, ||D_i - D_{i-1}|| / ||D_i||, for DDIM and
   2M at w = 1 and w = 5, and the size of 2M's correction, ||D_i - D_{i-1}|| / (2 r_i ||D_i||).

It prints measured numbers and asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from minidiff.data.shapes import caption
from minidiff.eval.classifiers import load_classifier
from minidiff.eval.text import judge, prompt_attrs, summarize
from minidiff.pipelines.text_to_image import guided_text_denoiser, text_to_image_latents
from minidiff.pretrained import load_pipeline
from minidiff.schedules import sampling_sigmas, vp_coefficients
from minidiff.utils import randn

CONFIGS = [  # (sampler, steps, spacing, guidance)
    ("dpmpp_2m", 10, "trailing", 5.0), ("ddim", 10, "trailing", 5.0), ("euler", 10, "trailing", 5.0),
    ("dpmpp_2m", 10, "karras", 5.0), ("ddim", 10, "karras", 5.0), ("dpmpp_2m", 10, "trailing", 3.0),
    ("ddim", 10, "trailing", 3.0), ("dpmpp_2m", 10, "trailing", 1.0), ("ddim", 10, "trailing", 1.0),
    ("dpmpp_2m", 20, "trailing", 5.0), ("ddim", 20, "trailing", 5.0), ("dpmpp_2m", 15, "trailing", 5.0),
]


@torch.no_grad()
def dpmpp_2m_ablation(denoiser, x, sigmas, *, first_order=(), extra_args=None, callback=None):
    """DPM-Solver++(2M) in the VP state (as ``minidiff.samplers``), with the second-order term dropped on the step
    indices in ``first_order`` (those steps are DDIM steps). ``first_order=()`` is ``sample_dpmpp_2m``."""
    sigmas = sigmas.to(torch.float64)  # as minidiff.samplers._prepare: the coefficients in float64
    s = sigmas.tolist()
    a, b = (t.tolist() for t in vp_coefficients(sigmas))
    cond, x0_old, h_last = dict(extra_args or {}), None, None
    for i in range(len(s) - 1):
        x0_hat = denoiser(x, x.new_full((x.shape[0],), s[i]), **cond)
        if s[i + 1] == 0:
            if callback is not None:
                callback({"i": i, "x0_hat": x0_hat, "correction": None})
            return x0_hat
        h = math.log(s[i] / s[i + 1])
        correction = None if x0_old is None else (x0_hat - x0_old) / (2 * (h_last / h))
        if callback is not None:  # correction: None on step 0 (no history) and on the last step
            callback({"i": i, "x0_hat": x0_hat, "correction": correction})
        x0_d = x0_hat + correction if correction is not None and i not in first_order else x0_hat
        x = (b[i + 1] / b[i]) * x + a[i + 1] * (1.0 - s[i + 1] / s[i]) * x0_d
        x0_old, h_last = x0_hat, h
    return x


def per_image_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="shapes64-text")
    p.add_argument("--n", type=int, default=100, help="prompts of seen combinations")
    p.add_argument("--objects", type=int, choices=(1, 2), default=1, help="objects per prompt")
    p.add_argument("--n-trace", type=int, default=50, help="prompts for the per-step x0_hat trace")
    p.add_argument("--seed", type=int, default=0, help="generator seed of the start noise")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    pipe, classifier = load_pipeline(args.model), load_classifier("shapes")
    attrs = prompt_attrs(args.n, objects=args.objects, split="seen", seed=100)
    prompts = [caption(a) for a in attrs]
    shape = (len(prompts), *pipe.denoiser.image_shape)

    def score(z: torch.Tensor) -> float:
        return summarize(judge(pipe.vae.decode_latents(z).clamp(-1, 1), attrs, classifier))["all"]

    print(f"{args.model}: {args.n} {args.objects}-object prompts (seen pairs), start noise seed {args.seed}; "
          f"threads {torch.get_num_threads()}")
    print(f"\n1. {args.objects}-object all-correct by sampler, steps, spacing and guidance w")
    table, latents = {}, {}
    for sampler, steps, spacing, w in CONFIGS:
        z = text_to_image_latents(pipe.denoiser, pipe.tokenizer, prompts, guidance=w, sampler=sampler, steps=steps,
                                  spacing=spacing, generator=torch.Generator().manual_seed(args.seed), progress=False)
        key = f"{sampler} {steps} {spacing} w={w:g}"
        table[key], latents[key] = score(z), z
        print(f"  {key:<32} {table[key]:.3f}")

    print("\n2. dpmpp_2m, 10 trailing steps, w=5, with the second-order term off on some steps (those are DDIM)")
    guided, cond = guided_text_denoiser(pipe.denoiser, pipe.tokenizer, prompts, guidance=5.0)
    sigmas = sampling_sigmas(pipe.denoiser.alphas_cumprod, 10, "trailing")
    x_T = randn(shape, generator=torch.Generator().manual_seed(args.seed), device="cpu")
    z_abl = dpmpp_2m_ablation(guided, x_T.clone(), sigmas, extra_args=cond)
    check = float((latents["dpmpp_2m 10 trailing w=5"] - z_abl).abs().max())  # section 1's library run
    print(f"  check: the ablation with nothing off vs sample_dpmpp_2m, max |difference| = {check:.2e}")
    n_corr = len(sigmas) - 3  # steps 1 .. len-3 carry a correction (step 0 has no history, the last lands on x0)
    every, half = tuple(range(1, n_corr + 1)), n_corr // 2
    variants = {f"off on step {i}": (i,) for i in every}
    variants |= {f"off on steps 1-{half}": every[:half], f"off on steps {half + 1}-{n_corr}": every[half:],
                 "off on every step (= ddim)": every}
    ablation = {"none off (= dpmpp_2m)": score(z_abl)}
    print(f"  {'none off (= dpmpp_2m)':<32} {ablation['none off (= dpmpp_2m)']:.3f}")
    for name, off in variants.items():
        ablation[name] = score(dpmpp_2m_ablation(guided, x_T.clone(), sigmas, first_order=off, extra_args=cond))
        print(f"  {name:<32} {ablation[name]:.3f}")

    print(f"\n3. per step, relative change of x0_hat from the previous level (mean over {args.n_trace} prompts)")
    trace = {}
    sub = slice(0, args.n_trace)
    for w in (1.0, 5.0):
        g_w, c_w = guided_text_denoiser(pipe.denoiser, pipe.tokenizer, prompts[sub], guidance=w)
        for name, off in (("ddim", every), ("dpmpp_2m", ())):
            steps = []  # the callback's dict of every step
            dpmpp_2m_ablation(g_w, x_T[sub].clone(), sigmas, first_order=off, extra_args=c_w, callback=steps.append)
            x0s = [d["x0_hat"] for d in steps]
            change = [float((per_image_norm(x0s[i] - x0s[i - 1]) / per_image_norm(x0s[i])).mean())
                      for i in range(1, len(x0s))]
            corr = [float((per_image_norm(d["correction"]) / per_image_norm(d["x0_hat"])).mean())
                    for d in steps if d["correction"] is not None]
            # change[k] and corr[k] both belong to step i = k + 1 (step 0 has no previous x0_hat)
            trace[f"{name} w={w:g}"] = {"steps": list(range(1, len(change) + 1)),
                                         "x0_change": [round(c, 3) for c in change],
                                         "correction": [round(c, 3) for c in corr] if name == "dpmpp_2m" else None}
            print(f"  {name:<8} w={w:g}  x0 change  " + " ".join(f"{c:.3f}" for c in change))
            if name == "dpmpp_2m":
                print(f"  {'':<8}      correction " + " ".join(f"{c:.3f}" for c in corr))
    wall = round(time.perf_counter() - t0, 1)
    print(f"\nwall time {wall} s")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({
            "model": args.model, "n": args.n, "seed": args.seed, "objects": args.objects,
            "prompts": f"{args.objects} object(s), seen pairs, seed 100",
            "all_correct": table, "ablation_dpmpp_2m_10_w5": ablation, "ablation_check_max_abs_diff": check,
            "trace": trace, "wall_s": wall}, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
