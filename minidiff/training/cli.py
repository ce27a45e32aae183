"""Command line for training and exporting minidiff models.

    python -m minidiff.train --dataset fashion-mnist --preset tiny --steps 20000 --out runs/fmnist
    python -m minidiff.train --out runs/fmnist --resume --steps 30000      # continue a run
    python -m minidiff.train export runs/fmnist minidiff/weights/fashion-mnist-cond.safetensors

Training writes ``RUN/checkpoint.safetensors`` (full state, for --resume), ``RUN/samples/step_*.png``
(EMA model, fixed seed) and ``RUN/config.json``. Export writes the inference-only EMA weights and a
model card ``<PATH>.json``.
"""
from __future__ import annotations

import argparse
import json
import shlex
import time
from dataclasses import asdict, fields
from pathlib import Path

import torch

from minidiff.training.loop import TrainConfig
from minidiff.training.rundir import check_out_dir
from minidiff.utils import command_line

__all__ = ["main", "export_run", "export_main", "parse_args"]

_HELP = {
    "dataset": "mnist, fashion-mnist or cifar10", "preset": "UNet preset from minidiff.models.unet.PRESETS",
    "prediction": "what the net predicts: eps, x0 or v", "schedule": "beta schedule: linear, cosine, ...",
    "T": "number of training timesteps", "steps": "total optimizer steps (when resuming: the new total)",
    "batch_size": "images per step", "lr": "AdamW learning rate", "warmup": "linear LR warmup steps",
    "lr_schedule": "after warmup: constant, or cosine decay to 0 at --steps",
    "weight_decay": "AdamW weight decay", "ema_decay": "EMA decay of the weights used for samples/export",
    "p_uncond": "probability a label is replaced by the null class (CFG training)",
    "min_snr_gamma": "min-SNR-gamma loss weighting (Hang et al. 2023), e.g. 5", "max_grad_norm": "gradient clipping",
    "t_sampling": "density of the training timestep: uniform, or logit_normal (Esser et al. 2024)",
    "logit_normal_m": "location m of --t-sampling logit_normal",
    "logit_normal_s": "scale s of --t-sampling logit_normal",
    "sample_every": "save a sample grid every N steps", "ckpt_every": "save the checkpoint every N steps",
    "val_every": "validation loss (fixed images, t grid, noise) of the EMA weights every N steps",
    "val_size": "images in the validation set (the test split of the dataset)",
    "sampler": "sampler for the sample grids", "sample_steps": "sampler steps for the sample grids",
    "sample_guidance": "CFG scale for the sample grids of conditional models", "seed": "seed of weights, data and noise",
}


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, default None so that --resume knows what was given explicitly."""
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        if f.name in ("conditional", "unet"):
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = {"int": int, "float": float, "str": str}.get(type(getattr(defaults, f.name)).__name__, float)
        parser.add_argument(flag, type=kind, default=None,
                            help=f"{_HELP.get(f.name, '')} (default: {getattr(defaults, f.name)})")
    parser.add_argument("--conditional", dest="conditional", action="store_true", default=None,
                        help="class-conditional with a learned null class (default)")
    parser.add_argument("--unconditional", dest="conditional", action="store_false",
                        help="ignore the labels")
    parser.add_argument("--unet", type=json.loads, default=None, metavar="JSON",
                        help='UNetConfig overrides as JSON, e.g. \'{"base_channels": 16}\'')


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m minidiff.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="run folder for checkpoint, samples and config")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.safetensors")
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: minidiff.utils.get_device())")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--export", default=None, metavar="PATH", help="after training, export the EMA model to PATH")
    parser.add_argument("--export-dtype", choices=("float16", "float32"), default="float16")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    _add_config_args(parser)
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from explicit flags; with --resume the saved config fills in the flags not given."""
    from minidiff.training.checkpoint import checkpoint_config

    base = asdict(TrainConfig())
    ckpt = Path(args.out) / "checkpoint.safetensors"
    if args.resume and ckpt.exists():
        base.update(checkpoint_config(ckpt)["train"])
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name) is not None}
    return TrainConfig(**{**base, **given})


def model_card(run_dir, *, dtype: str) -> dict:
    """The model card of a run: config, data, steps, wall time, hardware and commands."""
    from minidiff.training.checkpoint import checkpoint_config

    saved = checkpoint_config(Path(run_dir) / "checkpoint.safetensors")
    sessions = saved.get("sessions", [])
    return {"config": saved["train"], "unet": saved["unet"],
            "data": {"dataset": saved["train"]["dataset"], "split": "train"},
            "steps": saved["step"], "images_seen": saved["step"] * saved["train"]["batch_size"],
            "weights": f"EMA (decay {saved['train']['ema_decay']}), {dtype}",
            "wall_time_s": round(sum(s.get("wall_s", 0.0) for s in sessions), 1),
            "hardware": [s["hardware"] for s in sessions], "commands": [s["command"] for s in sessions],
            "exported": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def export_run(run_dir, path, *, dtype: str = "float16", image_shape=None, class_names=None) -> Path:
    """Write the EMA weights of ``run_dir``'s checkpoint as an inference-only model file plus a model card;
    ``image_shape`` and ``class_names`` default to those of the run's dataset (give them for latent models)."""
    from minidiff.data.datasets import CLASS_NAMES
    from minidiff.denoiser import Denoiser
    from minidiff.models.unet import UNet, UNetConfig
    from minidiff.training.checkpoint import checkpoint_config, load_checkpoint, save_model
    from minidiff.training.loop import EMA, make_alphas_cumprod

    ckpt = Path(run_dir) / "checkpoint.safetensors"
    saved = checkpoint_config(ckpt)
    config = TrainConfig(**saved["train"])
    net = UNet(UNetConfig(**saved["unet"]))
    ema = EMA(net, config.ema_decay)
    load_checkpoint(ckpt, ema=ema, restore_rng=False)
    ema.copy_to(net)
    card = {**model_card(run_dir, dtype=dtype),
            "class_names": list(class_names if class_names is not None else CLASS_NAMES[config.dataset])}
    c = net.config.in_channels
    if image_shape is None:  # the datasets load_dataset serves
        image_shape = (c, 32, 32) if config.dataset == "cifar10" else (c, 28, 28)
    denoiser = Denoiser(net, make_alphas_cumprod(config), config.prediction, image_shape=image_shape)
    return save_model(path, denoiser, schedule=config.schedule, dtype=getattr(torch, dtype), card=card)


def export_main(argv, *, prog: str = "python -m minidiff.train", export=None) -> None:
    """``PROG export RUN_DIR PATH [--dtype]``: ``export(run_dir, path, dtype=)`` (default ``export_run``), then one
    line on what was written; ``python -m minidiff.distill export`` uses it with the student's exporter."""
    parser = argparse.ArgumentParser(prog=f"{prog} export")
    parser.add_argument("run_dir")
    parser.add_argument("path")
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    args = parser.parse_args(argv)
    path = (export or export_run)(args.run_dir, args.path, dtype=args.dtype)
    print(f"exported {path} ({path.stat().st_size / 1e6:.2f} MB) and model card {path.with_suffix('.json')}")


@command_line("python -m minidiff.train")
def main(argv=None) -> None:
    """``python -m minidiff.train [export]``; user errors: one line, status 2 (see ``utils.command_line``)."""
    return export_main(argv[1:]) if argv and argv[0] == "export" else _train_main(argv)


def _train_main(argv) -> None:
    from minidiff.training.loop import train

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = config_from_args(args)
    out = Path(args.out)
    check_out_dir(out)  # before anything is printed, loaded or built
    from minidiff.training import distributed

    say = print if distributed.is_main() else (lambda *a, **k: None)  # under torchrun only rank 0 speaks and exports
    if args.resume:
        ckpt = out / "checkpoint.safetensors"
        say(f"resuming {ckpt}" if ckpt.exists() else f"--resume: no checkpoint at {ckpt}, starting from step 0")
    say(f"training {config.preset} on {config.dataset} for {config.steps} steps -> {out}/")
    say(f"  checkpoint: {out / 'checkpoint.safetensors'} (every {config.ckpt_every} steps)")
    say(f"  samples:    {out / 'samples'}/step_*.png (every {config.sample_every} steps)")
    command = "python -m minidiff.train " + shlex.join(argv)
    result = train(config, out, resume=args.resume, device=args.device, progress=not args.no_progress,
                   command=command)
    losses = result["history"]["loss"]
    say(f"done: step {result['step']}, mean loss of the last 100 steps {sum(losses[-100:]) / max(1, len(losses[-100:])):.4f}")
    if args.export and distributed.is_main():
        path = export_run(out, args.export, dtype=args.export_dtype)
        say(f"exported {path} and model card {path.with_suffix('.json')}")


if __name__ == "__main__":
    main()
