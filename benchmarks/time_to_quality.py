"""Time to quality (issue 19): wall-clock minutes of training on this machine until a class-conditional
Fashion-MNIST model samples at class accuracy >= 90%, for several recipes with the same data and budget.

Each recipe trains for at most ``--minutes`` of wall clock (the same for all). Every ``--eval-every-min`` minutes
of training its weights are sampled with DPM-Solver++(2M), 20 trailing steps, guidance 1 (no CFG), ``--n``
class-balanced samples from seed 0, and scored by ``minidiff.eval.evaluation.evaluate`` (class accuracy and
classifier-FID of the shipped Fashion-MNIST classifier). The clock counts training only: evaluations, model
set-up and checkpoint loading between chunks are not on it. A recipe stops at the first evaluation with accuracy
>= ``--threshold``, or when its budget is spent; the time to quality is the training time of that evaluation, so
it is known to within one evaluation interval. The table also reads the times to the lower accuracies of ``--also``
(default 80%) off the same evaluations, so that recipes that all miss the threshold in the budget still compare;
``--from-json`` reprints the table of a saved run with other thresholds, without training. The table ends with
the judge's accuracy on real test images at the same n (92.7% on the first 300, 90.6% on all 10,000): a 90%
threshold asks for samples about as recognisable as the real ones.

Recipes (same 60,000 training images, batches of 64 drawn with replacement, no augmentation):

| name      | what                                                                                            |
|-----------|-------------------------------------------------------------------------------------------------|
| flow      | the course's recipe: the "config" of minidiff/weights/fashion-mnist-cond-fm.json (flow, straight)|
| eps       | the first recipe: the "config" of minidiff/weights/fashion-mnist-cond-eps.json (eps, cosine)     |
| diffusers | diffusers' UNet2DModel twin of the tiny preset (class embedding, 10 classes) + DDPMScheduler     |
|           | (linear betas, 1000 steps, eps), trained as diffusers' "basic training" tutorial does           |

The default model ``fashion-mnist-cond`` is the flow recipe with the learning rate decayed along a cosine to 0 at
its planned 4,500 steps; a decay needs its end fixed in advance, and this benchmark trains open-ended chunks, so its
flow row is the constant-rate twin (the recipe of ``fashion-mnist-cond-fm``).

flow and eps train with ``minidiff.training.loop.train`` (EMA weights evaluated), in chunks resumed from its
checkpoint; the training time is the sum of its sessions' ``wall_s`` (start of the first step to the last
checkpoint). diffusers trains in the loop below (raw weights evaluated: the tutorial keeps no EMA) and is sampled
through minidiff's ``Denoiser`` (its eps read as one row of the parameterization table), so every recipe meets
the same sampler, the same x0 clipping as the shipped pixel models, and the same judge.

``--set KEY=VALUE`` changes TrainConfig fields of the minidiff recipes for an ablation; the row is then named after
the change (``flow[t_sampling=logit_normal]``), never plain ``flow``. A time reached at a recipe's first evaluation
prints as ``<= 5.0`` and its ratios say so: it got there sooner by an unknown amount.

Run (the issue's measurement; about 3 hours of training plus evaluations on one CPU thread):
    OMP_NUM_THREADS=1 python benchmarks/time_to_quality.py --minutes 60 --eval-every-min 5 --n 300 --threads 1 \\
        --out /tmp/time_to_quality.json
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import time
from dataclasses import asdict, fields, replace
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from minidiff.data.datasets import load_dataset
from minidiff.denoiser import Denoiser
from minidiff.eval.evaluation import evaluate, real_class_accuracy
from minidiff.files import hardware_info
from minidiff.models.unet import PRESETS
from minidiff.pretrained import model_card
from minidiff.training.checkpoint import checkpoint_config
from minidiff.training.loop import TrainConfig, make_alphas_cumprod, train
from minidiff.utils import get_device, smoke

CARDS = {"flow": "fashion-mnist-cond-fm", "eps": "fashion-mnist-cond-eps"}  # recipe -> the model card it copies
RECIPES = ("flow", "eps", "diffusers")
BATCH_SIZE = 64
NEVER = 10**9  # sample_every / ckpt_every / val_every: only at the end of each chunk (train() always saves there)


def probe_steps() -> int:
    """Steps timed before the first plan of a recipe's steps per minute (one in smoke mode)."""
    return smoke(10, 1)


# ----------------------------------------------------------------------------- minidiff's recipes
def recipe_config(recipe: str, overrides: dict | None = None) -> TrainConfig:
    """The TrainConfig of a shipped model's card, changed by ``overrides`` (``--set``), with side tasks (grids,
    validation) off: all RESUMABLE fields of TrainConfig, which do not change the trained model; the sample grid
    train() saves at each chunk's end is made with one sampler step so that it costs little (it is off the clock)."""
    unknown = sorted(set(overrides or {}) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise ValueError(f"--set {unknown[0]}=...: not a TrainConfig field; the fields are "
                         f"{[f.name for f in fields(TrainConfig)]}")
    saved = {**model_card(CARDS[recipe])["config"], **(overrides or {})}
    return replace(TrainConfig(**saved), sample_every=NEVER, ckpt_every=NEVER, val_every=NEVER, sample_steps=1)


def parse_set(items: list[str]) -> dict:
    """``--set KEY=VALUE`` pairs -> {KEY: VALUE}, VALUE read as JSON when it parses (1e-3, true, {...}), else text."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set takes KEY=VALUE (a TrainConfig field), got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def recipe_label(recipe: str, overrides: dict) -> str:
    """A recipe's name in the table: ``flow``, or ``flow[t_sampling=logit_normal]`` when ``--set`` changed it."""
    return recipe + ("[" + ",".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}"
                                    for k, v in overrides.items()) + "]" if overrides else "")


class MinidiffRun:
    """A recipe trained by ``minidiff.training.loop.train`` in chunks: ``train(config, out, resume=True)`` with a
    growing ``config.steps`` continues from the checkpoint bit for bit (TrainConfig.RESUMABLE lists ``steps``)."""

    def __init__(self, config: TrainConfig, run_dir: Path, data, device: torch.device):
        self.config, self.run_dir, self.data, self.device = config, run_dir, data, device
        self.step, self.seconds, self.ema_net = 0, 0.0, None

    def _chunk(self, steps: int) -> None:
        out = train(replace(self.config, steps=steps), self.run_dir, resume=True, device=self.device,
                    data=self.data, progress=False, command="benchmarks/time_to_quality.py")
        sessions = checkpoint_config(self.run_dir / "checkpoint.safetensors")["sessions"]
        self.step, self.ema_net = out["step"], out["ema_net"]
        self.seconds = sum(s["wall_s"] for s in sessions)  # each session: its first step to its last checkpoint

    def train_until(self, seconds: float) -> None:
        """Train to about ``seconds`` of training time, planning the steps from the throughput so far."""
        if self.step == 0:
            self._chunk(probe_steps())
        if self.seconds < seconds:
            rate = self.step / self.seconds
            self._chunk(self.step + max(1, round(rate * (seconds - self.seconds))))

    def denoiser(self) -> Denoiser:
        """The EMA weights as a denoiser, x0_hat clipped as for the shipped pixel models (``pretrained.load``)."""
        return Denoiser(self.ema_net, make_alphas_cumprod(self.config), self.config.prediction, clip_x0=True)


# ----------------------------------------------------------------------------- diffusers' recipe
def load_diffusers_twin():
    """``diffusers_twin`` of benchmarks/unet_throughput.py: UNet2DModel built to a minidiff preset's architecture."""
    spec = importlib.util.spec_from_file_location("unet_throughput", Path(__file__).with_name("unet_throughput.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.diffusers_twin


class DiffusersEpsNet(nn.Module):
    """diffusers' UNet2DModel as a minidiff net ``net(x, t, class_labels=...) -> eps_hat`` (its ``.sample``);
    ``config.num_classes`` tells ``Denoiser`` and ``evaluate`` the net is class-conditional."""

    def __init__(self, unet: nn.Module, num_classes: int):
        super().__init__()
        self.unet = unet
        self.config = SimpleNamespace(num_classes=num_classes, context_dim=None)

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels=None) -> torch.Tensor:
        return self.unet(x, t, class_labels=class_labels).sample


class DiffusersRun:
    """diffusers' recipe, as its "basic training" tutorial (docs: tutorials/basic_training) trains UNet2DModel:
    DDPMScheduler(1000 linear betas, epsilon), AdamW(lr=1e-4), get_cosine_schedule_with_warmup(500 warmup steps,
    the budget in steps), MSE between predicted and true noise, gradients clipped to norm 1, no EMA; on CUDA under
    bf16 autocast (the tutorial's mixed precision; minidiff's loop uses the same). Classes via ``num_class_embeds``.
    Batches are drawn as minidiff's loop draws them, without the tutorial's random flips: the same data for all."""

    def __init__(self, data, device: torch.device, budget_s: float, seed: int = 0):
        from diffusers import DDPMScheduler

        self.data, self.device, self.seed = data, device, seed
        self.noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                             prediction_type="epsilon")
        total = max(1, round(self._probe_rate() * budget_s))  # the cosine schedule spans the whole budget
        self.net, self.optimizer, self.lr_scheduler = self._build(total)
        self.gens = {"data": torch.Generator().manual_seed(seed),  # as minidiff's loop seeds its data and noise
                     "noise": torch.Generator(device).manual_seed(seed + 1)}
        self.step, self.seconds = 0, 0.0

    def _build(self, total_steps: int):
        from diffusers.optimization import get_cosine_schedule_with_warmup

        torch.manual_seed(self.seed)
        k = len(self.data.class_names)
        unet = load_diffusers_twin()(PRESETS["tiny"], self.data.images.shape[-1], num_class_embeds=k)
        net = DiffusersEpsNet(unet.to(self.device), k)
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
        return net, optimizer, get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=500,
                                                               num_training_steps=total_steps)

    def _probe_rate(self) -> float:
        """Steps per second of this recipe, timed on a throwaway model (off the clock): the schedule's length."""
        self.net, self.optimizer, self.lr_scheduler = self._build(1)
        self.gens = {"data": torch.Generator().manual_seed(12345),
                     "noise": torch.Generator(self.device).manual_seed(12345)}
        self._train_step()  # the first step pays for allocations
        start, n = time.perf_counter(), probe_steps()
        for _ in range(n):
            self._train_step()
        return n / (time.perf_counter() - start)

    def _train_step(self) -> float:
        """One step of the tutorial's loop: noise a batch at random timesteps, regress the noise (Ho et al. 2020)."""
        idx = torch.randint(len(self.data.images), (BATCH_SIZE,), generator=self.gens["data"])
        x0, labels = self.data.images[idx].to(self.device), self.data.labels[idx].to(self.device)
        noise = torch.randn(x0.shape, generator=self.gens["noise"], device=self.device)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (BATCH_SIZE,),
                          generator=self.gens["noise"], device=self.device)
        self.net.train()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            eps_hat = self.net(self.noise_scheduler.add_noise(x0, noise, t), t, class_labels=labels)
        loss = F.mse_loss(eps_hat.float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()  # waits for the device, so the clock below times finished steps

    def train_until(self, seconds: float) -> None:
        """Train while the training clock is under ``seconds``."""
        while self.seconds < seconds:
            start = time.perf_counter()
            self._train_step()
            self.seconds += time.perf_counter() - start
            self.step += 1

    def denoiser(self) -> Denoiser:
        """The net through minidiff's contract, on diffusers' own alpha_bar table (float32, read as float64)."""
        alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(torch.float64)
        return Denoiser(self.net.eval(), alphas_cumprod, "eps", clip_x0=True)


# ----------------------------------------------------------------------------- the race and the report
def race(recipe: str, run, args) -> list[dict]:
    """Alternate training to the next evaluation time and evaluating, until accuracy >= threshold or the budget."""
    budget, every = args.minutes * 60, args.eval_every_min * 60
    rows, mark = [], min(every, budget)
    while True:
        run.train_until(mark)
        start = time.perf_counter()
        r = evaluate(run.denoiser(), dataset="fashion-mnist", sampler="dpmpp_2m", steps=20, guidance=1.0, n=args.n,
                     seed=0, spacing="trailing", progress=False)
        row = {"recipe": recipe, "train_minutes": run.seconds / 60, "step": run.step,
               "accuracy": r["class_accuracy"], "fid": r["fid"], "fid_floor": r["fid_floor"],
               "img_s": run.step * BATCH_SIZE / run.seconds, "eval_seconds": time.perf_counter() - start}
        print(json.dumps(row), flush=True)
        rows.append(row)
        if row["accuracy"] >= args.threshold or mark >= budget or run.seconds >= budget:
            return rows
        # The next mark is one interval on from this one, not from the clock: a chunk planned from the throughput
        # can stop a few seconds short of its mark, and re-aiming at that mark would evaluate it again and again.
        mark = min(budget, mark + every)


def first_minutes(rows: list[dict], threshold: float) -> float | None:
    """Training minutes of a recipe's first evaluation at accuracy >= threshold (None: never)."""
    return next((r["train_minutes"] for r in rows if r["accuracy"] >= threshold), None)


def summarize(rows: list[dict], threshold: float, minutes: float, also: tuple = ()) -> dict:
    """A recipe's first evaluation at accuracy >= threshold (or its best one), and its overall img/s; ``also``:
    lower thresholds read off the same evaluations (the race stops only at ``threshold``)."""
    hit = next((r for r in rows if r["accuracy"] >= threshold), None)
    best = max(rows, key=lambda r: r["accuracy"])
    return {"recipe": rows[0]["recipe"], "reached": hit is not None,
            "minutes": first_minutes(rows, threshold), "step": (hit or rows[-1])["step"],
            "img_s": rows[-1]["img_s"], "best_accuracy": best["accuracy"], "best_at_minutes": best["train_minutes"],
            "budget_minutes": minutes, "minutes_to": {f"{a:g}": first_minutes(rows, a) for a in also},
            "first_eval_minutes": rows[0]["train_minutes"]}


def _at_first(s: dict, m: float | None) -> bool:
    """Whether a recipe's time ``m`` is its first evaluation's: it got there sooner, by an unknown amount."""
    return m is not None and m == s.get("first_eval_minutes")


def _ratio_lines(by_name: dict, label: str, minutes_of, budget: float) -> list[str]:
    """``time to <label>, other / flow`` for eps and diffusers, or n/a naming who did not get there."""
    out = []
    for other in (name for name in ("eps", "diffusers") if name in by_name and "flow" in by_name):
        a, b = minutes_of(by_name[other]), minutes_of(by_name["flow"])
        if a is not None and b is not None:
            first = [n for n, m in ((other, a), ("flow", b)) if _at_first(by_name[n], m)]
            caveat = (f" ({' and '.join(first)} got there by {'its' if len(first) == 1 else 'their'} first evaluation"
                      f"{': flow may be faster still' if first == ['flow'] else ''})" if first else "")
            out.append(f"time to {label}, {other} / flow: {a / b:.2f}x{caveat}")
        else:
            missing = " and ".join(n for n, m in ((other, a), ("flow", b)) if m is None)
            out.append(f"time to {label}, {other} / flow: n/a ({missing} did not reach {label} in {budget:g} min)")
    return out


def table(summaries: list[dict], threshold: float, real_accuracy: float | None = None) -> str:
    """Markdown: one row per recipe, then the time-to-quality ratios against flow (and at each lower threshold
    of the summaries' ``minutes_to``), then the judge's accuracy on real images when given."""
    pct = f"{100 * threshold:g}%"
    also = list(summaries[0].get("minutes_to", {})) if summaries else []
    out = [f"| recipe | minutes to >= {pct} | steps | img/s |" + "".join(f" min to >= {100 * float(a):g}% |"
                                                                      for a in also),
           "|---|---|---|---|" + "---|" * len(also)]
    for s in summaries:
        def minutes(m, s=s):  # "<= 5.0": reached by the first evaluation, so at most that long
            return f"{'<= ' if _at_first(s, m) else ''}{m:.1f}"

        when = (minutes(s["minutes"]) if s["reached"] else
                f"not reached in {s['budget_minutes']:g} min; best acc {100 * s['best_accuracy']:.1f}% "
                f"at {s['best_at_minutes']:.1f} min")
        extra = "".join(" - |" if s["minutes_to"][a] is None else f" {minutes(s['minutes_to'][a])} |" for a in also)
        out.append(f"| {s['recipe']} | {when} | {s['step']} | {s['img_s']:.1f} |" + extra)
    by_name = {s["recipe"]: s for s in summaries}
    budget = summaries[0]["budget_minutes"] if summaries else 0
    lines = _ratio_lines(by_name, pct, lambda s: s["minutes"], budget)
    for a in also:
        lines += _ratio_lines(by_name, f"{100 * float(a):g}%", lambda s, a=a: s["minutes_to"][a], budget)
    if real_accuracy is not None:
        lines.append(f"the judge on the same number of real test images: {100 * real_accuracy:.1f}% "
                     f"(threshold {pct}: {100 * (threshold - real_accuracy):+.1f} points from it)")
    return "\n".join(out + ([""] if lines else []) + lines)


def run_recipe(recipe: str, work_dir: Path, data, device: torch.device, args) -> list[dict]:
    """Build a recipe's run (a fresh run folder for minidiff's, its config changed by ``--set``) and race it."""
    if recipe == "diffusers":
        return race(recipe, DiffusersRun(data, device, args.minutes * 60), args)
    run_dir = work_dir / recipe
    if (run_dir / "checkpoint.safetensors").exists():
        raise ValueError(f"--work-dir {work_dir} already holds a checkpoint in {run_dir}; resuming it would start "
                         "the clock late. Give an empty --work-dir (or none: a temporary folder)")
    return race(recipe_label(recipe, args.overrides), MinidiffRun(args.configs[recipe], run_dir, data, device), args)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    p.add_argument("--minutes", type=float, default=60.0, help="training budget of each recipe (wall clock)")
    p.add_argument("--eval-every-min", type=float, default=5.0, help="minutes of training between evaluations")
    p.add_argument("--threshold", type=float, default=0.9, help="class accuracy that counts as reached")
    p.add_argument("--also", type=float, nargs="*", default=[0.8], help="lower accuracies whose times the table "
                   "also reads off the same evaluations (the race stops only at --threshold)")
    p.add_argument("--from-json", default=None, help="print the table of a saved --out JSON (no training)")
    p.add_argument("--n", type=int, default=300, help="samples per evaluation")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: minidiff.utils.get_device())")
    p.add_argument("--work-dir", default=None, help="run folders of the minidiff recipes (default: a temporary one)")
    p.add_argument("--out", default=None, help="write settings, evaluations and summaries as JSON here")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="change TrainConfig fields of the "
                   "minidiff recipes (an ablation; the row is named after them), e.g. t_sampling=logit_normal")
    args = p.parse_args(argv)
    args.overrides = parse_set(args.set)
    if args.overrides and "diffusers" in args.recipes:
        raise ValueError("--set changes minidiff's recipes only; run diffusers without it")
    # built once, here: a bad field or value fails now, not after an hour of training
    args.configs = {r: recipe_config(r, args.overrides) for r in args.recipes if r in CARDS}
    if args.minutes <= 0 or args.eval_every_min <= 0:
        raise ValueError(f"--minutes and --eval-every-min must be > 0, got {args.minutes} and {args.eval_every_min}")
    if args.from_json:
        saved, per_recipe = json.loads(Path(args.from_json).read_text()), {}
        budget = saved["settings"]["minutes"]
        for row in saved["evaluations"]:
            per_recipe.setdefault(row["recipe"], []).append(row)
        summaries = [summarize(r, args.threshold, budget, tuple(args.also)) for r in per_recipe.values()]
        n = saved["settings"].get("n")
        real = real_class_accuracy("fashion-mnist", n) if n else None
        print(table(summaries, args.threshold, real))
        return {**saved, "summaries": summaries, "real_accuracy": real}
    if args.threads:
        torch.set_num_threads(args.threads)
    device = get_device(args.device)
    data = load_dataset("fashion-mnist", "train")
    rows = []
    with tempfile.TemporaryDirectory(prefix="time_to_quality_") as tmp:
        work_dir = Path(args.work_dir) if args.work_dir else Path(tmp)
        for recipe in args.recipes:
            rows.append(run_recipe(recipe, work_dir, data, device, args))
    summaries = [summarize(r, args.threshold, args.minutes, tuple(args.also)) for r in rows]
    real = real_class_accuracy("fashion-mnist", args.n)
    print(table(summaries, args.threshold, real))
    configs = {k: asdict(c) for k, c in args.configs.items()}  # replaces vars(args)'s TrainConfig objects
    result = {"settings": {**vars(args), "sampler": "dpmpp_2m", "steps": 20, "spacing": "trailing", "guidance": 1.0,
                           "seed": 0, "batch_size": BATCH_SIZE, "configs": configs},
              "hardware": hardware_info(device), "data_stand_in": data.stand_in,
              "evaluations": [row for r in rows for row in r], "summaries": summaries,
              "real_accuracy": real}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
