"""Small CNN classifiers shipped with the course: the feature space for FID/KID/precision-recall and the judges
of class accuracy and prompt adherence.

FID (Heusel et al. 2017) is usually computed in the pool3 features of an ImageNet Inception-v3. Those weights
cannot be downloaded everywhere and know nothing about 28x28 clothes, so minidiff ships one small classifier per
dataset ("classifier-FID", as in the Fashion-MNIST/MNIST diffusion literature): ``features(x)`` is its
penultimate layer, ``forward(x)`` its logits (a dict of heads for the multi-attribute "shapes" classifier).
Numbers in this feature space are comparable between runs of this course, not with published Inception FIDs.

Train one with ``python -m minidiff.eval.classifier_training train --dataset fashion-mnist`` (also ``shapes``, ``mnist``,
``cifar10``); it writes ``minidiff/weights/classifier-<dataset>.safetensors`` and a JSON model card beside it
(the recipe and the command are in ``minidiff.eval.classifier_training``).
``inception_features`` / ``inception_fid`` are an optional extra that needs torchvision's Inception download.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from minidiff.files import WEIGHTS_DIR, file_sha256, read_safetensors, write_safetensors
from minidiff.utils import resolve_device

__all__ = ["ClassifierConfig", "Classifier", "CONFIGS", "WEIGHTS_DIR", "build_classifier", "classifier_loss",
           "attrs_to_targets", "head_accuracy", "extract_features", "save_classifier", "load_classifier",
           "available_classifiers", "training_data", "inception_features", "inception_fid"]

FORMAT = "minidiff-classifier-v1"


@dataclass
class ClassifierConfig:
    """Architecture of one evaluator: conv stages (each conv-BN-ReLU, then 2x max-pool except the last)."""
    dataset: str = "fashion-mnist"
    in_channels: int = 1
    image_size: int = 28
    widths: tuple = (32, 64, 128)
    pool_size: int = 1          # adaptive average pool to (pool_size, pool_size) before the feature layer
    feature_dim: int = 128      # width of the penultimate layer = the FID feature space
    feature_scale: float = 1.0  # features() divides by this: RMS of the training features (set by calibrate)
    heads: dict = field(default_factory=lambda: {"label": 10})


def _shapes_heads() -> dict:
    """One head per attribute of minidiff.data.shapes, objects in canonical order (see ``attrs_to_targets``).

    Object 2 gets an extra last class 'absent'; the relation head has classes ("above", "left of", "absent").
    """
    from minidiff.data import shapes
    n_shape, n_color, n_size = len(shapes.SHAPES), len(shapes.COLORS), len(shapes.SIZES)
    return {"shape1": n_shape, "color1": n_color, "size1": n_size,
            "shape2": n_shape + 1, "color2": n_color + 1, "size2": n_size + 1, "relation": 3}


def attrs_to_targets(attrs: torch.Tensor, heads: dict) -> torch.Tensor:
    """Shapes attrs (N, 7) -> classifier targets (N, 7), the same picture always giving the same targets.

    "A below B" and "B above A" describe one image, so a pair whose relation is "below"/"right of" is rewritten
    with the objects swapped as "above"/"left of": object 1 is then the upper (or left) one. -1 ('absent')
    becomes the last class of its head. Relation targets: 0 = above, 1 = left of, 2 = absent.
    """
    from minidiff.data.shapes import RELATIONS
    assert RELATIONS == ("above", "below", "left of", "right of"), "update attrs_to_targets for new RELATIONS"
    attrs = torch.as_tensor(attrs, dtype=torch.int64)
    if attrs.ndim != 2 or attrs.shape[1] != 7:
        raise ValueError(f"attrs must be (N, 7) = (shape1, color1, size1, shape2, color2, size2, relation), "
                         f"got {tuple(attrs.shape)}")
    out = attrs.clone()
    swap = (attrs[:, 6] == 1) | (attrs[:, 6] == 3)  # below / right of
    out[swap, 0:3], out[swap, 3:6] = attrs[swap, 3:6], attrs[swap, 0:3]
    out[:, 6] = torch.where(attrs[:, 6] >= 2, 1, 0)  # above/below -> 0, left/right of -> 1
    absent = attrs[:, 3] < 0
    for j, n_classes in enumerate(heads.values()):
        out[absent & (j >= 3), j] = n_classes - 1
    return out


CONFIGS = {
    "fashion-mnist": lambda: ClassifierConfig(),
    "mnist": lambda: ClassifierConfig(dataset="mnist"),
    "cifar10": lambda: ClassifierConfig(dataset="cifar10", in_channels=3, image_size=32,
                                        widths=(32, 64, 128), pool_size=2),
    "shapes": lambda: ClassifierConfig(dataset="shapes", in_channels=3, image_size=32,
                                       widths=(32, 64, 96, 128), pool_size=2, heads=_shapes_heads()),
}


class Classifier(nn.Module):
    """A small CNN; ``features`` is the penultimate layer, ``forward`` the logits (dict when several heads)."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        layers, c_in = [], config.in_channels
        for i, width in enumerate(config.widths):
            layers += [nn.Conv2d(c_in, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
            if i < len(config.widths) - 1:
                layers.append(nn.MaxPool2d(2))
            c_in = width
        layers += [nn.AdaptiveAvgPool2d(config.pool_size), nn.Flatten()]
        self.trunk = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in * config.pool_size ** 2, config.feature_dim)
        self.heads = nn.ModuleDict({k: nn.Linear(config.feature_dim, n) for k, n in config.heads.items()})

    def _hidden(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        if x.ndim != 4 or x.shape[1:] != (c.in_channels, c.image_size, c.image_size):
            raise ValueError(f"x must be (B, {c.in_channels}, {c.image_size}, {c.image_size}) for the "
                             f"{c.dataset!r} classifier, got {tuple(x.shape)}")
        return F.relu(self.fc(self.trunk(x)))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features (B, feature_dim) of images x (B, C, H, W) in [-1, 1], scaled to unit RMS
        on the training data (KID's cubic kernel assumes features of order 1, as Inception's are)."""
        return self._hidden(x) / self.config.feature_scale

    def logits(self, x: torch.Tensor) -> dict:
        """Logits of every head, as a dict name -> (B, n_classes)."""
        h = self._hidden(x)
        return {k: head(h) for k, head in self.heads.items()}

    def forward(self, x: torch.Tensor):
        """Logits (B, n_classes) for a one-head classifier, else a dict of heads."""
        out = self.logits(x)
        return out["label"] if list(out) == ["label"] else out


def build_classifier(dataset: str) -> Classifier:
    """A freshly initialised evaluator for ``dataset``."""
    if dataset not in CONFIGS:
        raise ValueError(f"dataset must be one of {tuple(CONFIGS)}, got {dataset!r}")
    return Classifier(CONFIGS[dataset]())


def classifier_loss(model: Classifier, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum over heads of the cross-entropy; ``targets`` is int64 (B, n_heads) in head order."""
    logits = model.logits(x)
    return sum(F.cross_entropy(out, targets[:, j]) for j, out in enumerate(logits.values()))


@torch.no_grad()
def head_accuracy(model: Classifier, images: torch.Tensor, targets: torch.Tensor, *, batch_size: int = 500) -> dict:
    """Fraction of correct predictions per head (and 'all': every head right) on a labelled set."""
    model.eval()
    preds = torch.cat([torch.stack([o.argmax(1) for o in model.logits(xb).values()], 1)
                       for xb in images.split(batch_size)])
    correct = preds == targets
    acc = {name: float(correct[:, j].float().mean()) for j, name in enumerate(model.config.heads)}
    if len(acc) > 1:
        acc["all"] = float(correct.all(1).float().mean())
    return acc


@torch.no_grad()
def extract_features(model: Classifier, images: torch.Tensor, *, batch_size: int = 500) -> torch.Tensor:
    """Features (N, feature_dim) of an image tensor (N, C, H, W), computed in batches in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    return torch.cat([model.features(xb.to(device)).cpu() for xb in images.split(batch_size)])


def training_data(dataset: str, split: str, *, n: int | None = None, seed: int = 0):
    """(images, targets (N, n_heads)) for a dataset; for 'shapes', ``n`` fresh samples drawn with ``seed``."""
    if dataset == "shapes":
        from minidiff.data.shapes import make_shapes
        images, _, attrs = make_shapes(n or 5000, size=32, seed=seed)
        return images, attrs_to_targets(attrs, _shapes_heads())
    from minidiff.data.datasets import load_dataset
    ds = load_dataset(dataset, split)
    images, labels = ds.images, ds.labels
    if n is not None:
        images, labels = images[:n], labels[:n]
    return images, labels[:, None]


# ---------------------------------------------------------------- saving, loading, model cards

def _weights_path(name_or_path) -> Path:
    path = Path(name_or_path)
    if path.suffix == ".safetensors" or path.parent != Path("."):
        return path
    return WEIGHTS_DIR / f"classifier-{name_or_path}.safetensors"


def available_classifiers() -> list[str]:
    """Datasets with a shipped classifier in minidiff/weights/."""
    return sorted(p.stem.removeprefix("classifier-") for p in WEIGHTS_DIR.glob("classifier-*.safetensors"))


def save_classifier(model: Classifier, path, *, half: bool = True) -> Path:
    """Write the weights with safetensors (no pickle), float16 when ``half`` (half the size; loading casts
    back to float32); the config JSON goes in the metadata. Atomic, like every minidiff file."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    return write_safetensors(path, state, {"format": FORMAT, "config": json.dumps(asdict(model.config))})


def _read_classifier_file(path: Path) -> tuple[dict, dict]:
    """(tensors, metadata) of a classifier file, with the library's one reader (errors name the file)."""
    return read_safetensors(path, expect_format=FORMAT)


def _check_card(path: Path) -> None:
    """Compare the file with the SHA-256 in its model card, if it has one."""
    card = path.with_suffix(".json")
    if card.is_file():
        sha = json.loads(card.read_text()).get("sha256")
        if sha is not None and sha != file_sha256(path):
            raise ValueError(f"{path} does not match the SHA-256 in its model card {card.name}: "
                             "the file is corrupted or was replaced; retrain or reinstall it")


def load_classifier(name_or_path="fashion-mnist", *, device=None, check_card: bool = True) -> Classifier:
    """Load a shipped evaluator by dataset name ('fashion-mnist', 'shapes', ...) or from a .safetensors path.

    With ``check_card``, a model card beside the file must hold the file's SHA-256 (catches silent corruption).
    """
    path = _weights_path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"no classifier at {path} for name_or_path={str(name_or_path)!r}; shipped: "
                                f"{available_classifiers()}. Train one with "
                                f"`python -m minidiff.eval.classifier_training train --dataset <name>`")
    if check_card:
        _check_card(path)
    state, meta = _read_classifier_file(path)
    config = ClassifierConfig(**json.loads(meta["config"]))
    config.widths = tuple(config.widths)
    expected = path.stem.removeprefix("classifier-")
    if path.stem.startswith("classifier-") and expected in CONFIGS and expected != config.dataset:
        raise ValueError(f"{path.name} holds a classifier for dataset {config.dataset!r}, not {expected!r} "
                         "(was the file renamed?)")
    model = Classifier(config)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{path}: weights do not fit the architecture in its metadata: {err}") from err
    return model.to(resolve_device(device)).eval()


# ---------------------------------------------------------------- optional: Inception FID (needs a download)

def inception_features(images: torch.Tensor, *, batch_size: int = 50, device=None) -> torch.Tensor:
    """OPTIONAL. 2048-d pool features of torchvision's ImageNet Inception-v3 (Szegedy et al. 2016).

    Needs torchvision to download the weights (about 100 MB) on first use and raises RuntimeError if it cannot.
    This is torchvision's network, not the TF-FID one, so its FIDs are not comparable with published numbers.
    """
    from torchvision.models import Inception_V3_Weights, inception_v3
    try:
        net = inception_v3(weights=Inception_V3_Weights.IMAGENET1K_V1)
    except Exception as err:  # URLError, OSError, hash mismatch...: all mean "no weights here"
        raise RuntimeError("inception_features needs torchvision's Inception-v3 weights, which could not be "
                           f"downloaded ({err!r}); use the shipped classifier features (load_classifier) "
                           "instead, or put the weights into $TORCH_HOME/hub/checkpoints") from err
    net.fc = nn.Identity()
    net = net.to(resolve_device(device)).eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    feats = []
    with torch.no_grad():
        for xb in images.split(batch_size):
            xb = xb.expand(-1, 3, -1, -1) if xb.shape[1] == 1 else xb
            xb = F.interpolate((xb + 1) / 2, size=(299, 299), mode="bilinear", align_corners=False)
            feats.append(net(((xb - mean) / std).to(next(net.parameters()).device)).cpu())
    return torch.cat(feats)


def inception_fid(images_a: torch.Tensor, images_b: torch.Tensor, **kw) -> float:
    """OPTIONAL. Frechet distance in torchvision Inception-v3 features (needs the weights download)."""
    from minidiff.eval.metrics import frechet_distance_from_features
    return frechet_distance_from_features(inception_features(images_a, **kw), inception_features(images_b, **kw))
