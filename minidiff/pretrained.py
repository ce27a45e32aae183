"""The course's pretrained models: ``load("fashion-mnist-cond")`` returns a ready denoiser,
``load("shapes64-vae")`` the course's autoencoder (``AutoencoderKL``), and ``load_pipeline("shapes64-text")`` the
course's text-to-image model bundled with its autoencoder (``TextToImagePipeline``).

Each model is two files in ``minidiff/weights/``: ``<name>.safetensors`` (EMA weights, alphas_cumprod
and the spec to rebuild the net, written by ``minidiff.training.checkpoint.save_model`` through
``python -m minidiff.train export``) and ``<name>.json``, its model card (config, data, steps, wall
time, hardware, metrics).
"""
from __future__ import annotations

import difflib
import json
from pathlib import Path

from minidiff.files import WEIGHTS_DIR, CheckpointError, read_metadata
from minidiff.training.checkpoint import (MODEL_FORMAT, TEXT_MODEL_FORMAT, VAE_FORMAT, load_model, load_text_model,
                                         load_vae)

__all__ = ["WEIGHTS_DIR", "UnknownModelError", "available", "load", "load_pipeline", "model_card"]


def _is_denoiser_file(path: Path) -> bool:
    """True for files written by ``save_model`` or ``save_vae`` (and for damaged ones, so that ``load`` reports the
    damage); False for other safetensors files in the folder, such as the evaluator classifiers."""
    try:
        return read_metadata(path).get("format") in (MODEL_FORMAT, VAE_FORMAT, TEXT_MODEL_FORMAT)
    except CheckpointError:
        return True


def _format(path: Path) -> str | None:
    """The format string in a file's header, or None for a damaged file."""
    try:
        return read_metadata(path).get("format")
    except CheckpointError:
        return None


def available(*, weights_dir=None) -> list[str]:
    """Names of the shipped models (diffusion models and autoencoders in the weights folder), sorted."""
    folder = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.safetensors") if _is_denoiser_file(p))


class UnknownModelError(KeyError, ValueError):
    """No shipped model of that name (a KeyError, and a ValueError; printed without KeyError's quotes)."""

    def __str__(self) -> str:
        return str(self.args[0])


def _path(name: str, weights_dir, suffix: str) -> Path:
    folder = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    known = available(weights_dir=folder)
    if name not in known:
        if not folder.is_dir():
            raise UnknownModelError(f"unknown pretrained model {name!r}: the weights folder {folder} does not exist")
        key = str(name).lower().replace("_", "-").removesuffix(".safetensors")
        loaders = {"classifier-": f"minidiff.eval.classifiers.load_classifier({str(name)[11:]!r})",
                   "shapes-clip": "minidiff.models.clip.load_clip('shapes-clip')"}
        elsewhere = [f" ({name!r} is not a diffusion model or autoencoder: load it with {f})"
                     for prefix, f in loaders.items()
                     if str(name).startswith(prefix) and (folder / f"{name}{suffix}").exists()]
        close = [] if elsewhere else [key] if key in known else difflib.get_close_matches(key, known, n=1)
        raise UnknownModelError(f"unknown pretrained model {name!r}" + (f" (did you mean {close[0]!r}?)" if close
                                                                        else "") + "".join(elsewhere) +
                                f"; available in {folder}: {known}")
    return folder / f"{name}{suffix}"


def load(name: str, *, device=None, weights_dir=None, clip_x0: bool | None = None):
    """The pretrained model called ``name`` (eval mode, float32) on ``device`` (default CPU): a ``Denoiser``, or an
    ``AutoencoderKL`` for the autoencoders ("shapes64-vae").

    Pixel-space models see data in [-1, 1], so their x0_hat is clipped to that range by default (Ho et al. 2020's
    clip_denoised); ``clip_x0=False`` shows the raw network, as lecture 03 does. Latent models are not clipped
    (their latents are not bounded): the default is True for pixel models and False for latent models.
    """
    path = _path(name, weights_dir, ".safetensors")
    try:
        fmt = read_metadata(path).get("format")
        if fmt == VAE_FORMAT:
            if clip_x0 is not None:
                raise ValueError(f"clip_x0 applies to denoisers; {name!r} is an autoencoder")
            return load_vae(path, device=device)
        if fmt == TEXT_MODEL_FORMAT:
            if clip_x0:
                raise ValueError(f"clip_x0 applies to pixel-space denoisers; {name!r} is a latent text model")
            return load_text_model(path, device=device)
        if clip_x0 is None:
            clip_x0 = not model_card(name, weights_dir=weights_dir).get("latent", False) \
                if path.with_suffix(".json").is_file() else True
        return load_model(path, device=device, clip_x0=clip_x0)
    except CheckpointError as e:
        raise CheckpointError(f"pretrained model {name!r} cannot be loaded: {e}. Reinstall minidiff or "
                              f"re-export it with `python -m minidiff.train export RUN_DIR {path}`") from e


def model_card(name: str, *, weights_dir=None) -> dict:
    """The model card of ``name`` (config, data, steps, wall time, hardware, metrics) as a dict."""
    path = _path(name, weights_dir, ".json")
    if not path.is_file():
        raise FileNotFoundError(f"model card of {name!r} not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"model card {path} is corrupted (invalid JSON): {e}") from e


def load_pipeline(name: str, *, device=None, weights_dir=None):
    """The text-to-image pipeline ``name`` ("shapes64-text"): its denoiser (U-Net + text encoder) and the
    autoencoder its model card names, checked by hash, as a ``TextToImagePipeline``."""
    from minidiff.pipelines import TextToImagePipeline
    path = _path(name, weights_dir, ".safetensors")
    if read_metadata(path).get("format") != TEXT_MODEL_FORMAT:
        text_models = [n for n in available(weights_dir=weights_dir)
                       if _format(_path(n, weights_dir, ".safetensors")) == TEXT_MODEL_FORMAT]
        raise ValueError(f"{name!r} is not a text-to-image model; load it with load({name!r}). "
                         f"Text-to-image models: {text_models}")
    card = model_card(name, weights_dir=weights_dir)
    denoiser = load(name, device=device, weights_dir=weights_dir)
    vae = load(card["latent"]["vae"], device=device, weights_dir=weights_dir)
    found = model_card(card["latent"]["vae"], weights_dir=weights_dir).get("sha256")
    if card["latent"].get("vae_sha256") not in (None, found):
        raise CheckpointError(f"{name!r} was trained on the latents of another {card['latent']['vae']!r} "
                              f"(sha256 {card['latent']['vae_sha256'][:12]}..., installed {str(found)[:12]}...): "
                              "reinstall minidiff, or retrain the text model on this autoencoder")
    return TextToImagePipeline(denoiser, vae, name=name, card=card)
