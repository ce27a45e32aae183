"""Schedules against closed forms and against diffusers (used only as an oracle)."""
import math

import numpy as np
import pytest
import torch

from minidiff import schedules as S

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DDPMScheduler  # noqa: E402
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as hf_rescale  # noqa: E402

F64 = torch.float64
INF = float("inf")


# ----------------------------------------------------------------------------- betas
def test_linear_betas_endpoints_and_dtype():
    b = S.linear_betas(1000, 1e-4, 0.02)
    assert b.dtype == F64 and b.shape == (1000,)
    assert b[0].item() == pytest.approx(1e-4, abs=1e-15)
    assert b[-1].item() == pytest.approx(0.02, abs=1e-15)
    assert torch.all(b[1:] > b[:-1])


def test_scaled_linear_is_linear_in_sqrt_beta():
    b = S.scaled_linear_betas(1000)
    d = torch.diff(b.sqrt())
    assert torch.allclose(d, d[0].expand_as(d), rtol=1e-9, atol=0)
    assert b[0].item() == pytest.approx(0.00085, rel=1e-12)
    assert b[-1].item() == pytest.approx(0.012, rel=1e-12)


def test_cosine_alpha_bar_matches_closed_form_where_beta_not_clipped():
    T, s = 1000, 0.008
    b = S.cosine_betas(T, s=s, max_beta=0.999)
    ab = S.alphas_cumprod_from_betas(b)
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    clipped = b >= 0.999
    assert clipped.sum() == 1 and clipped[-1]  # only the last step hits the cap for T=1000
    expected = torch.tensor([f(t + 1) / f(0) for t in range(T)], dtype=F64)
    assert torch.allclose(ab[:-1], expected[:-1], rtol=1e-10, atol=1e-15)
    assert b.max().item() == 0.999


@pytest.mark.parametrize("name, hf_name", [("linear", "linear"), ("scaled_linear", "scaled_linear"),
                                           ("cosine", "squaredcos_cap_v2"), ("sigmoid", "sigmoid")])
def test_betas_match_diffusers(name, hf_name):
    ours = S.make_betas(name, 1000)
    start, end = (0.00085, 0.012) if name == "scaled_linear" else (1e-4, 0.02)  # our defaults for each schedule
    hf = DDPMScheduler(num_train_timesteps=1000, beta_schedule=hf_name, beta_start=start, beta_end=end).betas.double()
    assert torch.allclose(ours, hf, rtol=1e-5, atol=1e-7)  # diffusers tables are float32


def test_make_betas_unknown_name_lists_known():
    with pytest.raises(KeyError, match="known schedules.*cosine"):
        S.make_betas("cosin")


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_T_is_named(bad):
    with pytest.raises(ValueError, match="T must be"):
        S.linear_betas(bad)


def test_bad_beta_range_is_named():
    with pytest.raises(ValueError, match="beta_start"):
        S.linear_betas(10, beta_start=0.0)
    with pytest.raises(ValueError, match="max_beta"):
        S.cosine_betas(10, max_beta=1.5)


# ----------------------------------------------------------------------------- conversions
def test_betas_alphas_cumprod_round_trip():
    for name in S.SCHEDULES:
        b = S.make_betas(name, 1000)
        b2 = S.betas_from_alphas_cumprod(S.alphas_cumprod_from_betas(b))
        assert torch.allclose(b, b2, rtol=1e-8, atol=1e-12), name


def test_zero_terminal_snr_alg1():
    b = S.scaled_linear_betas(1000)
    ab = S.alphas_cumprod_from_betas(b)
    bz = S.rescale_zero_terminal_snr(b)
    abz = S.alphas_cumprod_from_betas(bz)
    assert abz[-1].item() == 0.0 and bz[-1].item() == 1.0
    assert abz[0].sqrt().item() == pytest.approx(ab[0].sqrt().item(), rel=1e-12)
    assert torch.all(abz[1:] < abz[:-1])
    assert torch.allclose(bz, hf_rescale(b.clone()), rtol=1e-9, atol=1e-12)


def test_sigma_round_trip_and_inf():
    abz = S.alphas_cumprod_from_betas(S.rescale_zero_terminal_snr(S.linear_betas()))
    sig = S.sigmas_from_alphas_cumprod(abz)
    assert sig.dtype == F64 and sig[-1].item() == INF and torch.isfinite(sig[:-1]).all()
    assert torch.all(sig[1:] > sig[:-1])
    back = S.alphas_cumprod_from_sigmas(sig)
    assert back[-1].item() == 0.0
    assert torch.allclose(back, abz, rtol=1e-12, atol=1e-15)


def test_snr_is_inverse_sigma_squared_and_log_snr():
    ab = S.alphas_cumprod_from_betas(S.cosine_betas())
    sig = S.sigmas_from_alphas_cumprod(ab)
    assert torch.allclose(S.snr(ab), sig**-2, rtol=1e-10)
    assert torch.allclose(S.log_snr(ab), -2 * sig.log(), rtol=1e-10, atol=1e-10)
    abz = torch.tensor([0.9, 0.5, 0.0], dtype=F64)
    assert S.log_snr(abz)[-1].item() == -INF and S.snr(abz)[-1].item() == 0.0


def test_vp_coefficients_unit_norm_and_finite_at_extremes():
    sigma = torch.tensor([0.0, 1e-8, 1e-3, 1.0, 1e3, 1e8, INF], dtype=F64)
    a, b = S.vp_coefficients(sigma)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert torch.allclose(a**2 + b**2, torch.ones_like(a), rtol=1e-12)
    assert (a[0], b[0], a[-1], b[-1]) == (1.0, 0.0, 0.0, 1.0)
    assert torch.allclose((b / a)[:-1], sigma[:-1], rtol=1e-10)  # sigma = b / a
    a32, _ = S.vp_coefficients(sigma.float())
    assert a32.dtype == torch.float32


def test_vp_coefficients_rejects_negative_sigma():
    with pytest.raises(ValueError, match="sigma must be >= 0"):
        S.vp_coefficients(torch.tensor([-1.0]))


# ----------------------------------------------------------------------------- Karras sigmas
@pytest.mark.parametrize("n", [1, 2, 10, 50])
def test_karras_sigmas_endpoints_and_monotone(n):
    s = S.karras_sigmas(n, 0.002, 80.0, rho=7.0)
    assert s.shape == (n + 1,) and s.dtype == F64 and s[-1].item() == 0.0
    assert s[0].item() == pytest.approx(80.0, rel=1e-12)
    if n > 1:
        assert s[n - 1].item() == pytest.approx(0.002, rel=1e-12)
    assert torch.all(s[1:] < s[:-1])


def test_karras_sigmas_uniform_in_sigma_pow_inv_rho():
    s = S.karras_sigmas(20, 0.01, 50.0, rho=7.0)[:-1]
    d = torch.diff(s ** (1 / 7))
    assert torch.allclose(d, d[0].expand_as(d), rtol=1e-9)


def test_karras_sigmas_rejects_bad_range():
    with pytest.raises(ValueError, match="sigma_min"):
        S.karras_sigmas(10, 0.0, 80.0)
    with pytest.raises(ValueError, match="sigma_max"):
        S.karras_sigmas(10, 0.1, INF)
    with pytest.raises(ValueError, match="n must be"):
        S.karras_sigmas(0, 0.1, 1.0)


# ----------------------------------------------------------------------------- timesteps
CASES = [(1000, 1), (1000, 3), (1000, 10), (1000, 50), (1000, 999), (1000, 1000), (100, 7), (50, 49)]


@pytest.mark.parametrize("T, n", CASES)
@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("Scheduler", [DDIMScheduler, DDPMScheduler])
def test_timesteps_match_diffusers(T, n, spacing, Scheduler):
    hf = Scheduler(num_train_timesteps=T, timestep_spacing=spacing)
    hf.set_timesteps(n)
    ours = S.timesteps(T, n, spacing)
    assert ours.dtype == torch.int64 and ours.shape == (n,)
    assert torch.all(ours[1:] < ours[:-1]) and ours.min() >= 0 and ours.max() <= T - 1
    assert ours.tolist() == hf.timesteps.tolist()


def test_timesteps_leading_steps_offset_matches_diffusers():
    hf = DDIMScheduler(num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading")
    hf.set_timesteps(50)
    assert S.timesteps(1000, 50, "leading", steps_offset=1).tolist() == hf.timesteps.tolist()


def test_timesteps_trailing_where_diffusers_returns_n_plus_1():
    # diffusers' float arange yields 62 entries for n=61, the last being -1; ours are its first 61.
    hf = DDIMScheduler(num_train_timesteps=1000, timestep_spacing="trailing")
    hf.set_timesteps(61)
    assert len(hf.timesteps) == 62 and hf.timesteps[-1].item() == -1
    assert S.timesteps(1000, 61, "trailing").tolist() == hf.timesteps[:61].tolist()


def test_timesteps_bad_arguments():
    with pytest.raises(ValueError, match=r"n \(number of sampling steps\).*got 0"):
        S.timesteps(1000, 0)
    with pytest.raises(ValueError, match=r"1 <= n <= T=1000, got 1001"):
        S.timesteps(1000, 1001)
    with pytest.raises(ValueError, match="spacing must be one of .*'leading'.*got 'uniform'"):
        S.timesteps(1000, 10, "uniform")
    with pytest.raises(ValueError, match="steps_offset"):
        S.timesteps(1000, 10, "trailing", steps_offset=1)
    with pytest.raises(ValueError, match="steps_offset"):
        S.timesteps(10, 10, "leading", steps_offset=1)  # 9 + 1 = 10 is outside [0, 9]


@pytest.mark.parametrize("spacing", S.SPACINGS)
def test_sigmas_for_timesteps_previous_step_comes_from_list(spacing):
    ab = S.alphas_cumprod_from_betas(S.linear_betas())
    table = S.sigmas_from_alphas_cumprod(ab)
    ts = S.timesteps(1000, 7, spacing)
    sig = S.sigmas_for_timesteps(ab, ts)
    assert sig.shape == (8,) and sig.dtype == F64 and sig[-1].item() == 0.0
    assert torch.equal(sig[:-1], table[ts])  # so sig[i + 1] is the sigma of ts[i + 1], never of ts[i] - T // n


def test_sigmas_for_timesteps_rejects_bad_timesteps():
    ab = S.alphas_cumprod_from_betas(S.linear_betas(10))
    with pytest.raises(ValueError, match="strictly descending"):
        S.sigmas_for_timesteps(ab, torch.tensor([1, 5]))
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 9\]"):
        S.sigmas_for_timesteps(ab, torch.tensor([10, 5]))


# ----------------------------------------------------------------------------- sigma_to_t
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sigma_to_t_exact_on_grid(dtype):
    ab = S.alphas_cumprod_from_betas(S.cosine_betas())
    t = S.sigma_to_t(S.sigmas_from_alphas_cumprod(ab).to(dtype), ab)
    assert t.dtype == dtype
    assert torch.equal(t, torch.arange(1000, dtype=dtype))


def test_sigma_to_t_monotone_and_linear_in_log_sigma():
    ab = S.alphas_cumprod_from_betas(S.linear_betas())
    table = S.sigmas_from_alphas_cumprod(ab)
    dense = torch.logspace(math.log10(table[0]), math.log10(table[-1]), 5000, dtype=F64)
    t = S.sigma_to_t(dense, ab)
    assert torch.all(t[1:] >= t[:-1]) and t[0] == 0 and t[-1] == 999
    mid = ((table[10].log() + table[11].log()) / 2).exp()
    assert S.sigma_to_t(mid, ab).item() == pytest.approx(10.5, abs=1e-9)


def test_sigma_to_t_clamps_and_handles_inf():
    abz = S.alphas_cumprod_from_betas(S.rescale_zero_terminal_snr(S.linear_betas()))
    table = S.sigmas_from_alphas_cumprod(abz)
    got = S.sigma_to_t(torch.tensor([0.0, table[0] / 10, INF, 1e12], dtype=F64), abz)
    assert got.tolist() == [0.0, 0.0, 999.0, 998.0]  # finite sigma above the last finite entry clamps to it
    ab = S.alphas_cumprod_from_betas(S.linear_betas())
    assert S.sigma_to_t(torch.tensor([1e12, INF]), ab).tolist() == [999.0, 999.0]


# ----------------------------------------------------------------------------- sampling_sigmas
def test_sampling_sigmas_plain_and_karras():
    abz = S.alphas_cumprod_from_betas(S.rescale_zero_terminal_snr(S.scaled_linear_betas()))
    plain = S.sampling_sigmas(abz, 10, "trailing")
    assert torch.equal(plain, S.sigmas_for_timesteps(abz, S.timesteps(1000, 10, "trailing")))
    assert plain[0].item() == INF and plain[-1].item() == 0.0
    k = S.sampling_sigmas(abz, 10, "karras", sigma_max=math.inf)
    finite = S.sigmas_from_alphas_cumprod(abz)[:-1]
    assert k.shape == (11,) and k[-1] == 0.0
    assert k[0].item() == pytest.approx(finite.max().item(), rel=1e-12)
    assert k[-2].item() == pytest.approx(finite.min().item(), rel=1e-12)
    assert np.all(np.diff(k.numpy()) < 0)


def test_sampling_sigmas_karras_caps_sigma_max_at_edm_80():
    ab = S.alphas_cumprod_from_betas(S.cosine_betas(1000))
    table = S.sigmas_from_alphas_cumprod(ab)
    assert table.max() > 1e4  # the cosine table goes far beyond EDM's range
    s = S.sampling_sigmas(ab, 10, "karras")
    assert s.shape == (11,) and s[-1] == 0
    assert s[0].item() == pytest.approx(80.0) and s[-2].item() == pytest.approx(table.min().item())
    assert torch.all(s[1:] < s[:-1])
    # a table that never reaches 80 keeps its own maximum
    lin = S.alphas_cumprod_from_betas(S.linear_betas(1000, 1e-4, 0.002))
    assert S.sampling_sigmas(lin, 5, "karras")[0].item() == pytest.approx(
        S.sigmas_from_alphas_cumprod(lin).max().item())


@pytest.mark.parametrize("spacing", S.SPACINGS)
def test_sampling_sigmas_spacings_are_the_table_at_timesteps(spacing):
    ab = S.alphas_cumprod_from_betas(S.cosine_betas(1000))
    want = S.sigmas_for_timesteps(ab, S.timesteps(1000, 7, spacing))
    assert torch.equal(S.sampling_sigmas(ab, 7, spacing), want)


def test_sampling_sigmas_default_is_trailing_and_karras_is_capped():
    ab = S.alphas_cumprod_from_betas(S.cosine_betas(1000))
    assert torch.equal(S.sampling_sigmas(ab, 10), S.sampling_sigmas(ab, 10, "trailing"))
    assert S.sampling_sigmas(ab, 10)[0] == S.sigmas_from_alphas_cumprod(ab)[-1]  # starts at t = T - 1
    assert S.sampling_sigmas(ab, 10, "karras")[0].item() == pytest.approx(S.EDM_SIGMA_MAX)
    with pytest.raises(ValueError, match="spacing must be one of"):
        S.sampling_sigmas(ab, 10, "karas")


def test_sampling_sigmas_unknown_spacing_names_the_choices():
    ab = S.alphas_cumprod_from_betas(S.cosine_betas(1000))
    with pytest.raises(ValueError, match="spacing must be one of .*karras.*got 'edm'"):
        S.sampling_sigmas(ab, 5, "edm")
