"""Tests of minidiff.models.unet: shapes at every size and condition, conditioning semantics, gradients, errors, presets."""
import pytest
import torch

from minidiff.models import unet as unet_module
from minidiff.models.unet import PRESETS, UNet, UNetConfig, unet_from_preset

# A small config with 3 levels and attention at the two lowest, cheap enough for every test.
SMALL = dict(in_channels=2, out_channels=3, base_channels=8, channel_mults=(1, 2, 2), num_res_blocks=1,
             attn_levels=(1, 2), num_groups=4, num_heads=2)
CONDITIONS = ["none", "class", "context", "context_masked"]


def make_net(gen, cond="none", **kw):
    """A SMALL net for a condition type, with its zero-initialised output conv perturbed so outputs depend on x.

    Residual branches are not zero-initialised here (zero_init=False): these tests check the wiring of every input,
    which a zero-initialised branch hides until training moves it (see test_zero_init_makes_every_block_the_identity).
    """
    cfg = dict(SMALL, **{"zero_init": False, **kw})
    if cond == "class":
        cfg["num_classes"] = 5
    if cond.startswith("context"):
        cfg["context_dim"] = 6
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    net = UNet(UNetConfig(**cfg))
    with torch.no_grad():
        net.conv_out.weight.normal_(0, 0.1, generator=gen)
        net.conv_out.bias.normal_(0, 0.1, generator=gen)
    return net


def cond_kwargs(cond, B, gen, L=4):
    if cond == "class":
        return dict(class_labels=torch.randint(0, 5, (B,), generator=gen))
    if cond == "context":
        return dict(context=torch.randn(B, L, 6, generator=gen))
    if cond == "context_masked":
        mask = torch.ones(B, L, dtype=torch.bool)
        mask[:, -1] = False
        return dict(context=torch.randn(B, L, 6, generator=gen), context_mask=mask)
    return {}


@pytest.mark.parametrize("cond", CONDITIONS)
@pytest.mark.parametrize("size", [(8, 8), (16, 16), (28, 28), (32, 32), (64, 64), (13, 30)])
def test_output_shape_equals_input_shape(gen, size, cond):
    net = make_net(gen, cond)
    B = 2
    x = torch.randn(B, 2, *size, generator=gen)
    y = net(x, torch.rand(B, generator=gen) * 1000, **cond_kwargs(cond, B, gen))
    assert y.shape == (B, 3, *size)
    assert torch.isfinite(y).all()


def test_internal_padding_is_zero_pad_right_bottom_then_crop(gen):
    # 3 levels need multiples of 4: a 13x30 input is run as 16x32 (zeros right/bottom) and cropped back.
    net = make_net(gen).eval()
    x, t = torch.randn(1, 2, 13, 30, generator=gen), torch.tensor([321.0])
    padded = torch.nn.functional.pad(x, (0, 2, 0, 3))  # 16 x 32
    assert torch.allclose(net(x, t), net(padded, t)[:, :, :13, :30], atol=1e-6)


def test_output_is_zero_at_init():
    net = UNet(UNetConfig(**SMALL))
    x = torch.randn(2, 2, 16, 16)
    assert torch.equal(net(x, torch.tensor([1.0, 2.0])), torch.zeros(2, 3, 16, 16))


def test_zero_init_makes_every_block_the_identity(gen):
    """zero_init (the default) zeroes each residual branch's last layer: a ResBlock returns its skip path, an
    attention block its input, and one optimiser step moves those layers off zero."""
    from minidiff.models.attention import AttentionBlock
    from minidiff.models.layers import ResBlock

    net = UNet(UNetConfig(**dict(SMALL, num_classes=5)))
    assert net.config.zero_init
    seen = {"res": 0, "attn": 0}

    def check(module, inputs, output):
        if isinstance(module, ResBlock):
            assert torch.equal(output, module.skip(inputs[0]))
            seen["res"] += 1
        else:
            assert torch.equal(output, inputs[0])
            seen["attn"] += 1
    hooks = [m.register_forward_hook(check) for m in net.modules() if isinstance(m, (ResBlock, AttentionBlock))]
    loss = net(torch.randn(2, 2, 16, 16, generator=gen), torch.tensor([3.0, 500.0]), class_labels=torch.tensor([0, 4]))
    for h in hooks:
        h.remove()
    assert seen["res"] > 0 and seen["attn"] > 0
    (loss.square().mean() + net.conv_out.bias.sum()).backward()
    grads = [m.conv2.weight.grad for m in net.modules() if isinstance(m, ResBlock)]
    assert all(g is not None for g in grads)


def test_null_class_equals_no_labels(gen):
    net = make_net(gen, "class").eval()
    x, t = torch.randn(3, 2, 16, 16, generator=gen), torch.tensor([5.0, 250.0, 999.0])
    assert torch.equal(net(x, t), net(x, t, class_labels=torch.full((3,), 5)))


def test_different_classes_give_different_outputs(gen):
    net = make_net(gen, "class").eval()
    x, t = torch.randn(1, 2, 16, 16, generator=gen).expand(5, -1, -1, -1), torch.full((5,), 400.0)
    y = net(x, t, class_labels=torch.arange(5))  # (5, 3, 16, 16): same x, each class once
    for i in range(5):
        for j in range(i + 1, 5):
            assert (y[i] - y[j]).abs().max() > 1e-4


def test_masked_context_token_has_no_influence(gen):
    net = make_net(gen, "context").eval()
    B, L = 2, 4
    x, t = torch.randn(B, 2, 16, 16, generator=gen), torch.tensor([100.0, 700.0])
    ctx = torch.randn(B, L, 6, generator=gen)
    mask = torch.tensor([[True, True, False, True], [True, False, False, False]])
    changed = ctx.clone()
    changed[~mask] = torch.randn(int((~mask).sum()), 6, generator=gen) * 10
    y = net(x, t, context=ctx, context_mask=mask)
    assert torch.allclose(y, net(x, t, context=changed, context_mask=mask), atol=1e-5)
    # ...while changing a kept token does change the output.
    changed[0, 0] += 1.0
    assert (net(x, t, context=changed, context_mask=mask)[0] - y[0]).abs().max() > 1e-4


def test_all_masked_context_equals_no_context(gen):
    net = make_net(gen, "context").eval()
    x, t = torch.randn(2, 2, 8, 8, generator=gen), torch.tensor([10.0, 20.0])
    ctx = torch.randn(2, 3, 6, generator=gen)
    y = net(x, t, context=ctx, context_mask=torch.zeros(2, 3, dtype=torch.bool))
    assert torch.isfinite(y).all()
    assert torch.allclose(y, net(x, t), atol=1e-6)


@pytest.mark.parametrize("cond", CONDITIONS)
@pytest.mark.parametrize("scale_shift", [False, True])
def test_gradients_reach_every_parameter(gen, cond, scale_shift):
    net = make_net(gen, cond, scale_shift=scale_shift, dropout=0.1)
    x = torch.randn(2, 2, 16, 16, generator=gen)
    kw = cond_kwargs(cond, 2, gen)
    net(x, torch.tensor([3.0, 600.0]), **kw).square().mean().backward()
    for name, p in net.named_parameters():
        if cond == "class" and name == "class_emb.weight":
            used = kw["class_labels"].unique()
            assert p.grad[used].abs().sum(dim=1).gt(0).all(), name
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"


def test_output_depends_on_t(gen):
    net = make_net(gen).eval()
    x = torch.randn(1, 2, 16, 16, generator=gen).expand(3, -1, -1, -1)
    y = net(x, torch.tensor([0.0, 0.5, 900.0]))  # continuous t: a half step also matters
    assert (y[0] - y[1]).abs().max() > 1e-5
    assert (y[0] - y[2]).abs().max() > 1e-3


def test_scalar_t_broadcasts(gen):
    net = make_net(gen).eval()
    x = torch.randn(2, 2, 8, 8, generator=gen)
    assert torch.equal(net(x, torch.tensor(42.0)), net(x, torch.tensor([42.0, 42.0])))


@pytest.mark.parametrize("field, value", [("channel_mults", ()), ("num_groups", 3), ("attn_levels", (5,)),
                                          ("num_classes", 0), ("dropout", 1.0), ("in_channels", 0)])
def test_bad_config_errors_name_the_argument(field, value):
    with pytest.raises(ValueError, match=field):
        UNetConfig(**dict(SMALL, **{field: value}))


def test_bad_num_heads_error():
    with pytest.raises(ValueError, match="num_heads"):
        UNet(UNetConfig(**dict(SMALL, num_heads=3)))


def test_bad_inputs_errors(gen):
    net = make_net(gen, "class")
    x, t = torch.randn(2, 2, 8, 8), torch.tensor([1.0, 2.0])
    with pytest.raises(ValueError, match=r"class_labels must be in 0\.\.5.*got values in 0\.\.6"):
        net(x, t, class_labels=torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="class_labels must be in"):
        net(x, t, class_labels=torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="context_dim=None"):
        net(x, t, context=torch.randn(2, 3, 6))
    with pytest.raises(ValueError, match=r"t must have shape \(2,\)"):
        net(x, torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="num_classes=None"):
        make_net(gen)(x, t, class_labels=torch.tensor([0, 1]))
    ctx_net = make_net(gen, "context")
    with pytest.raises(ValueError, match="context_mask must be bool"):
        ctx_net(x, t, context=torch.randn(2, 3, 6), context_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"context must have shape \(2, L, 6\)"):
        ctx_net(x, t, context=torch.randn(2, 3, 5))


def test_unknown_preset_lists_presets():
    with pytest.raises(KeyError, match="tiny.*unknown|unknown.*tiny"):
        unet_from_preset("huge")


@pytest.mark.parametrize("name, low, high", [("tiny", 0.5e6, 1.0e6), ("small", 2e6, 10e6),
                                             ("cifar", 10e6, 36e6), ("latent", 2e6, 15e6)])
def test_preset_parameter_counts_in_documented_range(name, low, high):
    n = sum(p.numel() for p in UNet(PRESETS[name]).parameters())
    assert low <= n <= high
    assert f"{n:,}" in unet_module.__doc__  # the docstring table states the measured count


def test_preset_overrides():
    net = unet_from_preset("tiny", num_classes=10)
    assert net.class_emb.num_embeddings == 11
    assert net.config.base_channels == PRESETS["tiny"].base_channels


def _load_benchmark():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "unet_throughput.py"
    spec = importlib.util.spec_from_file_location("unet_throughput", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("overrides", [{}, dict(num_res_blocks=2, channel_mults=(1, 2, 1), attn_levels=(0, 2),
                                                in_channels=3, out_channels=2)])
def test_same_function_as_diffusers_unet2dmodel(gen, overrides):
    # Reference implementation: diffusers' UNet2DModel built to the same architecture, with our weights
    # copied in, computes the same output (so the benchmark compares like with like).
    pytest.importorskip("diffusers")
    bench = _load_benchmark()
    cfg = UNetConfig(**{**PRESETS["tiny"].__dict__, **overrides})
    ours = UNet(cfg)
    theirs = bench.diffusers_twin(cfg, 28)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    assert bench.max_abs_difference(ours, theirs, 28) < 1e-4


# ---------------------------------------------------------------- the 2-D position code in attention (attn_pos)

def test_sincos_2d_codes_places_not_levels():
    from minidiff.models.attention import sincos_2d
    fine, coarse = sincos_2d(8, 8, 16), sincos_2d(4, 4, 16)
    assert fine.shape == (64, 16) and coarse.shape == (16, 16)
    assert len({tuple(r) for r in fine.tolist()}) == 64  # every pixel its own code
    # rows first; the first feature is sin(pi y) of the row centre
    assert fine[0, 0].item() == pytest.approx(torch.sin(torch.tensor(torch.pi / 16)).item(), abs=1e-6)
    assert torch.equal(fine[:8, :8], fine[:8, :8][0].expand(8, 8))  # the y half is constant along a row
    # a place is a fraction of the side, whatever the level: the centre pixels of 3x3 and 5x5 grids code alike
    assert torch.allclose(sincos_2d(3, 3, 16)[4], sincos_2d(5, 5, 16)[12], atol=1e-6)
    assert not torch.allclose(sincos_2d(3, 3, 16)[0], sincos_2d(5, 5, 16)[0], atol=1e-3)
    with pytest.raises(ValueError, match="dim must be a multiple of 4, got 6"):
        sincos_2d(4, 4, 6)


def test_attn_pos_starts_as_the_identity_and_then_tells_places_apart(gen):
    base = make_net(gen, "context")
    x = torch.randn(2, 2, 16, 16, generator=gen)
    kw = cond_kwargs("context", 2, gen)
    t = torch.tensor([3.0, 600.0])
    grown = unet_module.grow_unet(base, attn_pos=True)
    assert grown.config.attn_pos and not base.config.attn_pos
    blocks = sum(isinstance(m, unet_module.AttentionBlock) for m in grown.modules())
    assert blocks == 7 and sum(".pos_proj." in k for k in grown.state_dict()) == 2 * blocks  # weight + bias each
    assert torch.equal(grown(x, t, **kw), base(x, t, **kw))  # zero-initialised: the trained function, exactly
    with torch.no_grad():
        for name, p in grown.named_parameters():
            if ".pos_proj." in name:
                p.normal_(0, 0.5, generator=gen)
    assert not torch.allclose(grown(x, t, **kw), base(x, t, **kw), atol=1e-3)  # the code now reaches the output


def test_grow_unet_refuses_changes_that_would_reinterpret_trained_weights(gen):
    base = make_net(gen)
    assert unet_module.grow_unet(base) is base
    assert unet_module.grow_unet(base, attn_levels=[1, 2]) is base  # the same value, as a list
    with pytest.raises(ValueError, match=r"can gain only \['attn_pos', 'attn_levels'\], got changes to "
                                         r"\['base_channels'\]"):
        unet_module.grow_unet(base, base_channels=16)
    with pytest.raises(ValueError, match=r"attn_levels can only gain levels: the trained U-Net has \[1, 2\], "
                                         r"got \[0, 2\]; it must include those"):
        unet_module.grow_unet(base, attn_levels=(0, 2))
    assert unet_module.grow_unet(base, attn_levels=[2, 1, 1]) is base  # a set of levels, in any order
    with pytest.raises(ValueError, match="attn_pos can only be switched on: the trained U-Net has attn_pos=True"):
        unet_module.grow_unet(unet_module.grow_unet(base, attn_pos=True), attn_pos=False)


@pytest.mark.parametrize("cond", ["none", "context"])
def test_grow_unet_gains_attention_levels_as_the_identity(gen, cond):
    base = make_net(gen, cond)  # zero_init=False: the gained blocks must be zeroed by grow_unet itself
    x = torch.randn(2, 2, 16, 16, generator=gen)
    kw = cond_kwargs(cond, 2, gen)
    t = torch.tensor([3.0, 600.0])
    grown = unet_module.grow_unet(base, attn_levels=[0, 1, 2])
    assert grown.config.attn_levels == (0, 1, 2) and base.config.attn_levels == (1, 2)
    count = lambda net: sum(isinstance(m, unet_module.AttentionBlock) for m in net.modules())  # noqa: E731
    assert count(grown) == count(base) + 3  # level 0: one stage down, two up
    assert torch.equal(grown(x, t, **kw), base(x, t, **kw))  # every trained weight kept, the new blocks add 0
    with torch.no_grad():
        for p in grown.down[0][1].parameters():  # the first gained block
            p.normal_(0, 0.5, generator=gen)
    assert not torch.allclose(grown(x, t, **kw), base(x, t, **kw), atol=1e-3)  # and it reaches the output


def test_gradients_reach_the_position_code(gen):
    net = make_net(gen, "context", attn_pos=True)
    net(torch.randn(2, 2, 16, 16, generator=gen), torch.tensor([3.0, 600.0]),
        **cond_kwargs("context", 2, gen)).square().mean().backward()
    grads = [p.grad for n, p in net.named_parameters() if ".pos_proj." in n]
    assert len(grads) == 14 and all(g is not None and g.abs().sum() > 0 for g in grads)
