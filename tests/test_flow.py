"""Flow matching: the straight-path table, the 'flow' row of the parameterization table, its loss, and the claim
that an Euler step of the flow ODE is a DDIM step (and a VE Euler step)."""
import math

import pytest
import torch
from torch import nn

from minidiff import flow, schedules as S
from minidiff.denoiser import Denoiser, get_parameterization
from minidiff.losses import diffusion_loss, min_snr_weights, training_target
from minidiff.samplers import sample_ddim, sample_dpmpp_2m, sample_euler
from minidiff.toy import GaussianMixture

F64 = torch.float64


def _straight(T=1000):
    return S.alphas_cumprod_from_betas(S.straight_betas(T))


def test_straight_table_is_the_straight_path():
    T = 1000
    ab = _straight(T)
    t = torch.arange(1, T + 1, dtype=F64) / T
    sig = S.sigmas_from_alphas_cumprod(ab)
    assert ab[-1] == 0 and math.isinf(sig[-1])
    torch.testing.assert_close(sig[:-1], t[:-1] / (1 - t[:-1]), rtol=1e-9, atol=0)
    torch.testing.assert_close(flow.flow_time(sig), t, rtol=1e-9, atol=0)
    # a trailing grid of n steps is the uniform grid t = 1, 1 - 1/n, ..., 0 of rectified flow
    torch.testing.assert_close(flow.flow_time(S.sampling_sigmas(ab, 4, "trailing")),
                               torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=F64))
    with pytest.raises(ValueError, match="T must be a positive int"):
        S.straight_betas(0)


def test_flow_time_round_trip_and_errors():
    t = torch.tensor([0.0, 1e-3, 0.5, 0.999, 1.0], dtype=F64)
    torch.testing.assert_close(flow.flow_time(flow.sigma_from_flow_time(t)), t)
    assert math.isinf(flow.sigma_from_flow_time(1.0))
    with pytest.raises(ValueError, match="t must lie in \\[0, 1\\]"):
        flow.sigma_from_flow_time(1.5)
    with pytest.raises(ValueError, match="sigma must be >= 0"):
        flow.flow_time(-1.0)


@pytest.mark.parametrize("sigma", [1e-3, 0.3, 1.0, 7.0, math.inf])
def test_flow_row_is_exact_and_the_net_sees_the_straight_path(sigma):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 2, 4, 4, generator=g, dtype=F64), torch.randn(3, 2, 4, 4, generator=g, dtype=F64)
    s = torch.full((3,), sigma, dtype=F64)
    a, b = (c.view(-1, 1, 1, 1) for c in S.vp_coefficients(s))
    x_t = a * x0 + b * eps
    t = float(flow.flow_time(torch.tensor(sigma)))
    row = get_parameterization("flow")
    torch.testing.assert_close(row.c_in(a, b) * x_t, flow.straight_path(x0, eps, t))
    torch.testing.assert_close(flow.to_flow(x_t, s), flow.straight_path(x0, eps, t))
    torch.testing.assert_close(flow.from_flow(flow.to_flow(x_t, s), s), x_t)
    u = training_target(x0, eps, s, "flow")
    torch.testing.assert_close(u, eps - x0)
    c_skip, c_out = row.coefficients(a, b)
    torch.testing.assert_close(c_skip * x_t + c_out * u, x0)


class _OracleVelocity(nn.Module):
    """A 'net' that knows x0 and eps and checks it is given the straight-path point, then returns u = eps - x0."""

    def __init__(self, x0, eps, ab):
        super().__init__()
        self.x0, self.eps, self.ab = x0, eps, ab

    def forward(self, x_in, t):
        tf = ((t.to(F64).round().long() + 1) / len(self.ab)).view(-1, 1, 1, 1)
        torch.testing.assert_close(x_in, ((1 - tf) * self.x0 + tf * self.eps).to(x_in))
        return self.eps - self.x0


def test_flow_loss_is_zero_for_the_true_velocity_and_positive_otherwise():
    ab = _straight(100)
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(8, 1, 4, 4, generator=g), torch.randn(8, 1, 4, 4, generator=g)
    t = torch.tensor([0, 1, 10, 50, 90, 98, 99, 99])
    net = _OracleVelocity(x0, eps, ab)
    assert diffusion_loss(net, x0, ab, "flow", t=t, noise=eps).item() < 1e-10
    wrong = lambda x, tt: eps  # an eps-predictor's output scored as a velocity
    assert diffusion_loss(wrong, x0, ab, "flow", t=t, noise=eps).item() > 0.5
    with pytest.raises(ValueError, match="zero SNR"):
        diffusion_loss(wrong, x0, ab, "eps", t=t, noise=eps)


def test_denoiser_recovers_x0_from_the_true_velocity_even_at_pure_noise():
    ab = _straight(100)
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(8, 1, 4, 4, generator=g), torch.randn(8, 1, 4, 4, generator=g)
    t = torch.tensor([0, 1, 10, 50, 90, 98, 99, 99])
    sig = S.sigmas_from_alphas_cumprod(ab)[t].float()
    a, b = (c.view(-1, 1, 1, 1) for c in S.vp_coefficients(sig))
    d = Denoiser(_OracleVelocity(x0, eps, ab), ab, "flow")
    torch.testing.assert_close(d(a * x0 + b * eps, sig), x0, atol=1e-5, rtol=1e-5)


def test_min_snr_weight_of_flow_is_min_snr_times_c_out_squared():
    snr_t = torch.tensor([1e-4, 0.5, 1.0, 4.0, 100.0], dtype=F64)
    a, b = snr_t.sqrt() / (1 + snr_t).sqrt(), 1 / (1 + snr_t).sqrt()
    want = snr_t.clamp(max=5.0) * (b / (a + b)) ** 2
    torch.testing.assert_close(min_snr_weights(snr_t, 5.0, "flow"), want)


def _flow_net_denoiser():
    """A small random conv net read as a flow model: not a good model, but any model must give the identities."""
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 1, 3, padding=1).double()
    net = lambda x, t: conv(x) * (1 + t.view(-1, 1, 1, 1) / 1000)
    return Denoiser(net, _straight(1000), "flow")


@pytest.mark.parametrize("n", [1, 2, 4, 10])
def test_flow_euler_is_ddim_and_ve_euler(n):
    d = _flow_net_denoiser()
    sigmas = S.sampling_sigmas(d.alphas_cumprod, n, "trailing")
    x = torch.randn(4, 1, 6, 6, generator=torch.Generator().manual_seed(n), dtype=F64)
    out = flow.sample_flow_euler(d, x, sigmas)
    torch.testing.assert_close(out, sample_ddim(d, x, sigmas), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out, sample_euler(d, x, sigmas), rtol=1e-9, atol=1e-9)
    if n > 2:  # DPM++(2M) is first order on its first and last steps; beyond those it is a different method
        assert (out - sample_dpmpp_2m(d, x, sigmas)).abs().max() > 1e-6


def test_flow_euler_one_step_from_noise_is_x0_hat_and_reports_each_step():
    d = _flow_net_denoiser()
    x = torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(3), dtype=F64)
    seen = []
    sigmas = S.sampling_sigmas(d.alphas_cumprod, 3, "trailing")
    flow.sample_flow_euler(d, x, sigmas, callback=seen.append)
    assert [r["i"] for r in seen] == [0, 1, 2] and math.isinf(seen[0]["sigma"])
    ddim_seen = []
    sample_ddim(d, x, sigmas, callback=ddim_seen.append)  # the same states as DDIM reports: before each step
    for mine, ref in zip(seen, ddim_seen):
        torch.testing.assert_close(mine["x"], ref["x"], rtol=1e-9, atol=1e-9)
    one = flow.sample_flow_euler(d, x, S.sampling_sigmas(d.alphas_cumprod, 1, "trailing"))
    torch.testing.assert_close(one, d(x, torch.full((2,), math.inf, dtype=F64)))


def test_flow_euler_on_a_gaussian_converges_to_the_exact_ode_endpoint():
    """On N(mean, std^2) data the exact x0_hat is known; Euler is first order, so 4x the steps cut the error ~4x."""
    gm = GaussianMixture.gaussian(torch.tensor([0.5, -1.0], dtype=F64), torch.tensor([0.3, 1.2], dtype=F64))
    ab = _straight(1000)
    x = torch.randn(256, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    ref = flow.sample_flow_euler(gm.denoiser, x, S.sampling_sigmas(ab, 999, "trailing"))
    errs = [float((flow.sample_flow_euler(gm.denoiser, x, S.sampling_sigmas(ab, n, "trailing")) - ref).abs().mean())
            for n in (2, 8, 32)]
    assert errs[0] > 2.5 * errs[1] and errs[1] > 2.5 * errs[2], errs


def test_velocity_and_straight_path_errors():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="sigma must be > 0"):
        flow.velocity(x, x, torch.zeros(2))
    with pytest.raises(ValueError, match="eps must have the shape of x0"):
        flow.straight_path(x, torch.zeros(2, 4), 0.5)
    with pytest.raises(ValueError, match="t must lie in \\[0, 1\\]"):
        flow.straight_path(x, x, 2.0)
    s = torch.tensor([1.0, 1.0])  # t = 0.5: from the flow point 1 to x0_hat = 0 in half a unit of time, u = 2
    torch.testing.assert_close(flow.velocity(flow.from_flow(x + 1, s), x, s), torch.full((2, 3), 2.0))


def test_toy_mlp_learns_the_ring_with_flow_matching():
    """The lecture 11 toy: a few hundred flow-matching steps must beat returning noise by a wide margin."""
    from minidiff.toy import ToyMLP, fit_toy, ring_mixture, sliced_wasserstein

    gm, ab, g = ring_mixture(), _straight(1000), torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = fit_toy(ToyMLP(), gm, ab, "flow", steps=400, generator=g)
    d = Denoiser(net, ab, "flow")
    data, z = gm.sample(1000, generator=g), torch.randn(1000, 2, generator=g)
    out = flow.sample_flow_euler(d, z, S.sampling_sigmas(ab, 16, "trailing"))
    sw = lambda a: float(sliced_wasserstein(a, data, generator=torch.Generator().manual_seed(0)))
    assert sw(out) < 0.4 * sw(z), (sw(out), sw(z))  # measured 0.16 vs 0.49 for the noise itself
    with pytest.raises(ValueError, match="ToyMLP takes x"):
        net(torch.zeros(2, 2, 2), torch.zeros(2))
