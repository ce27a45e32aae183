"""Training the shipped evaluators: recipes, the training loop, calibration, model cards and the command line.

``python -m minidiff.eval.classifier_training train --dataset fashion-mnist|shapes|mnist|cifar10`` (or ``calibrate``) runs
``main`` below. The classifiers themselves, loading and feature extraction are in ``minidiff.eval.classifiers``.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from minidiff.eval.classifiers import (
    CONFIGS,
    FORMAT,
    Classifier,
    _read_classifier_file,
    _weights_path,
    build_classifier,
    classifier_loss,
    extract_features,
    file_sha256,
    head_accuracy,
    load_classifier,
    save_classifier,
    training_data,
)
from minidiff.files import hardware_info
from minidiff.utils import command_line

__all__ = ["train_classifier", "RECIPES", "calibrate_feature_scale", "write_model_card", "main"]


def train_classifier(model: Classifier, images, targets, *, steps: int, batch_size: int = 128, lr: float = 3e-3,
                     generator: torch.Generator | None = None, log_every: int = 100, augment_flip: bool = False):
    """Adam with a one-cycle learning rate; minibatches drawn with ``generator``. Returns the loss history."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    losses = []
    model.train()
    for step in range(steps):
        idx = torch.randint(len(images), (batch_size,), generator=generator)
        x = images[idx]
        if augment_flip:
            flip = torch.rand(batch_size, generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        loss = classifier_loss(model, x, targets[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:5d}/{steps}  loss {loss.item():.4f}", flush=True)
    return losses


def write_model_card(model: Classifier, path: Path, **facts) -> Path:
    """JSON card beside the weights: data, architecture, size, training facts and measured test accuracy."""
    card = {"dataset": model.config.dataset, "file": path.name, "format": FORMAT,
            "stored_dtype": str(next(iter(_read_classifier_file(path)[0].values())).dtype),
            "arch": asdict(model.config), "params": sum(p.numel() for p in model.parameters()),
            "file_bytes": path.stat().st_size, "sha256": file_sha256(path), **facts}
    card_path = path.with_suffix(".json")
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    return card_path


SHAPES_TARGETS_NOTE = ("attrs_to_targets: pairs described with 'below'/'right of' are swapped to 'above'/'left of', so "
                       "object 1 is the upper (or left) one; relation classes (above, left of, absent); object-2 "
                       "heads have a last class 'absent'. About a quarter of two-object pictures are separated on "
                       "both axes, so their caption's choice of relation cannot be read from the image: this "
                       "bounds the relation head's accuracy.")

# Training recipes: steps, and for 'shapes' how many procedural samples (seed 0 train, seed 1 test).
RECIPES = {"fashion-mnist": dict(steps=2000, flip=True), "mnist": dict(steps=1500, flip=False),
           "cifar10": dict(steps=6000, flip=True), "shapes": dict(steps=2000, flip=False, n_train=20000, n_test=5000)}


@torch.no_grad()
def calibrate_feature_scale(model: Classifier, images: torch.Tensor) -> float:
    """Set ``config.feature_scale`` to the RMS of the unscaled features of ``images`` (training data)."""
    model.config.feature_scale = 1.0
    model.config.feature_scale = float(extract_features(model, images).pow(2).mean().sqrt())
    return model.config.feature_scale


def _finish(model: Classifier, path: Path, dataset: str, facts: dict, *, half: bool = True) -> None:
    """Calibrate, save, re-measure test accuracy on the weights as saved, write the card."""
    recipe = RECIPES[dataset]
    x_train, _ = training_data(dataset, "train", n=min(5000, recipe.get("n_train", 5000)), seed=0)
    x_test, y_test = training_data(dataset, "test", n=recipe.get("n_test"), seed=1)
    calibrate_feature_scale(model, x_train)
    path = save_classifier(model, path, half=half)
    acc = head_accuracy(load_classifier(path, check_card=False), x_test, y_test)  # the card is rewritten below
    print("test accuracy:", json.dumps(acc), flush=True)
    facts = {**facts, "n_test": len(x_test), "test_accuracy": acc, "torch": torch.__version__}
    if dataset == "shapes":
        facts["data"] = "minidiff.data.shapes.make_shapes(n_train, size=32, seed=0); test: make_shapes(n_test, seed=1)"
        facts["targets"] = SHAPES_TARGETS_NOTE
    print("wrote", path, "and", write_model_card(model, path, **facts), flush=True)


def _train_command(args) -> None:
    recipe = RECIPES[args.dataset]
    steps = args.steps or recipe["steps"]
    torch.manual_seed(args.seed)
    model = build_classifier(args.dataset)
    x_train, y_train = training_data(args.dataset, "train", n=recipe.get("n_train"), seed=0)
    print(f"{args.dataset}: {len(x_train)} train images, {steps} steps", flush=True)
    t0 = time.time()
    train_classifier(model, x_train, y_train, steps=steps, batch_size=args.batch_size, lr=args.lr,
                     generator=torch.Generator().manual_seed(args.seed), augment_flip=recipe["flip"])
    facts = dict(steps=steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, n_train=len(x_train),
                 wall_time_s=round(time.time() - t0, 1), hardware=hardware_info(),
                 command=f"python -m minidiff.eval.classifier_training train --dataset {args.dataset}"
                         + (f" --steps {args.steps}" if args.steps else ""))
    _finish(model, Path(args.out or _weights_path(args.dataset)), args.dataset, facts)


def _calibrate_command(args) -> None:
    """Recompute feature_scale of an existing file, keeping its training facts; accuracy is re-measured."""
    path = Path(args.out or _weights_path(args.dataset))
    card = json.loads(path.with_suffix(".json").read_text())
    half = _read_classifier_file(path)[0]["fc.weight"].dtype == torch.float16
    keep = {k: v for k, v in card.items() if k not in {"dataset", "file", "format", "stored_dtype", "arch", "params",
                                                       "file_bytes", "sha256", "n_test", "test_accuracy", "torch"}}
    keep["calibrated_with"] = f"python -m minidiff.eval.classifier_training calibrate --dataset {args.dataset}"
    _finish(load_classifier(path), path, args.dataset, keep, half=half)


@command_line("python -m minidiff.eval.classifier_training")
def main(argv=None) -> None:
    """Command line: ``python -m minidiff.eval.classifier_training train|calibrate --dataset fashion-mnist|shapes|mnist|cifar10``."""
    parser = argparse.ArgumentParser(prog="python -m minidiff.eval.classifier_training",
                                     description="Train or calibrate a shipped evaluator classifier.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train an evaluator and write its weights and model card")
    c = sub.add_parser("calibrate", help="recompute the feature scale of a trained evaluator and its card")
    for q in (p, c):
        q.add_argument("--dataset", required=True, choices=tuple(CONFIGS))
        q.add_argument("--out", default=None, help="default: minidiff/weights/classifier-<dataset>.safetensors")
    p.add_argument("--steps", type=int, default=None, help="default: the dataset's recipe in RECIPES")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    (_train_command if args.command == "train" else _calibrate_command)(args)


if __name__ == "__main__":
    main()
