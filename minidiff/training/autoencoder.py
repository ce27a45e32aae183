"""Training the course's KL autoencoder: the loss, one step, and a resumable loop.

    python -m minidiff.training.autoencoder train --out runs/vae --steps 3000
    python -m minidiff.training.autoencoder export runs/vae minidiff/weights/shapes64-vae.safetensors

The loss is the latent-diffusion autoencoder's without the GAN (Rombach et al. 2022, App. G; Esser et al.
2021, Eq. 4 and 5 without the patch discriminator):

    L = |x - x_hat|_1 + w_p * d_feat(x, x_hat) + beta * KL(q(z | x) || N(0, I)) / n_latent

``d_feat`` is an LPIPS-style distance (Zhang et al. 2018, Eq. 1 with unit weights) on the first three
convolutional stages of the course's own shapes classifier, since the VGG/LPIPS weights cannot be
downloaded offline; the KL is per latent element, so ``beta`` does not depend on the image size.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from minidiff.files import hardware_info
from minidiff.models.vae import VAE_PRESETS, AutoencoderKL
from minidiff.training.checkpoint import checkpoint_config, load_checkpoint, save_checkpoint
from minidiff.training.rundir import acquire_lock, check_out_dir
from minidiff.training.steps import lr_factor
from minidiff.utils import command_line, get_device

__all__ = ["FeatureDistance", "vae_loss", "VAETrainConfig", "shapes64", "train_vae"]


class FeatureDistance(nn.Module):
    """d(x, y) = sum_l mean_hw |phi_l(x) / |phi_l(x)| - phi_l(y) / |phi_l(y)||^2 over conv stages phi_l of a frozen
    CNN (LPIPS, Zhang et al. 2018, Eq. 1, with the per-channel weights w_l = 1); (B,) per image pair."""

    def __init__(self, classifier: nn.Module, *, stages: int = 3):
        super().__init__()
        layers, self.taps, seen = [], [], 0
        for layer in classifier.trunk:
            if isinstance(layer, (nn.AdaptiveAvgPool2d, nn.Flatten)) or seen == stages:
                break
            layers.append(layer)
            if isinstance(layer, nn.ReLU):
                self.taps.append(len(layers) - 1)
                seen += 1
        self.layers = nn.ModuleList(layers).eval().requires_grad_(False)

    def train(self, mode: bool = True):  # the feature net stays in eval mode (BatchNorm statistics frozen)
        return super().train(False)

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i in self.taps:
                feats.append(x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-8))  # unit length over channels
        return feats

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            fx = self._features(x)
        fy = self._features(y)
        return sum((a - b).pow(2).sum(dim=1).mean(dim=(1, 2)) for a, b in zip(fx, fy))


def vae_loss(vae: AutoencoderKL, x: torch.Tensor, *, feature_distance: FeatureDistance | None = None,
             perceptual_weight: float = 0.1, kl_weight: float = 1e-5,
             generator: torch.Generator | None = None) -> dict:
    """The autoencoder loss above for a batch x (B, C, H, W) in [-1, 1] -> dict of scalar tensors (loss and its terms)."""
    x_hat, posterior = vae(x, generator=generator)
    rec = (x - x_hat).abs().mean()
    kl = posterior.kl().mean() / posterior.mean[0].numel()  # per latent element
    perc = feature_distance(x, x_hat).mean() if feature_distance is not None and perceptual_weight > 0 \
        else x.new_zeros(())
    loss = rec + perceptual_weight * perc + kl_weight * kl
    return {"loss": loss, "rec": rec, "perceptual": perc, "kl": kl}


@dataclass
class VAETrainConfig:
    """Everything that defines an autoencoder run; saved as JSON in every checkpoint."""

    preset: str = "f4"
    n_train: int = 20_000  # shapes images at 64x64, seed 0 (the test split is seed 1)
    image_size: int = 64
    crop: int | None = 32  # train on random crop x crop patches (the net is convolutional): 4x more steps per second
    steps: int = 7000
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 100
    kl_weight: float = 1e-5
    perceptual_weight: float = 0.1
    max_grad_norm: float = 1.0
    ckpt_every: int = 500
    seed: int = 0

    # Only this may change on --resume: ``steps`` sets the length of the cosine decay, so a longer run is a new run.
    RESUMABLE = ("ckpt_every",)

    def __post_init__(self):
        if self.preset not in VAE_PRESETS:
            raise ValueError(f"preset must be one of {list(VAE_PRESETS)}, got {self.preset!r}")
        for name in ("steps", "warmup"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be an int >= 0, got {getattr(self, name)!r}")
        for name in ("n_train", "image_size", "batch_size", "ckpt_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        if self.crop is not None and (not isinstance(self.crop, int) or self.crop % 4 or not 4 <= self.crop <= self.image_size):
            raise ValueError(f"crop must be None or a multiple of 4 in [4, image_size={self.image_size}], got {self.crop!r}")
        if not self.lr > 0 or self.kl_weight < 0 or self.perceptual_weight < 0 or not self.max_grad_norm > 0:
            raise ValueError(f"need lr > 0, kl_weight >= 0, perceptual_weight >= 0, max_grad_norm > 0; got lr={self.lr}, "
                             f"kl_weight={self.kl_weight}, perceptual_weight={self.perceptual_weight}, "
                             f"max_grad_norm={self.max_grad_norm}")


def shapes64(n: int, seed: int) -> torch.Tensor:
    """``n`` shapes images at 64x64 (B, 3, 64, 64) in [-1, 1], seed 0 = the training split, 1 = the test split."""
    from minidiff.data.shapes import make_shapes
    return make_shapes(n, size=64, seed=seed)[0]


def _schedule(config: VAETrainConfig):
    """Linear warmup then cosine decay to 0 at ``config.steps`` (``steps.lr_factor``)."""
    return lr_factor(config.warmup, "cosine", max(1, config.steps))


def _setup(config: VAETrainConfig, device: torch.device, in_channels: int = 3) -> dict:
    """The autoencoder (``in_channels`` from the data), optimizer, schedule, generators and the feature distance:
    on the shapes classifier for RGB data, on the Fashion-MNIST classifier for greyscale (MNIST family)."""
    from minidiff.eval.classifiers import load_classifier
    torch.manual_seed(config.seed)
    vae = AutoencoderKL(replace(VAE_PRESETS[config.preset], in_channels=in_channels)).to(device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config))
    gens = {"data": torch.Generator().manual_seed(config.seed),
            "noise": torch.Generator(device).manual_seed(config.seed + 1)}
    dist = FeatureDistance(load_classifier("shapes" if in_channels == 3 else "fashion-mnist", device=device))
    return {"vae": vae, "optimizer": optimizer, "scheduler": scheduler, "generators": gens, "distance": dist,
            "start": 0, "history": {"loss": [], "rec": [], "perceptual": [], "kl": []}, "sessions": []}


def _save(path: Path, config: VAETrainConfig, run: dict, step: int) -> None:
    run["sessions"][-1].update(end_step=step, wall_s=round(time.perf_counter() - run["t_start"], 1))
    extra = {k: torch.tensor(v, dtype=torch.float64) for k, v in run["history"].items()}
    meta = {"train": asdict(config), "vae": asdict(run["vae"].config), "sessions": run["sessions"]}
    save_checkpoint(path, model=run["vae"], step=step, optimizer=run["optimizer"], scheduler=run["scheduler"],
                    generators=run["generators"], config=meta, extra_tensors=extra)


def _resume(path: Path, config: VAETrainConfig, run: dict) -> None:
    saved = checkpoint_config(path)["train"]
    diff = {k: (saved.get(k), v) for k, v in asdict(config).items() if k not in config.RESUMABLE and saved.get(k) != v}
    if diff:
        raise ValueError(f"cannot resume {path}: config differs from the checkpoint's (saved, given): {diff}")
    state = load_checkpoint(path, model=run["vae"], optimizer=run["optimizer"], scheduler=run["scheduler"],
                            generators=run["generators"])
    run["start"], run["sessions"] = state["step"], state["config"].get("sessions", [])
    run["history"] = {k: state["extra_tensors"][k].tolist() for k in run["history"]}


def train_vae(config: VAETrainConfig, out_dir, *, resume: bool = False, device=None, images=None,
              progress: bool = True, command: str | None = None) -> dict:
    """Train an autoencoder as ``config`` says, checkpointing to ``out_dir/checkpoint.safetensors``.

    ``images`` (N, C, H, W), C = 1 or 3, replaces the shapes training set: e.g. ``load_dataset("fashion-mnist").images``
    with ``crop=None`` or a crop <= 28 (28 = 4 * 7, so f = 4 works). Returns {"vae", "history", "step"}.
    """
    device = device if isinstance(device, torch.device) else get_device(device)
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    lock = acquire_lock(out_dir)
    try:
        images = images if images is not None else shapes64(config.n_train, seed=0)
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must be (N, 1 or 3, H, W) in [-1, 1], got shape {tuple(images.shape)}")
        run = _setup(config, device, images.shape[1])
        if resume and (out_dir / "checkpoint.safetensors").exists():
            _resume(out_dir / "checkpoint.safetensors", config, run)
        (out_dir / "config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
        run["sessions"].append({"command": command, "hardware": hardware_info(device), "start_step": run["start"]})
        run["t_start"] = time.perf_counter()
        _loop(config, run, images, device, out_dir, progress)
        return {"vae": run["vae"].eval(), "history": run["history"], "step": max(run["start"], config.steps)}
    finally:
        lock.unlink(missing_ok=True)


def random_crops(images: torch.Tensor, crop: int | None, *, generator: torch.Generator, align: int = 4) -> torch.Tensor:
    """One random ``crop`` x ``crop`` patch per image, at offsets that are multiples of ``align`` (None: the images)."""
    if crop is None or (crop >= images.shape[-1] and crop >= images.shape[-2]):
        return images
    H, W = images.shape[-2:]
    ys = torch.randint((H - crop) // align + 1, (len(images),), generator=generator) * align
    xs = torch.randint((W - crop) // align + 1, (len(images),), generator=generator) * align
    return torch.stack([img[:, y:y + crop, x:x + crop] for img, y, x in zip(images, ys.tolist(), xs.tolist())])


def _loop(config: VAETrainConfig, run: dict, images: torch.Tensor, device, out_dir: Path, progress: bool) -> None:
    vae, optimizer = run["vae"].train(), run["optimizer"]
    bar = tqdm(range(run["start"], config.steps), initial=run["start"], total=config.steps, disable=not progress)
    for step in bar:
        idx = torch.randint(len(images), (config.batch_size,), generator=run["generators"]["data"])
        x = random_crops(images[idx], config.crop, generator=run["generators"]["data"])
        out = vae_loss(vae, x.to(device), feature_distance=run["distance"],
                       perceptual_weight=config.perceptual_weight, kl_weight=config.kl_weight,
                       generator=run["generators"]["noise"])
        if not torch.isfinite(out["loss"]):
            raise FloatingPointError(f"the autoencoder loss became {out['loss'].item()} at step {step}; lower --lr "
                                     "and resume from the last checkpoint")
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), config.max_grad_norm)
        optimizer.step()
        run["scheduler"].step()
        for k, v in out.items():
            run["history"][k].append(float(v.detach()))
        done = step + 1
        if done % 50 == 0:
            bar.set_postfix(rec=f"{sum(run['history']['rec'][-50:]) / 50:.4f}", kl=f"{float(out['kl']):.2f}")
        if done % config.ckpt_every == 0 or done == config.steps:
            _save(out_dir / "checkpoint.safetensors", config, run, done)
    bar.close()


# ---------------------------------------------------------------- command line

def _parser():
    import argparse
    parser = argparse.ArgumentParser(prog="python -m minidiff.training.autoencoder",
                                     description="Train (or export) the course's KL autoencoder on 64x64 shapes.")
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train, checkpointing to OUT/checkpoint.safetensors")
    defaults = VAETrainConfig()
    for name, value in asdict(defaults).items():
        kind = (lambda v: None if v.lower() == "none" else int(v)) if name == "crop" else type(value)
        tr.add_argument("--" + name.replace("_", "-"), type=kind, default=value)
    tr.add_argument("--out", required=True, help="run folder")
    tr.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.safetensors")
    tr.add_argument("--device", default=None, help="cpu, cuda or mps (default: the best available)")
    tr.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    tr.add_argument("--no-progress", action="store_true")
    ex = sub.add_parser("export", help="set the scaling factor, measure, and write weights + model card")
    ex.add_argument("run_dir")
    ex.add_argument("path", help="where to write the .safetensors (the card goes beside it as .json)")
    ex.add_argument("--n-scale", type=int, default=10_000, help="training images for the scaling factor")
    ex.add_argument("--n-test", type=int, default=1000, help="held-out images for the metrics")
    return parser


@command_line("python -m minidiff.training.autoencoder")
def main(argv=None) -> None:
    """``python -m minidiff.training.autoencoder train|export``; user errors: one line, status 2."""
    import shlex
    argv = list(argv or [])
    args = _parser().parse_args(argv)
    if args.command == "export":
        from minidiff.eval.autoencoder import export_vae
        path = export_vae(args.run_dir, args.path, n_scale=args.n_scale, n_test=args.n_test)
        print(f"exported {path} and model card {Path(path).with_suffix('.json')}")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    fields = {k: getattr(args, k) for k in asdict(VAETrainConfig())}
    config = VAETrainConfig(**fields)
    check_out_dir(Path(args.out))
    print(f"training the {config.preset} autoencoder for {config.steps} steps -> {args.out}/checkpoint.safetensors")
    result = train_vae(config, args.out, resume=args.resume, device=args.device, progress=not args.no_progress,
                       command="python -m minidiff.training.autoencoder " + shlex.join(argv))
    rec = result["history"]["rec"][-100:]
    print(f"done: step {result['step']}, mean L1 of the last 100 steps {sum(rec) / max(1, len(rec)):.4f}")


if __name__ == "__main__":
    main()
