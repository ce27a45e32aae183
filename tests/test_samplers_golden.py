"""Golden numbers and the sampler contract (signature, callback, registry, input validation).

The golden values were produced once by running every sampler on the deterministic dummy denoiser below,
x = torch.randn(2, 3, generator seed 0, float64), noise generator seed 1, over SIGMAS (with and without the
leading inf), and printing the outputs rounded to 10 decimals (samplers.py as of commit e9f8f9f). A refactor that
changes any sampler's arithmetic or its order of noise draws changes these numbers.
"""
import math

import pytest
import torch

from minidiff.samplers import SAMPLERS, get_sampler, sample, sample_ddim, sample_ddpm, sample_euler_ancestral

SIGMAS = torch.tensor([float("inf"), 10.0, 3.0, 1.0, 0.3, 0.05, 0.0], dtype=torch.float64)


def dummy(x, sigma):
    """Deterministic, smooth, sigma-dependent, finite at sigma = inf."""
    return 0.8 * torch.tanh(x + 0.1) - 0.05 * x / (1 + sigma[:, None] ** 2).sqrt()


GOLDEN = {
    ("ddpm", 0): [-0.265997919, 0.0258039139, 0.4641084124, 0.0328525937, 0.0923370686, -0.2072439622],
    ("ddpm", 1): [-0.0341696909, 0.1780961054, -0.0224684988, 0.221553749, -0.1839898809, -0.1558809912],
    ("ddim", 0): [0.499579672, -0.016597562, -0.4111390304, 0.4134294245, -0.3154586412, -0.3556688107],
    ("ddim", 1): [0.4965737369, -0.0076597687, -0.4076682911, 0.4052891282, -0.3065191867, -0.3492195916],
    ("euler", 0): [0.499579672, -0.016597562, -0.4111390304, 0.4134294245, -0.3154586412, -0.3556688107],
    ("euler", 1): [0.4965737369, -0.0076597687, -0.4076682911, 0.4052891282, -0.3065191867, -0.3492195916],
    ("euler_ancestral", 0): [-0.265997919, 0.0258039139, 0.4641084124, 0.0328525937, 0.0923370686, -0.2072439622],
    ("euler_ancestral", 1): [-0.0341696909, 0.1780961054, -0.0224684988, 0.221553749, -0.1839898809, -0.1558809912],
    ("heun", 0): [0.347620334, 0.1659484843, -0.0791367871, 0.3128331159, 0.0073156792, -0.0218850801],
    ("heun", 1): [0.3453873264, 0.1703105688, -0.0746041293, 0.3108268711, 0.0130743467, -0.0167388902],
    ("dpmpp_2m", 0): [0.4779754211, 0.0134708464, -0.3775525453, 0.4016830227, -0.2668668921, -0.3085758044],
    ("dpmpp_2m", 1): [0.4745077312, 0.0223021561, -0.372809267, 0.3956065011, -0.2582205869, -0.3014978252],
    ("dpmpp_2m_sde", 0): [-0.2944971617, -0.1461394296, 0.6297473735, -0.1563055583, 0.3383330741, -0.3103581395],
    ("dpmpp_2m_sde", 1): [-0.3252475196, 0.1900817191, 0.104465787, 0.1303565187, -0.1198268126, -0.0326060895],
}


@pytest.mark.parametrize("name, variant", sorted(GOLDEN))
def test_golden_numbers(name, variant):
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigmas = SIGMAS if variant == 0 else SIGMAS[1:]
    out = SAMPLERS[name](dummy, x, sigmas, generator=torch.Generator().manual_seed(1))
    expected = torch.tensor(GOLDEN[name, variant], dtype=torch.float64).reshape(2, 3)
    torch.testing.assert_close(out, expected, rtol=1e-8, atol=2e-10)


def test_golden_covers_every_sampler():
    assert {name for name, _ in GOLDEN} == set(SAMPLERS)


# ----------------------------------------------------------------------------- the contract
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_callback_reports_every_step_and_denoiser_gets_contract_inputs(name, gen):
    x = torch.randn(4, 3, generator=gen)
    calls, infos = [], []

    def spy(x_in, sigma, **cond):
        calls.append((sigma.shape, sigma.dtype, cond["label"].shape))
        return dummy(x_in, sigma)

    out = SAMPLERS[name](spy, x, SIGMAS, extra_args={"label": torch.zeros(4)}, callback=infos.append, generator=gen)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert [info["i"] for info in infos] == list(range(len(SIGMAS) - 1))
    assert [info["sigma"] for info in infos] == SIGMAS[:-1].tolist()
    assert [info["sigma_next"] for info in infos] == SIGMAS[1:].tolist()
    assert torch.equal(infos[0]["x"], x) and all(set(i) == {"i", "sigma", "sigma_next", "x", "x0_hat"} for i in infos)
    assert all(c == (torch.Size([4]), x.dtype, torch.Size([4])) for c in calls)
    # Heun makes one extra call per step except on the step from inf and the step to 0
    assert len(calls) == (len(SIGMAS) - 1) + (len(SIGMAS) - 3 if name == "heun" else 0)


def test_euler_ancestral_is_ddpm_fixed_small_and_ddim_eta1(gen):
    """sigma_up of k-diffusion's ancestral step is the DDPM posterior std in VE units (all three coincide)."""
    x = torch.randn(2, 3, generator=gen, dtype=torch.float64)
    outs = [fn(dummy, x, SIGMAS, generator=torch.Generator().manual_seed(1), **kw) for fn, kw in
            [(sample_ddpm, {}), (sample_ddim, {"eta": 1.0}), (sample_euler_ancestral, {})]]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(outs[0], outs[2], rtol=1e-10, atol=1e-12)


def test_progress_bar_and_sample_convenience(gen, capsys):
    out = sample(dummy, (5, 3), SIGMAS[1:], sampler="heun", generator=gen, device="cpu", progress=True)
    assert out.shape == (5, 3) and torch.isfinite(out).all()
    x = torch.randn((5, 3), generator=torch.Generator().manual_seed(0))
    again = SAMPLERS["heun"](dummy, x, SIGMAS[1:])
    torch.testing.assert_close(sample(dummy, (5, 3), SIGMAS[1:], sampler="heun", device="cpu",
                                      generator=torch.Generator().manual_seed(0)), again)


def test_get_sampler_unknown_name_lists_known():
    assert get_sampler("heun") is SAMPLERS["heun"]
    with pytest.raises(KeyError, match="dpmpp_2m.*got 'plms'"):
        get_sampler("plms")


BAD_SIGMAS = [
    (torch.tensor([1.0, 0.5]), "end in 0"),
    (torch.tensor([[1.0, 0.0]]), "1-D"),
    (torch.tensor([0.0]), ">= 2 entries"),
    (torch.tensor([1.0, 2.0, 0.0]), "strictly decreasing"),
    (torch.tensor([1.0, 1.0, 0.0]), "strictly decreasing"),
    (torch.tensor([1.0, float("inf"), 0.0]), "inf only in the first"),
    (torch.tensor([1.0, float("nan"), 0.0]), "not NaN"),
    (torch.tensor([1.0, -0.5, 0.0]), ">= 0"),
    ([1.0, 0.0], "torch.Tensor"),
]


@pytest.mark.parametrize("sigmas, message", BAD_SIGMAS)
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_bad_sigmas_raise_naming_the_argument(name, sigmas, message):
    with pytest.raises(ValueError, match=f"sigmas.*{message}|{message}.*sigmas|sigmas must"):
        SAMPLERS[name](dummy, torch.zeros(2, 3), sigmas)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_bad_x_and_args_raise(name):
    sigmas = SIGMAS[1:]
    with pytest.raises(ValueError, match="x must be finite"):
        SAMPLERS[name](dummy, torch.tensor([[math.nan, 0.0, 0.0]]), sigmas)
    with pytest.raises(ValueError, match="extra_args must be a dict"):
        SAMPLERS[name](dummy, torch.zeros(1, 3), sigmas, extra_args=[1])
    with pytest.raises(ValueError, match="callback must be callable"):
        SAMPLERS[name](dummy, torch.zeros(1, 3), sigmas, callback=3)


@pytest.mark.parametrize("fn, options, message", [
    (sample_ddpm, {"variance": "learned"}, "variance must be one of"),
    (sample_ddim, {"eta": 1.5}, "eta must be a number with 0 <= eta <= 1.0, got 1.5"),
    (sample_ddim, {"eta": -0.1}, "eta must be"),
    (sample_euler_ancestral, {"eta": -1}, "eta must be a number with eta >= 0, got -1"),
    (SAMPLERS["dpmpp_2m_sde"], {"eta": "big"}, "eta must be"),
])
def test_bad_options_raise(fn, options, message):
    with pytest.raises(ValueError, match=message):
        fn(dummy, torch.zeros(1, 3), SIGMAS[1:], **options)


# ----------------------------------------------------------------------------- no graph, noise hook
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_samplers_build_no_autograd_graph(name, gen):
    """Outside torch.no_grad, with a denoiser whose parameters require grad, no step keeps a graph."""
    w = torch.nn.Parameter(torch.tensor(0.8))

    def net(x, sigma):
        return w * torch.tanh(x)
    out = SAMPLERS[name](net, torch.randn(4, 3, generator=gen), SIGMAS[1:], generator=gen)
    assert torch.is_grad_enabled() and not out.requires_grad and out.grad_fn is None


def test_sample_leaves_no_graph_with_a_real_network(gen):
    from minidiff.denoiser import Denoiser
    from minidiff.models.unet import unet_from_preset
    from minidiff.schedules import alphas_cumprod_from_betas, linear_betas, sampling_sigmas

    ab = alphas_cumprod_from_betas(linear_betas(1000))
    den = Denoiser(unet_from_preset("tiny", base_channels=8, channel_mults=(1, 2), attn_levels=()), ab)
    seen = []
    out = sample(den, (2, 1, 8, 8), sampling_sigmas(ab, 3), device="cpu", generator=gen,
                 callback=lambda info: seen.append(info["x0_hat"].requires_grad))
    assert out.grad_fn is None and not any(seen)


STOCHASTIC = ("ddpm", "euler_ancestral", "dpmpp_2m_sde")


@pytest.mark.parametrize("name", STOCHASTIC)
def test_noise_sampler_supplies_every_fresh_draw(name):
    """With noise_sampler returning zeros, a stochastic sampler adds no noise; with a recorded stream it is
    reproducible without any generator; its calls see (sigma, sigma_next) of the step."""
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    levels = []

    def zeros(s, s_next):
        levels.append((s, s_next))
        return torch.zeros_like(x)
    out = SAMPLERS[name](dummy, x, SIGMAS[1:], noise_sampler=zeros)
    assert levels and all(s > s_next > 0 for s, s_next in levels)
    seeded = SAMPLERS[name](dummy, x, SIGMAS[1:], generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(out, seeded)
    stream = torch.Generator().manual_seed(1)
    hooked = SAMPLERS[name](dummy, x, SIGMAS[1:], noise_sampler=lambda s, s_next: torch.randn(
        x.shape, generator=stream, dtype=x.dtype))
    torch.testing.assert_close(hooked, seeded, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_noise_sampler_and_generator_are_validated(name):
    x = torch.randn(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="noise_sampler must be callable"):
        SAMPLERS[name](dummy, x, SIGMAS[1:], noise_sampler=42)
    with pytest.raises(ValueError, match="generator must be a torch.Generator"):
        SAMPLERS[name](dummy, x, SIGMAS[1:], generator=42)
    if name in STOCHASTIC:
        with pytest.raises(ValueError, match="noise_sampler must return a tensor of shape"):
            SAMPLERS[name](dummy, x, SIGMAS[1:], noise_sampler=lambda s, s_next: torch.zeros(3))
