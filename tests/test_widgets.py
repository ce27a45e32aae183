"""Explorers: the view functions behind each widget run headless for several values and draw what they should."""
import pytest
import torch
from matplotlib.figure import Figure

from minidiff import schedules
from minidiff.course import widgets
from minidiff.denoiser import Denoiser
from minidiff.models.unet import unet_from_preset
from minidiff.samplers import HEUN_MAX_RATIO, SAMPLERS

pytest.importorskip("ipywidgets")

SIZE = 8  # tiny images keep every update well under a second on a CPU


@pytest.fixture(scope="module")
def denoiser():
    """An untrained class-conditional tiny U-Net: the widgets only need the contract, not a good model."""
    torch.manual_seed(0)
    net = unet_from_preset("tiny", base_channels=8, num_groups=4, num_classes=3)
    return Denoiser(net, schedules.alphas_cumprod_from_betas(schedules.linear_betas())).eval()


@pytest.fixture
def images(gen):
    return torch.rand(4, 1, SIZE, SIZE, generator=gen) * 2 - 1


# ----------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("schedule", widgets.SCHEDULE_CHOICES)
def test_schedule_alphas_cumprod_is_a_decreasing_table(schedule):
    ab = widgets.schedule_alphas_cumprod(schedule, 200)
    assert ab.shape == (200,) and ab.dtype == torch.float64
    assert (ab[1:] <= ab[:-1]).all() and 0 <= ab[-1] < ab[0] <= 1


def test_karras_is_not_a_training_schedule():
    with pytest.raises(ValueError, match="sampling spacing"):
        widgets.schedule_alphas_cumprod("karras", 100)


def test_schedule_alphas_cumprod_rejects_unknown_name():
    with pytest.raises(ValueError, match="schedule must be one of"):
        widgets.schedule_alphas_cumprod("quadratic")


@pytest.mark.parametrize("schedule,T,beta_range,t", [
    ("linear", 1000, (1e-4, 0.02), 0), ("cosine", 1000, (1e-4, 0.02), 999), ("scaled_linear", 50, (1e-3, 0.03), 25),
    ("sigmoid", 200, (1e-4, 0.02), 100),
])
def test_schedule_view_draws_curves_markers_and_images(images, gen, schedule, T, beta_range, t):
    fig = widgets.schedule_view(schedule, T, beta_range, t, images=images, noise=torch.randn_like(images))
    assert isinstance(fig, Figure)
    ax_ab, ax_snr, ax_img = fig.axes
    assert len(ax_ab.lines) == 2 and len(ax_snr.lines) == 3  # curve + marker at t (+ the SNR = 1 line)
    assert ax_ab.lines[1].get_xdata()[0] == t
    assert len(ax_img.images) == 1 and f"t={t}" in ax_img.get_title()


def test_schedule_view_at_t0_shows_nearly_clean_images(images):
    """At t = 0 the noised images must still be the images (alpha_bar_0 = 1 - beta_0)."""
    fig = widgets.schedule_view("linear", 1000, (1e-4, 0.02), 0, images=images, noise=torch.zeros_like(images))
    shown = fig.axes[2].images[0].get_array()
    assert shown.min() < 0.2 or shown.max() > 0.8  # not a flat grey field


def test_schedule_view_rejects_t_outside_T(images):
    with pytest.raises(ValueError, match="t must lie in"):
        widgets.schedule_view("linear", 100, (1e-4, 0.02), 100, images=images, noise=images)


def test_schedule_explorer_builds_and_t_follows_T(images):
    w = widgets.schedule_explorer(images)
    assert isinstance(w.result, Figure)
    T_w = next(c for c in w.children if getattr(c, "description", "") == "T")
    t_w = next(c for c in w.children if getattr(c, "description", "") == "t")
    T_w.value = 100
    assert t_w.max == 99 and t_w.value <= 99
    assert isinstance(w.result, Figure)


# ----------------------------------------------------------------------------- samplers
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_sampler_view_every_sampler(denoiser, sampler):
    fig = widgets.sampler_view(denoiser, sampler, 3, 0.5, "trailing", 1, n_images=2, image_size=SIZE)
    ax_img, ax_sig = fig.axes
    assert len(ax_img.images) == 1 and len(ax_sig.lines) == 1
    sigmas = schedules.sampling_sigmas(denoiser.alphas_cumprod, 3, "trailing").tolist()
    # Heun: two evaluations per step, one on the last step and on steps its ratio guard sends to Euler
    guarded = sum(s > HEUN_MAX_RATIO * s_next for s, s_next in zip(sigmas[:-2], sigmas[1:-1]))
    nfe = 5 - guarded if sampler == "heun" else 3
    assert f"{nfe} NFE" in ax_img.get_title()


@pytest.mark.parametrize("spacing", widgets.SPACING_CHOICES)
def test_sampler_view_every_spacing(denoiser, spacing):
    fig = widgets.sampler_view(denoiser, "ddim", 4, 0.0, spacing, 0, n_images=2, image_size=SIZE)
    assert len(fig.axes[1].lines[0].get_xdata()) == 4


def test_sampler_view_same_seed_same_picture(denoiser):
    def pixels(seed):
        fig = widgets.sampler_view(denoiser, "euler_ancestral", 2, 1.0, "trailing", seed, n_images=2, image_size=SIZE)
        return fig.axes[0].images[0].get_array()

    assert (pixels(3) == pixels(3)).all() and not (pixels(3) == pixels(4)).all()


def test_sampler_view_rejects_unknown_names(denoiser):
    with pytest.raises(KeyError, match="sampler must be one of"):
        widgets.sampler_view(denoiser, "plms", 3, image_size=SIZE)
    with pytest.raises(ValueError, match="spacing must be one of"):
        widgets.sampler_view(denoiser, "ddim", 3, spacing="uniform", image_size=SIZE)


def test_sampler_explorer_builds(denoiser):
    w = widgets.sampler_explorer(denoiser, n_images=2, image_size=SIZE)
    assert isinstance(w.result, Figure)


# ----------------------------------------------------------------------------- guidance
@pytest.mark.parametrize("class_label,scale,rescale,steps", [(0, 1.0, 0.0, 2), (2, 3.0, 0.7, 3), (1, 0.0, 0.0, 1)])
def test_guidance_view(denoiser, class_label, scale, rescale, steps):
    fig = widgets.guidance_view(denoiser, class_label, scale, rescale, steps, 0, n_images=2, image_size=SIZE,
                                class_names=["a", "b", "c"])
    (ax,) = fig.axes
    assert len(ax.images) == 1 and ax.get_title().startswith("abc"[class_label])


def test_guidance_view_rejects_bad_input(denoiser):
    with pytest.raises(ValueError, match="class_label must lie in \\[0, 3\\)"):
        widgets.guidance_view(denoiser, 3, image_size=SIZE)
    with pytest.raises(ValueError, match="guidance_scale"):
        widgets.guidance_view(denoiser, 0, -1.0, image_size=SIZE)
    uncond = Denoiser(unet_from_preset("tiny", base_channels=8, num_groups=4), denoiser.alphas_cumprod)
    with pytest.raises(ValueError, match="class-conditional"):
        widgets.guidance_view(uncond, 0, image_size=SIZE)


def test_guidance_explorer_builds(denoiser):
    w = widgets.guidance_explorer(denoiser, n_images=2, image_size=SIZE)
    assert isinstance(w.result, Figure)
    labels = next(c for c in w.children if getattr(c, "description", "") == "class")
    assert labels.options == (("class 0", 0), ("class 1", 1), ("class 2", 2))
