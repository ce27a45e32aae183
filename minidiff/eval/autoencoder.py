"""How good is an autoencoder? Reconstruction metrics, and the export that writes them into its model card.

| metric                    | computed on                                   | reads as                                  |
|---------------------------|-----------------------------------------------|-------------------------------------------|
| PSNR (dB)                 | held-out images vs their reconstructions      | pixel fidelity; >= 30 dB is the course bar |
| SSIM                      | the same pairs (``metrics.ssim``)             | local structure, 1 = identical             |
| rFID                      | shipped shapes classifier's features          | do reconstructions look like the data?     |
| attribute accuracy        | shipped classifier on originals and recons   | is the content (shape, colour...) kept?    |
| KL per latent element     | mean of KL(q(z | x) || N(0, I)) / n_latent     | how far latents are from the prior         |

The shapes classifier reads 32x32 images, so 64x64 images are average-pooled 2x2 before it (its accuracy on
pooled real 64x64 images is reported beside its accuracy on native 32x32 ones, to show it is adequate).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from minidiff.eval.metrics import frechet_distance_from_features, prompt_adherence, psnr, ssim
from minidiff.files import atomic_write_bytes, file_sha256, hardware_info
from minidiff.models.vae import AutoencoderKL, VAEConfig, reconstruct, set_scaling_factor

__all__ = ["to_classifier_size", "reconstruction_metrics", "export_vae"]


def to_classifier_size(images: torch.Tensor, size: int = 32) -> torch.Tensor:
    """Average-pool images (B, C, H, W) down to ``size`` x ``size`` (H must be a multiple of ``size``)."""
    factor = images.shape[-1] // size
    if factor < 1 or images.shape[-1] != factor * size or images.shape[-2] != factor * size:
        raise ValueError(f"images must be square with a side that is a multiple of {size}, got {tuple(images.shape)}")
    return F.avg_pool2d(images, factor) if factor > 1 else images


@torch.no_grad()
def reconstruction_metrics(vae: AutoencoderKL, images: torch.Tensor, attrs: torch.Tensor | None = None, *,
                           classifier=None, batch_size: int = 250) -> dict:
    """PSNR, SSIM, KL per latent element, and (given the shapes classifier and ``attrs``) rFID and attribute
    accuracy of originals and reconstructions, on held-out ``images`` (N, 3, H, W) in [-1, 1]."""
    from minidiff.eval.classifiers import extract_features
    recons = reconstruct(vae, images, batch_size=batch_size)
    kl = torch.cat([vae.encode(images[k:k + batch_size]).kl() for k in range(0, len(images), batch_size)])
    n_latent = vae.config.latent_channels * (images.shape[-1] // vae.factor) * (images.shape[-2] // vae.factor)
    out = {"n": len(images), "psnr_db": float(psnr(images, recons).mean()), "ssim": float(ssim(images, recons).mean()),
           "kl_per_latent_element": float(kl.mean() / n_latent)}
    if classifier is not None:
        real, fake = to_classifier_size(images), to_classifier_size(recons)
        out["rfid_classifier"] = frechet_distance_from_features(extract_features(classifier, real),
                                                                extract_features(classifier, fake))
        if attrs is not None:
            out["attr_accuracy_originals"] = prompt_adherence(classifier, real, attrs)
            out["attr_accuracy_reconstructions"] = prompt_adherence(classifier, fake, attrs)
    return out, recons


def _vae_from_run(run_dir: Path) -> tuple[AutoencoderKL, dict]:
    from minidiff.training.checkpoint import checkpoint_config, load_checkpoint
    path = Path(run_dir) / "checkpoint.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; train first with "
                                f"`python -m minidiff.training.autoencoder train --out {run_dir}`")
    meta = checkpoint_config(path)
    vae = AutoencoderKL(VAEConfig(**meta["vae"]))
    load_checkpoint(path, model=vae, restore_rng=False)
    return vae.eval(), meta


def export_vae(run_dir, path, *, n_scale: int = 10_000, n_test: int = 1000) -> Path:
    """Set the scaling factor from ``n_scale`` training images, measure on ``n_test`` held-out images, and write the
    autoencoder and its model card (``<path>.json``)."""
    from minidiff.data.shapes import make_shapes
    from minidiff.eval.classifiers import load_classifier
    from minidiff.training.checkpoint import save_vae
    t0 = time.perf_counter()
    vae, meta = _vae_from_run(Path(run_dir))
    train_cfg = meta["train"]
    size = train_cfg["image_size"]
    scale = set_scaling_factor(vae, make_shapes(n_scale, size=size, seed=0)[0],
                               generator=torch.Generator().manual_seed(0))
    images, _, attrs = make_shapes(n_test, size=size, seed=1)
    classifier = load_classifier("shapes")
    metrics, _ = reconstruction_metrics(vae, images, attrs, classifier=classifier)
    z = torch.cat([vae.encode_latents(images[k:k + 250], generator=torch.Generator().manual_seed(1))
                   for k in range(0, n_test, 250)])
    native, _, native_attrs = make_shapes(n_test, size=32, seed=1)
    sessions = meta.get("sessions", [])
    card = {
        "name": Path(path).stem, "kind": "autoencoder (KL, Rombach et al. 2022)", "file": Path(path).name,
        "vae": meta["vae"], "params": sum(p.numel() for p in vae.parameters()),
        "latent_shape_for_64x64": list(vae.latent_shape((3, 64, 64))),
        "scaling_factor": scale, "scaling_factor_from": f"1 / std of posterior samples of {n_scale} training images",
        "scaled_latent_std_test": float(z.std()), "scaled_latent_mean_test": float(z.mean()),
        "metrics_test": metrics,
        "evaluator_accuracy_native_32px": prompt_adherence(classifier, native, native_attrs),
        "data": f"train: make_shapes({train_cfg['n_train']}, size={size}, seed=0); "
                f"test: make_shapes({n_test}, size={size}, seed=1)",
        "train": train_cfg, "steps": sum(s.get("end_step", 0) - s.get("start_step", 0) for s in sessions),
        "wall_time_s": round(sum(s.get("wall_s", 0) for s in sessions), 1),
        "train_hardware": sessions[-1]["hardware"] if sessions else None,
        "train_commands": [s.get("command") for s in sessions],
        "export_command": f"python -m minidiff.training.autoencoder export {run_dir} {path}",
        "export_hardware": hardware_info(), "export_wall_time_s": None,
    }
    save_vae(path, vae)
    card["sha256"] = file_sha256(path)
    card["export_wall_time_s"] = round(time.perf_counter() - t0, 1)
    atomic_write_bytes(Path(path).with_suffix(".json"), (json.dumps(card, indent=2) + "\n").encode())
    return Path(path)
