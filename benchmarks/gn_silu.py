"""Does fusing GroupNorm and SiLU pay? Timed at the shapes the U-Net's GroupNorm-SiLU pairs really see.

Every ResBlock computes SiLU(GroupNorm(x)) twice before a convolution (minidiff.models.layers.ResBlock, after
Ho et al. 2020, App. B; with ``scale_shift`` its second norm is modulated before the SiLU, so only the first
counts), and the U-Net once more before its output conv. Issue 19 asks whether fusing the pair
speeds training. Three ways to compute the pair, forward and backward:

- ``separate``: ``F.silu(F.group_norm(x))``, what the library does: two kernels, the GroupNorm output kept for
  SiLU's backward;
- ``compiled``: the same function through ``torch.compile`` (inductor generates the pair's forward and backward
  as its own fused C++ loops); each pair is compiled and called alone, so the per-call overhead of a compiled
  function is inside its time, which fusion inside a whole compiled model would not pay;
- ``recompute``: one ``torch.autograd.Function`` that keeps only x and recomputes GroupNorm in its backward: the
  memory side of fusion (gradient checkpointing, Chen et al. 2016, applied to one pair).

(In-place ``F.silu(..., inplace=True)`` is no fusion: autograd then saves a copy of the GroupNorm output for
SiLU's backward, so it allocates as much and copies once more.)

The shapes come from forward hooks on a real U-Net of ``--preset`` at ``--batch`` and ``--size``. The variants are
timed alternately, round after round, each call a forward and a backward with one fixed dense output gradient
(``torch.autograd.grad``, nothing accumulated), and the script prints the median milliseconds per shape, the sum over
every pair of one training step (each shape times its count), the ratio separate / variant (above 1 = the
variant is faster), and the pairs' share of one whole training step (forward, MSE, backward, AdamW), which
bounds what any fusion can save.

    python benchmarks/gn_silu.py --threads 2                 # tiny preset, 28x28, batch 64
    python benchmarks/gn_silu.py --preset latent --size 16 --batch 64 --threads 2 --out /tmp/gn_silu.json
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import time

import torch
import torch.nn.functional as F

from minidiff.models.layers import ResBlock
from minidiff.models.unet import PRESETS, UNet


def separate(x, groups, weight, bias):
    return F.silu(F.group_norm(x, groups, weight, bias))


class _Recompute(torch.autograd.Function):
    """SiLU(GroupNorm(x)) that saves x, not the GroupNorm output, and recomputes the pair in its backward."""

    @staticmethod
    def forward(ctx, x, groups, weight, bias):
        ctx.groups = groups
        ctx.save_for_backward(x, weight, bias)
        return separate(x, groups, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias = (t.detach().requires_grad_() for t in ctx.saved_tensors)
        with torch.enable_grad():
            y = separate(x, ctx.groups, weight, bias)
        gx, gw, gb = torch.autograd.grad(y, (x, weight, bias), grad)
        return gx, None, gw, gb


def recompute(x, groups, weight, bias):
    return _Recompute.apply(x, groups, weight, bias)


# name -> a function returning the variant (compiling only when asked for)
VARIANTS = {"separate": lambda: separate, "compiled": lambda: torch.compile(separate, dynamic=False),
            "recompute": lambda: recompute}


def unet_inputs(net: UNet, batch: int, size: int) -> tuple:
    """Random (x, t, keywords) for one forward of ``net``: a context of 12 tokens if it cross-attends, labels if
    it is class-conditional."""
    c, g = net.config, torch.Generator().manual_seed(0)
    kw = {}
    if c.context_dim is not None:
        kw["context"] = torch.randn(batch, 12, c.context_dim, generator=g)
    if c.num_classes is not None:
        kw["class_labels"] = torch.randint(0, c.num_classes, (batch,), generator=g)
    return torch.randn(batch, c.in_channels, size, size, generator=g), torch.rand(batch, generator=g) * 1000, kw


def pair_shapes(net: UNet, batch: int, size: int) -> collections.Counter:
    """(B, C, H, W, groups) -> count, for every GroupNorm whose output goes straight into SiLU in one forward."""
    norms = [m for b in net.modules() if isinstance(b, ResBlock)
             for m in ((b.norm1,) if b.scale_shift else (b.norm1, b.norm2))] + [net.norm_out]
    seen = collections.Counter()
    hooks = [m.register_forward_hook(lambda m, inp, out: seen.update([(*inp[0].shape, m.num_groups)]))
             for m in norms]
    x, t, kw = unet_inputs(net, batch, size)
    with torch.no_grad():
        net(x, t, **kw)
    for h in hooks:
        h.remove()
    return seen


def fwd_bwd_ms(fn, x, groups, weight, bias, grad, reps: int) -> float:
    start = time.perf_counter()
    for _ in range(reps):
        torch.autograd.grad(fn(x, groups, weight, bias), (x, weight, bias), grad)
    return (time.perf_counter() - start) / reps * 1e3


def train_step_ms(net: UNet, batch: int, size: int, reps: int) -> float:
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x, t, kw = unet_inputs(net, batch, size)

    def step():
        loss = F.mse_loss(net(x, t, **kw), torch.randn_like(x))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    step()
    start = time.perf_counter()
    for _ in range(reps):
        step()
    return (time.perf_counter() - start) / reps * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--reps", type=int, default=10, help="forward+backward calls per timed round")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                   help="separate is always timed: the others' ratios are to it")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = UNet(PRESETS[args.preset])
    shapes = pair_shapes(net, args.batch, args.size)
    torch._dynamo.config.recompile_limit = 64  # one compiled graph per shape; past the limit it runs eager
    variants = {k: VARIANTS[k]() for k in ["separate", *(v for v in args.variants if v != "separate")]}
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}, preset {args.preset!r}, "
          f"batch {args.batch}, {args.size}x{args.size}: {sum(shapes.values())} GroupNorm-SiLU pairs per forward")
    print(f"{'B, C, H, W, groups':>24} {'count':>5} | " + " ".join(f"{k + ' ms':>12}" for k in variants)
          + " | " + " ".join(f"{'/ ' + k:>12}" for k in list(variants)[1:]))
    rows, total = [], dict.fromkeys(variants, 0.0)
    for shape, count in sorted(shapes.items(), key=lambda kv: -kv[0][1] * kv[0][2] * kv[0][3]):
        *dims, groups = shape
        x = torch.randn(*dims, requires_grad=True)
        weight, bias = torch.randn(dims[1], requires_grad=True), torch.randn(dims[1], requires_grad=True)
        grad = torch.randn(*dims)  # one dense output gradient, as a training step's backward brings
        ref = torch.autograd.grad(separate(x, groups, weight, bias), (x, weight, bias), grad)
        for name, fn in variants.items():  # the same function (and the compiled one compiled) before timing
            got = torch.autograd.grad(fn(x, groups, weight, bias), (x, weight, bias), grad)
            err = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, ref))
            assert err < 1e-4, f"{name} gradients differ from separate's by {err:.1e} (relative) at {shape}"
        times = {k: [] for k in variants}
        for _ in range(args.rounds):
            for name, fn in variants.items():
                times[name].append(fwd_bwd_ms(fn, x, groups, weight, bias, grad, args.reps))
        ms = {k: statistics.median(v) for k, v in times.items()}
        for k in variants:
            total[k] += count * ms[k]
        rows.append({"shape": dims, "groups": groups, "count": count, "ms": ms})
        print(f"{str(tuple(shape)):>24} {count:>5} | " + " ".join(f"{ms[k]:>12.3f}" for k in variants) + " | "
              + " ".join(f"{ms['separate'] / ms[k]:>12.2f}" for k in list(variants)[1:]), flush=True)
    step = train_step_ms(net, args.batch, args.size, reps=args.reps)
    print(f"{'all pairs of one step':>24} {sum(shapes.values()):>5} | "
          + " ".join(f"{total[k]:>12.2f}" for k in variants) + " | "
          + " ".join(f"{total['separate'] / total[k]:>12.2f}" for k in list(variants)[1:]))
    print(f"one training step of the whole U-Net: {step:.1f} ms; the pairs (separate) are "
          f"{total['separate'] / step:.0%} of it")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"preset": args.preset, "batch": args.batch, "size": args.size,
                       "threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows,
                       "sum_ms": total, "train_step_ms": step, "share": total["separate"] / step,
                       "speedup_vs_separate": {k: total["separate"] / total[k] for k in variants}}, f, indent=1)


if __name__ == "__main__":
    main()
