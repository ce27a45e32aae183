"""Exporting a text run as a shipped model: its EMA weights (``save_text_model``) and a model card with measurements.

    python -m minidiff.training.text export runs/shapes64-text minidiff/weights/shapes64-text.safetensors
    python -m minidiff.training.text export-inpaint runs/shapes64-inpaint minidiff/weights/shapes64-inpaint.safetensors

The text model's card holds the ``eval.text.evaluate_text_model`` table (judge per slot, seen vs held-out,
guidance, samplers, FID); the inpainting model's card the ``eval.editing`` replace problem for the model and,
on the same scenes and seeds, for training-free inpainting with the text model it was fine-tuned from.
"""
from __future__ import annotations

import json
from pathlib import Path

from minidiff.data.shapes import HELD_OUT
from minidiff.denoiser import Denoiser
from minidiff.eval.editing import evaluate_img2img, evaluate_inpainting, recolor_scenes, replace_scenes
from minidiff.eval.text import evaluate_text_model
from minidiff.files import WEIGHTS_DIR, file_sha256
from minidiff.models.clip import load_clip
from minidiff.pipelines import TextToImagePipeline
from minidiff.pretrained import load, model_card
from minidiff.schedules import alphas_cumprod_from_betas, make_betas
from minidiff.training.checkpoint import (checkpoint_config, load_checkpoint, load_text_model, save_text_model,
                                         text_net_from_spec)
from minidiff.training.steps import EMA
from minidiff.training.text import TextTrainConfig, build_text_net

__all__ = ["ema_denoiser", "export_text_model", "export_inpainting_model"]

DATA = ("captioned 64x64 shapes scenes, one or two objects: ShapesDataset(40000, size=64, seed=4, max_objects=2) "
        "minus every scene holding a held-out (colour, shape) pair, encoded with the autoencoder's posterior mean "
        "times its scaling factor")


def ema_denoiser(run_dir, *, clip=None) -> tuple[Denoiser, dict]:
    """(the run's EMA net as a ``Denoiser`` in eval mode, the checkpoint's saved config)."""
    ckpt = Path(run_dir) / "checkpoint.safetensors"
    saved = checkpoint_config(ckpt)
    if "unet" in saved and "encoder" in saved:  # the architecture and vocabulary it was trained with, whatever
        config = TextTrainConfig(**{**saved["train"], "init": None})  # its init file or the course holds now
        net = text_net_from_spec({**saved, "inpainting": config.inpainting})
    else:  # a checkpoint older than its spec
        config = TextTrainConfig(**saved["train"])
        net = build_text_net(config, clip=clip)
    ema = EMA(net)
    load_checkpoint(ckpt, model=net, ema=ema, restore_rng=False)
    ema.copy_to(net).eval()
    ab = alphas_cumprod_from_betas(make_betas(config.schedule, config.T))
    return Denoiser(net, ab, config.prediction, image_shape=(4, 16, 16)), saved


def _card(path, denoiser, saved: dict, vae, vae_name: str, kind: str, metrics: dict, **extra) -> dict:
    net = denoiser.net
    return {"name": Path(path).stem, "kind": kind, "file": Path(path).name, "train": saved["train"],
            "unet": saved["unet"], "encoder": net.text_encoder.spec(),
            "params": {"unet": sum(p.numel() for p in net.unet.parameters()),
                       "text_encoder": sum(p.numel() for p in net.text_encoder.parameters())},
            "latent": {"vae": vae_name, "vae_sha256": model_card(vae_name)["sha256"],
                       "scaling_factor": float(vae.scaling_factor)},
            "data": DATA, "held_out": [list(p) for p in HELD_OUT], "steps": saved["step"],
            "sessions": saved["sessions"],
            "train_wall_time_s": round(sum(s.get("wall_s", 0) for s in saved["sessions"]), 1),
            **extra, "metrics": metrics, "sha256": file_sha256(path)}


def _write_card(path, card: dict) -> Path:
    Path(path).with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")
    return Path(path)


def export_text_model(run_dir, path, *, vae_name: str = "shapes64-vae", n_eval: int = 300,
                      clip_name: str | None = "shapes-clip", progress: bool = True) -> Path:
    """Write the EMA weights of a text run as ``path`` with its card and the ``evaluate_text_model`` table."""
    saved_train = checkpoint_config(Path(run_dir) / "checkpoint.safetensors")["train"]
    has_clip = clip_name is not None and (WEIGHTS_DIR / f"{clip_name}.safetensors").is_file()
    clip = load_clip(clip_name) if has_clip or saved_train.get("encoder") == "clip" else None
    denoiser, saved = ema_denoiser(run_dir, clip=clip)
    save_text_model(path, denoiser)
    vae = load(vae_name)
    metrics = evaluate_text_model(TextToImagePipeline(denoiser, vae), n=n_eval, clip=clip, progress=progress)
    return _write_card(path, _card(path, denoiser, saved, vae, vae_name,
                                   "text-to-image latent diffusion (Rombach et al. 2022)", metrics))


def _row(result: dict) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items() if k != "images"}


def export_inpainting_model(run_dir, path, *, vae_name: str = "shapes64-vae", n_eval: int = 300,
                            progress: bool = True) -> Path:
    """Write an inpainting run's EMA weights as ``path`` with a card: the replace problem (``eval.editing``) for
    the model (with and without pasting z0 back outside the mask) and for training-free inpainting with its
    base text model (DPM-Solver++, DDPM, RePaint), on the same scenes and seeds; and the base model's
    image-to-image strength curve on the recolor problem."""
    train = checkpoint_config(Path(run_dir) / "checkpoint.safetensors")["train"]
    if not train.get("inpainting") or not train.get("init"):
        raise ValueError(f"{run_dir} is not an inpainting fine-tune (trained with --inpainting --init MODEL); "
                         f"export a text model with `export` instead")
    denoiser, saved = ema_denoiser(run_dir)
    save_text_model(path, denoiser)
    vae = load(vae_name)
    base_path = Path(saved["train"]["init"])
    base = TextToImagePipeline(load_text_model(base_path), vae)
    scenes = replace_scenes(n_eval, seed=0)
    model = TextToImagePipeline(denoiser, vae)
    runs = {"inpainting model": (model, {}), "inpainting model, no paste-back": (model, {"keep_unmasked": False}),
            "training-free": (base, {}), "training-free, DDPM": (base, {"sampler": "ddpm"}),
            "training-free + RePaint (5 jumps)": (base, {"jumps": 5})}
    replace = {name: _row(evaluate_inpainting(pipe, scenes, progress=progress, **options))
               for name, (pipe, options) in runs.items()}
    recolor = [_row(r) for r in evaluate_img2img(base, recolor_scenes(n_eval, seed=0), progress=progress)]
    metrics = {"replace": replace, "recolor_by_img2img": recolor,
               "settings": {"guidance": 5.0, "sampler": "dpmpp_2m unless named", "steps": 20, "n": n_eval,
                            "training_free_model": base_path.stem, "img2img_model": base_path.stem}}
    base_info = {"name": base_path.stem, "sha256": file_sha256(base_path)}
    return _write_card(path, _card(path, denoiser, saved, vae, vae_name,
                                   "inpainting latent diffusion: the text model's U-Net with mask and masked-latent "
                                   "input channels, zero-initialised and fine-tuned (Rombach et al. 2022)",
                                   metrics, base_model=base_info))
