"""Evaluate a denoiser: generate samples, then classifier-FID (beside its real-vs-real floor), KID, class accuracy,
precision/recall, NFE and wall time.

    python -m minidiff.evaluate --checkpoint fashion-mnist-cond --sampler dpmpp_2m --steps 20 --guidance 3 --n 1000

Notebooks call ``evaluate(denoiser, ...) -> dict`` and ``generate(...)``. Features live in the space of the
shipped classifier of ``dataset`` (``minidiff.eval.classifiers``). The reference set is the test split: generated
samples are compared with ``n`` test images, and the floor is ``n`` train vs ``n`` test images, i.e. what a model
reproducing its training data would score at this N (see ``minidiff.eval.metrics`` on sample-size bias).
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from minidiff.denoiser import NFECounter, num_classes_of
from minidiff.eval import metrics
from minidiff.eval.classifiers import extract_features, load_classifier, training_data
from minidiff.guidance import CFGDenoiser
from minidiff.samplers import get_sampler
from minidiff.schedules import SAMPLING_SPACINGS, sampling_sigmas
from minidiff.utils import command_line, get_device

__all__ = ["Generated", "generate", "real_features", "real_class_accuracy", "evaluate", "format_table", "main"]

# (dataset, split, n) -> classifier features of the first n real images; kept for the life of the process.
_REAL_FEATURES: dict[tuple[str, str, int], torch.Tensor] = {}


@dataclass
class Generated:
    """Samples from ``generate``: images (N, C, H, W) in [-1, 1], class labels (N,) or None, NFE per sample."""
    images: torch.Tensor
    labels: torch.Tensor | None
    nfe: int
    wall_time_s: float


def _guided(denoiser, guidance: float, num_classes: int | None, guidance_rescale: float = 0.0):
    if guidance == 1.0:
        return denoiser
    if num_classes is None:
        raise ValueError(f"guidance must be 1.0 for an unconditional model (no null class to guide against), "
                         f"got {guidance}")
    return CFGDenoiser(denoiser, guidance, uncond={"class_labels": torch.tensor(num_classes)},
                       guidance_rescale=guidance_rescale)


def generate(denoiser, *, n: int, shape: tuple, sampler: str = "dpmpp_2m", steps: int = 20, guidance: float = 1.0,
             batch_size: int = 250, generator: torch.Generator | None = None, num_classes: int | None = None,
             spacing: str = "trailing", guidance_rescale: float = 0.0, device=None, progress: bool = True,
             decode=None, **sampler_options) -> Generated:
    """Draw ``n`` samples of ``shape`` (C, H, W); class-balanced labels 0, 1, ..., K-1, 0, ... if conditional.

    ``spacing`` defaults to "trailing": the first step is at t = T - 1, where x_T ~ N(0, I) really is the marginal.
    "leading" starts at t = T - T/steps and ignores the signal left there (Lin et al. 2024, "Common diffusion noise
    schedules and sample steps are flawed", Sec. 3.3); with the shipped model it costs 2-5x in FID at 10-20 steps.
    "karras" uses Karras et al. 2022's sigmas (Eq. 5) up to EDM's sigma_max = 80 (``schedules.sampling_sigmas``):
    Heun needs it here, because its trapezoid rule in sigma fails on trailing's first step from sigma ~ 2e4 down to
    ~ 6 (see lecture 03).

    ``num_classes`` defaults to the U-Net's; guidance uses ``CFGDenoiser`` with the null class id K as uncond.
    ``decode`` (a latent model's ``vae.decode_latents``) maps each batch of samples to images before they are clamped.
    """
    if n < 1 or batch_size < 1:
        raise ValueError(f"n and batch_size must be >= 1, got n={n}, batch_size={batch_size}")
    num_classes = num_classes if num_classes is not None else num_classes_of(denoiser)
    device = torch.device(device) if device is not None else next(denoiser.parameters()).device
    counter = NFECounter(denoiser)
    model, fn = _guided(counter, guidance, num_classes, guidance_rescale), get_sampler(sampler)
    sigmas = sampling_sigmas(denoiser.alphas_cumprod, steps, spacing)
    labels = torch.arange(n) % num_classes if num_classes is not None else None
    images, t0 = [], time.time()
    with torch.no_grad(), tqdm(total=n, desc=f"{sampler} {steps} steps", disable=not progress) as bar:
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            x = torch.randn((b, *shape), generator=generator).to(device)
            extra = {"class_labels": labels[start:start + b].to(device)} if labels is not None else None
            x = fn(model, x, sigmas, extra_args=extra, generator=generator, **sampler_options)
            images.append((decode(x) if decode is not None else x).cpu())
            bar.update(b)
    n_batches = -(-n // batch_size)
    return Generated(torch.cat(images).clamp(-1, 1), labels, counter.calls // n_batches, time.time() - t0)


def real_features(dataset: str, split: str, n: int, *, classifier=None) -> torch.Tensor:
    """Classifier features of the first ``n`` real images of a split (cached per process)."""
    key = (dataset, split, n)
    if key not in _REAL_FEATURES:
        classifier = classifier if classifier is not None else load_classifier(dataset)
        images, _ = training_data(dataset, split, n=n, seed=0 if split == "train" else 1)
        if len(images) < n:
            raise ValueError(f"n must be <= {len(images)} (the size of the {dataset!r} {split} split), got {n}")
        _REAL_FEATURES[key] = extract_features(classifier, images)
    return _REAL_FEATURES[key]


def real_class_accuracy(dataset: str, n: int, classifier=None) -> float:
    """The judge's ceiling: the shipped classifier of ``dataset`` on the first ``n`` real test images (the set
    ``evaluate`` compares samples with) and their labels."""
    classifier = classifier if classifier is not None else load_classifier(dataset)
    images, labels = training_data(dataset, "test", n=n, seed=1)
    return metrics.class_accuracy(classifier, images, labels[:, 0])


def evaluate(denoiser, *, dataset: str = "fashion-mnist", sampler: str = "dpmpp_2m", steps: int = 20,
             guidance: float = 1.0, n: int = 1000, batch_size: int = 250, generator: torch.Generator | None = None,
             seed: int = 0, num_classes: int | None = None, kid_subsets: int = 50, progress: bool = True,
             **generate_options) -> dict:
    """Generate ``n`` samples and score them in the shipped classifier's feature space; returns a dict.

    Keys: fid, fid_floor (train vs test at the same n), kid, kid_std (std over subsets of min(n, 1000); 0 when
    n <= 1000, since every subset is then the whole set), class_accuracy (None if unconditional) and
    class_accuracy_real (the classifier on the same ``n`` test images with their labels: the judge's ceiling),
    precision, recall, saturation and saturation_real (``metrics.saturated_share`` of the samples and of the
    ``n`` test images), nfe, wall_time_s (generation), n, and the settings. ``generator`` defaults to one
    seeded with ``seed``.
    """
    generator = generator if generator is not None else torch.Generator().manual_seed(seed)
    classifier = load_classifier(dataset)
    shape = (classifier.config.in_channels, classifier.config.image_size, classifier.config.image_size)
    gen = generate(denoiser, n=n, shape=shape, sampler=sampler, steps=steps, guidance=guidance,
                   batch_size=batch_size, generator=generator, num_classes=num_classes, progress=progress,
                   **generate_options)
    fake = extract_features(classifier, gen.images)
    test, train = real_features(dataset, "test", n, classifier=classifier), real_features(dataset, "train", n)
    kid_mean, kid_std = metrics.kid(test, fake, num_subsets=kid_subsets, subset_size=min(1000, n),
                                    generator=generator)
    precision, recall = metrics.precision_recall(test, fake)
    accuracy = metrics.class_accuracy(classifier, gen.images, gen.labels) if gen.labels is not None else None
    real_images = training_data(dataset, "test", n=n, seed=1)[0]
    accuracy_real = real_class_accuracy(dataset, n, classifier) if accuracy is not None else None
    return {"dataset": dataset, "sampler": sampler, "steps": steps, "guidance": guidance, "n": n,
            "fid": metrics.frechet_distance_from_features(test, fake),
            "fid_floor": metrics.frechet_distance_from_features(train, test),
            "kid": kid_mean, "kid_std": kid_std, "class_accuracy": accuracy,
            "class_accuracy_real": accuracy_real,
            "precision": precision, "recall": recall, "saturation": metrics.saturated_share(gen.images),
            "saturation_real": metrics.saturated_share(real_images), "nfe": gen.nfe, "wall_time_s": gen.wall_time_s}


def _real_accuracy(result: dict) -> str:
    """`` (real: 91.6%)``: the classifier on the real test images, when ``result`` has it (older results do not)."""
    real = result.get("class_accuracy_real")
    return "" if real is None else f" (real: {100 * real:.1f}%)"


def format_table(result: dict) -> str:
    """A two-column text table of an ``evaluate`` result."""
    acc = result["class_accuracy"]
    rows = [("classifier-FID", f"{result['fid']:.3f}"),
            (f"real-vs-real floor (n={result['n']})", f"{result['fid_floor']:.3f}"),
            ("KID", f"{result['kid']:.5f}" + (f" +- {result['kid_std']:.5f}" if result["n"] > 1000 else "")),
            ("class accuracy", "n/a (unconditional)" if acc is None else
             f"{100 * acc:.1f}%" + _real_accuracy(result)),
            ("precision (k=3)", f"{result['precision']:.3f}"), ("recall (k=3)", f"{result['recall']:.3f}"),
            ("saturated pixels (>= 0.98)", f"{100 * result['saturation']:.2f}% (real: "
                                           f"{100 * result['saturation_real']:.2f}%)"),
            ("NFE per sample", str(result["nfe"])), ("wall time (s)", f"{result['wall_time_s']:.1f}")]
    width = max(len(name) for name, _ in rows)
    head = f"{result['dataset']}: {result['sampler']}, {result['steps']} steps, guidance {result['guidance']}"
    return "\n".join([head, "-" * len(head)] + [f"{name:<{width}}  {value}" for name, value in rows])


def _load_denoiser(name_or_path: str, device):
    """A checkpoint file written by ``minidiff.training.checkpoint.save_model``, or a shipped model's name."""
    if Path(name_or_path).suffix == ".safetensors" or Path(name_or_path).is_file():
        from minidiff.training.checkpoint import load_model
        if not Path(name_or_path).is_file():
            raise FileNotFoundError(f"--checkpoint {name_or_path!r}: no such file")
        return load_model(name_or_path, device=device, clip_x0=True)  # pixel models: as pretrained.load
    from minidiff.pretrained import load
    return load(name_or_path, device=device)


@command_line("python -m minidiff.evaluate")
def main(argv=None) -> dict:
    """Command line: generate, score, print the table (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m minidiff.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="pretrained model name or path to a .safetensors model")
    p.add_argument("--dataset", default="fashion-mnist", help="whose classifier and real data to compare with")
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--spacing", default="trailing", choices=SAMPLING_SPACINGS,
                   help="sampling levels: a timestep spacing, or karras (Karras et al. 2022, capped at sigma 80)")
    p.add_argument("--device", default=None, help="default: minidiff.utils.get_device() (CUDA, MPS, then CPU)")
    args = p.parse_args(argv)
    args.device = args.device or str(get_device())
    denoiser = _load_denoiser(args.checkpoint, args.device)
    result = evaluate(denoiser, dataset=args.dataset, sampler=args.sampler, steps=args.steps, guidance=args.guidance,
                      n=args.n, batch_size=args.batch_size, seed=args.seed, spacing=args.spacing,
                      device=args.device)
    print(format_table(result))
    return result


if __name__ == "__main__":
    main()
