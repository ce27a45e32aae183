"""A tiny CLIP for the shapes world: contrastive image-text training with attribute-swapped hard negatives.

CLIP (Radford et al. 2021) trains an image encoder f and a text encoder g so that the cosine similarity of
matching (image, caption) pairs is high and of every other pair in the batch is low (InfoNCE, their Fig. 3):

    logits_ij = exp(tau) * <f(x_i), g(c_j)> / (|f(x_i)| |g(c_j)|),   L = (CE(logits, I) + CE(logits^T, I)) / 2

A batch of random captions rarely contains "a red circle" next to "a blue circle", so plain CLIP can match
images by bag of words and never learn which colour belongs to which shape (Yuksekgonul et al. 2023, "When and
why vision-language models behave like bags-of-words"; their fix, NegCLIP, is used here): each image also sees
one *hard negative* caption with one attribute changed or two attributes swapped between its objects.

| symbol | code name      | meaning                                         |
|--------|----------------|-------------------------------------------------|
| f, g   | ``image_embed``, ``text_embed`` | unit-norm embeddings (B, E)     |
| tau    | ``logit_scale``| log inverse temperature, learned (init log 1/0.07) |

The frozen text tower conditions a U-Net the way Stable Diffusion uses CLIP's: per-token hidden states
(``clip.text_encoder()``). ``clip_score`` is 100 * max(cos, 0) (Hessel et al. 2021 with w = 100, as torchmetrics).
"""
from __future__ import annotations

import copy
import json
import math
import shlex
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from minidiff.data.shapes import COLORS, HELD_OUT, SHAPES, SIZES, ShapesDataset, caption, held_out_mask, make_shapes
from minidiff.data.tokenizer import EOS, Tokenizer
from minidiff.files import WEIGHTS_DIR, file_sha256, hardware_info, read_safetensors, write_safetensors
from minidiff.models.text_encoder import TransformerTextEncoder
from minidiff.utils import resolve_device

__all__ = ["CLIPConfig", "TinyCLIP", "hard_negative", "clip_loss", "train_clip", "clip_score", "save_clip",
           "load_clip", "evaluate_clip", "train_shapes_clip", "CLIP_FORMAT"]

CLIP_FORMAT = "minidiff-clip-v1"


@dataclass(frozen=True, kw_only=True)
class CLIPConfig:
    """Sizes of the tiny CLIP: a 4-stage CNN on 32x32 images and a causal text transformer (CLIP's text tower)."""
    dim: int = 128  # text width = the context_dim it gives a U-Net
    layers: int = 2
    heads: int = 4
    embed_dim: int = 128  # joint embedding E
    widths: tuple = (32, 64, 128, 128)
    image_size: int = 32


class TinyCLIP(nn.Module):
    """Image CNN + causal text transformer, both projected to a joint unit sphere (Radford et al. 2021, Sec. 2.3)."""

    def __init__(self, config: CLIPConfig = CLIPConfig(), tokenizer: Tokenizer | None = None):
        super().__init__()
        self.config = c = config
        layers, cin = [], 3
        for k, w in enumerate(c.widths):  # 32 -> 16 -> 8 -> 4: position survives in the flattened 4x4 map
            layers += [nn.Conv2d(cin, w, 3, stride=1 if k == 0 else 2, padding=1), nn.GroupNorm(8, w), nn.SiLU()]
            cin = w
        self.cnn = nn.Sequential(*layers)
        side = c.image_size // 2 ** (len(c.widths) - 1)
        self.image_proj = nn.Linear(cin * side * side, c.embed_dim)
        self.text = TransformerTextEncoder(tokenizer, dim=c.dim, layers=c.layers, heads=c.heads, causal=True)
        self.text_proj = nn.Linear(c.dim, c.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def image_embed(self, images: torch.Tensor) -> torch.Tensor:
        """Unit embeddings (B, E) of images (B, 3, H, W) in [-1, 1], average-pooled to ``image_size`` first."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) in [-1, 1], got {tuple(images.shape)}")
        s = self.config.image_size
        if images.shape[-1] != s:
            if images.shape[-1] % s or images.shape[-2] != images.shape[-1]:
                raise ValueError(f"images must be square with a side that is a multiple of {s}, got {tuple(images.shape)}")
            images = F.avg_pool2d(images, images.shape[-1] // s)
        return F.normalize(self.image_proj(self.cnn(images).flatten(1)), dim=-1)

    def text_embed(self, prompts) -> torch.Tensor:
        """Unit embeddings (B, E) of prompts: the causal transformer's state at <eos> (CLIP's pooling)."""
        ids, mask = self.text.tokenize(prompts)
        h, _ = self.text(ids, mask)  # (B, L, D)
        eos = (ids == EOS).int().argmax(1)  # (B,) position of <eos>
        return F.normalize(self.text_proj(h[torch.arange(len(ids)), eos]), dim=-1)

    def text_encoder(self, *, frozen: bool = True) -> TransformerTextEncoder:
        """A copy of the text tower whose per-token states (B, L, D) condition a U-Net (frozen by default)."""
        tower = copy.deepcopy(self.text)
        tower.requires_grad_(not frozen)
        return tower.eval() if frozen else tower


def hard_negative(attrs, *, generator: torch.Generator | None = None, exclude=None) -> str:
    """A caption that is wrong about exactly one thing: one attribute changed, or (two objects) the colours or
    shapes swapped between them, or the relation reversed ("above" -> "below"). ``exclude(attrs) -> bool`` refuses
    some negatives (training passes ``held_out_mask``: a held-out pair must not reach the text tower even as a
    wrong caption, or the encoder learns those words as "never true" before any model is tested on them)."""
    a = torch.as_tensor(attrs).clone()
    two = bool(a[3] >= 0)
    same = two and torch.equal(a[:3], a[3:6])  # two identical objects: reversing the relation describes the same scene
    kinds = ["shape", "color", "size"] + (["swap_color", "swap_shape"] if two else []) + (["relation"] if two and not same else [])
    while True:
        kind = kinds[int(torch.randint(len(kinds), (), generator=generator))]
        b = a.clone()
        if kind in ("shape", "color", "size"):
            slot = 3 * int(torch.randint(2 if two else 1, (), generator=generator))
            k, n = {"shape": (0, len(SHAPES)), "color": (1, len(COLORS)), "size": (2, len(SIZES))}[kind]
            b[slot + k] = (b[slot + k] + 1 + torch.randint(n - 1, (), generator=generator)) % n
        elif kind == "relation":
            b[6] = {0: 1, 1: 0, 2: 3, 3: 2}[int(b[6])]  # above <-> below, left of <-> right of
        else:
            k = 1 if kind == "swap_color" else 0
            b[k], b[3 + k] = a[3 + k], a[k]
        if caption(b) != caption(a) and not (exclude is not None and exclude(b)):
            return caption(b)


def clip_loss(model: TinyCLIP, images, captions, negatives=None) -> torch.Tensor:
    """Symmetric InfoNCE (Radford et al. 2021, Fig. 3); ``negatives`` (one per image) join the image->text side."""
    f = model.image_embed(images)  # (B, E)
    g = model.text_embed(list(captions) + list(negatives or []))  # (B [+ B], E)
    logits = model.logit_scale.exp().clamp(max=100) * f @ g.T  # (B, B [+ B])
    target = torch.arange(len(f), device=f.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits[:, :len(f)].T, target)) / 2


def train_clip(images: torch.Tensor, attrs: torch.Tensor, *, steps: int = 3000, batch_size: int = 128,
               lr: float = 1e-3, seed: int = 0, config: CLIPConfig = CLIPConfig(), progress: bool = True,
               exclude_negative=None) -> TinyCLIP:
    """Train a TinyCLIP on (images (N, 3, H, W), attrs (N, 7)) with one hard negative per image (NegCLIP;
    ``exclude_negative``: ``hard_negative``'s ``exclude``)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = TinyCLIP(config)
    images = F.avg_pool2d(images, images.shape[-1] // config.image_size) if images.shape[-1] != config.image_size else images
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.05)
    bar = tqdm(range(steps), desc="tiny CLIP", disable=not progress)
    for _ in bar:
        idx = torch.randint(len(images), (batch_size,), generator=g)
        caps = [caption(a) for a in attrs[idx]]
        negs = [hard_negative(a, generator=g, exclude=exclude_negative) for a in attrs[idx]]
        loss = clip_loss(model, images[idx], caps, negs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


@torch.no_grad()
def clip_score(model: TinyCLIP, images: torch.Tensor, prompts) -> torch.Tensor:
    """CLIP score per (image, prompt) pair, 100 * max(cos, 0) (Hessel et al. 2021, Eq. 1 with w = 100): (B,)."""
    if len(images) != len(prompts):
        raise ValueError(f"need one prompt per image, got {len(images)} images and {len(prompts)} prompts")
    return 100 * (model.image_embed(images) * model.text_embed(list(prompts))).sum(-1).clamp(min=0)


@torch.no_grad()
def evaluate_clip(model: TinyCLIP, *, n: int = 1000, seed: int = 6) -> dict:
    """On ``n`` fresh scenes: how often the true caption beats one hard negative (all, seen, held-out pairs), top-1
    retrieval among 100 captions, and the CLIP score of matched vs mismatched pairs."""
    images, captions, attrs = make_shapes(n, size=64, seed=seed)
    g = torch.Generator().manual_seed(seed)
    f, g_true = model.image_embed(images), model.text_embed(captions)
    g_neg = model.text_embed([hard_negative(a, generator=g) for a in attrs])
    wins, held = (f * g_true).sum(-1) > (f * g_neg).sum(-1), held_out_mask(attrs)
    k = min(100, n)
    return {"n": n, "hard_negative_accuracy": round(float(wins.float().mean()), 4),
            "hard_negative_accuracy_seen": round(float(wins[~held].float().mean()), 4),
            "hard_negative_accuracy_held_out": round(float(wins[held].float().mean()), 4),
            "top1_retrieval_of_100": round(float(((f[:k] @ g_true[:k].T).argmax(1) == torch.arange(k)).float().mean()), 4),
            "clip_score_matched": round(float(clip_score(model, images[:k], captions[:k]).mean()), 2),
            "clip_score_mismatched": round(float(clip_score(model, images[:k], captions[k:2 * k] or captions[:k][::-1]).mean()), 2)}


def save_clip(path, model: TinyCLIP, *, card: dict | None = None) -> Path:
    """Weights + config + vocabulary as safetensors; ``card`` (optional) beside it as JSON."""
    spec = {"clip": asdict(model.config), "vocabulary": list(model.text.tokenizer.vocabulary[4:]),
            "max_length": model.text.tokenizer.max_length}
    write_safetensors(path, {k: v.contiguous() for k, v in model.state_dict().items()},
                      {"format": CLIP_FORMAT, "spec": json.dumps(spec)})
    if card is not None:
        Path(path).with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")
    return Path(path)


def load_clip(name_or_path: str = "shapes-clip", *, device=None) -> TinyCLIP:
    """The shipped tiny CLIP (``"shapes-clip"`` in minidiff/weights) or one saved by ``save_clip``, in eval mode."""
    path = Path(name_or_path)
    if path.suffix != ".safetensors":
        path = WEIGHTS_DIR / f"{name_or_path}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no tiny CLIP at {path}; train one with `python -m minidiff.eval.text train-clip`")
    tensors, meta = read_safetensors(path, expect_format=CLIP_FORMAT)
    spec = json.loads(meta["spec"])
    config = CLIPConfig(**{**spec["clip"], "widths": tuple(spec["clip"]["widths"])})
    model = TinyCLIP(config, Tokenizer(spec["vocabulary"], max_length=spec["max_length"]))
    model.load_state_dict(tensors)
    return model.to(resolve_device(device)).eval()


def train_shapes_clip(out=None, *, steps: int = 3000, n: int = 20_000, seed: int = 5, argv=()) -> Path:
    """Train the shipped tiny CLIP on ``n`` scenes without held-out pairs and save it with its card."""
    images, _, attrs = ShapesDataset(n, size=64, seed=seed, max_objects=2).tensors()
    keep = ~held_out_mask(attrs)
    t0 = time.perf_counter()
    model = train_clip(images[keep], attrs[keep], steps=steps,
                       exclude_negative=lambda b: bool(held_out_mask(b[None])))  # held-out pairs: never even as text
    out = Path(out) if out else WEIGHTS_DIR / "shapes-clip.safetensors"
    card = {"name": out.stem, "kind": "tiny CLIP (Radford et al. 2021) with NegCLIP hard negatives",
            "data": f"ShapesDataset({n}, size=64, seed={seed}, max_objects=2) minus held-out pairs {HELD_OUT}, "
                    "average-pooled to 32x32; no hard negative holds a held-out pair",
            "n_train": int(keep.sum()), "steps": steps, "batch_size": 128,
            "params": sum(p.numel() for p in model.parameters()), "train_wall_time_s": round(time.perf_counter() - t0, 1),
            "hardware": hardware_info(torch.device("cpu")),
            "command": "python -m minidiff.training.text " + shlex.join(["train-clip", *argv[1:]])}
    save_clip(out, model)
    card.update(metrics=evaluate_clip(model), sha256=file_sha256(out))
    out.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")
    return out
