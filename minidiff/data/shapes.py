"""A procedural, captioned RGB dataset: coloured shapes on a dark background, generated on the fly.

Each image holds one or two objects. An object is (shape, color, size); two objects are joined by a
spatial relation that is geometrically true in the picture. Captions follow one small grammar, so a
text encoder (or ``parse_caption``) can read them back:

    caption  := object [relation object]
    object   := "a" SIZE COLOR SHAPE              e.g. "a small red circle"
    relation := "above" | "below" | "left of" | "right of"

    "a large blue square above a small yellow triangle"  (the square's centre is higher in the image)

Attributes are a fixed-size int64 tensor, one entry per classifier head (-1 where absent):

    attrs = (shape1, color1, size1, shape2, color2, size2, relation)

Geometry: coordinates are fractions of the image side, x to the right, y downwards (image rows).
An object of radius r lies inside the square [cx - r, cx + r] x [cy - r, cy + r]; two objects are
separated along the relation's axis by a gap, so they never overlap and "above" means "entirely above".
Edges are anti-aliased from signed distance functions: pixel coverage = clamp(0.5 - distance_in_pixels, 0, 1).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "SHAPES", "COLORS", "SIZES", "RELATIONS", "ATTR_NAMES", "WORDS", "COLOR_RGB", "SIZE_RADIUS",
    "caption", "parse_caption", "sample_attrs", "sample_layout", "render", "render_layout", "object_box_mask",
    "make_shapes", "ShapesDataset", "HELD_OUT", "held_out_mask", "two_object_weights",
]

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLORS = ("red", "green", "blue", "yellow", "purple", "white")
SIZES = ("small", "large")
RELATIONS = ("above", "below", "left of", "right of")
ATTR_NAMES = ("shape1", "color1", "size1", "shape2", "color2", "size2", "relation")
WORDS = ("a", *SIZES, *COLORS, *SHAPES, "above", "below", "left", "right", "of")  # the whole vocabulary

COLOR_RGB = torch.tensor([  # in [0, 1]; far apart so that a small CNN can tell them apart
    [0.92, 0.16, 0.14],  # red
    [0.18, 0.80, 0.22],  # green
    [0.20, 0.38, 0.96],  # blue
    [0.96, 0.88, 0.18],  # yellow
    [0.64, 0.24, 0.86],  # purple
    [0.95, 0.95, 0.95],  # white
])
BACKGROUND_RGB = torch.tensor([0.06, 0.06, 0.09])
SIZE_RADIUS = (0.12, 0.20)  # half-extent of a small / large object, as a fraction of the image side
_PAD = 0.03  # margin between an object and the image border
_GAP = 0.04  # minimum gap between the two objects along the relation's axis


# ---------------------------------------------------------------- captions

def _check_attrs(attrs) -> torch.Tensor:
    attrs = torch.as_tensor(attrs, dtype=torch.int64)
    if attrs.shape != (7,):
        raise ValueError(f"attrs must have shape (7,) = {ATTR_NAMES}, got {tuple(attrs.shape)}")
    values = attrs.tolist()
    limits = (len(SHAPES), len(COLORS), len(SIZES)) * 2 + (len(RELATIONS),)
    if values[3] == -1 and values[3:] != [-1] * 4:
        raise ValueError(f"attrs with no second object (shape2 = -1) must have -1 in {ATTR_NAMES[3:]}, got {values[3:]}")
    for k, (value, limit) in enumerate(zip(values, limits)):
        if not 0 <= value < limit and not (k >= 3 and values[3] == -1):
            raise ValueError(f"attrs[{k}] ({ATTR_NAMES[k]}) must be in 0..{limit - 1}, got {value}")
    return attrs


def caption(attrs) -> str:
    """The caption of an attribute vector, e.g. "a large blue square above a small yellow triangle"."""
    a = _check_attrs(attrs).tolist()
    text = f"a {SIZES[a[2]]} {COLORS[a[1]]} {SHAPES[a[0]]}"
    if a[3] >= 0:
        text += f" {RELATIONS[a[6]]} a {SIZES[a[5]]} {COLORS[a[4]]} {SHAPES[a[3]]}"
    return text


def _expect(words: list[str], pos: int, vocab: tuple, what: str, text: str) -> int:
    got = words[pos] if pos < len(words) else "<end of caption>"
    if got not in vocab:
        raise ValueError(f"cannot parse caption {text!r}: word {pos + 1} should be {what} from {vocab}, got {got!r}")
    return vocab.index(got)


def _parse_object(words: list[str], pos: int, text: str) -> list[int]:
    _expect(words, pos, ("a",), "the article", text)
    size = _expect(words, pos + 1, SIZES, "a size", text)
    color = _expect(words, pos + 2, COLORS, "a color", text)
    shape = _expect(words, pos + 3, SHAPES, "a shape", text)
    return [shape, color, size]


def parse_caption(text: str) -> torch.Tensor:
    """Inverse of ``caption``: text -> attrs int64 (7,); ValueError naming the first word that does not fit."""
    words = text.strip().lower().split()
    first = _parse_object(words, 0, text)
    if len(words) == 4:
        return torch.tensor(first + [-1, -1, -1, -1], dtype=torch.int64)
    if words[4] in ("left", "right"):
        _expect(words, 5, ("of",), "'of'", text)
        phrase, pos = f"{words[4]} of", 6
    else:
        phrase, pos = words[4], 5
    if phrase not in RELATIONS:
        raise ValueError(f"cannot parse caption {text!r}: word 5 should be a relation from {RELATIONS}, got {words[4]!r}")
    second = _parse_object(words, pos, text)
    if len(words) > pos + 4:
        raise ValueError(f"cannot parse caption {text!r}: unexpected word {words[pos + 4]!r} after the second object")
    return torch.tensor(first + second + [RELATIONS.index(phrase)], dtype=torch.int64)


# ---------------------------------------------------------------- sampling attributes and positions

def sample_attrs(*, max_objects: int = 2, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniformly random attrs (7,): one or two objects (up to ``max_objects``), each shape/color/size uniform."""
    if max_objects not in (1, 2):
        raise ValueError(f"max_objects must be 1 or 2, got {max_objects}")
    def pick(n: int) -> int:
        return int(torch.randint(n, (), generator=generator))
    n_objects = 1 + pick(max_objects)
    attrs = [pick(len(SHAPES)), pick(len(COLORS)), pick(len(SIZES))]
    if n_objects == 1:
        return torch.tensor(attrs + [-1, -1, -1, -1], dtype=torch.int64)
    attrs += [pick(len(SHAPES)), pick(len(COLORS)), pick(len(SIZES)), pick(len(RELATIONS))]
    return torch.tensor(attrs, dtype=torch.int64)


HELD_OUT = (("red", "square"), ("green", "triangle"), ("blue", "circle"))  # 3 of the 30 (colour, shape) pairs


def held_out_mask(attrs: torch.Tensor) -> torch.Tensor:
    """(N,) bool: True where a scene holds a (colour, shape) pair of ``HELD_OUT`` in either slot (the pairs the
    text model never sees in training, to measure compositional generalisation)."""
    pairs = {(COLORS.index(c), SHAPES.index(s)) for c, s in HELD_OUT}
    attrs = torch.as_tensor(attrs)
    hit = torch.zeros(len(attrs), dtype=torch.bool)
    for color, shape in pairs:
        for slot in (0, 3):
            hit |= (attrs[:, slot] == shape) & (attrs[:, slot + 1] == color)
    return hit


def _uniform(low: float, high: float, generator) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))


def sample_layout(attrs, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Object centres (2, 2) as (x, y) fractions of the image side (NaN row for an absent second object)."""
    a = _check_attrs(attrs).tolist()
    r1 = SIZE_RADIUS[a[2]]
    centres = torch.full((2, 2), float("nan"), dtype=torch.float64)
    if a[3] < 0:
        centres[0] = torch.tensor([_uniform(r1 + _PAD, 1 - r1 - _PAD, generator) for _ in range(2)])
        return centres
    r2 = SIZE_RADIUS[a[5]]
    axis = 1 if RELATIONS[a[6]] in ("above", "below") else 0  # y for above/below, x for left/right
    first, second = (0, 1) if RELATIONS[a[6]] in ("above", "left of") else (1, 0)  # smaller coordinate first
    radius = (r1, r2)
    low = radius[first] + _PAD
    high = 1 - radius[second] - _PAD
    separation = r1 + r2 + _GAP
    c_first = _uniform(low, high - separation, generator)
    c_second = _uniform(c_first + separation, high, generator)
    centres[first, axis], centres[second, axis] = c_first, c_second
    for k, r in enumerate(radius):  # the other axis: anywhere inside the image
        centres[k, 1 - axis] = _uniform(r + _PAD, 1 - r - _PAD, generator)
    return centres


# ---------------------------------------------------------------- rendering (signed distance functions)

def _sdf_box(dx, dy, hx, hy):
    qx, qy = dx.abs() - hx, dy.abs() - hy
    outside = torch.sqrt(qx.clamp(min=0) ** 2 + qy.clamp(min=0) ** 2)
    return outside + torch.maximum(qx, qy).clamp(max=0)


def _sdf_triangle(dx, dy, r):
    """Equilateral triangle pointing up, circumradius r, inside the box of half-side r (Quilez's formula)."""
    k = math.sqrt(3.0)
    a = r * k / 2  # half the side length
    px = dx.abs() - a
    py = -dy + r / 4 + a / k  # flip y (image rows go down) and centre the triangle vertically in its box
    fold = px + k * py > 0
    px, py = torch.where(fold, (px - k * py) / 2, px), torch.where(fold, (-k * px - py) / 2, py)
    px = px - torch.minimum(torch.maximum(px, -2 * a), torch.zeros_like(px))
    return -torch.sqrt(px ** 2 + py ** 2) * torch.sign(py)


def _sdf(shape: str, dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Signed distance (negative inside) to a shape of radius r centred at the origin."""
    if shape == "circle":
        return torch.sqrt(dx ** 2 + dy ** 2) - 0.9 * r
    if shape == "square":
        return _sdf_box(dx, dy, 0.8 * r, 0.8 * r)
    if shape == "triangle":
        return _sdf_triangle(dx, dy, r)
    if shape == "diamond":
        return (dx.abs() + dy.abs() - r) / math.sqrt(2.0)
    if shape == "cross":
        return torch.minimum(_sdf_box(dx, dy, 0.95 * r, 0.32 * r), _sdf_box(dx, dy, 0.32 * r, 0.95 * r))
    raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")


def _render_batch(attrs: torch.Tensor, centres: torch.Tensor, size: int) -> torch.Tensor:
    """Render attrs (N, 7) at centres (N, 2, 2) into images (N, 3, size, size) in [-1, 1]."""
    n = attrs.shape[0]
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size  # pixel centres
    images = BACKGROUND_RGB.view(1, 3, 1, 1).expand(n, 3, size, size).clone()
    for obj in range(2):
        shape_ids, color_ids, size_ids = attrs[:, 3 * obj], attrs[:, 3 * obj + 1], attrs[:, 3 * obj + 2]
        for s, shape in enumerate(SHAPES):
            idx = (shape_ids == s).nonzero().flatten()
            if idx.numel() == 0:
                continue
            cx = centres[idx, obj, 0].float().view(-1, 1, 1)
            cy = centres[idx, obj, 1].float().view(-1, 1, 1)
            r = torch.tensor(SIZE_RADIUS, dtype=torch.float32)[size_ids[idx]].view(-1, 1, 1)
            dist = _sdf(shape, coords.view(1, 1, -1) - cx, coords.view(1, -1, 1) - cy, r)  # (n_s, H, W)
            alpha = (0.5 - dist * size).clamp(0, 1).unsqueeze(1)  # anti-aliased coverage (n_s, 1, H, W)
            color = COLOR_RGB[color_ids[idx]].view(-1, 3, 1, 1)
            images[idx] = images[idx] * (1 - alpha) + color * alpha
    return images * 2 - 1


def render_layout(attrs: torch.Tensor, centres: torch.Tensor, size: int = 64) -> torch.Tensor:
    """Render attrs (N, 7) at known centres (N, 2, 2) (``sample_layout``'s) as images (N, 3, size, size)."""
    return _render_batch(torch.as_tensor(attrs), torch.as_tensor(centres), _check_size(size))


def object_box_mask(attrs: torch.Tensor, centres: torch.Tensor, obj: torch.Tensor, size: int = 64, *,
                    pad: float = 0.02) -> torch.Tensor:
    """(N, 1, size, size) float masks, 1 on the box [c - r - pad, c + r + pad]^2 of object ``obj`` (N,) in {0, 1}."""
    attrs, centres, obj = torch.as_tensor(attrs), torch.as_tensor(centres), torch.as_tensor(obj)
    n = len(attrs)
    r = torch.tensor(SIZE_RADIUS, dtype=torch.float64)[attrs[torch.arange(n), 3 * obj + 2]] + pad  # (N,)
    c = centres[torch.arange(n), obj]  # (N, 2) as (x, y)
    coords = (torch.arange(size, dtype=torch.float64) + 0.5) / size
    inside_x = (coords[None] - c[:, :1]).abs() <= r[:, None]  # (N, W)
    inside_y = (coords[None] - c[:, 1:]).abs() <= r[:, None]  # (N, H)
    return (inside_y[:, :, None] & inside_x[:, None, :]).float()[:, None]


def _check_size(size: int) -> int:
    if not isinstance(size, int) or size < 16:
        raise ValueError(f"size must be an int >= 16 (e.g. 32 or 64), got {size!r}")
    return size


def render(attrs, size: int = 32, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Render one attribute vector (or a caption string) as an image (3, size, size) in [-1, 1]; positions are random."""
    if isinstance(attrs, str):
        attrs = parse_caption(attrs)
    attrs = _check_attrs(attrs)
    centres = sample_layout(attrs, generator=generator)
    return _render_batch(attrs[None], centres[None], _check_size(size))[0]


# ---------------------------------------------------------------- the dataset

def _item_generator(seed: int, i: int) -> torch.Generator:
    """A generator that depends only on (seed, i), so item i is the same whatever the access order."""
    state = np.random.SeedSequence([seed, i]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1]))


class ShapesDataset(Dataset):
    """``n`` captioned shape images, item i deterministic in (seed, i): (image (3, H, W), caption, attrs (7,))."""

    def __init__(self, n: int, *, size: int = 32, seed: int = 0, max_objects: int = 2):
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be an int >= 0, got {n!r}")
        if max_objects not in (1, 2):
            raise ValueError(f"max_objects must be 1 or 2, got {max_objects}")
        self.n, self.size, self.seed, self.max_objects = n, _check_size(size), int(seed), max_objects

    def __len__(self) -> int:
        return self.n

    def layout(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(attrs (7,), centres (2, 2)) of item i, without rendering."""
        if not -self.n <= i < self.n:
            raise IndexError(f"index must be in [-{self.n}, {self.n}), got {i}")
        g = _item_generator(self.seed, i % self.n)
        attrs = sample_attrs(max_objects=self.max_objects, generator=g)
        return attrs, sample_layout(attrs, generator=g)

    def __getitem__(self, i: int):
        attrs, centres = self.layout(int(i))
        image = _render_batch(attrs[None], centres[None], self.size)[0]
        return image, caption(attrs), attrs

    def tensors(self, *, chunk: int = 1024):
        """Everything at once: (images (N, 3, H, W), captions list[str], attrs (N, 7)); the fast path."""
        layouts = [self.layout(i) for i in range(self.n)]
        attrs = torch.stack([a for a, _ in layouts]) if layouts else torch.empty(0, 7, dtype=torch.int64)
        centres = torch.stack([c for _, c in layouts]) if layouts else torch.empty(0, 2, 2, dtype=torch.float64)
        images = [_render_batch(attrs[k:k + chunk], centres[k:k + chunk], self.size) for k in range(0, self.n, chunk)]
        images = torch.cat(images) if images else torch.empty(0, 3, self.size, self.size)
        return images, [caption(a) for a in attrs], attrs


def make_shapes(n: int, size: int = 32, seed: int = 0, *, max_objects: int = 2):
    """(images (N, 3, size, size) in [-1, 1], captions, attrs (N, 7)): ``ShapesDataset(...).tensors()``."""
    return ShapesDataset(n, size=size, seed=seed, max_objects=max_objects).tensors()


def two_object_weights(captions, share: float) -> torch.Tensor:
    """Sampling weights (N,) float64 over ``captions`` under which two-object ones make up ``share`` of the draws
    (``torch.multinomial(weights, B, replacement=True)``), one-object ones the rest, uniform within each group."""
    if not 0.0 < share < 1.0:
        raise ValueError(f"share must be in (0, 1), got {share}")
    two = torch.tensor([bool(parse_caption(c)[3] >= 0) for c in captions], dtype=torch.bool)
    if two.all() or not two.any():
        raise ValueError(f"share={share} needs both one- and two-object captions, got only "
                         f"{'two' if two.all() else 'one'}-object ones")
    return torch.where(two, share / two.sum(), (1 - share) / (~two).sum()).double()
