"""Classifier-free guidance wrapper, guidance rescale and condition dropout."""
import pytest
import torch

from minidiff.guidance import CFGDenoiser, condition_dropout, rescale_guidance

NULL = 10


class CountingDenoiser(torch.nn.Module):
    """A nonlinear, label-dependent dummy D(x, sigma, class_labels) that records the batch size of every call."""

    def __init__(self):
        super().__init__()
        self.batch_sizes = []

    def forward(self, x, sigma, class_labels, context=None):
        self.batch_sizes.append(x.shape[0])
        k = class_labels.to(x.dtype).view(-1, 1, 1, 1)
        out = torch.sin(x * (1 + k)) / (1 + sigma.view(-1, 1, 1, 1)) + 0.1 * k
        if context is not None:
            out = out + context.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return out


def _inputs(gen, B=4):
    x = torch.randn(B, 2, 4, 4, generator=gen)
    sigma = torch.rand(B, generator=gen) * 5
    labels = torch.randint(0, NULL, (B,), generator=gen)
    return x, sigma, labels


def test_scale_one_is_conditional_exactly_with_one_call(gen):
    x, sigma, labels = _inputs(gen)
    D = CountingDenoiser()
    out = CFGDenoiser(D, 1.0, uncond={"class_labels": torch.tensor(NULL)})(x, sigma, class_labels=labels)
    assert torch.equal(out, D(x, sigma, class_labels=labels))
    assert D.batch_sizes == [4, 4]  # the wrapper's call, then ours


def test_scale_zero_is_unconditional_exactly_with_one_call(gen):
    x, sigma, labels = _inputs(gen)
    D = CountingDenoiser()
    out = CFGDenoiser(D, 0.0, uncond={"class_labels": torch.tensor(NULL)})(x, sigma, class_labels=labels)
    assert torch.equal(out, D(x, sigma, class_labels=torch.full((4,), NULL)))
    assert D.batch_sizes == [4, 4]


@pytest.mark.parametrize("uncond_labels", [torch.tensor(NULL), torch.tensor([NULL]), torch.tensor([3, 1, 4, 1])])
def test_scale_three_formula_in_one_batched_forward(gen, uncond_labels):
    """uncond may be a null class (broadcast) or a per-sample negative label (negative conditioning)."""
    x, sigma, labels = _inputs(gen)
    D = CountingDenoiser()
    out = CFGDenoiser(D, 3.0, uncond={"class_labels": uncond_labels})(x, sigma, class_labels=labels)
    assert D.batch_sizes == [8]
    x0_c = D(x, sigma, class_labels=labels)
    x0_u = D(x, sigma, class_labels=uncond_labels.expand(4))
    assert torch.allclose(out, x0_u + 3.0 * (x0_c - x0_u), atol=1e-6)
    assert not torch.allclose(out, x0_c)


def test_context_uncond_broadcasts_over_batch(gen):
    x, sigma, labels = _inputs(gen)
    ctx = torch.randn(4, 5, 3, generator=gen)
    null_ctx = torch.zeros(1, 5, 3)
    D = CountingDenoiser()
    cfg = CFGDenoiser(D, 2.0, uncond={"class_labels": torch.tensor(NULL), "context": null_ctx})
    out = cfg(x, sigma, class_labels=labels, context=ctx)
    x0_c = D(x, sigma, class_labels=labels, context=ctx)
    x0_u = D(x, sigma, class_labels=torch.full((4,), NULL), context=null_ctx.expand(4, 5, 3))
    assert torch.allclose(out, x0_u + 2.0 * (x0_c - x0_u), atol=1e-6)


def test_rescale_phi_zero_is_noop_and_phi_one_matches_cond_std(gen):
    x, sigma, labels = _inputs(gen)
    D = CountingDenoiser()
    uncond = {"class_labels": torch.tensor(NULL)}
    plain = CFGDenoiser(D, 5.0, uncond=uncond)(x, sigma, class_labels=labels)
    assert torch.equal(CFGDenoiser(D, 5.0, uncond=uncond, guidance_rescale=0.0)(x, sigma, class_labels=labels), plain)
    full = CFGDenoiser(D, 5.0, uncond=uncond, guidance_rescale=1.0)(x, sigma, class_labels=labels)
    x0_c = D(x, sigma, class_labels=labels)
    assert torch.allclose(full.flatten(1).std(1), x0_c.flatten(1).std(1), rtol=1e-5)
    half = CFGDenoiser(D, 5.0, uncond=uncond, guidance_rescale=0.5)(x, sigma, class_labels=labels)
    assert torch.allclose(half, 0.5 * full + 0.5 * plain, atol=1e-6)


def test_rescale_matches_diffusers_rescale_noise_cfg(gen):
    from diffusers.guiders.guider_utils import rescale_noise_cfg  # no transformers needed
    x_cfg = 3 * torch.randn(3, 4, 8, 8, generator=gen, dtype=torch.float64)
    x_c = torch.randn(3, 4, 8, 8, generator=gen, dtype=torch.float64)
    for phi in (0.3, 0.7, 1.0):
        assert torch.allclose(rescale_guidance(x_cfg, x_c, phi), rescale_noise_cfg(x_cfg, x_c, phi), rtol=1e-12)


def test_rescale_leaves_constant_prediction_finite():
    out = rescale_guidance(torch.ones(2, 3), torch.randn(2, 3), 0.7)
    assert torch.equal(out, torch.ones(2, 3))


@pytest.mark.parametrize("scale", [-2.0, float("nan"), float("inf")])
def test_bad_guidance_scale_is_named(scale):
    with pytest.raises(ValueError, match="guidance_scale must be finite and >= 0"):
        CFGDenoiser(CountingDenoiser(), scale, uncond={})


@pytest.mark.parametrize("phi", [-0.1, 1.5])
def test_bad_guidance_rescale_is_named(phi):
    with pytest.raises(ValueError, match=r"guidance_rescale must be a number in \[0, 1\]"):
        CFGDenoiser(CountingDenoiser(), 3.0, uncond={}, guidance_rescale=phi)


def test_uncond_keys_and_shapes_must_match(gen):
    x, sigma, labels = _inputs(gen)
    with pytest.raises(ValueError, match="uncond must have the same keys"):
        CFGDenoiser(CountingDenoiser(), 3.0, uncond={"context": torch.zeros(1, 2, 2)})(x, sigma, class_labels=labels)
    with pytest.raises(ValueError, match=r"uncond\['class_labels'\] of shape \(3,\)"):
        CFGDenoiser(CountingDenoiser(), 3.0, uncond={"class_labels": torch.zeros(3, dtype=torch.int64)})(
            x, sigma, class_labels=labels)
    with pytest.raises(ValueError, match="uncond must be a dict"):
        CFGDenoiser(CountingDenoiser(), 3.0, uncond=torch.tensor(NULL))


# ----------------------------------------------------------------------------- condition dropout
def test_condition_dropout_extremes_and_rate(gen):
    labels = torch.randint(0, NULL, (20000,), generator=gen)
    assert torch.equal(condition_dropout(labels, 0.0, NULL, generator=gen), labels)
    assert torch.equal(condition_dropout(labels, 1.0, NULL, generator=gen), torch.full_like(labels, NULL))
    out = condition_dropout(labels, 0.2, NULL, generator=gen)
    frac = (out == NULL).float().mean().item()
    assert abs(frac - 0.2) < 5 * (0.2 * 0.8 / 20000) ** 0.5
    kept = out != NULL
    assert torch.equal(out[kept], labels[kept])


def test_condition_dropout_reproducible_and_validated():
    labels = torch.arange(100)
    a = condition_dropout(labels, 0.5, NULL, generator=torch.Generator().manual_seed(7))
    b = condition_dropout(labels, 0.5, NULL, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"p \(condition dropout probability\) must be in \[0, 1\], got 1.5"):
        condition_dropout(labels, 1.5, NULL)
    with pytest.raises(ValueError, match="labels must be an int64 tensor"):
        condition_dropout(labels.float(), 0.5, NULL)
