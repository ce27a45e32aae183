"""Encode a dataset through an autoencoder once, cache the scaled latents, and reload them in seconds.

Latent diffusion trains on s_z * z with z ~ q(z | x) for every training image (Rombach et al. 2022, Sec. 3);
encoding is the slow part, so it happens once. The cache is a safetensors file whose name is a hash of

* the autoencoder's tensors (weights and ``scaling_factor``): a retrained or rescaled autoencoder gets a new file,
  never a stale one; and
* the dataset's parameters (a JSON-able dict the caller gives, e.g. ``{"name": "shapes", "n": 20000, "seed": 2}``)
  and how latents were drawn (the posterior mode, or a sample with a given seed; and the batch size, since float32
  convolutions round differently in batches of other sizes).

The file records both hashes again in its metadata and ``load_latents`` checks them, so a file that was copied
or renamed from another autoencoder's cache is refused with an error naming it. Deterministic: the same
autoencoder, data, seed and batch size give bit-identical latents on a given device and thread count.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from minidiff.data.datasets import ImageDataset, default_root
from minidiff.files import CheckpointError, read_safetensors, tensors_sha256, write_safetensors

__all__ = ["LATENT_FORMAT", "vae_hash", "encode_dataset", "cache_path", "cached_latents", "load_latents",
           "latent_dataset"]

LATENT_FORMAT = "minidiff-latents-v1"


def vae_hash(vae) -> str:
    """SHA-256 of an autoencoder's tensors (weights and scaling factor), as hex."""
    return tensors_sha256({k: v.detach().float() for k, v in vae.state_dict().items()})


@torch.no_grad()
def encode_dataset(vae, images: torch.Tensor, *, batch_size: int = 256, seed: int | None = None,
                   progress: bool = True) -> torch.Tensor:
    """Scaled latents s_z * z (N, c, H / f, W / f) of ``images`` (N, C, H, W): the posterior mean, or the sample
    mean + std * eps with eps drawn for the whole dataset at once from ``torch.Generator().manual_seed(seed)`` on the
    CPU (so the noise does not depend on the batch size or the device)."""
    vae.eval()
    device = next(vae.parameters()).device
    eps = None
    if seed is not None:
        eps = torch.randn((len(images), *vae.latent_shape(images.shape[1:])), generator=torch.Generator().manual_seed(seed))
    chunks = []
    for k in tqdm(range(0, len(images), batch_size), desc="encoding", disable=not progress):
        q = vae.encode(images[k:k + batch_size].to(device))
        z = q.mean if eps is None else q.mean + q.std * eps[k:k + batch_size].to(device, q.mean.dtype)
        chunks.append((z * vae.scaling_factor).cpu())
    if not chunks:
        raise ValueError("images is empty: nothing to encode")
    return torch.cat(chunks)


def _key(vae_sha: str, data_key: dict, seed: int | None, batch_size: int) -> str:
    try:
        text = json.dumps({"vae": vae_sha, "data": data_key, "seed": seed, "batch_size": batch_size}, sort_keys=True)
    except TypeError as err:
        raise ValueError(f"data_key must be a JSON-able dict of the dataset's parameters, got {data_key!r}") from err
    return hashlib.sha256(text.encode()).hexdigest()


def cache_path(vae, data_key: dict, *, seed: int | None = None, batch_size: int = 256, cache_dir=None) -> Path:
    """Where ``cached_latents`` keeps the latents of this autoencoder and dataset (``$MINIDIFF_DATA/latents/``)."""
    folder = Path(cache_dir) if cache_dir is not None else default_root() / "latents"
    return folder / f"latents-{_key(vae_hash(vae), data_key, seed, batch_size)[:20]}.safetensors"


def load_latents(path, vae, data_key: dict, *, seed: int | None = None,
                 batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(latents, labels or None) from a cache file, after checking it belongs to this autoencoder and dataset."""
    tensors, meta = read_safetensors(path, expect_format=LATENT_FORMAT)
    if meta.get("vae_sha256") != vae_hash(vae):
        raise CheckpointError(f"{path} holds latents of another autoencoder (vae_sha256 {meta.get('vae_sha256', '?')[:12]}"
                              f"..., this one is {vae_hash(vae)[:12]}...): delete it, or encode again with "
                              "cached_latents(...)")
    if meta.get("key") != _key(meta["vae_sha256"], data_key, seed, batch_size):
        raise CheckpointError(f"{path} holds latents of other data ({meta.get('data')}, seed {meta.get('seed')}, "
                              f"batch_size {meta.get('batch_size')}), not {data_key} with seed={seed}, "
                              f"batch_size={batch_size}: delete it, or encode again with cached_latents(...)")
    return tensors["latents"], tensors.get("labels")


def cached_latents(vae, images_fn, data_key: dict, *, labels: torch.Tensor | None = None, seed: int | None = None,
                   cache_dir=None, batch_size: int = 256, progress: bool = True):
    """Latents (and labels) of the dataset ``images_fn()`` returns, from the cache if it has them, else encoded once
    (progress bar) and written to the cache. ``images_fn`` is only called on a cache miss."""
    path = cache_path(vae, data_key, seed=seed, batch_size=batch_size, cache_dir=cache_dir)
    if path.is_file():
        return load_latents(path, vae, data_key, seed=seed, batch_size=batch_size)
    latents = encode_dataset(vae, images_fn(), batch_size=batch_size, seed=seed, progress=progress)
    tensors = {"latents": latents, **({"labels": labels.to(torch.int64)} if labels is not None else {})}
    sha = vae_hash(vae)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(path, tensors, {"format": LATENT_FORMAT, "vae_sha256": sha,
                                      "key": _key(sha, data_key, seed, batch_size), "data": json.dumps(data_key),
                                      "seed": str(seed), "batch_size": str(batch_size)})
    return latents, tensors.get("labels")


def latent_dataset(vae, images_fn, data_key: dict, labels: torch.Tensor, class_names, *, name: str,
                   **kw) -> ImageDataset:
    """An ``ImageDataset`` of cached latents (``.images`` are the scaled latents), for ``training.train(data=...)``."""
    latents, labels = cached_latents(vae, images_fn, data_key, labels=labels, **kw)
    where = cache_path(vae, data_key, seed=kw.get("seed"), batch_size=kw.get("batch_size", 256),
                       cache_dir=kw.get("cache_dir"))
    return ImageDataset(latents, labels, class_names, name, source=str(where))
