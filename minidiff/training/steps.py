"""Training pieces a diffusion loop is written from, and a short ``train()`` loop built from them.

The loop a student reads (``train()`` below is this, plus logging, samples and checkpoints)::

    optimizer, scheduler = make_optimizer(net, lr=2e-3, warmup_steps=200)
    ema = EMA(net, decay=0.999)
    for step in range(steps):
        idx = torch.randint(len(images), (batch_size,), generator=data_gen)
        out = train_step(net, images[idx], alphas_cumprod=alphas_cumprod, prediction="eps",
                         optimizer=optimizer, scheduler=scheduler, class_labels=labels[idx],
                         p_uncond=0.1, null_id=10, generator=noise_gen, step=step)
        ema.update(net)

| name            | meaning                                                                  |
|-----------------|--------------------------------------------------------------------------|
| ``p_uncond``    | probability a label is replaced by the null class (Ho & Salimans 2022)  |
| ``null_id``     | id of the learned null class (``num_classes`` of the UNet)               |
| ``decay``       | EMA decay beta: ``shadow <- beta * shadow + (1 - beta) * theta``        |
"""
from __future__ import annotations

import math

import torch
from torch import nn

from minidiff.guidance import condition_dropout
from minidiff.losses import diffusion_loss

__all__ = ["EMA", "lr_factor", "make_optimizer", "train_step", "parameter_groups", "validation_loss"]


class EMA:
    """Exponential moving average of a model's parameters and float buffers (Polyak averaging).

    With ``warmup=True`` the decay at update ``n`` is ``min(decay, (1 + n) / (10 + n))``, so early
    averages are not dominated by the random initialisation (as in TensorFlow's ExponentialMovingAverage).
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, *, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay, self.warmup, self.step = float(decay), bool(warmup), 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def current_decay(self) -> float:
        """The decay the next ``update`` will use."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.step) / (10 + self.step))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """shadow <- d * shadow + (1 - d) * theta for float entries; other buffers are copied."""
        d = self.current_decay()
        for name, value in model.state_dict().items():
            s = self.shadow[name]
            if s.dtype.is_floating_point:
                s.mul_(d).add_(value.detach(), alpha=1 - d)
            else:
                s.copy_(value)
        self.step += 1

    def copy_to(self, model: nn.Module) -> nn.Module:
        """Load the averaged weights into ``model`` (e.g. a deep copy used for sampling); returns it."""
        model.load_state_dict(self.shadow)
        return model

    def state_dict(self) -> dict:
        return {"decay": self.decay, "warmup": self.warmup, "step": self.step, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise ValueError(f"EMA state does not match the model: differing keys {sorted(missing)[:5]}")
        self.decay, self.warmup, self.step = float(state["decay"]), bool(state["warmup"]), int(state["step"])
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)


_NO_DECAY_MODULES = (nn.Embedding, nn.GroupNorm, nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on weight matrices and conv kernels (>= 2 dims) only; never on biases, norm gains or
    embedding tables (nanoGPT's ``configure_optimizers``; Loshchilov & Hutter 2019 decay weights, not offsets)."""
    no_decay = {id(p) for m in model.modules() if isinstance(m, _NO_DECAY_MODULES) for p in m.parameters(recurse=False)}
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2 and id(p) not in no_decay]
    rest = [p for p in params if p.ndim < 2 or id(p) in no_decay]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


LR_SCHEDULES = ("constant", "cosine")


def lr_factor(warmup_steps: int, lr_schedule: str = "constant", total_steps: int | None = None):
    """step -> learning-rate multiplier: linear warmup over ``warmup_steps``, then 1 (``"constant"``) or a half
    cosine down to 0 at ``total_steps`` (``"cosine"``; Loshchilov & Hutter 2017, "SGDR", Eq. 5 without restarts)."""
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
    if lr_schedule == "cosine" and (total_steps is None or total_steps < 1):
        raise ValueError(f"lr_schedule='cosine' needs total_steps >= 1, got {total_steps}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if lr_schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def make_optimizer(model: nn.Module, *, lr: float, weight_decay: float = 0.0, warmup_steps: int = 0,
                   betas=(0.9, 0.999), lr_schedule: str = "constant", total_steps: int | None = None,
                   lr_scale: dict[str, float] | None = None):
    """AdamW (Loshchilov & Hutter 2019) over ``parameter_groups`` and a LambdaLR of ``lr_factor``: linear
    warmup, then the rate held (``lr_schedule="constant"``) or decayed to 0 at ``total_steps`` (``"cosine"``).
    ``lr_scale`` {submodule name: multiplier} gives a part of the model its own rate, lr * multiplier, on the
    same schedule (e.g. {"text_encoder": 0.1}: a pretrained encoder fine-tuned gently beside a new U-Net)."""
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    factor = lr_factor(warmup_steps, lr_schedule, total_steps)
    groups = parameter_groups(model, weight_decay)
    for name, scale in (lr_scale or {}).items():
        if not scale > 0:
            raise ValueError(f"lr_scale[{name!r}] must be > 0, got {scale}")
        try:
            inside = {id(p) for p in model.get_submodule(name).parameters()}
        except AttributeError:
            raise ValueError(f"lr_scale names {name!r}, which is not a submodule of the model") from None
        groups = [part for g in groups for part in (
            {**g, "params": [p for p in g["params"] if id(p) not in inside]},
            {**g, "params": [p for p in g["params"] if id(p) in inside], "lr": lr * scale})]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(betas))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _check_finite_step(value: torch.Tensor, what: str, step, optimizer) -> None:
    if not torch.isfinite(value):
        at = f" at step {step}" if step is not None else ""
        lr = optimizer.param_groups[0]["lr"]
        raise FloatingPointError(
            f"{what} became {value.item()}{at}: lower the learning rate (lr={lr:g}), keep gradient clipping on "
            "(max_grad_norm), or check the data for NaN/inf; resume from the last good checkpoint")


def train_step(net: nn.Module, x0: torch.Tensor, *, alphas_cumprod: torch.Tensor, prediction: str, optimizer,
               scheduler=None, class_labels=None, p_uncond: float = 0.0, null_id: int | None = None,
               min_snr_gamma: float | None = None, max_grad_norm: float | None = 1.0, generator=None,
               autocast_dtype=None, step: int | None = None, t=None, noise=None) -> dict:
    """One optimisation step on the denoising loss (Ho et al. 2020, Alg. 1) -> {"loss", "grad_norm"}; t and eps
    are drawn from ``generator`` unless given (``training.distributed`` gives each rank its part of one draw)."""
    cond = {}
    if class_labels is not None:
        if p_uncond > 0:
            class_labels = condition_dropout(class_labels, p_uncond, null_id, generator=generator)
        cond["class_labels"] = class_labels
    net.train()
    with torch.autocast(x0.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        loss = diffusion_loss(net, x0, alphas_cumprod, prediction, t=t, noise=noise, generator=generator,
                              min_snr_gamma=min_snr_gamma, **cond)
    _check_finite_step(loss.detach(), "loss", step, optimizer)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), max_grad_norm or float("inf"))
    _check_finite_step(grad_norm.detach(), "gradient norm", step, optimizer)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return {"loss": loss.item(), "grad_norm": grad_norm.item()}


@torch.no_grad()
def validation_loss(net: nn.Module, x0: torch.Tensor, *, alphas_cumprod: torch.Tensor, prediction: str,
                    n_levels: int = 10, seed: int = 0, class_labels=None) -> dict:
    """The denoising loss on fixed images at a fixed grid of t with fixed noise (Ho et al. 2020, Eq. 14).

    Unlike the training loss, whose t and eps are redrawn every step (its noise hides slow progress), this number
    changes only when the network does: the same ``n_levels`` timesteps, evenly spaced over [0, T - 1], and the
    same noise (from ``seed``) every call. Returns {"loss": mean over the grid, "t": grid, "per_t": loss per t}.
    """
    T = len(alphas_cumprod)
    grid = torch.linspace(0, T - 1, n_levels).round().to(torch.int64).unique()
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=g).to(x0)  # one draw, reused at every t
    cond = {"class_labels": class_labels} if class_labels is not None else {}
    was_training = net.training
    net.eval()
    per_t = [diffusion_loss(net, x0, alphas_cumprod, prediction, t=torch.full((len(x0),), int(t), device=x0.device),
                            noise=noise, **cond).item() for t in grid]
    net.train(was_training)
    return {"loss": sum(per_t) / len(per_t), "t": grid.tolist(), "per_t": per_t}
