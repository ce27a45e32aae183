"""Training throughput (images/s) of the minidiff U-Net vs diffusers' UNet2DModel of the same architecture.

One training step = forward + MSE loss on eps + backward + AdamW step, batch of random images.
The two models are timed alternately (A, B, A, B, ...) in one process after a warmup, so a change
in machine load hits both; the table prints every round and the median of the per-round ratios.
On CUDA it repeats the comparison under bf16 autocast + channels_last.

    python benchmarks/unet_throughput.py                      # tiny preset, 28x28, batch 64, CPU
    python benchmarks/unet_throughput.py --preset cifar --size 32 --batch 128 --device cuda
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from minidiff.models.layers import Downsample, Upsample
from minidiff.models.unet import PRESETS, UNet, UNetConfig


def diffusers_twin(cfg: UNetConfig, size: int):
    """diffusers.UNet2DModel with the same channels, res blocks, attention levels, groups and heads as ``cfg``."""
    from diffusers import UNet2DModel

    if cfg.num_classes is not None or cfg.context_dim is not None or cfg.scale_shift or not cfg.mid_attention:
        raise ValueError("the diffusers twin is built for unconditional presets without scale_shift, "
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
        downsample_type="conv", upsample_type="conv", add_attention=True,
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


def make_step(model, call, *, batch, channels, size, device, bf16_cl):
    """Return a function running one training step of ``model`` on fixed random data."""
    fmt = torch.channels_last if bf16_cl else torch.contiguous_format
    model.to(device, memory_format=fmt).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, channels, size, size, generator=g).to(device, memory_format=fmt)
    eps = torch.randn(batch, channels, size, size, generator=g).to(device, memory_format=fmt)
    t = (torch.rand(batch, generator=g) * 1000).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16_cl else contextlib.nullcontext()

    def step():
        with autocast:
            out = call(model, x, t)
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


def compare(args, device: torch.device, bf16_cl: bool) -> float:
    cfg = PRESETS[args.preset]
    torch.manual_seed(0)
    models = {"minidiff": UNet(cfg), "diffusers": diffusers_twin(cfg, args.size)}
    counts = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    print(f"parameters: minidiff {counts['minidiff']:,}  diffusers {counts['diffusers']:,}")
    assert abs(counts["minidiff"] - counts["diffusers"]) <= 0.1 * counts["diffusers"], "architectures differ"
    print(f"same function: max |minidiff - diffusers| = {max_abs_difference(*models.values(), args.size):.1e} "
          "on one batch after copying minidiff's weights into diffusers")
    calls = {"minidiff": lambda m, x, t: m(x, t), "diffusers": lambda m, x, t: m(x, t).sample}
    steps = {k: make_step(m, calls[k], batch=args.batch, channels=cfg.in_channels, size=args.size,
                          device=device, bf16_cl=bf16_cl) for k, m in models.items()}
    for k in steps:
        for _ in range(args.warmup):
            steps[k]()
    print(f"\n{'bf16 autocast + channels_last' if bf16_cl else 'float32'} on {device}, batch {args.batch}, "
          f"{args.size}x{args.size}, {args.steps} steps per round")
    print(f"{'round':>5} | {'img/s: minidiff':>15} {'diffusers':>10} {'ratio':>6} | "
          f"{'img/CPU-s: minidiff':>19} {'diffusers':>10} {'ratio':>6}")
    ratios, cpu_ratios = [], []
    for r in range(args.rounds):
        a, a_cpu = images_per_s(steps["minidiff"], args.steps, args.batch, device)
        b, b_cpu = images_per_s(steps["diffusers"], args.steps, args.batch, device)
        ratios.append(a / b)
        cpu_ratios.append(a_cpu / b_cpu)
        print(f"{r:>5} | {a:>15.1f} {b:>10.1f} {a / b:>6.2f} | {a_cpu:>19.1f} {b_cpu:>10.1f} {a_cpu / b_cpu:>6.2f}")
    med = statistics.median(ratios)
    print(f"median ratio minidiff / diffusers: {med:.2f} (wall clock), "
          f"{statistics.median(cpu_ratios):.2f} (CPU time)")
    return med


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=5, help="training steps per timed round")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load = ", load average %.1f %.1f %.1f" % os.getloadavg() if hasattr(os, "getloadavg") else ""
    print(f"torch {torch.__version__}, device {device}, CPU threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} CPUs{load}, preset {args.preset!r}")
    compare(args, device, bf16_cl=False)
    if device.type == "cuda":
        compare(args, device, bf16_cl=True)


if __name__ == "__main__":
    main()
