"""Does zero-initialising the residual branches help the tiny U-Net? Two runs, identical but for ``zero_init``.

Same seed, data order, noise and recipe as the first shipped model, fashion-mnist-cond-eps (tiny preset, cosine schedule,
eps-prediction, AdamW lr 1e-3, warmup 200, batch 64, EMA 0.999, p_uncond 0.1), a shorter run. Prints the training
loss (mean of each 100 steps) and the validation loss of the EMA weights (256 test images, 10 fixed t, fixed noise)
for both, and their ratio.

Run: OMP_NUM_THREADS=2 nice python benchmarks/zero_init.py --steps 1000
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

from minidiff.training import TrainConfig, train


def run(zero_init: bool, steps: int, out: str) -> dict:
    config = TrainConfig(steps=steps, sample_every=10**9, ckpt_every=10**9, val_every=max(1, steps // 5),
                         unet={"zero_init": zero_init})
    t0 = time.perf_counter()
    result = train(config, out, device="cpu", progress=False)
    return {**result["history"], "wall_s": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1000)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        h = {z: run(z, args.steps, f"{tmp}/{z}") for z in (False, True)}
    print(f"{args.steps} steps each; wall time default {h[False]['wall_s']:.0f} s, zero-init {h[True]['wall_s']:.0f} s")
    print("training loss, mean over 100-step windows")
    print(f"{'steps':>11} {'default':>9} {'zero-init':>9} {'ratio':>6}")
    for i in range(0, args.steps, 100):
        a = sum(h[False]["loss"][i:i + 100]) / len(h[False]["loss"][i:i + 100])
        b = sum(h[True]["loss"][i:i + 100]) / len(h[True]["loss"][i:i + 100])
        print(f"{i:>5}-{i + 99:<5} {a:9.4f} {b:9.4f} {b / a:6.3f}")
    print("validation loss (EMA weights)")
    for s, a, b in zip(h[False]["val_step"], h[False]["val_loss"], h[True]["val_loss"]):
        print(f"step {int(s):>5} {a:9.4f} {b:9.4f} {b / a:6.3f}")


if __name__ == "__main__":
    torch.set_num_threads(torch.get_num_threads())
    main()
