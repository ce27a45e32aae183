"""Image datasets for the course: MNIST, Fashion-MNIST and CIFAR-10 as in-memory tensors in [-1, 1].

``load_dataset(name, split)`` looks for the files on disk first, in this order:

1. ``root`` (argument), else ``$MINIDIFF_DATA``, else ``~/.cache/minidiff/data``, in the layouts
   ``root/``, ``root/<name>/`` and torchvision's ``root/FashionMNIST/raw/`` (IDX files, gzipped or not);
2. for Fashion-MNIST, where Debian's ``dataset-fashion-mnist`` package installs it
   (``/usr/share/datasets/fashion-mnist/``).

If nothing is found and ``download=True``, torchvision downloads the dataset into ``root``.
If that is impossible the error says what to install or where to put which files.
In smoke mode (``MINIDIFF_SMOKE=1``, offline CI) a missing dataset is not downloaded: it is replaced,
with a loud warning, by a small procedural stand-in of the same shape, dtype, range and number of
classes (``ImageDataset.stand_in`` is True). Without smoke mode missing data is always an error.
Decoded pixels are cached per process, so notebooks can call ``load_dataset`` as often as they like.
"""
from __future__ import annotations

import gzip
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from minidiff.utils import smoke_mode

__all__ = [
    "DATASETS", "SPLITS", "CLASS_NAMES", "TEMPLATES", "DEBIAN_FASHION_MNIST_DIR",
    "ImageDataset", "load_dataset", "default_root", "read_idx", "caption_for_label", "clear_cache",
]

DATASETS = ("mnist", "fashion-mnist", "cifar10")
SPLITS = ("train", "test")

CLASS_NAMES = {
    "mnist": ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9"),
    "fashion-mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                      "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer",
                "dog", "frog", "horse", "ship", "truck"),
}

DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

# IDX file names shared by MNIST and Fashion-MNIST (each may also end in .gz).
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_TORCHVISION_DIRS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"

# (name, split, root) -> (uint8 images (N, C, H, W), int64 labels (N,), source); float copies are made per call.
_CACHE: dict[tuple[str, str, str], tuple[torch.Tensor, torch.Tensor, str]] = {}  # + the source path


class ImageDataset(Dataset):
    """An in-memory labelled image dataset: ``.images`` float32 (N, C, H, W) in [-1, 1], ``.labels`` int64 (N,)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, class_names, name: str, *, stand_in: bool = False,
                 source: str | None = None):
        if images.ndim != 4 or labels.shape != images.shape[:1]:
            raise ValueError(f"images must be (N, C, H, W) and labels (N,), got {tuple(images.shape)} "
                             f"and {tuple(labels.shape)}")
        self.images = images
        self.labels = labels
        self.class_names = tuple(class_names)
        self.name = name
        self.stand_in = stand_in  # True when this is a smoke-mode substitute, not the real data
        self.source = source  # the file or folder the images were read from

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i):
        return self.images[i], self.labels[i]

    def __repr__(self) -> str:
        kind = ", stand-in" if self.stand_in else ""
        where = f", from {self.source}" if self.source else ""
        return (f"ImageDataset({self.name!r}, n={len(self)}, shape={tuple(self.images.shape[1:])}, "
                f"classes={len(self.class_names)}{kind}{where})")


def default_root() -> Path:
    """Where datasets are looked for and downloaded: ``$MINIDIFF_DATA`` or ``~/.cache/minidiff/data``."""
    env = os.environ.get("MINIDIFF_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "minidiff" / "data"


def clear_cache() -> None:
    """Forget the decoded datasets held in memory by this process."""
    _CACHE.clear()


def _check_args(name: str, split: str) -> None:
    if name not in DATASETS:
        raise ValueError(f"name must be one of {DATASETS}, got {name!r} "
                         "(the procedural 'shapes' dataset is minidiff.data.shapes.ShapesDataset)")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def load_dataset(name: str, split: str = "train", *, root=None, download: bool = True) -> ImageDataset:
    """Load MNIST, Fashion-MNIST or CIFAR-10 as an in-memory ``ImageDataset`` scaled to [-1, 1]."""
    _check_args(name, split)
    explicit_root = root is not None
    root = Path(root).expanduser() if explicit_root else default_root()
    key = (name, split, str(root))
    if key not in _CACHE:
        found = _load_local(name, split, root, explicit_root=explicit_root)
        if found is None and smoke_mode():
            return _stand_in(name, split, root)  # not cached: it warns on every call
        if found is None:
            found = (*_download_or_explain(name, split, root, download, explicit_root), str(root))
        _CACHE[key] = found
    images_u8, labels, source = _CACHE[key]
    images = images_u8.float().div_(127.5).sub_(1.0)  # uint8 [0, 255] -> float32 [-1, 1]
    return ImageDataset(images, labels.clone(), CLASS_NAMES[name], name, source=source)


def _download_or_explain(name: str, split: str, root: Path, download: bool, explicit_root: bool = False):
    """Download the dataset, or raise an error that says how to get it."""
    message = _missing_message(name, split, root, explicit_root)
    if not download:
        raise FileNotFoundError(message)
    try:
        return _download(name, split, root)
    except (OSError, RuntimeError) as err:  # no network, server down, disk full...
        raise FileNotFoundError(message + f"\nThe download failed with: {err!r}") from err


# ---------------------------------------------------------------- finding and reading files

def _idx_dirs(name: str, root: Path, *, explicit_root: bool = False) -> list[Path]:
    """Folders searched for IDX files: ``root`` and its usual subfolders, and Debian's folder for Fashion-MNIST
    unless the caller gave ``root=`` explicitly (an explicit root is honoured: nothing else is searched)."""
    dirs = [root, root / name, root / _TORCHVISION_DIRS[name] / "raw"]
    if name == "fashion-mnist" and not explicit_root:
        dirs.append(DEBIAN_FASHION_MNIST_DIR)
    return dirs


def _find_file(dirs: list[Path], stem: str) -> Path | None:
    for d in dirs:
        for candidate in (d / stem, d / f"{stem}.gz"):
            if candidate.is_file():
                return candidate
    return None


def read_idx(path) -> np.ndarray:
    """Read an IDX file (LeCun's MNIST format, optionally gzipped) of unsigned bytes into a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (EOFError, OSError, gzip.BadGzipFile) as err:
        raise ValueError(f"{path} is damaged ({type(err).__name__}: {err}); delete it and download the dataset "
                         "again (load_dataset downloads what is missing), or reinstall the Debian package") from err
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (magic bytes {data[:4]!r})")
    ndim = data[3]
    dims = tuple(int.from_bytes(data[4 + 4 * k: 8 + 4 * k], "big") for k in range(ndim))
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(dims)):
        raise ValueError(f"{path} is truncated: header says {dims}, found {len(data) - offset} bytes of data")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def _load_local(name: str, split: str, root: Path, *, explicit_root: bool = False):
    """(uint8 images (N, C, H, W), int64 labels) from files on disk, or None if they are not there."""
    if name == "cifar10":
        if not (root / _CIFAR_DIR).is_dir():
            return None
        try:
            return (*_load_cifar(root, split, download=False), str(root / _CIFAR_DIR))
        except (RuntimeError, OSError, EOFError, ValueError) as err:  # half-extracted or damaged batches
            raise ValueError(f"{root / _CIFAR_DIR} is incomplete or damaged ({type(err).__name__}: {err}); delete "
                             f"that folder and load again to download CIFAR-10, or extract {_CIFAR_URL} into "
                             f"{root} completely") from err
    dirs = _idx_dirs(name, root, explicit_root=explicit_root)
    image_file, label_file = (_find_file(dirs, stem) for stem in IDX_FILES[split])
    if image_file is None or label_file is None:
        return None
    images = torch.from_numpy(read_idx(image_file).copy()).unsqueeze(1)  # (N, 1, 28, 28)
    labels = torch.from_numpy(read_idx(label_file).astype(np.int64))
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{image_file} has {images.shape[0]} images but {label_file} has {labels.shape[0]} labels")
    return images, labels, str(image_file)


def _load_cifar(root: Path, split: str, download: bool):
    import torchvision  # imported lazily: MNIST-family loading does not need it

    ds = torchvision.datasets.CIFAR10(str(root), train=(split == "train"), download=download)
    images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()  # (N, 3, 32, 32)
    return images, torch.tensor(ds.targets, dtype=torch.int64)


def _download(name: str, split: str, root: Path):
    """Download through torchvision into ``root`` and return (uint8 images, labels)."""
    import torchvision

    root.mkdir(parents=True, exist_ok=True)
    if name == "cifar10":
        return _load_cifar(root, split, download=True)
    cls = {"mnist": torchvision.datasets.MNIST, "fashion-mnist": torchvision.datasets.FashionMNIST}[name]
    ds = cls(str(root), train=(split == "train"), download=True)
    return ds.data.unsqueeze(1).contiguous(), ds.targets.to(torch.int64)


def _missing_message(name: str, split: str, root: Path, explicit_root: bool = False) -> str:
    """Say exactly what to install, or which files to put where."""
    lines = [f"Dataset {name!r} ({split} split) was not found on this machine."]
    if name == "cifar10":
        lines.append(f"Looked for the folder {root / _CIFAR_DIR}. To fix, do one of:")
        lines.append(f"  - download {_CIFAR_URL} and extract it into {root} (giving {root / _CIFAR_DIR}/data_batch_1 ...);")
    else:
        files = ", ".join(f"{stem}.gz" for stem in IDX_FILES[split])
        dirs = ", ".join(str(d) for d in _idx_dirs(name, root, explicit_root=explicit_root))
        lines.append(f"Looked for {files} (gzipped or not) in: {dirs}. To fix, do one of:")
        if name == "fashion-mnist" and not explicit_root:
            lines.append("  - on Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist "
                         f"(installs the files into {DEBIAN_FASHION_MNIST_DIR});")
        lines.append(f"  - put {files} into {root};")
    lines.append("  - pass root=... or set $MINIDIFF_DATA to the folder that holds the files;")
    lines.append(f"  - with internet access, call load_dataset({name!r}, download=True) to download into {root}.")
    if not smoke_mode():
        lines.append("In CI, MINIDIFF_SMOKE=1 replaces a missing dataset by a small labelled stand-in.")
    return "\n".join(lines)


STAND_IN_SIZE = 512


def _stand_in(name: str, split: str, root: Path) -> ImageDataset:
    """Smoke-mode substitute: one-object shapes images, label = 2 * shape + size (10 classes), loudly announced."""
    from minidiff.data.shapes import make_shapes

    side, channels = (32, 3) if name == "cifar10" else (28, 1)
    seed = {"train": 0, "test": 1}[split]
    images, _, attrs = make_shapes(STAND_IN_SIZE, side, seed, max_objects=1)
    if channels == 1:  # luminance (ITU-R BT.601), computed in [0, 1] and mapped back to [-1, 1]
        weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        images = ((images * 0.5 + 0.5) * weights).sum(1, keepdim=True) * 2 - 1
    labels = attrs[:, 0] * 2 + attrs[:, 2]  # (shape, size) -> 0..9
    message = (f"minidiff: MINIDIFF_SMOKE is set and dataset {name!r} ({split}) is missing, so this is a STAND-IN: "
               f"{STAND_IN_SIZE} procedural shape images ({channels}x{side}x{side}, 10 classes, label = 2 * shape + size), "
               f"not {name} images.\n" + _missing_message(name, split, root))
    warnings.warn(message, UserWarning, stacklevel=3)  # point at the caller of load_dataset
    print(message)
    return ImageDataset(images.contiguous(), labels, CLASS_NAMES[name], name, stand_in=True)


# ---------------------------------------------------------------- captions

TEMPLATES = (
    "a photo of {}",
    "a picture of {}",
    "an image of {}",
    "a low-resolution photo of {}",
)
# The noun phrase for each class, with its article, so templates stay grammatical ("an airplane").
_PHRASES = {
    "mnist": tuple(f"the digit {w}" for w in
                   ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")),
    "fashion-mnist": ("a t-shirt", "a pair of trousers", "a pullover", "a dress", "a coat",
                      "a sandal", "a shirt", "a sneaker", "a bag", "an ankle boot"),
    "cifar10": ("an airplane", "an automobile", "a bird", "a cat", "a deer",
                "a dog", "a frog", "a horse", "a ship", "a truck"),
}


def caption_for_label(dataset_name: str, label, *, template=None) -> str:
    """Turn a class label into text, e.g. ("fashion-mnist", 7) -> "a photo of a sneaker"."""
    if dataset_name not in CLASS_NAMES:
        raise ValueError(f"dataset_name must be one of {tuple(CLASS_NAMES)}, got {dataset_name!r}")
    label = int(label)
    n_classes = len(CLASS_NAMES[dataset_name])
    if not 0 <= label < n_classes:
        raise ValueError(f"label must be in 0..{n_classes - 1} for {dataset_name!r}, got {label}")
    if template is None:
        template = TEMPLATES[0]
    elif isinstance(template, int):
        if not 0 <= template < len(TEMPLATES):
            raise ValueError(f"template index must be in 0..{len(TEMPLATES) - 1}, got {template}")
        template = TEMPLATES[template]
    elif "{}" not in template:
        raise ValueError(f"template must contain '{{}}' where the class phrase goes, got {template!r}")
    return template.format(_PHRASES[dataset_name][label])
