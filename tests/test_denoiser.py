"""eps / x0 / v conversions, the Denoiser wrapper and the training loss (with min-SNR-gamma)."""
import pytest
import torch
from torch import nn

from minidiff import schedules as S
from minidiff.denoiser import PREDICTIONS, Denoiser, eps_from_v, eps_from_x0, v_from_x0_eps, x0_from_eps, x0_from_v
from minidiff.losses import diffusion_loss, min_snr_weights, training_target

F64 = torch.float64
INF = float("inf")
AB = S.alphas_cumprod_from_betas(S.linear_betas())
ABZ = S.alphas_cumprod_from_betas(S.rescale_zero_terminal_snr(S.linear_betas()))


def _batch(gen, sigma):
    x0 = torch.randn(len(sigma), 2, 3, 3, generator=gen, dtype=F64)
    eps = torch.randn(len(sigma), 2, 3, 3, generator=gen, dtype=F64)
    a, b = (c.view(-1, 1, 1, 1) for c in S.vp_coefficients(sigma))
    return x0, eps, a * x0 + b * eps


def test_conversions_round_trip(gen):
    sigma = torch.tensor([1e-3, 0.1, 1.0, 10.0, 300.0], dtype=F64)
    x0, eps, x = _batch(gen, sigma)
    v = v_from_x0_eps(x0, eps, sigma)
    assert torch.allclose(x0_from_eps(x, eps, sigma), x0, rtol=1e-9, atol=1e-9)
    assert torch.allclose(eps_from_x0(x, x0, sigma), eps, rtol=1e-9, atol=1e-9)
    assert torch.allclose(x0_from_v(x, v, sigma), x0, rtol=1e-9, atol=1e-9)
    assert torch.allclose(eps_from_v(x, v, sigma), eps, rtol=1e-9, atol=1e-9)


def test_v_at_zero_snr_is_exact_and_eps_raises(gen):
    sigma = torch.tensor([INF, 2.0], dtype=F64)
    x0, eps, x = _batch(gen, sigma)
    assert torch.equal(x[0], eps[0])
    v = v_from_x0_eps(x0, eps, sigma)
    assert torch.equal(v[0], -x0[0])
    assert torch.allclose(x0_from_v(x, v, sigma), x0, atol=1e-12)
    with pytest.raises(ValueError, match="prediction='v'"):
        x0_from_eps(x, eps, sigma)
    with pytest.raises(ValueError, match="sigma must be > 0"):
        eps_from_x0(x, x0, torch.tensor([0.0, 1.0], dtype=F64))


def test_conversion_rejects_sigma_of_wrong_batch():
    with pytest.raises(ValueError, match=r"sigma must have shape \(2,\)"):
        x0_from_v(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3))


class OracleNet(nn.Module):
    """Knows x0 and eps; returns the exact target for its parameterization at the integer t it is given."""

    def __init__(self, x0, eps, prediction, alphas_cumprod):
        super().__init__()
        self.x0, self.eps, self.prediction, self.ab = x0, eps, prediction, alphas_cumprod
        self.calls = []

    def forward(self, x, t, **cond):
        self.calls.append((t, cond))
        sigma = S.sigmas_from_alphas_cumprod(self.ab)[t.round().long()]
        return training_target(self.x0, self.eps, sigma, self.prediction)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_denoiser_recovers_x0_for_each_prediction(gen, prediction):
    t = torch.tensor([0, 10, 500, 998])
    sigma = S.sigmas_from_alphas_cumprod(AB)[t]
    x0, eps, x = _batch(gen, sigma)
    net = OracleNet(x0, eps, prediction, AB)
    D = Denoiser(net, AB, prediction)
    labels = torch.tensor([1, 2, 3, 4])
    x0_hat = D(x, sigma, class_labels=labels)
    assert torch.allclose(x0_hat, x0, rtol=1e-8, atol=1e-8)
    t_seen, cond_seen = net.calls[0]
    assert t_seen.dtype == F64 and torch.equal(t_seen, t.to(F64))  # float t, exact on the grid
    assert cond_seen.keys() == {"class_labels"} and torch.equal(cond_seen["class_labels"], labels)
    assert torch.equal(D.predict(x, sigma), training_target(x0, eps, sigma, prediction))


def test_denoiser_attributes_and_validation():
    net = nn.Identity()
    D = Denoiser(net, AB, "x0")
    assert D.prediction == "x0" and D.alphas_cumprod.dtype == F64
    assert D.sigma_min == pytest.approx(S.sigmas_from_alphas_cumprod(AB)[0].item())
    assert Denoiser(net, ABZ, "v").sigma_max == INF
    with pytest.raises(ValueError, match=r"prediction must be one of \('eps', 'x0', 'v', 'flow'\), got 'epsilon'"):
        Denoiser(net, AB, "epsilon")


def test_denoiser_alphas_cumprod_survives_dtype_cast():
    D = Denoiser(nn.Linear(2, 2), AB, "eps").to(torch.float16)
    assert D.alphas_cumprod.dtype == F64 and D.net.weight.dtype == torch.float16


def test_denoiser_eps_at_inf_sigma_says_use_v(gen):
    x = torch.randn(2, 3, generator=gen)
    D = Denoiser(lambda x, t: torch.zeros_like(x), ABZ, "eps")
    with pytest.raises(ValueError, match=r"Use prediction='v' \(or 'x0'\) with zero-terminal-SNR"):
        D(x, torch.tensor([INF, 1.0]))
    Dv = Denoiser(lambda x, t: torch.zeros_like(x), ABZ, "v")
    out = Dv(x, torch.tensor([INF, 1.0]))
    assert torch.isfinite(out).all() and torch.equal(out[0], torch.zeros(3))  # x0 = a x - b v = 0 at a = 0, v = 0


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_denoiser_clip_x0_clamps_only_the_estimate(gen, prediction):
    net = lambda x, t: 3 * torch.ones_like(x)  # noqa: E731  (x0 = 3 for "x0": outside the data range)
    x, sigma = torch.randn(2, 4, generator=gen), torch.tensor([0.5, 50.0], dtype=F64)
    raw, clipped = Denoiser(net, AB, prediction)(x, sigma), Denoiser(net, AB, prediction, clip_x0=True)(x, sigma)
    assert raw.abs().max() > 1 and torch.equal(clipped, raw.clamp(-1, 1))


def test_denoiser_rejects_wrong_output_shape():
    D = Denoiser(lambda x, t: x[:, :1], AB, "x0")
    with pytest.raises(ValueError, match="net output must have the shape of x"):
        D(torch.zeros(2, 3), torch.ones(2))


# ----------------------------------------------------------------------------- loss
def test_loss_matches_manual_computation(gen):
    x0 = torch.randn(4, 1, 4, 4, generator=gen)
    noise = torch.randn(4, 1, 4, 4, generator=gen)
    t = torch.tensor([0, 100, 500, 999])
    conv = nn.Conv2d(1, 1, 3, padding=1)
    loss = diffusion_loss(lambda x, t: conv(x), x0, AB, "v", t=t, noise=noise)
    ab = AB[t].float().view(-1, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    target = ab.sqrt() * noise - (1 - ab).sqrt() * x0
    assert torch.allclose(loss, ((conv(x_t) - target) ** 2).mean(), rtol=1e-5)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_loss_zero_for_oracle_and_reproducible(gen, prediction):
    x0 = torch.randn(8, 2, 3, 3, generator=gen, dtype=F64)
    t = torch.randint(0, 1000, (8,), generator=gen)
    noise = torch.randn(8, 2, 3, 3, generator=gen, dtype=F64)
    oracle = OracleNet(x0, noise, prediction, AB)
    assert diffusion_loss(oracle, x0, AB, prediction, t=t, noise=noise).item() == pytest.approx(0.0, abs=1e-20)
    net = lambda x, t, **c: 0.5 * x  # noqa: E731
    l1 = diffusion_loss(net, x0, AB, prediction, generator=torch.Generator().manual_seed(3))
    l2 = diffusion_loss(net, x0, AB, prediction, generator=torch.Generator().manual_seed(3))
    l3 = diffusion_loss(net, x0, AB, prediction, generator=torch.Generator().manual_seed(4))
    assert l1.item() == l2.item() and l1.item() != l3.item()


def test_min_snr_weights_formulas():
    snr = torch.tensor([0.1, 1.0, 5.0, 50.0], dtype=F64)
    g = 5.0
    assert torch.allclose(min_snr_weights(snr, g, "eps"), torch.tensor([1.0, 1.0, 1.0, 0.1], dtype=F64))
    assert torch.allclose(min_snr_weights(snr, g, "x0"), torch.tensor([0.1, 1.0, 5.0, 5.0], dtype=F64))
    assert torch.allclose(min_snr_weights(snr, g, "v"), torch.tensor([0.1 / 1.1, 0.5, 5 / 6, 5 / 51], dtype=F64))
    with pytest.raises(ValueError, match="min_snr_gamma must be > 0"):
        min_snr_weights(snr, 0.0, "eps")


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_min_snr_loss_equals_clipped_snr_times_x0_error(gen, prediction):
    """Hang et al. 2023: every weighted loss equals min(SNR, gamma) * ||x0_hat - x0||^2 per sample."""
    t = torch.tensor([5, 200, 600, 990])
    sigma = S.sigmas_from_alphas_cumprod(AB)[t]
    x0, eps, x = _batch(gen, sigma)
    x0_hat = x0 + 0.1 * torch.randn(x0.shape, generator=gen, dtype=F64)
    eps_hat = eps_from_x0(x, x0_hat, sigma)
    out = training_target(x0_hat, eps_hat, sigma, prediction)  # what a net with this x0 error would output
    gamma = 5.0
    loss = diffusion_loss(lambda x, t: out, x0, AB, prediction, t=t, noise=eps, min_snr_gamma=gamma)
    per_sample = ((x0_hat - x0) ** 2).flatten(1).mean(1) * S.snr(AB)[t].clamp(max=gamma)
    assert loss.item() == pytest.approx(per_sample.mean().item(), rel=1e-9)


def test_loss_forwards_cond_and_float_t(gen):
    seen = {}

    def net(x, t, **cond):
        seen.update(cond, t=t)
        return torch.zeros_like(x)

    labels = torch.tensor([1, 2])
    diffusion_loss(net, torch.zeros(2, 3), AB, "x0", generator=gen, class_labels=labels)
    assert torch.equal(seen["class_labels"], labels) and seen["t"].dtype == torch.float32
    assert torch.equal(seen["t"], seen["t"].round())


def test_loss_zero_terminal_snr(gen):
    x0 = torch.randn(2, 3, generator=gen)
    with pytest.raises(ValueError, match="Use prediction='v'"):
        diffusion_loss(lambda x, t: x, x0, ABZ, "eps", generator=gen)
    loss = diffusion_loss(lambda x, t: x, x0, ABZ, "v", t=torch.tensor([999, 999]), min_snr_gamma=5.0, generator=gen)
    assert torch.isfinite(loss)


def test_loss_validates_arguments(gen):
    x0 = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="prediction must be one of"):
        diffusion_loss(lambda x, t: x, x0, AB, "sample")
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1000\)"):
        diffusion_loss(lambda x, t: x, x0, AB, t=torch.tensor([0, 1000]))
    with pytest.raises(ValueError, match="net output must have the shape of x0"):
        diffusion_loss(lambda x, t: x[:, :1], x0, AB, generator=gen)


# ----------------------------------------------------------------------------- the table and what Denoiser exposes
def test_parameterization_table_is_consistent(gen):
    """For every row, x0_hat = c_skip x_t + c_out * target reproduces x0 exactly (the table's definition)."""
    from minidiff.denoiser import PARAMETERIZATIONS

    x0, eps = torch.randn(5, 3, generator=gen, dtype=torch.float64), torch.randn(5, 3, generator=gen, dtype=torch.float64)
    sigma = torch.tensor([0.01, 0.5, 1.0, 7.0, 300.0], dtype=torch.float64)
    a, b = (c[:, None] for c in S.vp_coefficients(sigma))
    x_t = a * x0 + b * eps
    for name, row in PARAMETERIZATIONS.items():
        c_skip, c_out = row.coefficients(a, b)
        torch.testing.assert_close(c_skip * x_t + c_out * row.target(x0, eps, a, b), x0, msg=name)


def test_denoiser_exposes_conditioning_and_null_condition():
    from minidiff.models.unet import unet_from_preset

    ab = S.alphas_cumprod_from_betas(S.linear_betas(100))
    small = dict(base_channels=8, channel_mults=(1, 2), attn_levels=())
    cond = Denoiser(unet_from_preset("tiny", num_classes=10, **small), ab, image_shape=(1, 8, 8))
    assert cond.num_classes == 10 and cond.context_dim is None and cond.image_shape == (1, 8, 8)
    null = cond.null_condition(3)
    assert torch.equal(null["class_labels"], torch.full((3,), 10))
    uncond = Denoiser(unet_from_preset("tiny", **small), ab)
    assert uncond.num_classes is None
    with pytest.raises(ValueError, match="unconditional"):
        uncond.null_condition(2)
    text = Denoiser(unet_from_preset("tiny", context_dim=16, **small), ab)
    assert text.context_dim == 16
    with pytest.raises(ValueError, match="empty prompt"):
        text.null_condition(2)
