"""The training loop behind ``python -m minidiff.train``: config, setup, resume, samples, checkpoints.

It is the loop of ``minidiff.training.steps`` (which a student reads in one screen) plus what a long run needs:
a validation loss at fixed (t, noise), a sample grid and a checkpoint every N steps, bit-exact resume. Under torchrun
it trains data-parallel (``minidiff.training.distributed``): every rank trains on its part of the global batch,
rank 0 alone validates, logs and writes files.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from torchvision.utils import save_image
from tqdm.auto import tqdm

from minidiff.data.datasets import DATASETS, load_dataset
from minidiff.denoiser import PREDICTIONS, Denoiser
from minidiff.files import hardware_info
from minidiff.guidance import CFGDenoiser
from minidiff.losses import T_SAMPLINGS
from minidiff.models.unet import PRESETS, unet_from_preset
from minidiff.samplers import SAMPLERS, sample
from minidiff.schedules import SCHEDULES, alphas_cumprod_from_betas, make_betas, sampling_sigmas
from minidiff.training import distributed
from minidiff.training.checkpoint import checkpoint_config, load_checkpoint, save_checkpoint
from minidiff.training.rundir import RunLockedError, acquire_lock, check_out_dir, config_changes
from minidiff.training.steps import EMA, LR_SCHEDULES, make_optimizer, train_step, validation_loss
from minidiff.utils import get_device

__all__ = ["TrainConfig", "train", "build_model", "make_alphas_cumprod", "sample_grid", "RunLockedError"]


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
    lr_schedule: str = "constant"  # after warmup: "constant", or "cosine" decay to 0 at ``steps``
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    p_uncond: float = 0.1
    min_snr_gamma: float | None = None
    t_sampling: str = "uniform"  # density of the training t: "uniform", or "logit_normal" (SD3) with m, s below
    logit_normal_m: float = 0.0
    logit_normal_s: float = 1.0
    max_grad_norm: float = 1.0
    sample_every: int = 1000
    ckpt_every: int = 1000
    val_every: int = 250  # validation loss (fixed images, t grid and noise) of the EMA weights every N steps
    val_size: int = 256
    sampler: str = "dpmpp_2m"
    sample_steps: int = 20
    sample_guidance: float = 3.0
    seed: int = 0
    unet: dict = field(default_factory=dict)  # UNetConfig fields overriding the preset

    # Fields that may change between a run and its resumption (they do not change the trained model).
    RESUMABLE = ("steps", "sample_every", "ckpt_every", "val_every", "sampler", "sample_steps", "sample_guidance")

    def __post_init__(self):
        """Validate every field at once, so a bad value fails before any data is loaded or a model is built."""
        _check_choice("dataset", self.dataset, DATASETS + LATENT_DATASETS)
        _check_choice("preset", self.preset, tuple(PRESETS))
        _check_choice("prediction", self.prediction, PREDICTIONS)
        _check_choice("schedule", self.schedule, tuple(SCHEDULES))
        _check_choice("sampler", self.sampler, tuple(SAMPLERS))
        _check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _check_choice("t_sampling", self.t_sampling, T_SAMPLINGS)
        if not self.logit_normal_s > 0:
            raise ValueError(f"logit_normal_s must be > 0 (Esser et al. 2024 use 1), got {self.logit_normal_s}")
        for name in ("T", "batch_size", "sample_every", "ckpt_every", "sample_steps", "val_every", "val_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.sample_steps > self.T:
            raise ValueError(f"sample_steps must be <= T = {self.T} (one sampling step per training timestep at most), "
                             f"got {self.sample_steps}")
        if self.steps < 0 or self.warmup < 0:
            raise ValueError(f"steps and warmup must be >= 0, got steps={self.steps}, warmup={self.warmup}")
        if not 0.0 <= self.p_uncond <= 1.0:
            raise ValueError(f"p_uncond must be in [0, 1], got {self.p_uncond}")
        if not self.lr > 0 or self.weight_decay < 0 or not 0.0 <= self.ema_decay < 1.0 or not self.max_grad_norm > 0:
            raise ValueError(f"need lr > 0, weight_decay >= 0, 0 <= ema_decay < 1 and max_grad_norm > 0, got lr={self.lr}, "
                             f"weight_decay={self.weight_decay}, ema_decay={self.ema_decay}, "
                             f"max_grad_norm={self.max_grad_norm}")
        if self.min_snr_gamma is not None and not self.min_snr_gamma > 0:
            raise ValueError(f"min_snr_gamma must be > 0 or None, got {self.min_snr_gamma}")
        if not isinstance(self.unet, dict):
            raise ValueError(f"unet must be a dict of UNetConfig overrides, got {type(self.unet).__name__}")
        try:
            replace(PRESETS[self.preset], **self.unet)
        except TypeError as err:
            raise ValueError(f"unet overrides {self.unet} are not UNetConfig fields: {err}") from None


# Latent datasets are built from an autoencoder by ``minidiff.training.latent`` and passed to ``train(data=...)``.
LATENT_DATASETS = ("shapes64-latents",)


def _check_choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def build_model(config: TrainConfig, channels: int, num_classes: int):
    """The UNet and the alphas_cumprod table a config describes."""
    net = unet_from_preset(config.preset, **{"in_channels": channels, "out_channels": channels,
                                            "num_classes": num_classes if config.conditional else None,
                                            **config.unet})
    return net, make_alphas_cumprod(config)


def make_alphas_cumprod(config: TrainConfig) -> torch.Tensor:
    """The float64 alpha_bar table of ``config.schedule`` with ``config.T`` steps."""
    return alphas_cumprod_from_betas(make_betas(config.schedule, config.T))


@torch.no_grad()
def sample_grid(net: nn.Module, alphas_cumprod, config: TrainConfig, path, *, image_shape, n_per_class: int = 8,
                decode=None):
    """Save a PNG grid sampled from ``net`` with a fixed seed (one row per class when conditional); ``decode`` maps
    samples to images in [-1, 1] first (a latent model's autoencoder)."""
    device = next(net.parameters()).device
    c = net.config
    denoiser, extra = Denoiser(net, alphas_cumprod, config.prediction), None
    n = 64
    if c.num_classes is not None:
        labels = torch.arange(c.num_classes, device=device).repeat_interleave(n_per_class)
        n, extra = len(labels), {"class_labels": labels}
        denoiser = CFGDenoiser(denoiser, config.sample_guidance,
                               uncond={"class_labels": torch.full_like(labels, c.num_classes)})
    x = sample(denoiser, (n, *image_shape), sampling_sigmas(alphas_cumprod, config.sample_steps),
               sampler=config.sampler, generator=torch.Generator(device).manual_seed(config.seed),
               device=device, extra_args=extra)
    if decode is not None:
        x = decode(x)
    save_image((x.float().cpu().clamp(-1, 1) + 1) / 2, path, nrow=n_per_class, padding=1)
    return x


HISTORY_KEYS = ("loss", "grad_norm", "val_step", "val_loss")


def _validation_set(config: TrainConfig, data, val_data) -> tuple:
    """Fixed images (and labels) for the validation loss: ``val_data``, else the test split of the config's dataset
    when ``data`` was loaded from it, else a fixed subset of ``data`` (drawn with seed 12345)."""
    if val_data is None and data is None:
        val_data = load_dataset(config.dataset, "test")
    if val_data is None:
        idx = torch.randperm(len(data.images), generator=torch.Generator().manual_seed(12345))[:config.val_size]
        images, labels = data.images[idx], data.labels[idx]
    else:
        images, labels = val_data.images[:config.val_size], val_data.labels[:config.val_size]
    return images, (labels if config.conditional else None)


def _validate(done: int, run: dict, config: TrainConfig) -> None:
    """Append the EMA model's validation loss at step ``done`` to the run's history."""
    images, labels = run["val_set"]
    device = run["device"]
    out = validation_loss(_ema_net(run), images.to(device), alphas_cumprod=run["alphas_cumprod"],
                          prediction=config.prediction, class_labels=labels.to(device) if labels is not None else None)
    run["history"]["val_step"].append(done)
    run["history"]["val_loss"].append(out["loss"])


def _setup(config: TrainConfig, data, device: torch.device) -> dict:
    """Build the net, EMA, optimizer, scheduler and seeded generators for a run."""
    torch.manual_seed(config.seed)  # initial weights and dropout draw from the global generator
    net, alphas_cumprod = build_model(config, data.images.shape[1], len(data.class_names))
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    net = net.to(device, memory_format=fmt)
    optimizer, scheduler = make_optimizer(net, lr=config.lr, weight_decay=config.weight_decay,
                                          warmup_steps=config.warmup, lr_schedule=config.lr_schedule,
                                          total_steps=config.steps)
    gens = {"data": torch.Generator().manual_seed(config.seed),
            "noise": torch.Generator(device).manual_seed(config.seed + 1)}
    return {"net": net, "ema": EMA(net, config.ema_decay), "optimizer": optimizer, "scheduler": scheduler,
            "generators": gens, "alphas_cumprod": alphas_cumprod, "memory_format": fmt, "device": device,
            "start": 0, "history": {k: [] for k in HISTORY_KEYS}, "sessions": []}


def _resume(path: Path, config: TrainConfig, run: dict) -> None:
    """Load a checkpoint into ``run`` after checking it was trained with the same config."""
    saved = checkpoint_config(path)["train"]
    diff = config_changes(saved, config)
    if diff:
        raise ValueError(f"cannot resume {path}: config differs from the checkpoint's (saved, given): {diff}")
    state = load_checkpoint(path, model=run["net"], ema=run["ema"], optimizer=run["optimizer"],
                            scheduler=run["scheduler"], generators=run["generators"])
    run["start"], run["sessions"] = state["step"], state["config"].get("sessions", [])
    run["history"] = {k: state["extra_tensors"][k].tolist() if k in state["extra_tensors"] else []
                      for k in HISTORY_KEYS}


def _save(path: Path, config: TrainConfig, run: dict, step: int) -> None:
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
    if distributed.is_main():
        (out_dir / "samples").mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
    n = distributed.world_size()
    run["sessions"].append({"command": command, "hardware": hardware_info(device), "start_step": run["start"],
                            **({"world_size": n} if n > 1 else {})})
    run["model"], run["part"] = distributed.wrap(run["net"], device), distributed.batch_part(config.batch_size)
    run["t_start"] = run["t_window"] = time.perf_counter()
    return run


def _batch(data, config: TrainConfig, run: dict):
    """This rank's part of a random global batch: (x0, labels or None, t, eps), label dropout applied. Indices come
    from the data generator, dropout, t and eps from the noise generator, drawn for the global batch on every rank."""
    idx = torch.randint(len(data.images), (config.batch_size,), generator=run["generators"]["data"])
    x0 = data.images[idx[run["part"]]].to(run["device"], memory_format=run["memory_format"])
    labels = data.labels[idx].to(run["device"]) if config.conditional else None
    labels, t, noise = distributed.step_noise(
        labels, (config.batch_size, *x0.shape[1:]), T=len(run["alphas_cumprod"]), p_uncond=config.p_uncond,
        null_id=len(data.class_names), generator=run["generators"]["noise"], part=run["part"], device=x0.device,
        dtype=x0.dtype, t_sampling=config.t_sampling, m=config.logit_normal_m, s=config.logit_normal_s)
    return x0, labels, t, noise


def _after_step(done: int, config: TrainConfig, run: dict, out_dir: Path, bar, image_shape, decode) -> None:
    """Every 10 steps show loss and img/s; every sample_every/ckpt_every steps (and at the end) save. Rank 0 only."""
    if not distributed.is_main():
        return
    last = done == config.steps
    if done % 10 == 0 or last:
        n_steps = done - max(run["start"], (done - 1) // 10 * 10)  # steps since the last update
        rate = n_steps * config.batch_size / (time.perf_counter() - run["t_window"])
        bar.set_postfix(loss=f"{sum(run['history']['loss'][-n_steps:]) / n_steps:.4f}", img_s=f"{rate:.0f}")
    if done % config.val_every == 0:  # not at a session's last step: a resumed run keeps the same history
        _validate(done, run, config)
    if done % config.ckpt_every == 0 or last:  # before the sample grid: a failing side task never costs a checkpoint
        _save(out_dir / "checkpoint.safetensors", config, run, done)
    if done % config.sample_every == 0 or last:
        sample_grid(_ema_net(run), run["alphas_cumprod"], config, out_dir / "samples" / f"step_{done:07d}.png",
                    image_shape=image_shape, decode=decode)
    if done % 10 == 0:
        run["t_window"] = time.perf_counter()


def train(config: TrainConfig, out_dir, *, resume: bool = False, device=None, data=None, val_data=None,
          progress: bool = True, command: str | None = None, decode=None) -> dict:
    """Train as ``config`` says; samples go to ``out_dir/samples``, the checkpoint to ``out_dir/checkpoint.safetensors``.

    Returns {"net", "ema", "ema_net", "optimizer", "scheduler", "alphas_cumprod", "history", "step"};
    ``history["loss"][i]`` is the loss of step i; ``history["val_loss"]`` the validation loss at the steps in
    ``history["val_step"]`` (under torchrun, rank 0's only: it alone validates). ``data`` (anything with ``.images``,
    ``.labels``, ``.class_names``) replaces ``load_dataset(config.dataset)``; ``val_data`` the images of the
    validation loss (see ``_validation_set``).
    A latent model gets its latents as ``data`` and its autoencoder's ``decode_latents`` as ``decode`` (for the
    sample grids), as ``minidiff.training.latent`` does.
    """
    if data is None and config.dataset in LATENT_DATASETS:
        raise ValueError(f"dataset {config.dataset!r} is made of an autoencoder's latents: pass them as data= "
                         f"(see minidiff.training.latent), or choose one of {DATASETS}")
    device = device if isinstance(device, torch.device) else get_device(device)
    distributed.batch_part(config.batch_size)  # under torchrun: raises now if the ranks cannot split the batch
    device = distributed.start(device)  # under torchrun: join the process group, take this rank's device
    lock = None
    if distributed.is_main():  # under torchrun, rank 0 alone writes the run folder
        check_out_dir(Path(out_dir))
        lock = acquire_lock(Path(out_dir))
    try:
        return _train(config, Path(out_dir), resume, device, data, val_data, progress and distributed.is_main(),
                      command, decode)
    finally:
        if lock is not None:
            lock.unlink(missing_ok=True)


def _train(config: TrainConfig, out_dir: Path, resume, device, data, val_data, progress, command, decode) -> dict:
    """The loop of ``train`` (called with the run folder locked)."""
    val_set = _validation_set(config, data, val_data)
    data = data if data is not None else load_dataset(config.dataset)
    run = _start(config, data, device, out_dir, resume, command)
    run["val_set"] = val_set
    autocast = torch.bfloat16 if device.type == "cuda" else None
    bar = tqdm(range(run["start"], config.steps), initial=run["start"], total=config.steps, disable=not progress)
    for step in bar:
        distributed.seed_step(config.seed, step)  # several processes: dropout masks per rank, the same after resume
        x0, labels, t, noise = _batch(data, config, run)
        out = train_step(run["model"], x0, alphas_cumprod=run["alphas_cumprod"], prediction=config.prediction,
                         optimizer=run["optimizer"], scheduler=run["scheduler"], class_labels=labels,
                         t=t, noise=noise, step=step,  # _batch drew the step's randomness (and dropped labels)
                         min_snr_gamma=config.min_snr_gamma, max_grad_norm=config.max_grad_norm,
                         autocast_dtype=autocast)
        out["loss"] = distributed.mean_over_ranks(out["loss"], device)  # the global batch's loss
        run["ema"].update(run["net"])  # DDP keeps run["net"] equal on every rank, and so the EMA
        for key, value in out.items():
            run["history"][key].append(value)
        _after_step(step + 1, config, run, Path(out_dir), bar, tuple(data.images.shape[1:]), decode)
    bar.close()
    distributed.barrier()  # every rank returns once rank 0 has written the last checkpoint and grid
    return {**{k: run[k] for k in ("net", "ema", "optimizer", "scheduler", "alphas_cumprod", "history")},
            "ema_net": _ema_net(run), "step": max(run["start"], config.steps)}
