"""Few-step students: progressive distillation and consistency distillation of a teacher denoiser, resumable.

The targets, losses and consistency sampling live in ``training/distill_losses.py`` (its docstring has the symbol
table) and are re-exported here; this module is the run: config, student, rounds, checkpoints.

Checkpoints are the trainer's safetensors format (``training.checkpoint.save_checkpoint``, atomic): student
weights, optimizer, step, the generator and, from round 1 on, the teacher (the previous round's student).
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from minidiff.denoiser import Denoiser
from minidiff.files import CheckpointError
from minidiff.schedules import sampling_sigmas
from minidiff.training.checkpoint import checkpoint_config, load_checkpoint, save_checkpoint
from minidiff.training.distill_losses import (_base, _is_power_of_2, consistency_fn, consistency_loss,
                                              consistency_sample, ddim_step, ddim_update, progressive_loss,
                                              progressive_sigmas, progressive_target, truncated_snr_weight)
from minidiff.training.steps import _check_finite_step, make_optimizer

__all__ = ["METHODS", "DistillConfig", "ddim_update", "ddim_step", "progressive_sigmas", "progressive_target",
           "truncated_snr_weight", "progressive_loss", "consistency_fn", "consistency_loss", "consistency_sample",
           "make_student", "start_run", "distill_round", "next_round", "save_state", "load_state", "distill"]

METHODS = ("progressive", "consistency")


# ----------------------------------------------------------------------------- config and the loop
@dataclass
class DistillConfig:
    """A distillation run; saved as JSON in its checkpoints. ``n_steps``: progressive, the first student's N (its
    teacher takes 2N); consistency, the grid sampling_sigmas(N): N levels above 0, then 0 (Song's epsilon).
    ``rounds``: progressive rounds N, N/2, ... (consistency: 1)."""

    method: str = "progressive"
    n_steps: int = 8
    rounds: int = 1
    steps: int = 1000  # optimizer steps per round
    batch_size: int = 64
    lr: float = 1e-4
    max_grad_norm: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, got {self.method!r}")
        for name in ("n_steps", "rounds", "steps", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if self.method == "progressive" and not _is_power_of_2(self.n_steps):
            raise ValueError(f"n_steps must be a power of 2 for progressive distillation (each round halves it), "
                             f"got {self.n_steps}")
        if self.method == "progressive" and 2 ** (self.rounds - 1) > self.n_steps:
            raise ValueError(f"rounds must be <= {self.n_steps.bit_length()} for n_steps={self.n_steps} (each "
                             f"round halves N, down to 1), got {self.rounds}")
        if self.method == "consistency" and self.rounds != 1:
            raise ValueError(f"rounds must be 1 for consistency distillation, got {self.rounds}")
        if not (self.lr > 0 and self.max_grad_norm > 0):
            raise ValueError(f"lr and max_grad_norm must be > 0, got lr={self.lr}, max_grad_norm={self.max_grad_norm}")


def make_student(teacher) -> Denoiser:
    """A trainable copy of the teacher's net in a Denoiser of the same parameterization (Salimans & Ho 2022, Alg. 2:
    theta <- eta); parts frozen in the teacher (a frozen text encoder) stay frozen. clip_x0 is off: x0_tilde is not
    an image and may leave [-1, 1]."""
    base = _base(teacher)
    student = Denoiser(copy.deepcopy(base.net), base.alphas_cumprod, base.prediction, image_shape=base.image_shape)
    if not any(p.requires_grad for p in student.parameters()):
        raise ValueError("teacher: its net has no trainable parameter (requires_grad is False everywhere), so the "
                         "student, its copy, could not learn; pass it unfrozen (it only runs under torch.no_grad)")
    return student.train()


def start_run(teacher, config: DistillConfig) -> dict:
    """Round 0, step 0: the student, its AdamW (constant lr) and the one generator every draw comes from."""
    student = make_student(teacher)
    return {"config": config, "teacher": teacher, "student": student, "round": 0, "step": 0,
            "optimizer": make_optimizer(student.net, lr=config.lr)[0],
            "generator": torch.Generator().manual_seed(config.seed)}


def _sigmas(run: dict) -> tuple[int, torch.Tensor]:
    """This round's N and the grid its loss draws levels from."""
    config, ab = run["config"], run["student"].alphas_cumprod
    if config.method == "consistency":
        return config.n_steps, sampling_sigmas(ab, config.n_steps, "trailing")
    n = config.n_steps // 2 ** run["round"]
    return n, progressive_sigmas(ab, n)[0]


def _batch(data: torch.Tensor, cond: dict, batch_size: int, generator, device):
    """A batch drawn with replacement: x0 and the matching cond tensors."""
    idx = torch.randint(len(data), (batch_size,), generator=generator)
    return data[idx].to(device), {k: v[idx].to(device) for k, v in cond.items()}


def distill_round(run: dict, data: torch.Tensor, *, cond: dict | None = None, callback=None) -> None:
    """One round, from ``run["step"]`` to ``config.steps``: Alg. 2's inner loop (Salimans & Ho 2022) or Alg. 2 of
    Song et al. 2023. ``callback({"round", "step", "n_steps", "loss"})`` after every step."""
    config, student, g = run["config"], run["student"], run["generator"]
    loss_fn = progressive_loss if config.method == "progressive" else consistency_loss
    n, sigmas = _sigmas(run)
    device = next(student.net.parameters()).device
    while run["step"] < config.steps:
        x0, c = _batch(data, cond or {}, config.batch_size, g, device)
        loss = loss_fn(run["teacher"], student, x0, sigmas, generator=g, **c)
        _check_finite_step(loss.detach(), "distillation loss", run["step"], run["optimizer"])
        run["optimizer"].zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.net.parameters(), config.max_grad_norm)
        run["optimizer"].step()
        run["step"] += 1
        if callback is not None:
            callback({"round": run["round"], "step": run["step"], "n_steps": n, "loss": loss.item()})


def next_round(run: dict) -> None:
    """eta <- theta, N <- N / 2 (Salimans & Ho 2022, Alg. 2): a frozen copy of the student becomes the teacher;
    the student keeps its weights and gets a fresh optimizer."""
    run["teacher"] = copy.deepcopy(run["student"]).eval().requires_grad_(False)
    run["optimizer"] = make_optimizer(run["student"].net, lr=run["config"].lr)[0]
    run["round"], run["step"] = run["round"] + 1, 0


def save_state(path, run: dict) -> Path:
    """Atomically write the run (student, optimizer, round, step, generator; from round 1 the teacher too) in the
    trainer's checkpoint format (``save_checkpoint``)."""
    teacher = {f"teacher.{k}": v for k, v in run["teacher"].net.state_dict().items()} if run["round"] else {}
    return save_checkpoint(path, model=run["student"].net, step=run["step"], optimizer=run["optimizer"],
                           generators={"distill": run["generator"]}, extra_tensors=teacher,
                           config={"distill": asdict(run["config"]), "round": run["round"]})


def load_state(path, run: dict) -> None:
    """Restore what ``save_state`` wrote into a fresh ``start_run`` of the same config (and the same first teacher);
    ``steps`` (per round) may differ, as long as the saved round has not passed it: the run then equals one started
    with the new value. Like ``train()``, this also restores torch's global RNG (only a net's dropout draws from it)."""
    saved = checkpoint_config(path).get("distill")  # checked before anything is loaded
    if saved is None:
        raise CheckpointError(f"{path} is a training checkpoint, not a distillation one (no 'distill' config)")
    given = asdict(run["config"])
    if {**saved, "steps": 0} != {**given, "steps": 0}:  # steps may change, as the trainer's --steps on resume
        raise ValueError(f"cannot resume {path}: config differs from the checkpoint's (only steps may change): "
                         f"saved {saved}, given {given}")
    if checkpoint_config(path)["step"] > given["steps"]:
        raise ValueError(f"cannot resume {path} with steps={given['steps']}: its round is already at step "
                         f"{checkpoint_config(path)['step']}")
    state = load_checkpoint(path, model=run["student"].net, optimizer=run["optimizer"],
                            generators={"distill": run["generator"]})
    run["round"], run["step"] = state["config"]["round"], state["step"]
    if run["round"]:
        teacher = {k[len("teacher."):]: v for k, v in state["extra_tensors"].items() if k.startswith("teacher.")}
        run["teacher"] = copy.deepcopy(run["student"]).eval().requires_grad_(False)
        run["teacher"].net.load_state_dict(teacher)


def _check_data(data, cond: dict | None) -> None:
    if not isinstance(data, torch.Tensor) or not data.is_floating_point() or data.ndim < 2 or len(data) == 0:
        raise ValueError(f"data must be a float tensor (M, ...) of training examples, got "
                         f"{getattr(data, 'shape', type(data).__name__)}")
    for k, v in (cond or {}).items():
        if not isinstance(v, torch.Tensor) or len(v) != len(data):
            raise ValueError(f"cond[{k!r}] must be a tensor with one entry per example ({len(data)}), got "
                             f"{getattr(v, 'shape', type(v).__name__)}")


def distill(teacher, data: torch.Tensor, config: DistillConfig, *, cond: dict | None = None, path=None,
            resume: bool = False, save_every: int = 100, callback=None) -> Denoiser:
    """Run ``config`` from the start (or from ``path`` with ``resume``): progressive rounds N, N/2, ... (Salimans &
    Ho 2022, Alg. 2) or consistency distillation (Song et al. 2023, Alg. 2); the state is saved to ``path`` every
    ``save_every`` steps and at the end. ``cond``: per-example tensors (e.g. class_labels) for teacher and student.
    Pass the teacher in eval mode (as ``pretrained.load`` returns it): it is never switched or trained here."""
    _check_data(data, cond)
    if resume and path is None:
        raise ValueError("resume=True needs path, the checkpoint file to resume from")
    if isinstance(save_every, bool) or not isinstance(save_every, int) or save_every < 1:
        raise ValueError(f"save_every must be an int >= 1, got {save_every!r}")
    run = start_run(teacher, config)
    if resume and path is not None and Path(path).exists():
        load_state(path, run)

    def on_step(info):
        if path is not None and info["step"] % save_every == 0:
            save_state(path, run)
        if callback is not None:
            callback(info)

    while True:
        distill_round(run, data, cond=cond, callback=on_step)
        if run["round"] == config.rounds - 1:
            break
        next_round(run)
    if path is not None:
        save_state(path, run)
    return run["student"]
