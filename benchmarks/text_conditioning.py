"""Why per-token cross-attention matters for binding attributes: three text encoders, one training budget.

    python benchmarks/text_conditioning.py --steps 1200 --n-eval 200 --out docs/images/text_conditioning.json

On two cores, run the arms as separate processes (one thread each) and merge their JSON files:

    python benchmarks/text_conditioning.py --arms joint --out /tmp/joint.json   # and clip, pooled
    python benchmarks/text_conditioning.py --merge /tmp/joint.json /tmp/clip.json /tmp/pooled.json --out ...

Trains the course's text model three times on the same captioned latents with the same U-Net, steps, batch, seed
and data order, changing only what the U-Net cross-attends to:

- ``joint``: the small transformer trained jointly with the U-Net (per-token context, the shipped default);
- ``clip``: the frozen text tower of the shipped tiny CLIP (per-token context, as Stable Diffusion uses CLIP);
- ``clip-init`` (not in the default ``--arms``): the joint encoder started from that tower and trained on with the
  U-Net, so it arrives knowing the words and may still adapt them;
- ``pooled``: the joint transformer's tokens averaged into one vector (a single key: every pixel gets the same
  conditioning, like a class embedding).

Each model is judged by the shapes attribute classifier (``minidiff.eval.text.judge``) on one- and two-object
prompts of seen combinations, 20 DPM-Solver++(2M) steps at guidance 5, and the table prints per-slot and
all-correct rates with the judge's ceiling on real renders. It prints measured numbers; it asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from minidiff.denoiser import Denoiser
from minidiff.eval.text import judge, prompt_attrs, real_images, summarize, generate_for
from minidiff.models.clip import load_clip
from minidiff.pipelines import TextToImagePipeline
from minidiff.pretrained import load
from minidiff.training.steps import LR_SCHEDULES
from minidiff.training.text import TextTrainConfig, shapes64_text_latents, train_text

# What makes two runs comparable (--merge checks it), with the value a file written before a key existed had.
RECIPE = {"steps": None, "n_eval": None, "attn_pos": False, "lr_schedule": TextTrainConfig.lr_schedule,
          "two_object_share": TextTrainConfig.two_object_share}


def run_arm(encoder: str, steps: int, latents, captions, vae, clip, sets, attn_pos: bool = False, **train) -> dict:
    """Train one arm (``train``: further TextTrainConfig fields, the same for every arm) and judge it on ``sets``."""
    unet = {"attn_levels": [1, 2], **({"attn_pos": True} if attn_pos else {})}
    if encoder == "clip-init":  # the joint encoder, warm-started from the tiny CLIP's text tower
        encoder, train = "joint", {**train, "encoder_init": "clip"}
    config = TextTrainConfig(encoder=encoder, steps=steps, ckpt_every=steps, sample_every=10 ** 9, unet=unet, **train)
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        result = train_text(config, out, latents=latents, captions=captions, clip=clip, progress=True)
        wall = time.perf_counter() - t0
    denoiser = Denoiser(result["ema_net"], result["alphas_cumprod"], config.prediction, image_shape=(4, 16, 16))
    pipe = TextToImagePipeline(denoiser, vae)
    row = {"wall_s": round(wall, 1), "final_loss_avg100": round(sum(result["losses"][-100:]) / 100, 4)}
    for name, attrs in sets.items():
        row[name] = summarize(judge(generate_for(pipe, attrs, guidance=5.0), attrs))
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--n-eval", type=int, default=200, help="prompts per set (one object, two objects)")
    parser.add_argument("--arms", default="joint,clip,pooled")
    parser.add_argument("--attn-pos", action="store_true", help="give every arm's U-Net the 2-D position code "
                        "before attention (UNetConfig.attn_pos, as the shipped shapes64-text has)")
    parser.add_argument("--lr-schedule", default=TextTrainConfig.lr_schedule, choices=LR_SCHEDULES,
                        help="every arm's learning-rate schedule (the shipped model's recipe uses cosine)")
    parser.add_argument("--two-object-share", type=float, default=None, help="share of two-object captions per "
                        "batch for every arm (default: the data's, about 0.5; the shipped recipe uses 0.6)")
    parser.add_argument("--out", default=None, help="write the results as JSON here (and a .txt table beside it)")
    parser.add_argument("--merge", nargs="+", default=None, help="combine the JSON files of runs of one recipe "
                        f"({', '.join(RECIPE)}; one arm each) instead of training")
    args = parser.parse_args(argv)
    if args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.merge]
        if len({tuple(p.get(k, default) for k, default in RECIPE.items()) for p in parts}) != 1:
            raise SystemExit(f"--merge: the files differ in one of {', '.join(RECIPE)}; "
                             "only runs of one recipe compare")
        result = {**parts[0], "arms": {k: v for p in parts for k, v in p["arms"].items()},
                  "command": " ; ".join(p["command"] for p in parts)}
        return report(result, args.out)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    vae, clip = load("shapes64-vae"), load_clip("shapes-clip")
    latents, _, captions = shapes64_text_latents(vae)
    sets = {"1obj": prompt_attrs(args.n_eval, objects=1, split="seen", seed=100),
            "2obj": prompt_attrs(args.n_eval, objects=2, split="seen", seed=101)}
    ceiling = {k: summarize(judge(real_images(a, seed=1), a)) for k, a in sets.items()}
    train = {"lr_schedule": args.lr_schedule, "two_object_share": args.two_object_share}
    arms = {arm: run_arm(arm, args.steps, latents, captions, vae, clip, sets, args.attn_pos, **train)
            for arm in args.arms.split(",")}
    command = "python benchmarks/text_conditioning.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report({"steps": args.steps, "attn_pos": args.attn_pos, **train, "batch_size": TextTrainConfig().batch_size,
            "n_eval": args.n_eval, "guidance": 5.0, "sampler": "dpmpp_2m 20 steps", "ceiling": ceiling, "arms": arms,
            "command": command},
           args.out)


def report(result: dict, out) -> None:
    """Print the table of ``result`` (and write it as JSON + .txt when ``out`` is given)."""
    ceiling, arms, sets = result["ceiling"], result["arms"], list(result["ceiling"])
    pos = "with" if result.get("attn_pos") else "without"
    share = result.get("two_object_share")
    lr = result.get("lr_schedule", RECIPE["lr_schedule"])
    recipe = f"{lr} lr, " + ("the data's" if share is None else f"{share:g}")
    lines = [f"text conditioning, {result['steps']} training steps each (batch 64), U-Net {pos} attn_pos, "
             f"{recipe} two-object share, "
             f"{result['n_eval']} prompts per set, guidance 5, dpmpp_2m 20 steps; judge = shapes attribute classifier",
             f"{'arm':8s} {'set':5s} {'shape':>6s} {'color':>6s} {'size':>6s} {'relat.':>6s} {'ALL':>6s} {'train s':>8s}"]
    for arm, row in [("ceiling", {**ceiling, "wall_s": float("nan")}), *arms.items()]:
        for k in sets:
            s = row[k]
            lines.append(f"{arm:8s} {k:5s} {s['shape']:6.3f} {s['color']:6.3f} {s['size']:6.3f} {s['relation']:6.3f} "
                         f"{s['all']:6.3f} {row['wall_s']:8.0f}")
    print("\n".join(lines))
    if out:
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
        Path(out).with_suffix(".txt").write_text("\n".join(lines) + "\n" + result["command"] + "\n")


if __name__ == "__main__":
    main()
