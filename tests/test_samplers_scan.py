"""No combination the library offers blows up: every sampler x schedule x spacing x step count, on the analytic oracle.

For data N(mean, diag(std^2)) the exact denoiser and the exact probability-flow ODE endpoint are known
(minidiff.toy). The yardstick is the trivial answer "return the data mean":

- deterministic samplers: RMS distance to the exact ODE endpoint of the same starting noise, against the
  same distance for the mean;
- every sampler: the 2-Wasserstein distance between the output's per-dimension Gaussian fit and the data
  (sqrt(sum (m - mean)^2 + (s - std)^2)), against the mean's (which is sqrt(sum std^2)).

A cell fails if it raises, returns NaN/inf, or is worse than 10x the mean's error.
"""

import pytest
import torch

from minidiff import schedules as S
from minidiff.samplers import SAMPLERS
from minidiff.toy import GaussianMixture, gaussian_pf_ode_endpoint

F64 = torch.float64
MEAN = torch.tensor([0.5, -1.0, 0.0, 2.0], dtype=F64)
STD = torch.tensor([0.2, 0.5, 1.0, 1.5], dtype=F64)
DETERMINISTIC = ("ddim", "euler", "heun", "dpmpp_2m")
STEPS = (1, 2, 3, 5, 7, 10, 50, 999, 1000)
LIMIT = 10.0


def _schedules():
    T = 1000
    return {
        "linear": S.alphas_cumprod_from_betas(S.linear_betas(T)),
        "cosine": S.alphas_cumprod_from_betas(S.cosine_betas(T)),
        "scaled_linear": S.alphas_cumprod_from_betas(S.scaled_linear_betas(T)),
        "zero_snr": S.alphas_cumprod_from_betas(S.rescale_zero_terminal_snr(S.linear_betas(T))),
    }


SCHEDULES = _schedules()


def _w2_gauss(out: torch.Tensor) -> float:
    """2-Wasserstein distance between the per-dimension Gaussian fit of ``out`` and the data."""
    m, s = out.mean(0), out.std(0, correction=0)
    return float(((m - MEAN) ** 2 + (s - STD) ** 2).sum().sqrt())


def _scan_cell(name: str, ab: torch.Tensor, spacing: str, n: int, fn=None) -> list[str]:
    """Problems of one (sampler, schedule, spacing, n) cell; empty when it is sane."""
    sigmas = S.sampling_sigmas(ab, n, spacing)
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(512, 4, generator=gen, dtype=F64)
    denoiser = GaussianMixture.gaussian(MEAN, STD).denoiser
    out = (fn or SAMPLERS[name])(denoiser, x, sigmas, generator=gen)
    if not torch.isfinite(out).all():
        return ["non-finite output"]
    problems = []
    w2, w2_mean = _w2_gauss(out), float(STD.pow(2).sum().sqrt())
    if w2 > LIMIT * w2_mean:
        problems.append(f"W2 {w2:.3g} > {LIMIT} x the mean's {w2_mean:.3g}")
    if name in DETERMINISTIC:
        exact = gaussian_pf_ode_endpoint(x, sigmas[0], 0.0, mean=MEAN, std=STD)
        err = float((out - exact).pow(2).mean().sqrt())
        err_mean = float((MEAN - exact).pow(2).mean().sqrt())
        if err > LIMIT * err_mean:
            problems.append(f"ODE endpoint error {err:.3g} > {LIMIT} x the mean's {err_mean:.3g}")
    return problems


@pytest.mark.slow
@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_spacing_and_step_count_is_sane(name, schedule):
    bad = {}
    for spacing in S.SAMPLING_SPACINGS:
        for n in STEPS:
            try:
                problems = _scan_cell(name, SCHEDULES[schedule], spacing, n)
            except Exception as err:  # the test reports every failing cell, not just the first
                problems = [f"raised {type(err).__name__}: {err}"]
            if problems:
                bad[(spacing, n)] = problems
    assert not bad, f"{name} on {schedule}: {len(bad)} bad cells: {bad}"


def test_yardstick_catches_a_broken_sampler():
    """The scan can fail: a sampler that skips the last step's denoising keeps noise of size sigma_1."""
    def broken(denoiser, x, sigmas, **kw):
        return SAMPLERS["euler"](denoiser, x, sigmas[:-1].clone(), **kw) if len(sigmas) > 2 else x * 50
    problems = _scan_cell("euler", SCHEDULES["cosine"], "trailing", 1, fn=broken)
    assert any("ODE endpoint" in p for p in problems) and any("W2" in p for p in problems), problems
    assert _scan_cell("euler", SCHEDULES["cosine"], "trailing", 10) == []
