"""Training throughput (images/s) of the minidiff U-Net vs diffusers' UNet2DModel of the same architecture.

One training step = forward + MSE loss on eps + backward + AdamW step, batch of random images.
The two models are timed alternately (A, B, A, B, ...) in one process after a warmup, so a change
in machine load hits both; the table prints every round and the median of the per-round ratios.
``--setups`` names the setups timed (``SETUPS``: float32, bf16 autocast, channels_last, torch.compile, timed
after its compiling warmup, and combinations); the default is fp32 and, on CUDA, bf16_channels_last.
``--batch`` takes several sizes (the larger-batch sweep); every setup is timed at each. (Fused GroupNorm+SiLU
is timed on its own by benchmarks/gn_silu.py.)
``--models minidiff`` times minidiff alone (where diffusers is not installed); ``--out`` appends one JSON
line per setup and batch size (the medians), for scripts such as benchmarks/gpu_run.sh.

    python benchmarks/unet_throughput.py                      # tiny preset, 28x28, batch 64, CPU
    python benchmarks/unet_throughput.py --preset cifar --size 32 --batch 128 --device cuda
    python benchmarks/unet_throughput.py --device cuda --setups fp32 bf16 channels_last compile --out /tmp/t.jsonl
    python benchmarks/unet_throughput.py --batch 32 64 128 256 --threads 2   # the larger-batch sweep
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from minidiff.models.layers import Downsample, Upsample
from minidiff.models.unet import PRESETS, UNet, UNetConfig

# name -> how a setup trains: bf16 autocast, channels_last memory format, torch.compile
SETUPS = {
    "fp32": {"bf16": False, "channels_last": False, "compile": False},
    "bf16": {"bf16": True, "channels_last": False, "compile": False},
    "channels_last": {"bf16": False, "channels_last": True, "compile": False},
    "bf16_channels_last": {"bf16": True, "channels_last": True, "compile": False},
    "compile": {"bf16": False, "channels_last": False, "compile": True},
    "bf16_channels_last_compile": {"bf16": True, "channels_last": True, "compile": True},
}


def diffusers_twin(cfg: UNetConfig, size: int, *, num_class_embeds: int | None = None):
    """diffusers.UNet2DModel with the same channels, res blocks, attention levels, groups and heads as ``cfg``.

    ``num_class_embeds=K`` adds diffusers' class embedding (K rows, added to the time embedding as minidiff's
    ``class_emb`` is; minidiff's has a K + 1-th row, the null class of guidance, which diffusers' recipe lacks).
    """
    from diffusers import UNet2DModel

    if cfg.num_classes is not None or cfg.context_dim is not None or cfg.scale_shift or not cfg.mid_attention:
        raise ValueError("the diffusers twin is built from unconditional presets without scale_shift (give "
                         "num_class_embeds= for classes), "
                         f"got num_classes={cfg.num_classes}, context_dim={cfg.context_dim}")
    if cfg.channel_mults[0] != 1:
        raise ValueError(f"UNet2DModel sizes its time embedding by level 0; use channel_mults[0] = 1, got {cfg.channel_mults}")
    chans = [cfg.base_channels * m for m in cfg.channel_mults]
    heads_dims = {chans[i] // cfg.num_heads for i in cfg.attn_levels} | {chans[-1] // cfg.num_heads}
    if len(heads_dims) != 1:
        raise ValueError(f"UNet2DModel takes one attention_head_dim; attention levels give {sorted(heads_dims)}")
    levels = range(len(chans))
    return UNet2DModel(
        sample_size=size, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        block_out_channels=tuple(chans), layers_per_block=cfg.num_res_blocks,
        down_block_types=tuple("AttnDownBlock2D" if i in cfg.attn_levels else "DownBlock2D" for i in levels),
        up_block_types=tuple("AttnUpBlock2D" if i in cfg.attn_levels else "UpBlock2D" for i in reversed(levels)),
        norm_num_groups=cfg.num_groups, attention_head_dim=heads_dims.pop(), dropout=cfg.dropout,
        downsample_type="conv", upsample_type="conv", add_attention=True, num_class_embeds=num_class_embeds,
    )


def _copy_res(ours, theirs):
    pairs = [("norm1", "norm1"), ("conv1", "conv1"), ("emb_proj", "time_emb_proj"), ("norm2", "norm2"),
             ("conv2", "conv2")] + ([("skip", "conv_shortcut")] if theirs.conv_shortcut is not None else [])
    for a, b in pairs:
        getattr(theirs, b).load_state_dict(getattr(ours, a).state_dict())


def _copy_attn(ours, theirs):
    theirs.group_norm.load_state_dict(ours.norm.state_dict())
    for proj, w, b in zip((theirs.to_q, theirs.to_k, theirs.to_v), ours.qkv.weight.chunk(3), ours.qkv.bias.chunk(3)):
        proj.load_state_dict({"weight": w, "bias": b})
    theirs.to_out[0].load_state_dict(ours.proj.state_dict())


def _copy_stages(stages, block):
    """Copy a list of minidiff stages into one diffusers down/up block (resnets, attentions, resamplers)."""
    n_res = 0
    for stage in stages:
        if isinstance(stage[0], (Downsample, Upsample)):
            resampler = block.downsamplers[0] if isinstance(stage[0], Downsample) else block.upsamplers[0]
            resampler.conv.load_state_dict(stage[0].conv.state_dict())
            continue
        _copy_res(stage[0], block.resnets[n_res])
        if len(stage) > 1:
            _copy_attn(stage[1], block.attentions[n_res])
        n_res += 1


@torch.no_grad()
def copy_weights_to_diffusers(ours: UNet, theirs) -> None:
    """Load a minidiff UNet's weights into its diffusers twin, so both compute the same function."""
    theirs.conv_in.load_state_dict(ours.conv_in.state_dict())
    theirs.time_embedding.linear_1.load_state_dict(ours.time_mlp[0].state_dict())
    theirs.time_embedding.linear_2.load_state_dict(ours.time_mlp[2].state_dict())
    n_down = ours.config.num_res_blocks + 1  # res stages + downsample per level (the last has none)
    n_up = ours.config.num_res_blocks + 2
    for i, block in enumerate(theirs.down_blocks):
        _copy_stages(ours.down[i * n_down:(i + 1) * n_down], block)
    for i, block in enumerate(theirs.up_blocks):
        _copy_stages(ours.up[i * n_up:(i + 1) * n_up], block)
    _copy_res(ours.mid[0], theirs.mid_block.resnets[0])
    _copy_attn(ours.mid[1], theirs.mid_block.attentions[0])
    _copy_res(ours.mid[2], theirs.mid_block.resnets[1])
    theirs.conv_norm_out.load_state_dict(ours.norm_out.state_dict())
    theirs.conv_out.load_state_dict(ours.conv_out.state_dict())


@torch.no_grad()
def max_abs_difference(ours: UNet, theirs, size: int) -> float:
    """Copy ours into theirs (with a non-zero output conv) and compare outputs on random inputs."""
    nn.init.normal_(ours.conv_out.weight, std=0.1)
    copy_weights_to_diffusers(ours, theirs)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, ours.config.in_channels, size, size, generator=g)
    t = torch.tensor([0.0, 10.5, 500.0, 999.0])
    return (ours.eval()(x, t) - theirs.eval()(x, t).sample).abs().max().item()


def make_step(model, call, *, batch, channels, size, device, bf16=False, channels_last=False, compile=False):
    """Return a function running one training step of ``model`` on fixed random data (torch.compile'd if asked)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(device, memory_format=fmt).train()
    runner = torch.compile(model) if compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, channels, size, size, generator=g).to(device, memory_format=fmt)
    eps = torch.randn(batch, channels, size, size, generator=g).to(device, memory_format=fmt)
    t = (torch.rand(batch, generator=g) * 1000).to(device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            out = call(runner, x, t)
        loss = F.mse_loss(out.float(), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def images_per_s(step, n_steps: int, batch: int, device: torch.device) -> tuple[float, float]:
    """Images per wall-clock second and per CPU-second of this process (steadier on a shared machine)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start, start_cpu = time.perf_counter(), time.process_time()
    for _ in range(n_steps):
        step()
    sync()
    n = n_steps * batch
    return n / (time.perf_counter() - start), n / (time.process_time() - start_cpu)


def setup_name(bf16: bool, channels_last: bool, compile: bool) -> str:
    """A readable name of a setup: "float32", "bf16 autocast + channels_last + torch.compile", ..."""
    parts = ["bf16 autocast" if bf16 else "float32"] + ["channels_last"] * channels_last + ["torch.compile"] * compile
    return " + ".join(parts)


def build_models(args) -> dict:
    """The models ``--models`` names, minidiff's seeded; with both, check they are the same function."""
    cfg = PRESETS[args.preset]
    torch.manual_seed(0)
    builders = {"minidiff": lambda: UNet(cfg), "diffusers": lambda: diffusers_twin(cfg, args.size)}
    models = {name: builders[name]() for name in args.models}
    counts = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    print("parameters: " + "  ".join(f"{k} {n:,}" for k, n in counts.items()))
    if len(models) == 2:
        assert abs(counts["minidiff"] - counts["diffusers"]) <= 0.1 * counts["diffusers"], "architectures differ"
        print(f"same function: max |minidiff - diffusers| = {max_abs_difference(*models.values(), args.size):.1e} "
              "on one batch after copying minidiff's weights into diffusers")
    return models


def compare(args, device: torch.device, *, batch: int, bf16=False, channels_last=False, compile=False) -> dict:
    """Time the models alternately, round by round; returns the medians (img/s, img/CPU-s, and the ratio)."""
    models = build_models(args)
    calls = {"minidiff": lambda m, x, t: m(x, t), "diffusers": lambda m, x, t: m(x, t).sample}
    steps = {k: make_step(m, calls[k], batch=batch, channels=PRESETS[args.preset].in_channels, size=args.size,
                          device=device, bf16=bf16, channels_last=channels_last, compile=compile)
             for k, m in models.items()}
    for step in steps.values():
        for _ in range(args.warmup):  # with --compile the first warmup step compiles
            step()
    name = setup_name(bf16, channels_last, compile)
    print(f"\n{name} on {device}, batch {batch}, {args.size}x{args.size}, {args.steps} steps per round")
    two = len(steps) == 2
    print(f"{'round':>5} | " + " ".join(f"{'img/s: ' + k:>15}" for k in steps) + (f" {'ratio':>6}" if two else "")
          + " | " + " ".join(f"{'img/CPU-s: ' + k:>19}" for k in steps) + (f" {'ratio':>6}" if two else ""))
    rates = {k: [] for k in steps}
    cpu_rates = {k: [] for k in steps}
    for r in range(args.rounds):
        for k, step in steps.items():
            wall, cpu = images_per_s(step, args.steps, batch, device)
            rates[k].append(wall)
            cpu_rates[k].append(cpu)
        last = {k: v[-1] for k, v in rates.items()}
        last_cpu = {k: v[-1] for k, v in cpu_rates.items()}
        ratio = f" {last['minidiff'] / last['diffusers']:>6.2f}" if two else ""
        ratio_cpu = f" {last_cpu['minidiff'] / last_cpu['diffusers']:>6.2f}" if two else ""
        print(f"{r:>5} | " + " ".join(f"{v:>15.1f}" for v in last.values()) + ratio + " | "
              + " ".join(f"{v:>19.1f}" for v in last_cpu.values()) + ratio_cpu)
    result = {"preset": args.preset, "size": args.size, "batch": batch, "device": str(device), "setup": name,
              "img_s": {k: statistics.median(v) for k, v in rates.items()},
              "img_cpu_s": {k: statistics.median(v) for k, v in cpu_rates.items()}, "ratio": None}
    if two:
        result["ratio"] = statistics.median(a / b for a, b in zip(rates["minidiff"], rates["diffusers"]))
        cpu_ratio = statistics.median(a / b for a, b in zip(cpu_rates["minidiff"], cpu_rates["diffusers"]))
        print(f"median ratio minidiff / diffusers: {result['ratio']:.2f} (wall clock), {cpu_ratio:.2f} (CPU time)")
    else:
        print("median img/s: " + ", ".join(f"{k} {v:.1f}" for k, v in result["img_s"].items()))
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--batch", type=int, nargs="+", default=[64], help="one or more batch sizes (a sweep)")
    p.add_argument("--steps", type=int, default=5, help="training steps per timed round")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    p.add_argument("--models", nargs="+", default=["minidiff", "diffusers"], choices=["minidiff", "diffusers"])
    p.add_argument("--setups", nargs="+", default=None, choices=list(SETUPS),
                   help="setups to time (default: fp32, and on CUDA also bf16_channels_last)")
    p.add_argument("--out", default=None, help="append one JSON line per setup (the medians) to this file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load = ", load average %.1f %.1f %.1f" % os.getloadavg() if hasattr(os, "getloadavg") else ""
    print(f"torch {torch.__version__}, device {device}, CPU threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} CPUs{load}, preset {args.preset!r}")
    setups = args.setups or ["fp32"] + (["bf16_channels_last"] if device.type == "cuda" else [])
    if min(args.batch) < 1:
        p.error(f"--batch sizes must be >= 1, got {args.batch}")
    for batch in args.batch:
        for setup in setups:
            result = compare(args, device, batch=batch, **SETUPS[setup])
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
