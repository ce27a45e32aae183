"""Update latency of the three explorers: seconds from a control change to the new figure's PNG being published.

Each explorer is built as in its lecture (the shipped Fashion-MNIST model, default settings), then each control is
changed a few times; the time is measured in the kernel around the widget's value change, which runs the view,
renders the PNG and publishes it (what a browser adds on top, decoding one small PNG, is not included). Goals
(issue: explorers that draw): <= 1 s in smoke mode, <= 2 s with the shipped model at the defaults.

Run (idle machine, as a student's laptop would be):
    OMP_NUM_THREADS=2 python benchmarks/explorer_latency.py            # shipped model, defaults
    MINIDIFF_SMOKE=1 OMP_NUM_THREADS=2 python benchmarks/explorer_latency.py
"""
from __future__ import annotations

import statistics
import time

import torch
from IPython.core.interactiveshell import InteractiveShell

from minidiff.course import widgets
from minidiff.data import load_dataset
from minidiff.utils import smoke_mode

# (explorer, control description, values to cycle through)
CHANGES = {
    "schedule": [("schedule", ["cosine", "linear"]), ("t", [100, 900]), ("T", [500, 1000])],
    "sampler": [("sampler", ["euler", "dpmpp_2m"]), ("steps", [11, 10]), ("seed", [1, 0])],
    "guidance": [("scale", [5.0, 3.0]), ("class", [1, 0]), ("seed", [1, 0])],
}


def _control(w, name):
    return next(c for c in w.children if getattr(c, "description", None) == name)


def measure(w, changes) -> dict:
    times = {}
    for name, values in changes:
        control = _control(w, name)
        for value in values:
            start = time.perf_counter()
            control.value = value  # runs the view and publishes the PNG before returning
            times.setdefault(name, []).append(time.perf_counter() - start)
    return times


def main() -> None:
    InteractiveShell.instance()  # display() needs a shell, as in a notebook
    images = load_dataset("fashion-mnist", "test").images[:4]
    start = time.perf_counter()
    built = {"schedule": widgets.schedule_explorer(images)}
    built["sampler"] = widgets.sampler_explorer()
    built["guidance"] = widgets.guidance_explorer()
    print(f"smoke mode: {smoke_mode()}, torch threads {torch.get_num_threads()}; built the three explorers (first "
          f"draw included) in {time.perf_counter() - start:.1f} s")
    print(f"{'explorer':<10} {'control':<10} {'median s':>9} {'max s':>7}")
    for which, w in built.items():
        for name, ts in measure(w, CHANGES[which]).items():
            print(f"{which:<10} {name:<10} {statistics.median(ts):9.2f} {max(ts):7.2f}")


if __name__ == "__main__":
    main()
