"""A first latent diffusion model: the U-Net and training loop of the pixel models, run on the autoencoder's latents.

    python -m minidiff.training.latent train --out runs/shapes64-latent --steps 2000
    python -m minidiff.training.latent export runs/shapes64-latent minidiff/weights/shapes64-latent.safetensors

Latent diffusion (Rombach et al. 2022, Sec. 3.3) is ordinary diffusion on x = s_z * E(image): nothing in the
loss, the samplers or guidance changes; the data are 16x16x4 latents instead of 64x64x3 pixels, and samples are
decoded by the autoencoder at the end. The model is class-conditional on the 30 (colour, shape) pairs of
one-object 64x64 shapes images (label = color * 5 + shape, names like "red circle"), which the shipped shapes
classifier can read back from the decoded samples.
"""
from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path

import torch

from minidiff.data.latents import latent_dataset
from minidiff.data.shapes import COLORS, SHAPES, ShapesDataset, make_shapes
from minidiff.training.loop import TrainConfig, train
from minidiff.utils import command_line

__all__ = ["CLASS_NAMES", "labels_of", "shapes64_latents", "latent_config", "evaluate_latent", "export_latent",
           "main"]

CLASS_NAMES = tuple(f"{c} {s}" for c in COLORS for s in SHAPES)  # label = color * len(SHAPES) + shape


def labels_of(attrs: torch.Tensor) -> torch.Tensor:
    """Class labels color1 * 5 + shape1 (N,) of shapes attrs (N, 7)."""
    return attrs[:, 1] * len(SHAPES) + attrs[:, 0]


def shapes64_latents(vae, *, n: int = 20_000, seed: int = 2, cache_dir=None, progress: bool = True):
    """The latent training set: ``n`` one-object 64x64 shapes images (``seed``), encoded once and cached;
    images are rendered only on a cache miss."""
    shapes = ShapesDataset(n, size=64, seed=seed, max_objects=1)
    labels = labels_of(torch.stack([shapes.layout(i)[0] for i in range(n)]))
    data_key = {"name": "shapes", "size": 64, "n": n, "seed": seed, "max_objects": 1}
    return latent_dataset(vae, lambda: shapes.tensors()[0], data_key, labels, CLASS_NAMES,
                          name="shapes64-latents", cache_dir=cache_dir, progress=progress)


def latent_config(**overrides) -> TrainConfig:
    """The shipped latent model's config: the "tiny" U-Net on 4-channel 16x16 latents, eps-prediction, cosine."""
    base = dict(dataset="shapes64-latents", preset="tiny", prediction="v", schedule="cosine", steps=6000,
                batch_size=64, lr=1e-3, warmup=100, sample_every=1000, ckpt_every=250, val_every=250,
                sample_guidance=2.0, unet={"attn_levels": [2]})
    return TrainConfig(**{**base, **overrides})


@torch.no_grad()
def evaluate_latent(denoiser, vae, *, n: int = 1000, guidance: float = 2.0, steps: int = 20,
                    sampler: str = "dpmpp_2m", seed: int = 0, progress: bool = True) -> dict:
    """Sample ``n`` class-balanced latents, decode them, and score the images with the shipped shapes classifier:
    FID against one-object test images (and the real-vs-real floor at the same n), and class accuracy (the
    classifier reads back both colour and shape; binomial standard error ~1.5 points at n = 1000)."""
    from minidiff.eval.autoencoder import to_classifier_size
    from minidiff.eval.classifiers import extract_features, load_classifier
    from minidiff.eval.evaluation import generate
    from minidiff.eval.metrics import frechet_distance_from_features
    classifier = load_classifier("shapes")
    gen = generate(denoiser, n=n, shape=tuple(denoiser.image_shape), sampler=sampler, steps=steps, guidance=guidance,
                   generator=torch.Generator().manual_seed(seed), progress=progress, decode=vae.decode_latents)
    fake = to_classifier_size(gen.images)
    test = to_classifier_size(make_shapes(n, size=64, seed=3, max_objects=1)[0])
    train_imgs = to_classifier_size(make_shapes(n, size=64, seed=2, max_objects=1)[0])
    f_fake, f_test = extract_features(classifier, fake), extract_features(classifier, test)
    logits = classifier.logits(fake)
    pred = logits["color1"].argmax(1) * len(SHAPES) + logits["shape1"].argmax(1)
    return {"n": n, "guidance": guidance, "steps": steps, "sampler": sampler, "nfe": gen.nfe,
            "fid_classifier": frechet_distance_from_features(f_test, f_fake),
            "fid_floor": frechet_distance_from_features(f_test, extract_features(classifier, train_imgs)),
            "class_accuracy": float((pred == gen.labels).double().mean()),
            "wall_time_s": round(gen.wall_time_s, 1)}, gen


def export_latent(run_dir, path, *, vae_name: str = "shapes64-vae", n_eval: int = 1000) -> Path:
    """Write the EMA weights of a latent run as ``path`` with a model card naming its autoencoder and its metrics."""
    from minidiff.files import atomic_write_bytes, file_sha256
    from minidiff.pretrained import load, model_card
    from minidiff.training.checkpoint import load_model
    from minidiff.training.cli import export_run
    export_run(run_dir, path, dtype="float32", image_shape=(4, 16, 16), class_names=CLASS_NAMES)
    vae = load(vae_name)
    denoiser = load_model(path, clip_x0=False)
    t0 = time.perf_counter()
    metrics, _ = evaluate_latent(denoiser, vae, n=n_eval)
    card = json.loads(Path(path).with_suffix(".json").read_text())
    card.update(latent={"vae": vae_name, "vae_sha256": model_card(vae_name)["sha256"],
                        "scaling_factor": float(vae.scaling_factor)},
                data="one-object shapes at 64x64 (make_shapes(20000, size=64, seed=2, max_objects=1)), encoded with "
                     "the autoencoder's posterior mean times its scaling factor",
                metrics=metrics, eval_wall_time_s=round(time.perf_counter() - t0, 1), sha256=file_sha256(path))
    atomic_write_bytes(Path(path).with_suffix(".json"), (json.dumps(card, indent=2) + "\n").encode())
    return Path(path)


@command_line("python -m minidiff.training.latent")
def main(argv=None) -> None:
    """``python -m minidiff.training.latent train|export``: train or export the shipped latent model."""
    argv = list(argv or [])
    parser = argparse.ArgumentParser(prog="python -m minidiff.training.latent")
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train")
    tr.add_argument("--out", required=True)
    tr.add_argument("--vae", default="shapes64-vae", help="a shipped autoencoder (minidiff.pretrained.available())")
    tr.add_argument("--steps", type=int, default=6000)
    tr.add_argument("--n", type=int, default=20_000, help="training images (encoded once, cached)")
    tr.add_argument("--resume", action="store_true")
    tr.add_argument("--threads", type=int, default=None)
    tr.add_argument("--device", default=None)
    ex = sub.add_parser("export")
    ex.add_argument("run_dir")
    ex.add_argument("path")
    ex.add_argument("--vae", default="shapes64-vae")
    ex.add_argument("--n-eval", type=int, default=1000)
    args = parser.parse_args(argv)
    if args.command == "export":
        print(f"exported {export_latent(args.run_dir, args.path, vae_name=args.vae, n_eval=args.n_eval)}")
        return
    from minidiff.pretrained import load
    if args.threads:
        torch.set_num_threads(args.threads)
    config = latent_config(steps=args.steps)
    vae = load(args.vae)
    data = shapes64_latents(vae, n=args.n)
    print(f"training on {data} -> {args.out}/")
    train(config, args.out, resume=args.resume, device=args.device, data=data, decode=vae.decode_latents,
          command="python -m minidiff.training.latent " + shlex.join(argv))


if __name__ == "__main__":
    main()
