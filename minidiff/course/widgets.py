"""Interactive explorers for the lectures: noise schedules (01), samplers (03), classifier-free guidance (05).

Each explorer is ``ipywidgets.interactive`` over a plain *view* function that takes the slider values and
returns a matplotlib Figure. The view functions are ordinary Python: tests and headless runs call them
directly, and a student can call one with chosen values to keep a picture.

| explorer              | view function      | shows                                                        |
|-----------------------|--------------------|--------------------------------------------------------------|
| ``schedule_explorer`` | ``schedule_view``  | alpha_bar_t and log-SNR_t with a marker at t, images at t    |
| ``sampler_explorer``  | ``sampler_view``   | a sample grid from the pretrained model and its sigma list   |
| ``guidance_explorer`` | ``guidance_view``  | a grid of one class at a guidance scale and rescale          |
"""
from __future__ import annotations

import functools
import inspect
import io
import math
import time

import torch
from matplotlib.figure import Figure

from minidiff import schedules
from minidiff.course import plotting
from minidiff.denoiser import NFECounter, num_classes_of
from minidiff.forward import q_sample
from minidiff.guidance import CFGDenoiser
from minidiff.samplers import SAMPLERS, get_sampler
from minidiff.utils import get_device, randn

__all__ = [
    "SCHEDULE_CHOICES", "SPACING_CHOICES", "schedule_alphas_cumprod", "pretrained_denoiser",
    "figure_png", "schedule_view", "schedule_explorer", "sampler_view", "sampler_explorer", "guidance_view",
    "guidance_explorer",
]

SCHEDULE_CHOICES = ("linear", "cosine", "scaled_linear", "sigmoid")  # training schedules; Karras is a spacing
SPACING_CHOICES = schedules.SAMPLING_SPACINGS
_BETA_SCHEDULES = ("linear", "scaled_linear", "sigmoid")  # the ones a beta range applies to


# ----------------------------------------------------------------------------- shared helpers
def schedule_alphas_cumprod(schedule: str, T: int = 1000, beta_range=(1e-4, 0.02)) -> torch.Tensor:
    """alpha_bar_t (T,) of a named training schedule (Karras levels are a sampling spacing: see sampler_explorer)."""
    if schedule not in SCHEDULE_CHOICES:
        raise ValueError(f"schedule must be one of {SCHEDULE_CHOICES} (Karras et al. 2022's levels are a sampling "
                         f"spacing, not a training schedule: schedules.sampling_sigmas(..., 'karras')), got {schedule!r}")
    beta_start, beta_end = beta_range
    if schedule == "cosine":
        return schedules.alphas_cumprod_from_betas(schedules.cosine_betas(T))
    betas = schedules.make_betas(schedule, T, beta_start=beta_start, beta_end=beta_end)
    return schedules.alphas_cumprod_from_betas(betas)


@functools.lru_cache(maxsize=4)
def pretrained_denoiser(name: str = "fashion-mnist-cond"):
    """The shipped model ``name`` on ``get_device()``, in eval mode, loaded once per session."""
    from minidiff import pretrained  # imported here: the schedule explorer needs no checkpoint

    return pretrained.load(name, device=get_device()).eval()


def _image_shape(denoiser, image_size: int) -> tuple[int, int, int]:
    config = getattr(getattr(denoiser, "net", None), "config", None)
    return (getattr(config, "in_channels", 1), image_size, image_size)


def _model_device(denoiser) -> torch.device:
    params = list(denoiser.parameters()) if hasattr(denoiser, "parameters") else []
    return params[0].device if params else get_device()


def _run_sampler(denoiser, sampler: str, sigmas, shape, seed: int, extra_args: dict, options: dict):
    """Sample from N(0, I) drawn by a CPU generator (same seed, same picture on every device); count NFE."""
    fn, counted = get_sampler(sampler), NFECounter(denoiser)
    g = torch.Generator().manual_seed(seed)
    x = randn(shape, generator=g, device=_model_device(denoiser))
    start = time.perf_counter()
    out = fn(counted, x, sigmas, extra_args=extra_args, generator=g, **options)
    return out, counted.calls, time.perf_counter() - start


def _class_labels(denoiser, labels, n: int, device) -> dict:
    if num_classes_of(denoiser) is None:
        return {}
    labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1).expand(n) if labels is not None \
        else torch.arange(n) % num_classes_of(denoiser)
    return {"class_labels": labels.to(device)}


def figure_png(fig: Figure, dpi: int = 80) -> bytes:
    """The PNG bytes of a matplotlib Figure, rendered with the Agg canvas (no pyplot, no backend state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    buf = io.BytesIO()
    FigureCanvasAgg(fig)
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def _explorer(view, **controls):
    """``ipywidgets.interactive`` over ``view`` that shows its figure, as a PNG, in the explorer's output area when
    the explorer is created and after every control change. (``interactive`` alone never displays a returned
    figure: the explorers were blank in JupyterLab because of that.) The last figure is kept as ``.result``."""
    import ipywidgets as W
    from IPython.display import Image, display

    def draw(**kw):
        fig = view(**kw)
        display(Image(data=figure_png(fig), format="png"))
        return fig
    draw.__signature__ = inspect.signature(view)
    return W.interactive(draw, **controls)


# ----------------------------------------------------------------------------- (1) schedules, lecture 01
def schedule_view(schedule: str = "linear", T: int = 1000, beta_range=(1e-4, 0.02), t: int = 500, *,
                  images: torch.Tensor, noise: torch.Tensor) -> Figure:
    """alpha_bar_t and log-SNR_t of one schedule with a marker at t, and ``images`` noised to x_t with ``noise``."""
    if not 0 <= t < T:
        raise ValueError(f"t must lie in [0, T) = [0, {T}), got {t}")
    ab = schedule_alphas_cumprod(schedule, T, beta_range)
    fig = Figure(figsize=(11, 3.2), layout="constrained")
    ax_ab, ax_snr, ax_img = fig.subplots(1, 3, width_ratios=(1, 1, 0.9))
    plotting.plot_schedules({schedule: ab}, t=t, axes=(ax_ab, ax_snr))
    x_t = q_sample(images, torch.full((images.shape[0],), t), noise, ab)
    plotting.show_images(x_t, nrow=2, ax=ax_img)
    snr_t = schedules.snr(ab)[t].item()
    ax_img.set_title(rf"$x_t$ at t={t}: $\bar\alpha_t$={ab[t].item():.3g}, SNR={snr_t:.3g}", fontsize=9)
    if schedule not in _BETA_SCHEDULES:
        fig.suptitle(f"{schedule}: the beta range is not used by this schedule", fontsize=9)
    return fig


def schedule_explorer(images: torch.Tensor | None = None, *, seed: int = 0):
    """Widget: schedule type, T, beta range and t; the curves and ``images`` (default: 4 Fashion-MNIST test images)
    noised at t with one fixed noise draw, so moving t shows the same images fade."""
    import ipywidgets as W

    if images is None:
        from minidiff.data.datasets import load_dataset

        images = load_dataset("fashion-mnist", "test").images[:4]
    images = plotting._check_images("images", images)
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    T_w = W.IntSlider(value=1000, min=10, max=2000, step=10, description="T")
    t_w = W.IntSlider(value=500, min=0, max=999, description="t")
    T_w.observe(lambda change: setattr(t_w, "max", change["new"] - 1), names="value")
    log_slider = dict(min=-5, max=math.log10(0.05), step=0.05, readout_format=".1e")  # a short readout that fits

    def view(schedule, T, beta_start, beta_end, t, images, noise):
        return schedule_view(schedule, T, (min(beta_start, beta_end), max(beta_start, beta_end)), t,
                             images=images, noise=noise)
    return _explorer(
        view,
        schedule=W.Dropdown(options=SCHEDULE_CHOICES, value="linear", description="schedule"),
        T=T_w,
        beta_start=W.FloatLogSlider(value=1e-4, description="beta start", **log_slider),
        beta_end=W.FloatLogSlider(value=0.02, description="beta end", **log_slider),
        t=t_w,
        images=W.fixed(images), noise=W.fixed(noise),
    )


# ----------------------------------------------------------------------------- (2) samplers, lecture 03
def sampler_view(denoiser, sampler: str = "dpmpp_2m", steps: int = 10, eta: float = 0.0, spacing: str = "trailing",
                 seed: int = 0, *, n_images: int = 8, image_size: int = 28) -> Figure:
    """Samples (one per class, cycling) from ``denoiser`` with a sampler, step count, eta and spacing,
    beside the list of noise levels it walks; the title gives the NFE and the wall time."""
    options = {"eta": eta} if "eta" in inspect.signature(get_sampler(sampler)).parameters else {}
    sigmas = schedules.sampling_sigmas(denoiser.alphas_cumprod, steps, spacing)
    shape = (n_images, *_image_shape(denoiser, image_size))
    cond = _class_labels(denoiser, None, n_images, _model_device(denoiser))
    out, nfe, seconds = _run_sampler(denoiser, sampler, sigmas, shape, seed, cond, options)
    fig = Figure(figsize=(11, 3.4), layout="constrained")
    ax_img, ax_sig = fig.subplots(1, 2, width_ratios=(1.6, 1))
    plotting.show_images(out, nrow=min(n_images, 4), ax=ax_img)
    eta_text = f"eta={eta:g}" if options else "deterministic" if sampler != "ddpm" else "stochastic"
    ax_img.set_title(f"{sampler}, {steps} steps, {nfe} NFE, {eta_text}, seed {seed} ({seconds:.2f} s)", fontsize=9)
    plotting.plot_sigmas({spacing: sigmas}, ax=ax_sig)
    return fig


def sampler_explorer(denoiser=None, *, n_images: int = 8, image_size: int = 28):
    """Widget: sampler, steps, eta (for samplers that take it), spacing and seed, on ``denoiser``
    (default: the shipped class-conditional Fashion-MNIST model)."""
    import ipywidgets as W

    denoiser = pretrained_denoiser() if denoiser is None else denoiser
    slider = dict(continuous_update=False)
    return _explorer(
        sampler_view,
        denoiser=W.fixed(denoiser),
        sampler=W.Dropdown(options=list(SAMPLERS), value="dpmpp_2m", description="sampler"),
        steps=W.IntSlider(value=10, min=1, max=100, description="steps", **slider),
        eta=W.FloatSlider(value=0.0, min=0.0, max=1.0, step=0.1, description="eta", **slider),
        spacing=W.Dropdown(options=SPACING_CHOICES, value="trailing", description="spacing"),
        seed=W.IntText(value=0, description="seed"),
        n_images=W.fixed(n_images), image_size=W.fixed(image_size),
    )


# ----------------------------------------------------------------------------- (3) guidance, lecture 05
def guidance_view(denoiser, class_label: int = 0, guidance_scale: float = 3.0, guidance_rescale: float = 0.0,
                  steps: int = 20, seed: int = 0, *, sampler: str = "dpmpp_2m", spacing: str = "trailing",
                  n_images: int = 8, image_size: int = 28, class_names=None) -> Figure:
    """``n_images`` samples of one class with classifier-free guidance (``CFGDenoiser``, null class as uncond)."""
    num_classes = num_classes_of(denoiser)
    if num_classes is None:
        raise ValueError("guidance_view needs a class-conditional denoiser (denoiser.net.config.num_classes is None)")
    if not 0 <= class_label < num_classes:
        raise ValueError(f"class_label must lie in [0, {num_classes}), got {class_label}")
    device = _model_device(denoiser)
    guided = CFGDenoiser(denoiser, guidance_scale, guidance_rescale=guidance_rescale,
                         uncond={"class_labels": torch.tensor([num_classes], device=device)})  # the null class
    sigmas = schedules.sampling_sigmas(denoiser.alphas_cumprod, steps, spacing)
    shape = (n_images, *_image_shape(denoiser, image_size))
    cond = _class_labels(denoiser, class_label, n_images, device)
    out, nfe, seconds = _run_sampler(guided, sampler, sigmas, shape, seed, cond, {})
    name = class_names[class_label] if class_names is not None else f"class {class_label}"
    fig = plotting.show_images(out, nrow=min(n_images, 8), scale=1.2)
    fig.axes[0].set_title(f"{name}: scale {guidance_scale:g}, rescale {guidance_rescale:g}, {sampler} {steps} steps, "
                          f"seed {seed} ({seconds:.2f} s)", fontsize=9)
    return fig


def guidance_explorer(denoiser=None, *, class_names=None, n_images: int = 8, image_size: int = 28):
    """Widget: class, guidance scale, guidance rescale, steps and seed on ``denoiser``
    (default: the shipped class-conditional Fashion-MNIST model, with its class names)."""
    import ipywidgets as W

    if denoiser is None:
        from minidiff.data.datasets import CLASS_NAMES

        denoiser = pretrained_denoiser()
        class_names = CLASS_NAMES["fashion-mnist"] if class_names is None else class_names
    num_classes = num_classes_of(denoiser)
    if num_classes is None:
        raise ValueError("guidance_explorer needs a class-conditional denoiser (denoiser.net.config.num_classes is None)")
    names = class_names if class_names is not None else [f"class {k}" for k in range(num_classes)]
    slider = dict(continuous_update=False)
    return _explorer(
        guidance_view,
        denoiser=W.fixed(denoiser),
        class_label=W.Dropdown(options=[(n, k) for k, n in enumerate(names)], value=0, description="class"),
        guidance_scale=W.FloatSlider(value=3.0, min=0.0, max=15.0, step=0.5, description="scale", **slider),
        guidance_rescale=W.FloatSlider(value=0.0, min=0.0, max=1.0, step=0.05, description="rescale", **slider),
        steps=W.IntSlider(value=20, min=1, max=100, description="steps", **slider),
        seed=W.IntText(value=0, description="seed"),
        sampler=W.fixed("dpmpp_2m"), spacing=W.fixed("trailing"),
        n_images=W.fixed(n_images), image_size=W.fixed(image_size),
        class_names=W.fixed(names),
    )
