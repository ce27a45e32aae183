"""Training pieces a diffusion loop is written from, and a short ``train()`` loop built from them.

The loop a student reads (``train()`` below is this, plus logging, samples and checkpoints)::

    optimizer, scheduler = make_optimizer(net, lr=2e-3, warmup_steps=200)
    ema = EMA(net, decay=0.999)
    for step in range(steps):
        idx = torch.randint(len(images), (batch_size,), generator=data_gen)
        out = train_step(net, images[idx], alphas_cumprod=alphas_cumprod, prediction="eps",
                         optimizer=optimizer, scheduler=scheduler, class_labels=labels[idx],
                         p_uncond=0.1, null_id=10, generator=noise_gen, step=step)
        ema.update(net)

| name            | meaning                                                                  |
|-----------------|--------------------------------------------------------------------------|
| ``p_uncond``    | probability a label is replaced by the null class (Ho & Salimans 2022)  |
| ``null_id``     | id of the learned null class (``num_classes`` of the UNet)               |
| ``decay``       | EMA decay beta: ``shadow <- beta * shadow + (1 - beta) * theta``        |
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .utils import get_device

__all__ = ["EMA", "make_optimizer", "train_step", "TrainConfig", "train"]


class EMA:
    """Exponential moving average of a model's parameters and float buffers (Polyak averaging).

    With ``warmup=True`` the decay at update ``n`` is ``min(decay, (1 + n) / (10 + n))``, so early
    averages are not dominated by the random initialisation (as in TensorFlow's ExponentialMovingAverage).
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, *, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay, self.warmup, self.step = float(decay), bool(warmup), 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def current_decay(self) -> float:
        """The decay the next ``update`` will use."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.step) / (10 + self.step))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """shadow <- d * shadow + (1 - d) * theta for float entries; other buffers are copied."""
        d = self.current_decay()
        for name, value in model.state_dict().items():
            s = self.shadow[name]
            if s.dtype.is_floating_point:
                s.mul_(d).add_(value.detach(), alpha=1 - d)
            else:
                s.copy_(value)
        self.step += 1

    def copy_to(self, model: nn.Module) -> nn.Module:
        """Load the averaged weights into ``model`` (e.g. a deep copy used for sampling); returns it."""
        model.load_state_dict(self.shadow)
        return model

    def state_dict(self) -> dict:
        return {"decay": self.decay, "warmup": self.warmup, "step": self.step, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise ValueError(f"EMA state does not match the model: differing keys {sorted(missing)[:5]}")
        self.decay, self.warmup, self.step = float(state["decay"]), bool(state["warmup"]), int(state["step"])
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)


def make_optimizer(model: nn.Module, *, lr: float, weight_decay: float = 0.0, warmup_steps: int = 0,
                   betas=(0.9, 0.999)):
    """AdamW (Loshchilov & Hutter 2019) and a LambdaLR that warms the learning rate up linearly, then holds it."""
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0)
    return optimizer, scheduler


def _check_finite_step(value: torch.Tensor, what: str, step, optimizer) -> None:
    if not torch.isfinite(value):
        at = f" at step {step}" if step is not None else ""
        lr = optimizer.param_groups[0]["lr"]
        raise FloatingPointError(
            f"{what} became {value.item()}{at}: lower the learning rate (lr={lr:g}), keep gradient clipping on "
            "(max_grad_norm), or check the data for NaN/inf; resume from the last good checkpoint")


def train_step(net: nn.Module, x0: torch.Tensor, *, alphas_cumprod: torch.Tensor, prediction: str, optimizer,
               scheduler=None, class_labels=None, p_uncond: float = 0.0, null_id: int | None = None,
               min_snr_gamma: float | None = None, max_grad_norm: float | None = 1.0, generator=None,
               autocast_dtype=None, step: int | None = None) -> dict:
    """One optimisation step on the denoising loss (Ho et al. 2020, Alg. 1) -> {"loss", "grad_norm"}."""
    from .guidance import condition_dropout
    from .parameterization import diffusion_loss

    cond = {}
    if class_labels is not None:
        if p_uncond > 0:
            class_labels = condition_dropout(class_labels, p_uncond, null_id, generator=generator)
        cond["class_labels"] = class_labels
    net.train()
    with torch.autocast(x0.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        loss = diffusion_loss(net, x0, alphas_cumprod, prediction, generator=generator,
                              min_snr_gamma=min_snr_gamma, **cond)
    _check_finite_step(loss.detach(), "loss", step, optimizer)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), max_grad_norm or float("inf"))
    _check_finite_step(grad_norm.detach(), "gradient norm", step, optimizer)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return {"loss": loss.item(), "grad_norm": grad_norm.item()}


@dataclass
class TrainConfig:
    """Everything that defines a training run; saved as JSON in every checkpoint."""

    dataset: str = "fashion-mnist"
    preset: str = "tiny"
    conditional: bool = True
    prediction: str = "eps"
    schedule: str = "cosine"
    T: int = 1000
    steps: int = 10_000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 200
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    p_uncond: float = 0.1
    min_snr_gamma: float | None = None
    max_grad_norm: float = 1.0
    sample_every: int = 1000
    ckpt_every: int = 1000
    sampler: str = "dpmpp_2m"
    sample_steps: int = 20
    sample_guidance: float = 3.0
    seed: int = 0
    unet: dict = field(default_factory=dict)  # UNetConfig fields overriding the preset

    # Fields that may change between a run and its resumption (they do not change the trained model).
    RESUMABLE = ("steps", "sample_every", "ckpt_every", "sampler", "sample_steps", "sample_guidance")

    def __post_init__(self):
        from .parameterization import PREDICTIONS

        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
        for name in ("T", "batch_size", "sample_every", "ckpt_every", "sample_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.steps < 0 or self.warmup < 0:
            raise ValueError(f"steps and warmup must be >= 0, got steps={self.steps}, warmup={self.warmup}")
        if not 0.0 <= self.p_uncond <= 1.0:
            raise ValueError(f"p_uncond must be in [0, 1], got {self.p_uncond}")


def build_model(config: TrainConfig, channels: int, num_classes: int):
    """The UNet and the alphas_cumprod table a config describes."""
    from .unet import unet_from_preset

    net = unet_from_preset(config.preset, **{"in_channels": channels, "out_channels": channels,
                                            "num_classes": num_classes if config.conditional else None,
                                            **config.unet})
    return net, make_alphas_cumprod(config)


def make_alphas_cumprod(config: TrainConfig) -> torch.Tensor:
    """The float64 alpha_bar table of ``config.schedule`` with ``config.T`` steps."""
    from .schedules import alphas_cumprod_from_betas, make_betas

    return alphas_cumprod_from_betas(make_betas(config.schedule, config.T))


@torch.no_grad()
def sample_grid(net: nn.Module, alphas_cumprod, config: TrainConfig, path, *, image_shape, n_per_class: int = 8):
    """Save a PNG grid sampled from ``net`` with a fixed seed (one row per class when conditional)."""
    from torchvision.utils import save_image

    from .guidance import CFGDenoiser
    from .parameterization import Denoiser
    from .samplers import sample
    from .schedules import get_sigmas

    device = next(net.parameters()).device
    c = net.config
    denoiser, extra = Denoiser(net, alphas_cumprod, config.prediction), None
    n = 64
    if c.num_classes is not None:
        labels = torch.arange(c.num_classes, device=device).repeat_interleave(n_per_class)
        n, extra = len(labels), {"class_labels": labels}
        denoiser = CFGDenoiser(denoiser, config.sample_guidance,
                               uncond={"class_labels": torch.full_like(labels, c.num_classes)})
    x = sample(denoiser, (n, *image_shape), get_sigmas(alphas_cumprod, config.sample_steps),
               sampler=config.sampler, generator=torch.Generator(device).manual_seed(config.seed),
               device=device, extra_args=extra)
    save_image((x.float().cpu() + 1) / 2, path, nrow=n_per_class, padding=1)
    return x


def hardware_info(device: torch.device) -> dict:
    """Where a run happened, for model cards: OS, CPU, threads, torch version and the accelerator if any."""
    import platform

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _setup(config: TrainConfig, data, device: torch.device) -> dict:
    """Build the net, EMA, optimizer, scheduler and seeded generators for a run."""
    torch.manual_seed(config.seed)  # initial weights and dropout draw from the global generator
    net, alphas_cumprod = build_model(config, data.images.shape[1], len(data.class_names))
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    net = net.to(device, memory_format=fmt)
    optimizer, scheduler = make_optimizer(net, lr=config.lr, weight_decay=config.weight_decay,
                                          warmup_steps=config.warmup)
    gens = {"data": torch.Generator().manual_seed(config.seed),
            "noise": torch.Generator(device).manual_seed(config.seed + 1)}
    return {"net": net, "ema": EMA(net, config.ema_decay), "optimizer": optimizer, "scheduler": scheduler,
            "generators": gens, "alphas_cumprod": alphas_cumprod, "memory_format": fmt, "device": device,
            "start": 0, "history": {"loss": [], "grad_norm": []}, "sessions": []}


def _resume(path: Path, config: TrainConfig, run: dict) -> None:
    """Load a checkpoint into ``run`` after checking it was trained with the same config."""
    from .checkpoint import checkpoint_config, load_checkpoint

    saved = checkpoint_config(path)["train"]
    mine = json.loads(json.dumps(asdict(config)))  # tuples become lists, as in the saved JSON
    diff = {k: (saved.get(k), v) for k, v in mine.items() if k not in config.RESUMABLE and saved.get(k) != v}
    if diff:
        raise ValueError(f"cannot resume {path}: config differs from the checkpoint's (saved, given): {diff}")
    state = load_checkpoint(path, model=run["net"], ema=run["ema"], optimizer=run["optimizer"],
                            scheduler=run["scheduler"], generators=run["generators"])
    run["start"], run["sessions"] = state["step"], state["config"].get("sessions", [])
    run["history"] = {k: state["extra_tensors"][k].tolist() for k in ("loss", "grad_norm")}


def _save(path: Path, config: TrainConfig, run: dict, step: int) -> None:
    from .checkpoint import save_checkpoint

    run["sessions"][-1].update(end_step=step, wall_s=time.perf_counter() - run["t_start"])
    extra = {k: torch.tensor(v, dtype=torch.float64) for k, v in run["history"].items()}
    meta = {"train": asdict(config), "unet": asdict(run["net"].config), "sessions": run["sessions"]}
    save_checkpoint(path, model=run["net"], step=step, ema=run["ema"], optimizer=run["optimizer"],
                    scheduler=run["scheduler"], generators=run["generators"], config=meta, extra_tensors=extra)


def _ema_net(run: dict) -> nn.Module:
    return run["ema"].copy_to(copy.deepcopy(run["net"])).eval()


def _start(config: TrainConfig, data, device, out_dir: Path, resume: bool, command) -> dict:
    """Set up (or resume) a run in ``out_dir`` and start this session's clock."""
    run = _setup(config, data, device)
    if resume and (out_dir / "checkpoint.safetensors").exists():
        _resume(out_dir / "checkpoint.safetensors", config, run)
    (out_dir / "samples").mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
    run["sessions"].append({"command": command, "hardware": hardware_info(device), "start_step": run["start"]})
    run["t_start"] = run["t_window"] = time.perf_counter()
    return run


def _batch(data, config: TrainConfig, run: dict):
    """A random batch (x0, labels or None), indices drawn from the run's data generator."""
    idx = torch.randint(len(data.images), (config.batch_size,), generator=run["generators"]["data"])
    x0 = data.images[idx].to(run["device"], memory_format=run["memory_format"])
    return x0, (data.labels[idx].to(run["device"]) if config.conditional else None)


def _after_step(done: int, config: TrainConfig, run: dict, out_dir: Path, bar, image_shape) -> None:
    """Every 10 steps show loss and img/s; every sample_every/ckpt_every steps (and at the end) save."""
    last = done == config.steps
    if done % 10 == 0 or last:
        n_steps = done - max(run["start"], (done - 1) // 10 * 10)  # steps since the last update
        rate = n_steps * config.batch_size / (time.perf_counter() - run["t_window"])
        bar.set_postfix(loss=f"{sum(run['history']['loss'][-n_steps:]) / n_steps:.4f}", img_s=f"{rate:.0f}")
    if done % config.sample_every == 0 or last:
        sample_grid(_ema_net(run), run["alphas_cumprod"], config, out_dir / "samples" / f"step_{done:07d}.png",
                    image_shape=image_shape)
    if done % config.ckpt_every == 0 or last:
        _save(out_dir / "checkpoint.safetensors", config, run, done)
    if done % 10 == 0:
        run["t_window"] = time.perf_counter()


def train(config: TrainConfig, out_dir, *, resume: bool = False, device=None, data=None, progress: bool = True,
          command: str | None = None) -> dict:
    """Train as ``config`` says; samples go to ``out_dir/samples``, the checkpoint to ``out_dir/checkpoint.safetensors``.

    Returns {"net", "ema", "ema_net", "optimizer", "scheduler", "alphas_cumprod", "history", "step"};
    ``history["loss"][i]`` is the loss of step i. ``data`` (anything with ``.images``, ``.labels``,
    ``.class_names``) replaces ``load_dataset(config.dataset)``.
    """
    from tqdm.auto import tqdm

    from .data import load_dataset

    device = device if isinstance(device, torch.device) else get_device(device)
    data = data if data is not None else load_dataset(config.dataset)
    run = _start(config, data, device, Path(out_dir), resume, command)
    autocast = torch.bfloat16 if device.type == "cuda" else None
    bar = tqdm(range(run["start"], config.steps), initial=run["start"], total=config.steps, disable=not progress)
    for step in bar:
        x0, labels = _batch(data, config, run)
        out = train_step(run["net"], x0, alphas_cumprod=run["alphas_cumprod"], prediction=config.prediction,
                         optimizer=run["optimizer"], scheduler=run["scheduler"], class_labels=labels,
                         p_uncond=config.p_uncond, null_id=len(data.class_names), step=step,
                         min_snr_gamma=config.min_snr_gamma, max_grad_norm=config.max_grad_norm,
                         generator=run["generators"]["noise"], autocast_dtype=autocast)
        run["ema"].update(run["net"])
        for key, value in out.items():
            run["history"][key].append(value)
        _after_step(step + 1, config, run, Path(out_dir), bar, tuple(data.images.shape[1:]))
    bar.close()
    return {**{k: run[k] for k in ("net", "ema", "optimizer", "scheduler", "alphas_cumprod", "history")},
            "ema_net": _ema_net(run), "step": max(run["start"], config.steps)}
