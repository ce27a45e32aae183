"""Pictures for the lectures: image grids, reverse trajectories, schedule curves, animations.

Every helper builds a ``matplotlib.figure.Figure`` without touching pyplot's global state and returns it:
in a notebook, a cell that ends with ``show_images(x)`` shows the picture exactly once, and a widget's
update function can return it. Draw into an existing figure by passing ``ax=`` / ``axes=``.

Images are (B, C, H, W) tensors in [-1, 1] (C = 1 or 3), as everywhere in minidiff.
A sampler's ``callback`` receives one dict per step, ``{"i", "sigma", "sigma_next", "x", "x0_hat"}``;
collect them with ``steps = []; sample(..., callback=steps.append)`` and pass ``steps`` here.
"""
from __future__ import annotations

import math

import torch
from matplotlib.figure import Figure

__all__ = ["to_grid", "show_images", "plot_trajectory", "plot_schedules", "plot_sigmas", "animate_trajectory",
           "path_from_steps", "plot_paths_2d"]


# ----------------------------------------------------------------------------- input checks
def _check_images(name: str, x) -> torch.Tensor:
    """(B, C, H, W) float tensor with C in {1, 3}, detached on the CPU; a single (C, H, W) image gets B = 1."""
    if not torch.is_tensor(x):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, C, H, W), got {type(x).__name__}")
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[1] not in (1, 3) or x.shape[0] == 0:
        raise ValueError(f"{name} must have shape (B, C, H, W) with B >= 1 and C in (1, 3), got {tuple(x.shape)}")
    return x.detach().float().cpu()


def _check_steps(steps) -> list[dict]:
    """The list of sampler callback dicts, each with at least "x", "x0_hat" and "sigma"."""
    if isinstance(steps, dict) or not hasattr(steps, "__len__") or len(steps) == 0:
        raise ValueError("steps must be a non-empty list of sampler callback dicts "
                         "(collect them with steps = []; sample(..., callback=steps.append))")
    for i, info in enumerate(steps):
        missing = {"x", "x0_hat", "sigma"} - set(info) if isinstance(info, dict) else {"x", "x0_hat", "sigma"}
        if missing:
            raise ValueError(f"steps[{i}] must be a callback dict with keys 'x', 'x0_hat', 'sigma'; "
                             f"missing {sorted(missing)}")
    return list(steps)


def _sigma_label(sigma) -> str:
    s = float(torch.as_tensor(sigma).flatten()[0])
    return "σ=∞" if math.isinf(s) else f"σ={s:.3g}"


def _to_rgb_array(img: torch.Tensor):
    """(C, H, W) in [-1, 1] -> (H, W) or (H, W, 3) numpy array in [0, 1] for imshow."""
    img = ((img.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
    return img[..., 0] if img.shape[-1] == 1 else img


def _imshow(ax, img: torch.Tensor, title: str | None = None) -> None:
    ax.imshow(_to_rgb_array(img), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=8)


# ----------------------------------------------------------------------------- image grids
def to_grid(x: torch.Tensor, nrow: int = 8, padding: int = 2) -> torch.Tensor:
    """Tile a batch (B, C, H, W) into one image (C, H', W') with ``nrow`` images per row, padded with white."""
    x = _check_images("x", x)
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    B, C, H, W = x.shape
    ncol = min(nrow, B)
    nrows = math.ceil(B / ncol)
    grid = x.new_ones(C, nrows * (H + padding) + padding, ncol * (W + padding) + padding)
    for k in range(B):
        r, c = divmod(k, ncol)
        top, left = padding + r * (H + padding), padding + c * (W + padding)
        grid[:, top:top + H, left:left + W] = x[k]
    return grid


def show_images(x: torch.Tensor, nrow: int = 8, title: str | None = None, *, labels=None, ax=None,
                scale: float = 1.0) -> Figure:
    """Show a batch of [-1, 1] images as a grid; with ``labels`` (one string per image) each gets its own caption."""
    x = _check_images("x", x)
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    B = x.shape[0]
    ncol, nrows = min(nrow, B), math.ceil(B / min(nrow, B))
    if labels is not None:
        labels = list(labels)
        if len(labels) != B:
            raise ValueError(f"labels must have one entry per image: got {len(labels)} labels for {B} images")
        if ax is not None:
            raise ValueError("labels draws one axes per image, so it cannot draw into a given ax")
        fig = Figure(figsize=(scale * 1.3 * ncol, scale * 1.5 * nrows + 0.4 * bool(title)), layout="constrained")
        axes = fig.subplots(nrows, ncol, squeeze=False).flatten()
        for k, a in enumerate(axes):
            if k < B:
                _imshow(a, x[k], str(labels[k]))
            else:
                fig.delaxes(a)
    else:
        if ax is None:
            fig = Figure(figsize=(scale * 1.1 * ncol, scale * 1.1 * nrows + 0.4 * bool(title)), layout="constrained")
            ax = fig.subplots()
        fig = ax.figure
        _imshow(ax, to_grid(x, nrow))
    if title and labels is not None:
        fig.suptitle(title)
    elif title:
        ax.set_title(title)
    return fig


# ----------------------------------------------------------------------------- reverse trajectories
def _pick(n_total: int, n_show: int) -> list[int]:
    """``n_show`` indices spread evenly over range(n_total), always including the first and the last."""
    n_show = min(n_show, n_total)
    if n_show == 1:
        return [n_total - 1]
    return sorted({round(k * (n_total - 1) / (n_show - 1)) for k in range(n_show)})


def plot_trajectory(steps, *, index: int = 0, n_show: int = 8, title: str | None = None,
                    scale: float = 1.0) -> Figure:
    """A strip of the reverse process: the state x_t (top row) and the denoiser's x0_hat (bottom row) over steps.

    ``steps`` is the list of sampler callback dicts; ``index`` picks the image in the batch.
    """
    steps = _check_steps(steps)
    B = steps[0]["x"].shape[0]
    if not -B <= index < B:
        raise ValueError(f"index must pick an image of the batch of {B}, got {index}")
    picks = _pick(len(steps), n_show)
    fig = Figure(figsize=(scale * 1.2 * len(picks), scale * 2.8), layout="constrained")
    axes = fig.subplots(2, len(picks), squeeze=False)
    for col, i in enumerate(picks):
        info = steps[i]
        _imshow(axes[0, col], _check_images("x", info["x"])[index], f"step {i}\n{_sigma_label(info['sigma'])}")
        _imshow(axes[1, col], _check_images("x0_hat", info["x0_hat"])[index])
    axes[0, 0].text(-0.15, 0.5, "$x_t$", transform=axes[0, 0].transAxes, ha="right", va="center")
    axes[1, 0].text(-0.15, 0.5, r"$\hat x_0$", transform=axes[1, 0].transAxes, ha="right", va="center")
    if title:
        fig.suptitle(title)
    return fig


def animate_trajectory(steps, *, index: int = 0, interval: int = 150, max_frames: int = 50):
    """An HTML animation (matplotlib ``to_jshtml``) of x_t and x0_hat side by side over the reverse steps.

    Long trajectories are thinned to ``max_frames`` evenly spread steps (first and last kept).
    """
    from IPython.display import HTML
    from matplotlib.animation import FuncAnimation

    steps = _check_steps(steps)
    B = steps[0]["x"].shape[0]
    if not -B <= index < B:
        raise ValueError(f"index must pick an image of the batch of {B}, got {index}")
    frames = [(_check_images("x", steps[i]["x"])[index], _check_images("x0_hat", steps[i]["x0_hat"])[index], i,
               steps[i]["sigma"]) for i in _pick(len(steps), max_frames)]
    fig = Figure(figsize=(4, 2.3), layout="constrained")
    ax_x, ax_x0 = fig.subplots(1, 2)
    im_x = ax_x.imshow(_to_rgb_array(frames[0][0]), cmap="gray", vmin=0, vmax=1)
    im_x0 = ax_x0.imshow(_to_rgb_array(frames[0][1]), cmap="gray", vmin=0, vmax=1)
    for a in (ax_x, ax_x0):
        a.set_axis_off()
    ax_x0.set_title(r"$\hat x_0$", fontsize=9)

    def draw(k):
        x, x0_hat, i, sigma = frames[k]
        im_x.set_data(_to_rgb_array(x))
        im_x0.set_data(_to_rgb_array(x0_hat))
        ax_x.set_title(f"$x_t$, step {i}, {_sigma_label(sigma)}", fontsize=9)
        return im_x, im_x0

    anim = FuncAnimation(fig, draw, frames=len(frames), interval=interval, blit=False)
    return HTML(anim.to_jshtml(default_mode="once"))


# ----------------------------------------------------------------------------- schedules
def _check_tables(name: str, tables) -> dict[str, torch.Tensor]:
    if not isinstance(tables, dict) or not tables:
        raise ValueError(f"{name} must be a non-empty dict from a label to a 1-D tensor, got {type(tables).__name__}")
    out = {}
    for label, v in tables.items():
        v = torch.as_tensor(v, dtype=torch.float64)
        if v.ndim != 1 or v.numel() == 0:
            raise ValueError(f"{name}[{label!r}] must be a non-empty 1-D tensor, got shape {tuple(v.shape)}")
        out[label] = v
    return out


def plot_schedules(alphas_cumprods: dict, *, t: int | None = None, axes=None) -> Figure:
    """alpha_bar_t and log SNR_t = log(alpha_bar / (1 - alpha_bar)) against t, one curve per schedule.

    ``t`` adds a marker at that timestep on every curve. ``axes`` is an optional pair of axes to draw into.
    """
    tables = _check_tables("alphas_cumprods", alphas_cumprods)
    if axes is None:
        fig = Figure(figsize=(9, 3.2), layout="constrained")
        axes = fig.subplots(1, 2)
    if len(axes) != 2:
        raise ValueError(f"axes must be a pair (alpha_bar, log-SNR), got {len(axes)} axes")
    ax_ab, ax_snr = axes
    for label, ab in tables.items():
        ts = torch.arange(len(ab))
        lsnr = ab.log() - (1 - ab).log()
        (line,) = ax_ab.plot(ts, ab, label=label)
        ax_snr.plot(ts, lsnr, color=line.get_color(), label=label)
        if t is not None:
            if not 0 <= t < len(ab):
                raise ValueError(f"t must lie in [0, {len(ab) - 1}] for schedule {label!r}, got {t}")
            ax_ab.plot([t], [ab[t]], "o", color=line.get_color())
            ax_snr.plot([t], [lsnr[t]], "o", color=line.get_color())
    ax_ab.set(xlabel="t", ylabel=r"$\bar\alpha_t$", title=r"signal kept: $\bar\alpha_t$")
    ax_snr.set(xlabel="t", ylabel=r"$\log \mathrm{SNR}_t$", title=r"log-SNR $= \log \bar\alpha_t/(1-\bar\alpha_t)$")
    ax_snr.axhline(0, color="gray", lw=0.5)
    ax_ab.legend(fontsize=8)
    return ax_ab.figure


def plot_sigmas(sigmas: dict, *, ax=None, title: str | None = None) -> Figure:
    """Sampling noise levels sigma_i (log scale) against step i, one curve per label; the final 0 is left out."""
    tables = _check_tables("sigmas", sigmas)
    if ax is None:
        fig = Figure(figsize=(4.5, 3.2), layout="constrained")
        ax = fig.subplots()
    for label, s in tables.items():
        s = s[s > 0]
        ax.plot(torch.arange(len(s)), s.clamp(max=1e4), "o-", ms=3, label=f"{label} ({len(s)} steps)")
    ax.set(yscale="log", xlabel="step i", ylabel=r"$\sigma_i$", title=title or "sampling noise levels")
    ax.legend(fontsize=8)
    return ax.figure


# ----------------------------------------------------------------------------- 2-D toy trajectories
def path_from_steps(steps, final: torch.Tensor) -> torch.Tensor:
    """Stack the states a sampler visited: each callback's x (before its step), then the returned ``final``."""
    steps = _check_steps(steps)
    if final.shape != steps[0]["x"].shape:
        raise ValueError(f"final must have the shape of the states {tuple(steps[0]['x'].shape)}, "
                         f"got {tuple(final.shape)}")
    return torch.stack([s["x"].detach().cpu() for s in steps] + [final.detach().cpu()])


def plot_paths_2d(paths: dict, *, data: torch.Tensor | None = None, ax=None, title: str | None = None,
                  max_paths: int = 64, lim: float | None = None) -> Figure:
    """2-D sampler trajectories, one colour per label: ``paths[label]`` is (n_states, N, 2); endpoints are dots.

    ``data`` (M, 2) is drawn as a light grey cloud underneath; at most ``max_paths`` of the N paths are drawn.
    """
    if not isinstance(paths, dict) or not paths:
        raise ValueError(f"paths must be a non-empty dict from a label to an (n_states, N, 2) tensor, "
                         f"got {type(paths).__name__}")
    if ax is None:
        fig = Figure(figsize=(4.5, 4.5), layout="constrained")
        ax = fig.subplots()
    if data is not None:
        data = torch.as_tensor(data).detach().cpu()
        if data.ndim != 2 or data.shape[1] != 2:
            raise ValueError(f"data must have shape (M, 2), got {tuple(data.shape)}")
        ax.scatter(data[:, 0], data[:, 1], s=2, color="0.8", zorder=0)
    for k, (label, p) in enumerate(paths.items()):
        p = torch.as_tensor(p).detach().cpu().float()
        if p.ndim != 3 or p.shape[2] != 2 or p.shape[0] < 2:
            raise ValueError(f"paths[{label!r}] must have shape (n_states >= 2, N, 2), got {tuple(p.shape)}")
        p = p[:, :max_paths]
        color = f"C{k}"
        ax.plot(p[:, :, 0], p[:, :, 1], color=color, lw=0.8, alpha=0.7)
        ax.plot([], [], color=color, label=f"{label} ({p.shape[0] - 1} steps)")
        ax.scatter(p[-1, :, 0], p[-1, :, 1], s=8, color=color, zorder=3)
    if lim is not None:
        ax.set(xlim=(-lim, lim), ylim=(-lim, lim))
    ax.set_aspect("equal")
    ax.legend(fontsize=7, loc="upper right")
    if title:
        ax.set_title(title, fontsize=9)
    return ax.figure
