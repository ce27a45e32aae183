"""Command line for distilling a shipped or exported model into a few-step student (``training.distill``).

    python -m minidiff.distill --teacher fashion-mnist-cond-fm --method progressive --n-steps 8 --rounds 2 \\
        --steps 1800 --out runs/fmnist-4step                  # rounds 8 -> 4 student steps (teacher 16, then 8)
    python -m minidiff.distill --out runs/fmnist-4step --resume   # continue after an interruption
    python -m minidiff.distill --out runs/fmnist-4step --resume --steps 1200   # ... with shorter rounds
    python -m minidiff.distill export runs/fmnist-4step minidiff/weights/fashion-mnist-cond-4step.safetensors

The run folder holds ``checkpoint.safetensors`` (student, optimizer, round, step, generator; from round 1 the
teacher), ``run.json`` (teacher, dataset, config, one entry per session: command, hardware, wall time) and
``log.jsonl`` (the loss every 10 steps). Export writes the student as an inference model (float16) and its card.
"""
from __future__ import annotations

import argparse
import json
import shlex
import time
from dataclasses import asdict, fields
from pathlib import Path

import torch

from minidiff.files import atomic_write_bytes, hardware_info
from minidiff.training.distill import DistillConfig, distill
from minidiff.training.cli import export_main
from minidiff.training.rundir import acquire_lock, check_out_dir
from minidiff.utils import command_line

__all__ = ["main", "load_teacher", "export_student"]


def load_teacher(spec: str, guidance: float = 1.0, *, device=None):
    """A shipped model by name or an exported ``.safetensors`` by path, x0_hat clipped to [-1, 1] as the pixel
    models sample; with ``guidance`` != 1 wrapped in classifier-free guidance (the student distills that scale)."""
    from minidiff import pretrained
    from minidiff.training.checkpoint import load_model

    if spec.endswith(".safetensors") or Path(spec).exists():
        teacher = load_model(spec, device=device, clip_x0=True)
    else:
        teacher = pretrained.load(spec, device=device)
    if guidance != 1.0:
        from minidiff.guidance import CFGDenoiser

        if teacher.net.config.num_classes is None:
            raise ValueError(f"--guidance {guidance} needs a class-conditional teacher; {spec!r} is unconditional")
        null = torch.tensor(teacher.net.config.num_classes)  # the learned null class id K
        teacher = CFGDenoiser(teacher, guidance, uncond={"class_labels": null})
    return teacher


_HELP = {"method": "progressive or consistency",
         "n_steps": "progressive: the first student's steps (its teacher takes 2N; a power of 2); consistency: grid levels",
         "rounds": "progressive rounds, each halving the steps (consistency: 1)",
         "steps": "optimizer steps per round (may change on --resume)", "batch_size": "images per step",
         "lr": "AdamW learning rate (constant)", "max_grad_norm": "gradient clipping", "seed": "seed of every draw"}


def _run_json(out: Path) -> dict:
    path = out / "run.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_run_json(out: Path, info: dict) -> None:
    atomic_write_bytes(out / "run.json", (json.dumps(info, indent=2) + "\n").encode())


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m minidiff.distill", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="run folder for checkpoint, run.json and log.jsonl")
    p.add_argument("--teacher", default=None, help="shipped model name or exported .safetensors (default with "
                   "--resume: the run's)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale of the teacher (default 1: none)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.safetensors")
    p.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (default 100)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: minidiff.utils.get_device())")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    defaults = DistillConfig()
    for f in fields(DistillConfig):
        kind = type(getattr(defaults, f.name))
        p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=None,
                       help=f"{_HELP[f.name]} (default: {getattr(defaults, f.name)})")
    return p.parse_args(argv)


def _distill_main(argv) -> None:
    from minidiff.data.datasets import load_dataset
    from minidiff.utils import get_device

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    check_out_dir(out)
    saved = _run_json(out) if args.resume else {}
    given = {f.name: getattr(args, f.name) for f in fields(DistillConfig) if getattr(args, f.name) is not None}
    config = DistillConfig(**{**saved.get("config", {}), **given})
    teacher_spec = args.teacher or saved.get("teacher")
    guidance = args.guidance if args.guidance is not None else saved.get("guidance", 1.0)
    if teacher_spec is None:
        raise ValueError("--teacher is required (a shipped model name or an exported .safetensors)")
    same_but_steps = lambda c: {**c, "steps": 0} if isinstance(c, dict) else c  # --steps may change on resume
    for key, now in (("teacher", teacher_spec), ("guidance", guidance), ("config", asdict(config))):
        if saved and same_but_steps(saved.get(key)) != same_but_steps(now):
            raise ValueError(f"--resume: {key} differs from the run's ({saved.get(key)!r}), got {now!r}")
    if not args.resume and (out / "checkpoint.safetensors").exists():
        raise ValueError(f"{out}/checkpoint.safetensors exists: pass --resume to continue it, or another --out")
    device = torch.device(args.device) if args.device else get_device()
    teacher = load_teacher(teacher_spec, guidance, device=device)
    base = getattr(teacher, "denoiser", teacher)
    dataset = load_dataset(saved.get("dataset") or _card_of(teacher_spec)["data"]["dataset"])
    cond = {"class_labels": dataset.labels} if base.net.config.num_classes is not None else None
    lock = acquire_lock(out)
    try:
        _distill_locked(args, argv, out, saved, config, teacher_spec, guidance, teacher, dataset, cond)
    finally:
        lock.unlink(missing_ok=True)


def _distill_locked(args, argv, out, saved, config, teacher_spec, guidance, teacher, dataset, cond) -> None:
    """The run itself, with ``out`` locked: run.json, the progress bar, log.jsonl and ``distill``."""
    from tqdm.auto import tqdm

    command = "python -m minidiff.distill " + shlex.join(argv)
    info = {"teacher": teacher_spec, "guidance": guidance, "dataset": dataset.name, "config": asdict(config),
            "sessions": saved.get("sessions", [])}
    info["sessions"].append({"command": command, "hardware": hardware_info(next(teacher.parameters()).device),
                              "wall_s": 0.0})
    _write_run_json(out, info)
    total = config.steps * config.rounds
    bar = tqdm(total=total, disable=args.no_progress, desc=f"{config.method} distillation")
    t0, log = time.perf_counter(), open(out / "log.jsonl", "a")

    def on_step(s):
        done = s["round"] * config.steps + s["step"]
        bar.n = done
        bar.set_postfix(round=s["round"], N=s["n_steps"], loss=f"{s['loss']:.4f}", refresh=False)
        bar.refresh()
        if s["step"] % 10 == 0:
            log.write(json.dumps({**s, "time": round(time.perf_counter() - t0, 1)}) + "\n")
            log.flush()
        if s["step"] % args.save_every == 0 or done == total:
            info["sessions"][-1]["wall_s"] = round(time.perf_counter() - t0, 1)
            info["sessions"][-1]["end"] = {"round": s["round"], "step": s["step"]}
            _write_run_json(out, info)

    print(f"distilling {teacher_spec} ({config.method}, N = {config.n_steps}, {config.rounds} round(s) of "
          f"{config.steps} steps) -> {out}/checkpoint.safetensors")
    distill(teacher, dataset.images, config, cond=cond, path=out / "checkpoint.safetensors", resume=args.resume,
            save_every=args.save_every, callback=on_step)
    bar.close()
    log.close()
    print(f"done in {time.perf_counter() - t0:.0f} s; export with: python -m minidiff.distill export {out} PATH")


def _card_of(spec: str) -> dict:
    """The teacher's model card: ``<path>.json`` beside an exported file, or the shipped model's."""
    from minidiff import pretrained

    card_path = Path(spec).with_suffix(".json")
    return json.loads(card_path.read_text()) if card_path.is_file() else pretrained.model_card(spec)


def export_student(run_dir, path, *, dtype: str = "float16") -> Path:
    """The student of ``run_dir`` as an inference model file plus a card: teacher, method, final N (the steps it
    samples in, trailing spacing, DDIM), distillation steps, wall time and the commands."""
    from minidiff.training.checkpoint import checkpoint_config, load_checkpoint, save_model
    from minidiff.training.distill import make_student

    run_dir = Path(run_dir)
    info, ckpt = _run_json(run_dir), run_dir / "checkpoint.safetensors"
    if not info or not ckpt.is_file():
        raise FileNotFoundError(f"{run_dir} is not a distillation run (needs run.json and checkpoint.safetensors)")
    teacher = load_teacher(info["teacher"], info["guidance"])
    student = make_student(teacher)
    load_checkpoint(ckpt, model=student.net, restore_rng=False)
    state = checkpoint_config(ckpt)
    config = DistillConfig(**info["config"])
    n = config.n_steps // 2 ** state["round"] if config.method == "progressive" else config.n_steps
    card = {**_teacher_card(info["teacher"]), "teacher": info["teacher"], "teacher_guidance": info["guidance"],
            "distill": asdict(config), "steps_per_sample": n, "sampler": "ddim", "spacing": "trailing",
            "distill_steps": config.steps * state["round"] + state["step"],
            "wall_time_s": round(sum(s["wall_s"] for s in info["sessions"]), 1),
            "hardware": [s["hardware"] for s in info["sessions"]],
            "commands": [s["command"] for s in info["sessions"]],
            "weights": f"student (no EMA), {dtype}", "exported": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    return save_model(path, student, schedule=card.get("config", {}).get("schedule"), dtype=getattr(torch, dtype),
                      card=card)


def _teacher_card(spec: str) -> dict:
    """What the student inherits from its teacher's card: the net, data and class names (not the teacher's metrics)."""
    card = _card_of(spec)
    keep = ("config", "unet", "data", "class_names")
    return {k: card[k] for k in keep if k in card}


@command_line("python -m minidiff.distill")
def main(argv=None) -> None:
    """``python -m minidiff.distill [export]``; user errors: one line, status 2 (see ``utils.command_line``)."""
    if argv and argv[0] == "export":
        return export_main(argv[1:], prog="python -m minidiff.distill", export=export_student)
    return _distill_main(argv)
