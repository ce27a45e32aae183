"""Explorers: the view functions behind each widget run headless for several values and draw what they should.

Beyond the structure of each figure (axes, lines, titles), the tests render figures to pixels with Agg and check
that the picture is the computation it claims to show (the sampler's output for that seed, x_t for that t),
that every control changes the pixels, that the same inputs give the same pixels, and that each explorer's
controls redraw exactly the figure the view function draws for the values they hold.
"""
import types

import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg

from minidiff import schedules
from minidiff.course import plotting, widgets
from minidiff.denoiser import Denoiser
from minidiff.forward import q_sample
from minidiff.guidance import CFGDenoiser
from minidiff.models.unet import unet_from_preset
from minidiff.samplers import HEUN_MAX_RATIO, SAMPLERS, get_sampler
from minidiff.utils import randn

pytest.importorskip("ipywidgets")

SIZE = 8  # tiny images keep every update well under a second on a CPU
K = 3  # classes of the test denoiser; its null class has id K


@pytest.fixture(scope="module")
def denoiser():
    """An untrained class-conditional tiny U-Net: the widgets only need the contract, not a good model.

    It predicts x0 and its output conv is re-drawn at random (the U-Net zero-initialises it, which would make
    x0_hat = 0 whatever the input and the class). So x0_hat depends on x, sigma and the class label and stays
    near [-1, 1]: every sampler setting and every guidance scale draws a different, unsaturated picture.
    """
    torch.manual_seed(0)
    net = unet_from_preset("tiny", base_channels=8, num_groups=4, num_classes=K, zero_init=False)
    torch.nn.init.normal_(net.conv_out.weight, std=0.1)
    return Denoiser(net, schedules.alphas_cumprod_from_betas(schedules.linear_betas()), "x0").eval()


@pytest.fixture
def images(gen):
    return torch.rand(4, 1, SIZE, SIZE, generator=gen) * 2 - 1


@pytest.fixture(autouse=True)
def frozen_clock(monkeypatch):
    """The sampler and guidance titles print the wall time of the run; with a clock that never moves a figure
    is a pure function of its inputs, so two figures can be compared pixel for pixel."""
    monkeypatch.setattr(widgets, "time", types.SimpleNamespace(perf_counter=lambda: 0.0))


# ----------------------------------------------------------------------------- pixels
def render(fig) -> np.ndarray:
    """The figure rasterised by Agg, as an (H, W, 4) uint8 RGBA array.

    Constrained layout moves the axes by a pixel or so between a figure's first and later draws, so pixels are
    compared between figures built afresh and each rendered once."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba()).copy()


def picture(pixels: np.ndarray, ax) -> np.ndarray:
    """The pixels of the one image in ``ax`` (the sample grid), cropped from its figure's last ``render``."""
    (im,) = ax.images
    box, height = im.get_window_extent(), pixels.shape[0]
    return pixels[round(height - box.y1):round(height - box.y0), round(box.x0):round(box.x1)]


def shown(ax) -> np.ndarray:
    """The array that the one image in ``ax`` displays (values in [0, 1], gray colormap)."""
    (im,) = ax.images
    return np.asarray(im.get_array())


def as_shown(x: torch.Tensor, nrow: int) -> np.ndarray:
    """What ``show_images(x, nrow)`` displays for a [-1, 1] batch of 1-channel images: its grid in [0, 1]."""
    return ((plotting.to_grid(x, nrow).clamp(-1, 1) + 1) / 2)[0].numpy()


def drawing(fig) -> list:
    """What every axes of ``fig`` draws, as data: title, line coordinates, image arrays (and the suptitle).

    The explorers compare figures this way: an explorer may already have rendered its figure for display, and a
    figure's pixels depend a little on its draw history (see ``render``); the pixels of the views are tested below."""
    return [fig.get_suptitle()] + [(ax.get_title(), [line.get_xydata().tolist() for line in ax.lines],
                                    [np.asarray(im.get_array()).tolist() for im in ax.images]) for ax in fig.axes]


def control(w, description):
    return next(c for c in w.children if getattr(c, "description", "") == description)


# ----------------------------------------------------------------------------- every view: canvas = array
def _views(denoiser, images, gen):
    noise = torch.randn(images.shape, generator=gen)
    return {
        "schedule": lambda: widgets.schedule_view("linear", 1000, (1e-4, 0.02), 300, images=images, noise=noise),
        "sampler": lambda: widgets.sampler_view(denoiser, "ddim", 3, 0.0, "trailing", 0, n_images=4, image_size=SIZE),
        "guidance": lambda: widgets.guidance_view(denoiser, 1, 3.0, 0.0, 3, 0, n_images=4, image_size=SIZE),
    }


@pytest.mark.parametrize("view", ["schedule", "sampler", "guidance"])
def test_the_canvas_shows_the_image_array(denoiser, images, gen, view):
    """Rendered with Agg, the pixel at the centre of every cell of the displayed array has exactly that cell's
    gray level (so the picture is the array, not a blank, shifted or rescaled one), and the grid is not flat."""
    fig = _views(denoiser, images, gen)[view]()
    ax = fig.axes[-1] if view == "schedule" else fig.axes[0]
    pixels, (im,), data = render(fig), ax.images, shown(ax)
    rows, cols = np.meshgrid(np.arange(data.shape[0]), np.arange(data.shape[1]), indexing="ij")
    xy = ax.transData.transform(np.stack([cols.ravel(), rows.ravel()], 1).astype(float))  # cell centres
    drawn = pixels[(pixels.shape[0] - xy[:, 1]).astype(int), xy[:, 0].astype(int)]
    np.testing.assert_array_equal(drawn, im.to_rgba(data, bytes=True).reshape(-1, 4))
    assert len(np.unique(drawn[:, 0])) > 20  # many gray levels: a picture, not a flat or saturated field


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
    """The curve is the schedule's alpha_bar table, the marker sits on it at t, and the image panel is exactly
    ``images`` noised to x_t with ``noise`` (q_sample at t)."""
    noise = torch.randn(images.shape, generator=gen)
    fig = widgets.schedule_view(schedule, T, beta_range, t, images=images, noise=noise)
    ax_ab, ax_snr, ax_img = fig.axes
    assert len(ax_ab.lines) == 2 and len(ax_snr.lines) == 3  # curve + marker at t (+ the SNR = 1 line)
    ab = widgets.schedule_alphas_cumprod(schedule, T, beta_range)
    np.testing.assert_array_equal(ax_ab.lines[0].get_ydata(), ab.numpy())
    assert ax_ab.lines[1].get_xdata()[0] == t and ax_ab.lines[1].get_ydata()[0] == ab[t].item()
    assert len(ax_img.images) == 1 and f"t={t}" in ax_img.get_title()
    np.testing.assert_array_equal(shown(ax_img), as_shown(q_sample(images, torch.full((4,), t), noise, ab), nrow=2))


def test_schedule_view_at_t0_shows_nearly_clean_images(images):
    """At t = 0 the noised images must still be the images (alpha_bar_0 = 1 - beta_0)."""
    fig = widgets.schedule_view("linear", 1000, (1e-4, 0.02), 0, images=images, noise=torch.zeros_like(images))
    at_t0 = shown(fig.axes[2])
    assert at_t0.min() < 0.2 or at_t0.max() > 0.8  # not a flat grey field
    np.testing.assert_allclose(at_t0, as_shown(images, nrow=2), atol=1e-4)


def test_schedule_view_pixels_follow_every_control(images, gen):
    """Same inputs, same pixels; moving t, the schedule, T or the beta range changes the rendered x_t picture
    (not only the curves or the title); the beta range changes no pixel of the cosine schedule, which ignores it."""
    noise = torch.randn(images.shape, generator=gen)
    base = {"schedule": "linear", "T": 1000, "beta_range": (1e-4, 0.02), "t": 300}

    def view(**change):
        fig = widgets.schedule_view(**{**base, **change}, images=images, noise=noise)
        pixels = render(fig)
        return pixels, picture(pixels, fig.axes[2])

    whole, pic = view()
    assert np.array_equal(whole, view()[0])
    for change in [{"t": 600}, {"schedule": "sigmoid"}, {"T": 500}, {"beta_range": (1e-3, 0.03)}]:
        assert not np.array_equal(view(**change)[1], pic), f"{change} left the x_t picture unchanged"
    cosine = view(schedule="cosine")
    assert not np.array_equal(cosine[1], pic)
    assert np.array_equal(cosine[0], view(schedule="cosine", beta_range=(1e-3, 0.03))[0])


def test_schedule_view_rejects_t_outside_T(images):
    with pytest.raises(ValueError, match="t must lie in"):
        widgets.schedule_view("linear", 100, (1e-4, 0.02), 100, images=images, noise=images)


def _set_beta_range(w, beta_range) -> tuple:
    """Move the explorer's "beta start" and "beta end" sliders; return the range they now hold (sorted, as the
    explorer passes it to ``schedule_view``)."""
    control(w, "beta start").value, control(w, "beta end").value = beta_range
    start, end = control(w, "beta start").value, control(w, "beta end").value
    return min(start, end), max(start, end)


def test_schedule_explorer_redraws_what_its_controls_say(images):
    """The explorer starts at linear, T = 1000, beta in [1e-4, 0.02], t = 500, and after each control move its figure
    draws exactly what ``schedule_view`` draws at the controls' values (with the explorer's fixed noise, seed 0),
    which differs from the figure before the move; moving T caps t at T - 1."""
    w = widgets.schedule_explorer(images)
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    expected = {"schedule": "linear", "T": 1000, "beta_range": (1e-4, 0.02), "t": 500}

    def view():
        return widgets.schedule_view(**expected, images=images, noise=noise)

    assert drawing(w.result) == drawing(view())
    for description, value in [("t", 250), ("schedule", "cosine"), ("T", 100), ("schedule", "sigmoid"),
                               ("beta range", (1e-3, 0.03))]:
        before = drawing(w.result)
        if description == "beta range":
            expected["beta_range"] = _set_beta_range(w, value)
        else:
            control(w, description).value = value
            expected[description] = value
        if description == "T":
            assert control(w, "t").max == 99 and control(w, "t").value == 99
            expected["t"] = 99
        assert drawing(w.result) == drawing(view()), f"after moving {description} to {value}"
        assert drawing(w.result) != before, f"moving {description} to {value} did not change the figure"


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


@pytest.mark.parametrize("sampler,eta", [("dpmpp_2m", 0.0), ("ddim", 0.5), ("euler_ancestral", 1.0), ("ddpm", 0.0)])
def test_sampler_view_shows_the_samplers_output(denoiser, sampler, eta):
    """The grid is the sampler's own output: the same sampler called directly on N(0, I) from a CPU generator
    seeded with ``seed`` (one label per image, cycling over the classes) gives exactly the displayed array;
    the sigma panel plots the sampler's sigmas."""
    n, steps, seed = 4, 3, 7
    fig = widgets.sampler_view(denoiser, sampler, steps, eta, "trailing", seed, n_images=n, image_size=SIZE)
    g = torch.Generator().manual_seed(seed)
    sigmas = schedules.sampling_sigmas(denoiser.alphas_cumprod, steps, "trailing")
    options = {"eta": eta} if sampler in ("ddim", "euler_ancestral") else {}
    out = get_sampler(sampler)(denoiser, randn((n, 1, SIZE, SIZE), generator=g), sigmas,
                               extra_args={"class_labels": torch.arange(n) % K}, generator=g, **options)
    np.testing.assert_array_equal(shown(fig.axes[0]), as_shown(out, nrow=4))
    np.testing.assert_allclose(fig.axes[1].lines[0].get_ydata(), sigmas[:-1].clamp(max=1e4).numpy())


@pytest.mark.parametrize("spacing", widgets.SPACING_CHOICES)
def test_sampler_view_every_spacing(denoiser, spacing):
    fig = widgets.sampler_view(denoiser, "ddim", 4, 0.0, spacing, 0, n_images=2, image_size=SIZE)
    assert len(fig.axes[1].lines[0].get_xdata()) == 4


def test_sampler_view_same_seed_same_picture(denoiser):
    def pixels(seed):
        fig = widgets.sampler_view(denoiser, "euler_ancestral", 2, 1.0, "trailing", seed, n_images=2, image_size=SIZE)
        return fig.axes[0].images[0].get_array()

    assert (pixels(3) == pixels(3)).all() and not (pixels(3) == pixels(4)).all()


def test_sampler_view_pixels_follow_every_control(denoiser):
    """Same inputs, same pixels (whole figure); changing the sampler, steps, eta, spacing or seed changes the
    rendered sample grid; eta changes nothing in the grid of a sampler that does not take it (euler)."""
    base = {"sampler": "ddim", "steps": 3, "eta": 0.0, "spacing": "trailing", "seed": 0}

    def view(**change):
        fig = widgets.sampler_view(denoiser, **{**base, **change}, n_images=4, image_size=SIZE)
        pixels = render(fig)
        return pixels, picture(pixels, fig.axes[0])

    whole, pic = view()
    assert np.array_equal(whole, view()[0])
    for change in [{"sampler": "ddpm"}, {"steps": 5}, {"eta": 1.0}, {"spacing": "leading"}, {"seed": 1}]:
        assert not np.array_equal(view(**change)[1], pic), f"{change} left the sample grid unchanged"

    def grid(**change):
        return shown(widgets.sampler_view(denoiser, **{**base, **change}, n_images=4, image_size=SIZE).axes[0])

    assert not np.array_equal(grid(sampler="dpmpp_2m"), grid(sampler="euler"))
    assert np.array_equal(grid(sampler="euler"), grid(sampler="euler", eta=1.0))


def test_sampler_view_rejects_unknown_names(denoiser):
    with pytest.raises(KeyError, match="sampler must be one of"):
        widgets.sampler_view(denoiser, "plms", 3, image_size=SIZE)
    with pytest.raises(ValueError, match="spacing must be one of"):
        widgets.sampler_view(denoiser, "ddim", 3, spacing="uniform", image_size=SIZE)


def test_sampler_explorer_redraws_what_its_controls_say(denoiser):
    """The explorer starts at DPM-Solver++(2M), 10 trailing steps, eta 0, seed 0; after each control move its
    figure draws exactly what ``sampler_view`` draws at the controls' values, which differs from the figure before
    the move."""
    w = widgets.sampler_explorer(denoiser, n_images=2, image_size=SIZE)
    expected = {"sampler": "dpmpp_2m", "steps": 10, "eta": 0.0, "spacing": "trailing", "seed": 0}

    def view():
        return widgets.sampler_view(denoiser, **expected, n_images=2, image_size=SIZE)

    assert drawing(w.result) == drawing(view())
    for key, value in [("sampler", "ddim"), ("eta", 0.5), ("steps", 4), ("spacing", "leading"), ("seed", 1)]:
        before = drawing(w.result)
        control(w, key).value = value
        expected[key] = value
        assert drawing(w.result) == drawing(view()), f"after moving {key} to {value}"
        assert drawing(w.result) != before, f"moving {key} to {value} did not change the figure"


# ----------------------------------------------------------------------------- guidance
def cfg_samples(denoiser, class_label, scale, rescale=0.0, *, steps, seed, n):
    """What guidance_view should show, computed directly: DPM-Solver++(2M) over trailing sigmas on N(0, I) from a
    CPU generator seeded with ``seed``, with CFG against the null class K; ``scale=None``: the bare denoiser."""
    model = denoiser if scale is None else CFGDenoiser(denoiser, scale, guidance_rescale=rescale,
                                                       uncond={"class_labels": torch.tensor([K])})
    g = torch.Generator().manual_seed(seed)
    sigmas = schedules.sampling_sigmas(denoiser.alphas_cumprod, steps, "trailing")
    return get_sampler("dpmpp_2m")(model, randn((n, 1, SIZE, SIZE), generator=g), sigmas,
                                   extra_args={"class_labels": torch.full((n,), class_label)}, generator=g)


@pytest.mark.parametrize("class_label,scale,rescale,steps", [(0, 1.0, 0.0, 2), (2, 3.0, 0.7, 3), (1, 0.0, 0.0, 1)])
def test_guidance_view(denoiser, class_label, scale, rescale, steps):
    """The title names the class and the grid is exactly the CFG samples of that class at that scale and rescale."""
    fig = widgets.guidance_view(denoiser, class_label, scale, rescale, steps, 0, n_images=2, image_size=SIZE,
                                class_names=["a", "b", "c"])
    (ax,) = fig.axes
    assert len(ax.images) == 1 and ax.get_title().startswith("abc"[class_label])
    out = cfg_samples(denoiser, class_label, scale, rescale, steps=steps, seed=0, n=2)
    np.testing.assert_array_equal(shown(ax), as_shown(out, nrow=2))


def test_guidance_scale_one_is_the_unguided_model_and_three_is_not(denoiser):
    """Scale 1 renders exactly the pixels of the conditional model sampled with no guidance wrapper at all
    (CFGDenoiser returns the conditional prediction itself at w = 1, so the comparison is exact), scale 0 exactly
    those of the null-class model, and scale 3 a different picture. Rescale cannot matter at scale 1 and does at 3."""
    n, steps, seed, label = 4, 4, 5, 1

    def view(scale, rescale=0.0):
        return widgets.guidance_view(denoiser, label, scale, rescale, steps, seed, n_images=n, image_size=SIZE)

    def drawn_like(fig, x):
        """``x`` shown the way guidance_view lays out its grid, under fig's title, rendered."""
        expected = plotting.show_images(x, nrow=n, scale=1.2)
        expected.axes[0].set_title(fig.axes[0].get_title(), fontsize=9)
        return render(expected)

    unguided = cfg_samples(denoiser, label, None, steps=steps, seed=seed, n=n)
    null_class = cfg_samples(denoiser, K, None, steps=steps, seed=seed, n=n)
    (at_1, at_0, at_3) = figs = [view(1.0), view(0.0), view(3.0)]
    px_1, px_0, px_3 = (render(f) for f in figs)
    assert np.array_equal(px_1, drawn_like(at_1, unguided))
    assert np.array_equal(px_0, drawn_like(at_0, null_class))
    pic_1, pic_0, pic_3 = (picture(px, f.axes[0]) for px, f in zip((px_1, px_0, px_3), figs))
    assert not np.array_equal(pic_3, pic_1)
    assert not np.array_equal(pic_1, pic_0)  # the class label reaches the net
    assert np.array_equal(shown(view(1.0, 0.7).axes[0]), shown(at_1.axes[0]))
    assert not np.array_equal(shown(view(3.0, 0.7).axes[0]), shown(at_3.axes[0]))


def test_guidance_view_rejects_bad_input(denoiser):
    with pytest.raises(ValueError, match="class_label must lie in \\[0, 3\\)"):
        widgets.guidance_view(denoiser, 3, image_size=SIZE)
    with pytest.raises(ValueError, match="guidance_scale"):
        widgets.guidance_view(denoiser, 0, -1.0, image_size=SIZE)
    uncond = Denoiser(unet_from_preset("tiny", base_channels=8, num_groups=4), denoiser.alphas_cumprod)
    with pytest.raises(ValueError, match="class-conditional"):
        widgets.guidance_view(uncond, 0, image_size=SIZE)


def test_guidance_explorer_redraws_what_its_controls_say(denoiser):
    """The explorer lists the classes and starts at class 0, scale 3, rescale 0, 20 steps, seed 0; after each
    control move its figure draws exactly what ``guidance_view`` draws at the controls' values, which differs from
    the figure before the move."""
    w = widgets.guidance_explorer(denoiser, n_images=2, image_size=SIZE)
    assert control(w, "class").options == (("class 0", 0), ("class 1", 1), ("class 2", 2))
    expected = {"class_label": 0, "guidance_scale": 3.0, "guidance_rescale": 0.0, "steps": 20, "seed": 0}

    def view():
        return widgets.guidance_view(denoiser, **expected, n_images=2, image_size=SIZE,
                                     class_names=["class 0", "class 1", "class 2"])

    assert drawing(w.result) == drawing(view())
    for description, key, value in [("class", "class_label", 2), ("scale", "guidance_scale", 1.0),
                                    ("scale", "guidance_scale", 5.0), ("rescale", "guidance_rescale", 0.5),
                                    ("steps", "steps", 3), ("seed", "seed", 1)]:
        before = drawing(w.result)
        control(w, description).value = value
        expected[key] = value
        assert drawing(w.result) == drawing(view()), f"after moving {description} to {value}"
        assert drawing(w.result) != before, f"moving {description} to {value} did not change the figure"
