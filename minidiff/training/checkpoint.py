"""Checkpoints in safetensors: no pickle is ever loaded, and a crash mid-write never corrupts the last one.

Two kinds of file, both safetensors (tensors + a str -> str metadata dict):

| kind           | written by          | holds                                                                    |
|----------------|---------------------|--------------------------------------------------------------------------|
| training state | ``save_checkpoint`` | model, EMA, optimizer, LR scheduler, step, RNG states, config (JSON)      |
| inference only | ``save_model``      | (EMA) weights, optionally float16, ``alphas_cumprod``, model spec (JSON) |
| autoencoder    | ``save_vae``        | autoencoder weights and ``scaling_factor``, its ``VAEConfig`` (JSON)      |
| text model     | ``save_text_model`` | U-Net + text encoder weights, ``alphas_cumprod``, both specs (JSON)       |

Tensor keys are prefixed by what they belong to (``model.``, ``ema.``, ``optim.<param id>.``, ``gen.``,
``rng.``, ``extra.``); everything that is not a tensor is JSON in the metadata.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from minidiff.files import CheckpointError, atomic_write_bytes, read_metadata, read_safetensors, write_safetensors
from minidiff.utils import resolve_device

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "checkpoint_config",
           "save_model", "load_model", "save_vae", "load_vae", "save_text_model", "load_text_model", "read_metadata",
           "TRAIN_FORMAT", "MODEL_FORMAT", "VAE_FORMAT", "TEXT_MODEL_FORMAT"]

TRAIN_FORMAT = "minidiff-checkpoint-v1"
MODEL_FORMAT = "minidiff-model-v1"
VAE_FORMAT = "minidiff-vae-v1"
TEXT_MODEL_FORMAT = "minidiff-text-model-v1"


def _prefixed(prefix: str, tensors: dict) -> dict:
    return {f"{prefix}{k}": v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def _unprefixed(prefix: str, tensors: dict) -> dict:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _optimizer_parts(optimizer) -> tuple[dict, dict]:
    """Split an optimizer state_dict into prefixed tensors and a JSON-able rest."""
    state = optimizer.state_dict()
    tensors, rest = {}, {}
    for pid, param_state in state["state"].items():
        for key, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{pid}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                rest[f"{pid}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "non_tensor_state": rest}


def _optimizer_state(tensors: dict, info: dict) -> dict:
    """Rebuild an optimizer state_dict from ``_optimizer_parts`` output."""
    state: dict[int, dict] = {}
    for name, value in _unprefixed("optim.", tensors).items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    for name, value in info["non_tensor_state"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in info["param_groups"]]
    return {"state": state, "param_groups": groups}


def _rng_tensors(generators: dict | None) -> dict:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    for name, g in (generators or {}).items():
        tensors[f"gen.{name}"] = g.get_state()
    return tensors


def save_checkpoint(path, *, model, step: int, ema=None, optimizer=None, scheduler=None, generators=None,
                    config: dict | None = None, extra_tensors: dict | None = None) -> Path:
    """Atomically save the full training state (resume continues exactly where this stopped)."""
    tensors = _prefixed("model.", model.state_dict())
    metadata = {"format": TRAIN_FORMAT, "step": str(int(step)), "config": json.dumps(config or {})}
    if ema is not None:
        ema_state = ema.state_dict()
        tensors.update(_prefixed("ema.", ema_state.pop("shadow")))
        metadata["ema"] = json.dumps(ema_state)
    if optimizer is not None:
        optim_tensors, metadata["optimizer"] = _optimizer_parts(optimizer)
        tensors.update(optim_tensors)
        metadata["optimizer"] = json.dumps(metadata["optimizer"])
    if scheduler is not None:
        metadata["scheduler"] = json.dumps(scheduler.state_dict())
    tensors.update(_rng_tensors(generators))
    tensors.update(_prefixed("extra.", extra_tensors or {}))
    write_safetensors(path, tensors, metadata)
    return Path(path)


def _restore_rng(tensors: dict, generators: dict | None) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[f"rng.cuda.{i}"] for i in range(len(_unprefixed("rng.cuda.", tensors)))]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
    for name, g in (generators or {}).items():
        if f"gen.{name}" not in tensors:
            raise CheckpointError(f"checkpoint has no state for generator {name!r}; it has "
                                  f"{sorted(_unprefixed('gen.', tensors))}")
        g.set_state(tensors[f"gen.{name}"])


def load_checkpoint(path, *, model=None, ema=None, optimizer=None, scheduler=None, generators=None,
                    restore_rng: bool = True) -> dict:
    """Load what ``save_checkpoint`` wrote into the given objects -> {"step", "config", "extra_tensors"}."""
    tensors, metadata = read_safetensors(path, expect_format=TRAIN_FORMAT)
    if model is not None:
        model.load_state_dict(_unprefixed("model.", tensors))
    if ema is not None:
        ema.load_state_dict({**json.loads(metadata["ema"]), "shadow": _unprefixed("ema.", tensors)})
    if optimizer is not None:
        optimizer.load_state_dict(_optimizer_state(tensors, json.loads(metadata["optimizer"])))
    if scheduler is not None:
        scheduler.load_state_dict(json.loads(metadata["scheduler"]))
    if restore_rng:
        _restore_rng(tensors, generators)
    return {"step": int(metadata["step"]), "config": json.loads(metadata["config"]),
            "extra_tensors": _unprefixed("extra.", tensors)}


def checkpoint_config(path) -> dict:
    """The config JSON stored in a training checkpoint, plus its step (reads only the header)."""
    _, metadata = read_safetensors(path, expect_format=TRAIN_FORMAT)
    return {**json.loads(metadata["config"]), "step": int(metadata["step"])}


def save_model(path, denoiser, *, schedule: str | None = None, dtype=torch.float32, card: dict | None = None) -> Path:
    """Save an inference-only model: the net's weights, ``alphas_cumprod`` and the spec to rebuild a Denoiser.

    ``denoiser`` is a ``minidiff.denoiser.Denoiser`` wrapping a ``UNet``; ``card`` (optional) is
    written beside it as ``<path without suffix>.json``.
    """
    net = denoiser.net
    tensors = {k: (v.to(dtype) if v.dtype.is_floating_point else v) for k, v in net.state_dict().items()}
    tensors = _prefixed("net.", tensors)
    tensors["alphas_cumprod"] = denoiser.alphas_cumprod.detach().to("cpu", torch.float64).contiguous()
    spec = {"unet": asdict(net.config), "prediction": denoiser.prediction, "schedule": schedule,
            "image_shape": list(denoiser.image_shape) if denoiser.image_shape is not None else None}
    metadata = {"format": MODEL_FORMAT, "spec": json.dumps(spec)}
    write_safetensors(path, tensors, metadata)
    if card is not None:
        atomic_write_bytes(Path(path).with_suffix(".json"), (json.dumps(card, indent=2) + "\n").encode())
    return Path(path)


def load_model(path, *, device=None, clip_x0: bool = False):
    """Rebuild the ``Denoiser`` saved by ``save_model`` (weights cast to float32, eval mode; see Denoiser for clip_x0)."""
    from minidiff.denoiser import Denoiser
    from minidiff.models.unet import UNet, UNetConfig

    tensors, metadata = read_safetensors(path, expect_format=MODEL_FORMAT)
    try:
        spec = json.loads(metadata["spec"])
    except (KeyError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: its model spec is not valid JSON ({err}); the file was edited or damaged: "
                              "re-export it from its run, or reinstall minidiff for a shipped model") from None
    try:
        net = UNet(UNetConfig(**spec["unet"]))
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: its spec is not a valid UNetConfig ({err}); re-export the model") from None
    weights = {k: v.float() if v.dtype.is_floating_point else v for k, v in _unprefixed("net.", tensors).items()}
    try:
        net.load_state_dict(weights)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
        raise CheckpointError(f"{path}: the weights do not fit the architecture in its spec ({first}); the spec "
                              "was edited: re-export the model") from None
    denoiser = Denoiser(net, tensors["alphas_cumprod"], prediction=spec["prediction"], clip_x0=clip_x0,
                        image_shape=spec.get("image_shape"))
    return denoiser.to(resolve_device(device)).eval()


def save_vae(path, vae, *, card: dict | None = None) -> Path:
    """Save an ``AutoencoderKL`` (float32 weights and its ``scaling_factor`` buffer) with its config as JSON;
    ``card`` (optional) goes beside it as ``<path without suffix>.json``."""
    metadata = {"format": VAE_FORMAT, "spec": json.dumps({"vae": asdict(vae.config)})}
    write_safetensors(path, _prefixed("vae.", vae.state_dict()), metadata)
    if card is not None:
        atomic_write_bytes(Path(path).with_suffix(".json"), (json.dumps(card, indent=2) + "\n").encode())
    return Path(path)


def load_vae(path, *, device=None):
    """Rebuild the ``AutoencoderKL`` saved by ``save_vae`` (eval mode); errors name the file and what to do."""
    from minidiff.models.vae import AutoencoderKL, VAEConfig

    tensors, metadata = read_safetensors(path, expect_format=VAE_FORMAT)
    try:
        vae = AutoencoderKL(VAEConfig(**json.loads(metadata["spec"])["vae"]))
    except (KeyError, TypeError, ValueError) as err:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{path}: its spec is not a valid VAEConfig ({err}); the file was edited: re-export "
                              "it, or reinstall minidiff for the shipped autoencoder") from None
    try:
        vae.load_state_dict(_unprefixed("vae.", tensors))
    except RuntimeError as err:
        raise CheckpointError(f"{path}: the weights do not fit the architecture in its spec; the spec was edited: "
                              f"re-export the autoencoder ({str(err).splitlines()[0]})") from None
    return vae.to(resolve_device(device)).eval()


def save_text_model(path, denoiser, *, card: dict | None = None) -> Path:
    """Save a ``Denoiser`` around a ``TextConditionedNet``: weights, ``alphas_cumprod``, the U-Net's config and
    the text encoder's spec (with its vocabulary); ``card`` (optional) beside it as JSON."""
    net = denoiser.net
    tensors = _prefixed("net.", {k: v.float() if v.dtype.is_floating_point else v for k, v in net.state_dict().items()})
    tensors["alphas_cumprod"] = denoiser.alphas_cumprod.detach().to("cpu", torch.float64).contiguous()
    spec = {"unet": asdict(net.unet.config), "encoder": net.text_encoder.spec(), "prediction": denoiser.prediction,
            "image_shape": list(denoiser.image_shape), "inpainting": type(net).__name__ == "InpaintingNet"}
    write_safetensors(path, tensors, {"format": TEXT_MODEL_FORMAT, "spec": json.dumps(spec)})
    if card is not None:
        atomic_write_bytes(Path(path).with_suffix(".json"), (json.dumps(card, indent=2) + "\n").encode())
    return Path(path)


def text_net_from_spec(spec: dict):
    """The untrained ``TextConditionedNet`` (``InpaintingNet`` if ``spec["inpainting"]``) that a text model file's
    or a text run checkpoint's spec describes: ``spec["unet"]`` (a UNetConfig as a dict) and ``spec["encoder"]``."""
    from minidiff.models.inpainting_net import InpaintingNet
    from minidiff.models.text_encoder import TextConditionedNet, encoder_from_spec
    from minidiff.models.unet import UNet, UNetConfig

    kind = InpaintingNet if spec.get("inpainting") else TextConditionedNet
    return kind(UNet(UNetConfig(**spec["unet"])), encoder_from_spec(spec["encoder"]))


def load_text_model(path, *, device=None):
    """Rebuild the ``Denoiser`` (around a ``TextConditionedNet``, or its ``InpaintingNet``) saved by
    ``save_text_model``, in eval mode."""
    from minidiff.denoiser import Denoiser

    tensors, metadata = read_safetensors(path, expect_format=TEXT_MODEL_FORMAT)
    try:
        spec = json.loads(metadata["spec"])
        net = text_net_from_spec(spec)
        net.load_state_dict(_unprefixed("net.", tensors))
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: its spec or weights do not describe a text model ({str(err).splitlines()[0]}); "
                              "re-export it, or reinstall minidiff for a shipped model") from None
    denoiser = Denoiser(net, tensors["alphas_cumprod"], prediction=spec["prediction"], image_shape=spec["image_shape"])
    return denoiser.to(resolve_device(device)).eval()
