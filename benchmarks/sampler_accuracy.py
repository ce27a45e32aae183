"""Sampler accuracy: minidiff vs diffusers on the same work, against closed forms.

For each sampler and NFE (denoiser calls) in {5, 10, 20, 50, 100}, both libraries run with the same linear
schedule (T = 1000, "trailing" timesteps), the same exact denoiser (minidiff.toy; diffusers sees it as an
eps-model), the same start noise and, for stochastic samplers, the same generator seed. Two errors:

- ode: RMS distance to the exact PF-ODE endpoint of a single 2-D Gaussian from the same start noise
  (deterministic samplers only; gaussian_pf_ode_endpoint is exact);
- sw:  sliced Wasserstein distance to a fresh data sample of a 2-D Gaussian mixture (all samplers); its
  sampling-noise floor (independent data samples of the same size) is printed.

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sampler_accuracy.py
"""
from __future__ import annotations

import argparse
import math
import time

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
)

from minidiff import schedules as S
from minidiff.samplers import SAMPLERS
from minidiff.toy import GaussianMixture, gaussian_pf_ode_endpoint, sliced_wasserstein

T = 1000
BETAS = S.linear_betas(T).tolist()
MIXTURE = GaussianMixture([[-1.5, 0.0], [1.0, 1.0], [0.5, -1.5]], [0.3, 0.5, 0.2], [0.5, 0.3, 0.2])
MEAN, STD = torch.tensor([0.5, -1.0]), torch.tensor([0.3, 1.2])
GAUSSIAN = GaussianMixture.gaussian(MEAN, STD)
# name: (diffusers class, config, carries the VE sample x / a, deterministic)
SETUPS = {
    "ddpm": (DDPMScheduler, {"clip_sample": False}, False, False),
    "ddim": (DDIMScheduler, {"clip_sample": False, "set_alpha_to_one": True}, False, True),
    "euler": (EulerDiscreteScheduler, {}, True, True),
    "euler_ancestral": (EulerAncestralDiscreteScheduler, {}, True, False),
    "heun": (HeunDiscreteScheduler, {}, True, True),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                               "final_sigmas_type": "zero"}, False, True),
}


def steps_for_nfe(name: str, nfe: int) -> int:
    return (nfe + 1) // 2 if name == "heun" else nfe  # Heun: 2n - 1 calls for n steps


def make_scheduler(name: str, steps: int):
    cls, config, _, _ = SETUPS[name]
    sched = cls(num_train_timesteps=T, trained_betas=BETAS, timestep_spacing="trailing", **config)
    sched.set_timesteps(steps)
    ts = torch.unique_consecutive(sched.timesteps.round().long())
    return sched, S.sigmas_for_timesteps(sched.alphas_cumprod.double(), ts)


def run_diffusers(name, steps, gm, x, seed):
    """diffusers' loop (a fresh scheduler) with an eps-model made from the exact denoiser; the final VP sample."""
    sched, sigmas = make_scheduler(name, steps)
    table = S.sigmas_from_alphas_cumprod(sched.alphas_cumprod.double())
    ve, kw = SETUPS[name][2], ({} if SETUPS[name][3] else {"generator": torch.Generator().manual_seed(seed)})
    sample = x / S.vp_coefficients(sigmas[0])[0].item() if ve else x.clone()
    for t in sched.timesteps:
        x_in, sigma = sched.scale_model_input(sample, t).double(), table[int(round(float(t)))]
        a, b = S.vp_coefficients(sigma)
        eps = ((x_in - a * gm.denoiser(x_in, sigma.expand(len(x_in)))) / b).float()
        sample = sched.step(eps, t, sample, **kw).prev_sample
    return sample


def run_minidiff(name, sigmas, gm, x, seed):
    return SAMPLERS[name](gm.denoiser, x, sigmas, generator=torch.Generator().manual_seed(seed))


def errors(name, steps, x_ode, x_sw, ref):
    """{library: (ode error or None, sw error)} for one sampler and step count."""
    _, sigmas = make_scheduler(name, steps)
    exact = gaussian_pf_ode_endpoint(x_ode.double(), sigmas[0], 0.0, mean=MEAN, std=STD)
    runs = {"minidiff": lambda gm, x: run_minidiff(name, sigmas, gm, x, 11),
            "diffusers": lambda gm, x: run_diffusers(name, steps, gm, x, 11)}
    out = {}
    for lib, run in runs.items():
        ode = float((run(GAUSSIAN, x_ode).double() - exact).pow(2).mean().sqrt()) if SETUPS[name][3] else None
        sw = float(sliced_wasserstein(run(MIXTURE, x_sw), ref, generator=torch.Generator().manual_seed(0)))
        out[lib] = (ode, sw)
    return out


def fmt(v):
    return "      -" if v is None else f"{v:8.2e}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4000, help="samples for the distribution error")
    parser.add_argument("--nfes", type=int, nargs="+", default=[5, 10, 20, 50, 100])
    args = parser.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    ref = MIXTURE.sample(20000, generator=g)
    floors = torch.tensor([float(sliced_wasserstein(MIXTURE.sample(args.n, generator=g), ref,
                                                    generator=torch.Generator().manual_seed(0))) for _ in range(5)])
    x_ode, x_sw = torch.randn(2000, 2, generator=g), torch.randn(args.n, 2, generator=g)
    print(f"sw noise floor (n={args.n} data points vs the reference): {floors.mean():.2e} +- {floors.std():.1e}")
    print(f"{'sampler':16s}{'NFE':>5s}{'steps':>6s} | {'ode mini':>9s}{'ode diff':>9s}{'ratio':>7s} | "
          f"{'sw mini':>9s}{'sw diff':>9s}{'ratio':>7s}")
    results, start = {}, time.time()
    for name in SETUPS:
        for nfe in args.nfes:
            steps = steps_for_nfe(name, nfe)
            e = errors(name, steps, x_ode, x_sw, ref)
            results[name, nfe] = e
            (om, sm), (od, sd) = e["minidiff"], e["diffusers"]
            ratio_ode = "      -" if om is None else f"{om / od:7.4f}"
            real_nfe = 2 * steps - 1 if name == "heun" else steps
            print(f"{name:16s}{real_nfe:5d}{steps:6d} | {fmt(om)} {fmt(od)}{ratio_ode} | {sm:8.2e} {sd:8.2e}{sm / sd:7.4f}")
    print("\n1000-step reference (minidiff; Heun 500 steps = 999 NFE):")
    ref_err = {}
    for name in SETUPS:
        steps = 500 if name == "heun" else 1000
        _, sigmas = make_scheduler(name, steps)
        exact = gaussian_pf_ode_endpoint(x_ode.double(), sigmas[0], 0.0, mean=MEAN, std=STD)
        ode = float((run_minidiff(name, sigmas, GAUSSIAN, x_ode, 11).double() - exact).pow(2).mean().sqrt()) \
            if SETUPS[name][3] else None
        sw = float(sliced_wasserstein(run_minidiff(name, sigmas, MIXTURE, x_sw, 11), ref,
                                      generator=torch.Generator().manual_seed(0)))
        ref_err[name] = (ode, sw)
        print(f"{name:16s} ode {fmt(ode)}  sw {sw:8.2e}")
    if 10 in args.nfes:
        (ode10, sw10), (ode_ref, sw_ref) = results["dpmpp_2m", 10]["minidiff"], ref_err["dpmpp_2m"]
        print(f"\nDPM-Solver++ 2M at 10 NFE vs its 1000-step error: sw {sw10:.2e} vs {sw_ref:.2e} "
              f"-> within 2x: {sw10 <= 2 * sw_ref}; ode {ode10:.2e} vs {ode_ref:.2e} -> within 2x: {ode10 <= 2 * ode_ref}")
        karras_at_10(x_sw, ref, sw_ref)
    print(f"(took {time.time() - start:.0f} s)")


def karras_at_10(x_sw, ref, sw_ref):
    """The same 10-NFE check with Karras sigmas (rho = 7) over the schedule's range, minidiff and diffusers."""
    sigmas = S.sampling_sigmas(S.alphas_cumprod_from_betas(torch.tensor(BETAS, dtype=torch.float64)), 10, "karras", sigma_max=math.inf)
    sw = float(sliced_wasserstein(run_minidiff("dpmpp_2m", sigmas, MIXTURE, x_sw, 11), ref,
                                  generator=torch.Generator().manual_seed(0)))
    print(f"DPM-Solver++ 2M at 10 NFE with Karras sigmas: sw {sw:.2e} vs {sw_ref:.2e} -> within 2x: {sw <= 2 * sw_ref}")


if __name__ == "__main__":
    main()
