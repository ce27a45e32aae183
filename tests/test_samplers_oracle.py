"""Samplers against closed forms: the exact Gaussian-mixture denoiser (minidiff.toy) needs no network.

1. Each sampler's output distribution approaches the data as steps grow, judged against the sampling
   noise of the metric itself (sliced Wasserstein between two independent data samples of the same size).
2. For a single Gaussian the PF-ODE endpoint is exact, so deterministic samplers show their order.
3. No NaN for any number of steps 1..T on every schedule, zero terminal SNR included.
"""
import math

import pytest
import torch

from minidiff import schedules as S
from minidiff.samplers import SAMPLERS, sample_ddim, sample_ddpm, sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_euler
from minidiff.toy import GaussianMixture, gaussian_pf_ode_endpoint, sliced_wasserstein

F64 = torch.float64
LINEAR_AC = S.alphas_cumprod_from_betas(S.linear_betas(1000))


def _mixture():
    return GaussianMixture([[-1.5, 0.0], [1.0, 1.0], [0.5, -1.5]], [0.3, 0.5, 0.2], [0.5, 0.3, 0.2])


def _sw(u, ref):
    return float(sliced_wasserstein(u, ref, n_projections=32, generator=torch.Generator().manual_seed(123)))


# ----------------------------------------------------------------------------- 1. distribution
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_output_distribution_approaches_data(name, gen):
    gm, n = _mixture(), 2000
    ref = gm.sample(8000, generator=gen, dtype=F64)
    # the metric's own noise at this sample size: independent data samples vs the same reference
    floor = max(_sw(gm.sample(n, generator=gen, dtype=F64), ref) for _ in range(3))
    err = {}
    for steps in (2, 100):
        sigmas = S.sampling_sigmas(LINEAR_AC, steps, "trailing")
        x = torch.randn(n, 2, generator=gen, dtype=F64)
        err[steps] = _sw(SAMPLERS[name](gm.denoiser, x, sigmas, generator=gen), ref)
    assert err[100] < 2.0 * floor, f"{name}: 100 steps err {err[100]:.4f} vs noise floor {floor:.4f}"
    assert err[2] > 3.0 * err[100], f"{name}: error should shrink with steps, {err}"


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_mean_and_cov_match_mixture(name, gen):
    gm, n = _mixture(), 3000
    sigmas = S.sampling_sigmas(LINEAR_AC, 50, "trailing")
    out = SAMPLERS[name](gm.denoiser, torch.randn(n, 2, generator=gen, dtype=F64), sigmas, generator=gen)
    # standard error of a mean is sqrt(var / n); allow 4 of them per coordinate
    se = (gm.cov().diag() / n).sqrt()
    assert ((out.mean(0) - gm.mean()).abs() < 4 * se).all()
    # relative error of a variance estimate ~ sqrt(2 / n) for Gaussian data; mixtures are heavier, allow 6x
    rel = (torch.cov(out.T) - gm.cov()).abs().max() / gm.cov().abs().max()
    assert rel < 6 * math.sqrt(2 / n)


# ----------------------------------------------------------------------------- 2. order of accuracy
MEAN = torch.tensor([0.5, -1.0, 0.0, 2.0], dtype=F64)
STD = torch.tensor([0.2, 0.5, 1.0, 1.5], dtype=F64)


def _ode_error(fn, steps, x):
    """RMS distance to the exact PF-ODE endpoint for a single Gaussian, on Karras sigmas."""
    sigmas = S.karras_sigmas(steps, 1e-3, 80.0)
    exact = gaussian_pf_ode_endpoint(x, sigmas[0], 0.0, mean=MEAN, std=STD)
    out = fn(GaussianMixture.gaussian(MEAN, STD).denoiser, x, sigmas)
    return float((out - exact).pow(2).mean().sqrt())


@pytest.mark.parametrize("name, order", [("euler", 1), ("ddim", 1), ("heun", 2), ("dpmpp_2m", 2)])
def test_deterministic_samplers_converge_with_expected_order(name, order, gen):
    x = torch.randn(64, 4, generator=gen, dtype=F64)
    steps = [16, 32, 64, 128]
    errs = [_ode_error(SAMPLERS[name], n, x) for n in steps]
    logn, loge = torch.tensor(steps, dtype=F64).log(), torch.tensor(errs, dtype=F64).log()
    slope = float(((logn - logn.mean()) * (loge - loge.mean())).sum() / ((logn - logn.mean()) ** 2).sum())
    assert -order - 0.3 < slope < -order + 0.25, f"{name}: slope {slope:.2f}, errors {errs}"
    assert errs[-1] < 0.02


def test_second_order_samplers_beat_euler_at_equal_nfe(gen):
    x = torch.randn(64, 4, generator=gen, dtype=F64)
    # in the asymptotic regime (at ~10 calls Heun on sigma_max = 80 is not yet there)
    heun = _ode_error(SAMPLERS["heun"], 32, x)  # 2 * 32 - 1 = 63 denoiser calls
    euler = _ode_error(SAMPLERS["euler"], 63, x)
    dpm = _ode_error(SAMPLERS["dpmpp_2m"], 63, x)
    assert heun < euler / 2 and dpm < euler / 2, (heun, dpm, euler)


# ----------------------------------------------------------------------------- identities between samplers
def test_ddim_eta1_is_ddpm_fixed_small_and_euler_is_ddim_eta0(gen):
    gm, x = _mixture(), torch.randn(16, 2, generator=gen, dtype=F64)
    sigmas = S.sampling_sigmas(LINEAR_AC, 12, "leading")
    ddpm = sample_ddpm(gm.denoiser, x, sigmas, generator=torch.Generator().manual_seed(5))
    ddim1 = sample_ddim(gm.denoiser, x, sigmas, eta=1.0, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(ddim1, ddpm, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sample_euler(gm.denoiser, x, sigmas), sample_ddim(gm.denoiser, x, sigmas),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sample_dpmpp_2m_sde(gm.denoiser, x, sigmas, eta=0.0),
                               sample_dpmpp_2m(gm.denoiser, x, sigmas), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- 3. never NaN
def _schedule_sigmas(kind, T, n):
    if kind == "cosine_karras":
        return S.sampling_sigmas(S.alphas_cumprod_from_betas(S.cosine_betas(T)), n, "karras", sigma_max=math.inf)
    if kind.startswith("zero_snr"):
        ac = S.alphas_cumprod_from_betas(S.rescale_zero_terminal_snr(S.linear_betas(T)))
        return S.sampling_sigmas(ac, n, kind.split("_")[-1])
    betas = S.linear_betas(T) if kind == "linear" else S.cosine_betas(T)
    return S.sampling_sigmas(S.alphas_cumprod_from_betas(betas), n, "leading")


KINDS = ["linear", "cosine", "zero_snr_trailing", "zero_snr_leading", "cosine_karras"]


def _run_all(denoiser, x, sigmas, gen, where):
    for name, fn in SAMPLERS.items():
        out = fn(denoiser, x, sigmas, generator=gen)
        assert torch.isfinite(out).all(), f"{name} gave non-finite output, {where}"


@pytest.mark.parametrize("kind", KINDS)
def test_no_nan_for_every_step_count_small_T(kind, gen):
    """Every n in 1..T for T = 24, with the exact mixture denoiser (finite at sigma = inf)."""
    gm, x, T = _mixture(), torch.randn(3, 2, generator=gen), 24
    for n in range(1, T + 1):
        sigmas = _schedule_sigmas(kind, T, n)
        if kind.startswith("zero_snr") and n == T:
            assert math.isinf(sigmas[0])  # the case this test is for
        _run_all(gm.denoiser, x, sigmas, gen, f"{kind}, T={T}, n={n}")


@pytest.mark.parametrize("kind", KINDS)
def test_no_nan_extremes_T1000(kind, gen):
    """T = 1000: the extremes and a spread of n. A cheap bounded denoiser keeps this fast; NaN would come
    from the samplers' coefficients (inf sigma, sigma_next = 0, tiny steps), not from the denoiser."""
    x = torch.randn(3, 2, generator=gen)
    for n in [1, 2, 3, 7, 50, 333, 999, 1000]:
        sigmas = _schedule_sigmas(kind, 1000, n)
        _run_all(lambda x, sigma: torch.tanh(x), x, sigmas, gen, f"{kind}, T=1000, n={n}")
