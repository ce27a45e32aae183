"""Training the course's text-to-image model: latent diffusion with a text encoder trained jointly with the U-Net.

    python -m minidiff.training.text train --out runs/shapes64-text --attn-pos --lr-schedule cosine \
        --two-object-share 0.6 --steps 12000 --threads 1
    python -m minidiff.training.text export runs/shapes64-text minidiff/weights/shapes64-text.safetensors

The data are 64x64 shapes scenes with one or two objects and their captions ("a small red circle left of a large
blue cross"), encoded once by the course's autoencoder to 4x16x16 latents. Every (colour, shape) pair in
``HELD_OUT`` is left out of training, in any slot, so the evaluation can ask how well the model composes
attributes it has only seen apart. Captions are replaced by the empty prompt with probability ``p_uncond``
(caption dropout), which trains the unconditional branch of classifier-free guidance (Ho & Salimans 2022).
"""
from __future__ import annotations

import argparse
import copy
import json
import shlex
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from torchvision.utils import save_image
from tqdm.auto import tqdm

from minidiff.data.latents import cached_latents
from minidiff.data.shapes import HELD_OUT, ShapesDataset, caption, held_out_mask, two_object_weights
from minidiff.denoiser import Denoiser
from minidiff.files import hardware_info, read_metadata
from minidiff.guidance import caption_dropout
from minidiff.losses import diffusion_loss
from minidiff.models.clip import load_clip, train_shapes_clip  # noqa: F401  (train_shapes_clip: re-exported)
from minidiff.models.inpainting_net import (everything_masked, inpainting_condition, random_latent_masks,
                                            widen_for_inpainting)
from minidiff.models.text_encoder import PooledTextEncoder, TextConditionedNet, TransformerTextEncoder
from minidiff.models.unet import PRESETS, grow_unet, unet_from_preset
from minidiff.pipelines.text_to_image import text_to_image_latents
from minidiff.schedules import alphas_cumprod_from_betas, make_betas
from minidiff.training.checkpoint import (TEXT_MODEL_FORMAT, checkpoint_config, load_checkpoint, load_text_model,
                                          save_checkpoint, text_net_from_spec)
from minidiff.training.rundir import acquire_lock, check_out_dir, config_changes
from minidiff.training.steps import EMA, LR_SCHEDULES, _check_finite_step, make_optimizer
from minidiff.utils import command_line, get_device

__all__ = ["HELD_OUT", "ENCODERS", "ENCODER_INITS", "TextTrainConfig", "held_out_mask", "shapes64_text_latents",
           "build_text_net", "train_text", "train_shapes_clip", "SAMPLE_PROMPTS", "main"]

ENCODERS = ("joint", "pooled", "clip")
ENCODER_INITS = (None, "clip")  # random weights, or the tiny CLIP's text tower (contrastive pre-training)
SAMPLE_PROMPTS = ("a large red circle", "a small blue square", "a large yellow triangle", "a small white cross",
                  "a large green diamond", "a small purple circle", "a large red square", "a large blue circle",
                  "a small red circle above a large blue square", "a large yellow cross left of a small green circle",
                  "a small white diamond below a large purple triangle", "a large blue cross right of a small red diamond")


@dataclass
class TextTrainConfig:
    """Everything that defines a text-model run; saved as JSON in every checkpoint."""

    encoder: str = "joint"  # "joint" transformer, its "pooled" ablation, or a frozen tiny "clip"
    encoder_init: str | None = None  # "clip": the joint encoder starts as the tiny CLIP's text tower (then trained)
    encoder_lr_scale: float = 1.0  # the text encoder's lr as a multiple of lr (below 1: a pretrained tower kept close)
    encoder_layers: int = 2
    encoder_dim: int = 128
    prediction: str = "v"
    schedule: str = "cosine"
    T: int = 1000
    steps: int = 8000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 200
    lr_schedule: str = "constant"  # or "cosine": decayed to 0 at `steps` (steps.lr_factor)
    ema_decay: float = 0.999
    p_uncond: float = 0.1  # caption dropout; 0.5 is known to make a model ignore its prompts
    two_object_share: float | None = None  # share of two-object captions per batch (None: the data's, ~0.5)
    max_grad_norm: float = 1.0
    ckpt_every: int = 250
    sample_every: int = 1000
    sample_guidance: float = 3.0
    seed: int = 0
    unet: dict = field(default_factory=lambda: {"attn_levels": [1, 2]})  # overrides of the "tiny" preset; with
    # init, of the init model's U-Net, where only models.unet.GROWABLE options may differ (grow_unet)
    inpainting: bool = False  # widen the U-Net's input by mask + masked latent (models.inpainting_net)
    init: str | None = None  # start from this text model (save_text_model's file) instead of random weights

    RESUMABLE = ("steps", "ckpt_every", "sample_every", "sample_guidance")

    def __post_init__(self):
        if self.encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {list(ENCODERS)}, got {self.encoder!r}")
        for name in ("steps", "batch_size", "ckpt_every", "sample_every", "encoder_layers", "encoder_dim", "T"):
            if getattr(self, name) < (0 if name == "steps" else 1):
                raise ValueError(f"{name} must be >= {0 if name == 'steps' else 1}, got {getattr(self, name)}")
        if not self.encoder_lr_scale > 0:
            raise ValueError(f"encoder_lr_scale must be > 0, got {self.encoder_lr_scale}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {list(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if not 0.0 <= self.p_uncond <= 1.0:
            raise ValueError(f"p_uncond must be in [0, 1], got {self.p_uncond}")
        if self.two_object_share is not None and not 0.0 < self.two_object_share < 1.0:
            raise ValueError(f"two_object_share must be None or in (0, 1), got {self.two_object_share}")
        if self.encoder_init not in ENCODER_INITS or self.encoder_init and (self.encoder, self.init) != ("joint", None):
            raise ValueError(f"encoder_init must be one of {list(ENCODER_INITS)}, and 'clip' (the joint encoder of a new "
                             f"model started from the tiny CLIP) needs encoder='joint' and init=None; got encoder_init="
                             f"{self.encoder_init!r} with encoder={self.encoder!r}, init={self.init!r}")
        replace(PRESETS["tiny"], **self.unet)  # a bad override fails here, before any data is loaded
        if self.init is not None:  # the same: a wrong init file fails before the latents are made
            if not Path(self.init).is_file():
                raise ValueError(f"init must be a text model file (save_text_model's, e.g. "
                                 f"minidiff/weights/shapes64-text.safetensors), got {self.init!r}: no such file")
            if read_metadata(self.init).get("format") != TEXT_MODEL_FORMAT:
                raise ValueError(f"init {self.init!r} is not a text model file (format {TEXT_MODEL_FORMAT})")


def shapes64_text_latents(vae, *, n: int = 40_000, seed: int = 4, cache_dir=None, progress: bool = True):
    """(latents (M, 4, 16, 16), attrs (M, 7), captions): the scenes among ``ShapesDataset(n, size=64, seed)``
    (one or two objects) without a held-out pair, encoded once by ``vae`` and cached."""
    shapes = ShapesDataset(n, size=64, seed=seed, max_objects=2)
    attrs = torch.stack([shapes.layout(i)[0] for i in range(n)])
    keep = (~held_out_mask(attrs)).nonzero().flatten()

    def images():
        return torch.stack([shapes[int(i)][0] for i in tqdm(keep, desc="rendering", disable=not progress)])
    data_key = {"name": "shapes-text", "size": 64, "n": n, "seed": seed, "max_objects": 2, "held_out": HELD_OUT}
    latents, kept_attrs = cached_latents(vae, images, data_key, labels=attrs[keep], cache_dir=cache_dir,
                                         progress=progress)
    return latents, kept_attrs, [caption(a) for a in kept_attrs]


def build_text_net(config: TextTrainConfig, *, clip=None) -> TextConditionedNet:
    """The U-Net ("tiny" preset, 4 latent channels, cross-attention) behind the config's text encoder (or the
    model ``config.init`` names), widened to an ``InpaintingNet`` if ``config.inpainting``."""
    if config.init is not None:  # fine-tune a saved text model: its own U-Net and encoder
        net = load_text_model(config.init).net
        net = type(net)(grow_unet(net.unet, **config.unet), net.text_encoder)
        return widen_for_inpainting(net) if config.inpainting else net
    if "clip" in (config.encoder, config.encoder_init):  # the tiny CLIP's text tower: frozen, or trained on
        if clip is None:
            raise ValueError(f"{'encoder' if config.encoder == 'clip' else 'encoder_init'}='clip' needs a trained "
                             "tiny CLIP: build_text_net(config, clip=load_clip(...))")
        encoder = clip.text_encoder(frozen=config.encoder == "clip")
    else:
        encoder = TransformerTextEncoder(dim=config.encoder_dim, layers=config.encoder_layers)
        if config.encoder == "pooled":
            encoder = PooledTextEncoder(encoder)
    unet = unet_from_preset("tiny", **{"in_channels": 4, "out_channels": 4, "context_dim": encoder.dim,
                                      **config.unet})
    net = TextConditionedNet(unet, encoder)
    return widen_for_inpainting(net) if config.inpainting else net


@torch.no_grad()
def sample_prompts_grid(net, alphas_cumprod, config: TextTrainConfig, path, *, decode=None, prompts=SAMPLE_PROMPTS,
                        n_per_prompt: int = 4) -> torch.Tensor:
    """A PNG with one row per prompt (fixed seed), CFG at ``config.sample_guidance``."""
    prompts = [p for p in prompts for _ in range(n_per_prompt)]
    denoiser = Denoiser(net, alphas_cumprod, config.prediction, image_shape=(4, 16, 16))
    image_cond = everything_masked(len(prompts), (4, 16, 16)) if config.inpainting else None
    z = text_to_image_latents(denoiser, net.text_encoder.tokenizer, prompts, guidance=config.sample_guidance,
                              steps=20, generator=torch.Generator().manual_seed(config.seed), progress=False,
                              image_cond=image_cond)
    x = decode(z) if decode is not None else z[:, :3]
    save_image((x.float().cpu().clamp(-1, 1) + 1) / 2, path, nrow=n_per_prompt, padding=1)
    return x


def _setup(config: TextTrainConfig, device, clip, resume_from: Path | None = None) -> dict:
    torch.manual_seed(config.seed)
    resumed_fine_tune = resume_from is not None and config.init is not None  # its own net, not the init file's
    net = (text_net_from_spec({**checkpoint_config(resume_from), "inpainting": config.inpainting})
           if resumed_fine_tune else build_text_net(config, clip=clip)).to(device)
    # None keeps the two AdamW groups of older checkpoints, so they still resume
    scale = None if config.encoder_lr_scale == 1.0 else {"text_encoder": config.encoder_lr_scale}
    optimizer, scheduler = make_optimizer(net, lr=config.lr, warmup_steps=config.warmup, lr_scale=scale,
                                          lr_schedule=config.lr_schedule, total_steps=config.steps)
    gens = {"data": torch.Generator().manual_seed(config.seed), "noise": torch.Generator(device).manual_seed(config.seed + 1)}
    return {"net": net, "ema": EMA(net, config.ema_decay), "optimizer": optimizer, "scheduler": scheduler,
            "generators": gens, "alphas_cumprod": alphas_cumprod_from_betas(make_betas(config.schedule, config.T)),
            "start": 0, "losses": [], "sessions": []}


def _resume(path: Path, config: TextTrainConfig, run: dict) -> None:
    saved = checkpoint_config(path)["train"]
    diff = config_changes(saved, config)
    if diff:
        raise ValueError(f"cannot resume {path}: config differs from the checkpoint's (saved, given): {diff}")
    state = load_checkpoint(path, model=run["net"], ema=run["ema"], optimizer=run["optimizer"],
                            scheduler=run["scheduler"], generators=run["generators"])
    run["start"], run["sessions"] = state["step"], state["config"].get("sessions", [])
    run["losses"] = state["extra_tensors"]["loss"].tolist()


def _save(path: Path, config: TextTrainConfig, run: dict, step: int) -> None:
    run["sessions"][-1].update(end_step=step, wall_s=round(time.perf_counter() - run["t_start"], 1))
    meta = {"train": asdict(config), "unet": asdict(run["net"].unet.config), "encoder": run["net"].text_encoder.spec(),
            "sessions": run["sessions"]}
    save_checkpoint(path, model=run["net"], step=step, ema=run["ema"], optimizer=run["optimizer"],
                    scheduler=run["scheduler"], generators=run["generators"], config=meta,
                    extra_tensors={"loss": torch.tensor(run["losses"], dtype=torch.float64)})


def ema_net(run: dict) -> nn.Module:
    """A copy of the run's net holding the EMA weights, in eval mode."""
    return run["ema"].copy_to(copy.deepcopy(run["net"])).eval()


def train_text(config: TextTrainConfig, out_dir, *, latents: torch.Tensor, captions, resume: bool = False,
               device=None, decode=None, clip=None, progress: bool = True, command: str | None = None) -> dict:
    """Train as ``config`` says on (latents, captions); checkpoint in ``out_dir/checkpoint.safetensors``, sample
    grids in ``out_dir/samples``. Returns {"net", "ema_net", "alphas_cumprod", "losses", "step"}."""
    if len(latents) != len(captions) or len(latents) == 0:
        raise ValueError(f"latents and captions must be non-empty and of one length, got {len(latents)} and {len(captions)}")
    device = device if isinstance(device, torch.device) else get_device(device)
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    lock = acquire_lock(out_dir)
    try:
        ckpt = out_dir / "checkpoint.safetensors"
        resume_from = ckpt if resume and ckpt.exists() else None
        run = _setup(config, device, clip, resume_from)
        if resume_from is not None:
            _resume(resume_from, config, run)
        (out_dir / "samples").mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
        run["sessions"].append({"command": command, "hardware": hardware_info(device), "start_step": run["start"]})
        run["t_start"] = time.perf_counter()
        _loop(config, run, out_dir, latents, captions, device, decode, progress)
    finally:
        lock.unlink(missing_ok=True)
    return {"net": run["net"], "ema_net": ema_net(run), "alphas_cumprod": run["alphas_cumprod"],
            "losses": run["losses"], "step": max(run["start"], config.steps)}


def _loop(config, run, out_dir, latents, captions, device, decode, progress) -> None:
    """The training loop: batch, caption dropout, denoising loss, AdamW step, EMA, checkpoint, sample grid."""
    net, opt, sched = run["net"], run["optimizer"], run["scheduler"]
    tokens, token_mask = net.text_encoder.tokenizer(list(captions))  # (N, L) each, tokenized once
    empty = net.text_encoder.tokenizer([""])
    share = config.two_object_share
    weights = None if share is None else two_object_weights(captions, share)  # oversampling the harder scenes
    bar = tqdm(range(run["start"], config.steps), initial=run["start"], total=config.steps, disable=not progress)
    for step in bar:
        g = run["generators"]["data"]
        idx = torch.randint(len(latents), (config.batch_size,), generator=g) if weights is None else \
            torch.multinomial(weights, config.batch_size, replacement=True, generator=g)
        ids, mask = caption_dropout(tokens[idx], token_mask[idx], config.p_uncond, empty=empty,
                                    generator=run["generators"]["data"])
        z0 = latents[idx].to(device)
        image_cond = {} if not config.inpainting else inpainting_condition(
            z0, random_latent_masks(len(z0), z0.shape[-2:], generator=run["generators"]["data"]).to(device))
        net.train()
        loss = diffusion_loss(net, z0, run["alphas_cumprod"], config.prediction, generator=run["generators"]["noise"],
                              tokens=ids.to(device), token_mask=mask.to(device), **image_cond)
        _check_finite_step(loss.detach(), "loss", step, opt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), config.max_grad_norm)
        opt.step()
        sched.step()
        run["ema"].update(net)
        run["losses"].append(loss.item())
        done = step + 1
        if done % 10 == 0:
            bar.set_postfix(loss=f"{sum(run['losses'][-10:]) / 10:.4f}")
        if done % config.ckpt_every == 0 or done == config.steps:
            _save(out_dir / "checkpoint.safetensors", config, run, done)
        if done % config.sample_every == 0 or done == config.steps:
            sample_prompts_grid(ema_net(run), run["alphas_cumprod"], config,
                                out_dir / "samples" / f"step_{done:07d}.png", decode=decode)
    bar.close()


@command_line("python -m minidiff.training.text")
def main(argv=None) -> None:
    """``python -m minidiff.training.text train|export``: train or export the shipped text-to-image model."""
    argv = list(argv or [])
    parser = argparse.ArgumentParser(prog="python -m minidiff.training.text")
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train")
    tr.add_argument("--out", required=True)
    tr.add_argument("--vae", default="shapes64-vae", help="a shipped autoencoder (minidiff.pretrained.available())")
    tr.add_argument("--encoder", default="joint", choices=ENCODERS)
    tr.add_argument("--encoder-init", choices=["clip"], help="start the joint encoder as the tiny CLIP's text tower")
    tr.add_argument("--clip", default="shapes-clip", help="the tiny CLIP of --encoder clip / --encoder-init clip")
    tr.add_argument("--encoder-lr-scale", type=float, default=1.0, help="the text encoder's lr as a multiple of --lr")
    tr.add_argument("--steps", type=int, default=8000)
    tr.add_argument("--n", type=int, default=40_000, help="scenes generated before the held-out ones are removed")
    tr.add_argument("--resume", action="store_true")
    tr.add_argument("--inpainting", action="store_true", help="train the 9-channel inpainting model")
    tr.add_argument("--init", default=None, help="fine-tune this text model file (e.g. the shipped shapes64-text)")
    tr.add_argument("--lr", type=float, default=TextTrainConfig.lr)
    tr.add_argument("--warmup", type=int, default=TextTrainConfig.warmup)
    tr.add_argument("--lr-schedule", default=TextTrainConfig.lr_schedule, choices=LR_SCHEDULES,
                    help="constant after warmup, or a half cosine down to 0 at --steps")
    tr.add_argument("--two-object-share", type=float, default=None,
                    help="share of two-object captions in each batch (default: the data's, about 0.5)")
    tr.add_argument("--attn-pos", action="store_true",
                    help="a 2-D position code in the attention blocks (zero-initialised: an --init model gains it)")
    tr.add_argument("--attn-levels", type=int, nargs="+", default=None,
                    help="levels with attention (0: 16x16, 1: 8x8, 2: 4x4; default 1 2, or the --init model's, "
                    "which it can gain, each new block starting as the identity)")
    tr.add_argument("--threads", type=int, default=None)
    tr.add_argument("--device", default=None)
    cl = sub.add_parser("train-clip", help="train the tiny CLIP (frozen encoder option and the CLIP score)")
    cl.add_argument("--out", default=None, help="default: minidiff/weights/shapes-clip.safetensors")
    cl.add_argument("--steps", type=int, default=3000)
    cl.add_argument("--n", type=int, default=20_000)
    cl.add_argument("--threads", type=int, default=None)
    ex = sub.add_parser("export")
    ex.add_argument("run_dir")
    ex.add_argument("path")
    ex.add_argument("--n-eval", type=int, default=300, help="prompts per evaluation cell")
    ex.add_argument("--threads", type=int, default=None)
    ei = sub.add_parser("export-inpaint", help="export an --inpainting run with its editing card")
    ei.add_argument("run_dir")
    ei.add_argument("path")
    ei.add_argument("--n-eval", type=int, default=300, help="scenes in the replace problem")
    ei.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.command in ("export", "export-inpaint"):
        from minidiff.training import text_export  # imports this module: load it only when exporting
        export = text_export.export_text_model if args.command == "export" else text_export.export_inpainting_model
        print(f"exported {export(args.run_dir, args.path, n_eval=args.n_eval)}")
        return
    if args.command == "train-clip":
        print(f"wrote {train_shapes_clip(args.out, steps=args.steps, n=args.n, argv=argv)}")
        return
    from minidiff.pretrained import load
    vae = load(args.vae)
    clip = load_clip(args.clip) if "clip" in (args.encoder, args.encoder_init) else None
    latents, _, captions = shapes64_text_latents(vae, n=args.n)
    print(f"training on {len(latents)} captioned latents (held out: {HELD_OUT}) -> {args.out}/")
    unet = {"attn_pos": True} if args.attn_pos else {}
    if args.attn_levels or not args.init:  # with --init and no --attn-levels, the init model's levels stay
        unet["attn_levels"] = args.attn_levels or [1, 2]
    config = TextTrainConfig(encoder=args.encoder, encoder_init=args.encoder_init, steps=args.steps,
                             encoder_lr_scale=args.encoder_lr_scale, inpainting=args.inpainting, init=args.init,
                             lr=args.lr, warmup=args.warmup, lr_schedule=args.lr_schedule,
                             two_object_share=args.two_object_share, unet=unet)
    train_text(config, args.out, latents=latents, captions=captions,
               resume=args.resume, device=args.device, decode=vae.decode_latents, clip=clip,
               command="python -m minidiff.training.text " + shlex.join(argv))


if __name__ == "__main__":
    main()
