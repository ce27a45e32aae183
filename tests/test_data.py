"""Tests for minidiff.data: real Fashion-MNIST from Debian's files, error messages, smoke stand-ins, captions."""
import gzip

import numpy as np
import pytest
import torch

from minidiff.data import datasets as data

needs_fashion = pytest.mark.skipif(
    not (data.DEBIAN_FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="needs Debian's dataset-fashion-mnist (sudo apt-get install dataset-fashion-mnist)",
)


@pytest.fixture
def empty_root(tmp_path, monkeypatch):
    """No data anywhere: an empty root and a Debian path that does not exist."""
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian")
    monkeypatch.delenv("MINIDIFF_SMOKE", raising=False)
    data.clear_cache()
    yield tmp_path / "empty"
    data.clear_cache()


@pytest.fixture
def default_root(tmp_path, monkeypatch):
    """$MINIDIFF_DATA points at an empty folder: without root=, Debian's folder is searched too."""
    monkeypatch.setenv("MINIDIFF_DATA", str(tmp_path))
    data.clear_cache()
    yield tmp_path
    data.clear_cache()


@needs_fashion
def test_fashion_mnist_from_debian_files(default_root):
    ds = data.load_dataset("fashion-mnist", "train", download=False)
    assert ds.images.shape == (60000, 1, 28, 28) and ds.images.dtype == torch.float32
    assert ds.labels.dtype == torch.int64 and len(ds) == 60000
    assert ds.images.min() == -1.0 and ds.images.max() == 1.0
    assert int(ds.labels.min()) == 0 and int(ds.labels.max()) == 9
    assert len(ds.class_names) == 10 and ds.name == "fashion-mnist" and not ds.stand_in
    image, label = ds[0]
    assert image.shape == (1, 28, 28) and int(label) == 9 and ds.class_names[9] == "Ankle boot"
    test = data.load_dataset("fashion-mnist", "test", download=False)
    assert test.images.shape == (10000, 1, 28, 28) and test.source.startswith(str(data.DEBIAN_FASHION_MNIST_DIR))


@needs_fashion
def test_cache_returns_fresh_tensors(default_root):
    a = data.load_dataset("fashion-mnist", "test", download=False)
    a.images.zero_()  # a notebook scribbling on its copy must not corrupt the next load
    b = data.load_dataset("fashion-mnist", "test", download=False)
    assert b.images.min() == -1.0 and b.images.max() == 1.0


def _write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_idx_files_under_root_plain_or_gz(tmp_path, empty_root):
    images = np.arange(3 * 28 * 28).reshape(3, 28, 28) % 256
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", images)  # plain
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([4, 0, 9]))  # gzipped
    ds = data.load_dataset("mnist", "test", root=tmp_path, download=False)
    assert ds.images.shape == (3, 1, 28, 28) and ds.labels.tolist() == [4, 0, 9]
    assert torch.allclose(ds.images[0, 0], torch.from_numpy(images[0]).float() / 127.5 - 1)


def test_truncated_idx_file_is_a_clear_error(tmp_path):
    path = tmp_path / "x-idx1-ubyte"
    path.write_bytes(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + b"abc")
    with pytest.raises(ValueError, match="truncated"):
        data.read_idx(path)


@pytest.mark.parametrize("name", ["fashion-mnist", "mnist", "cifar10"])
def test_missing_data_error_says_how_to_get_it(name, empty_root, monkeypatch):
    monkeypatch.setenv("MINIDIFF_DATA", str(empty_root))  # the default root, so Debian's folder is suggested too
    with pytest.raises(FileNotFoundError) as info:
        data.load_dataset(name, download=False)
    msg = str(info.value)
    assert str(empty_root) in msg and "download=True" in msg
    if name == "fashion-mnist":
        assert "sudo apt-get install dataset-fashion-mnist" in msg and "train-images-idx3-ubyte.gz" in msg
    if name == "cifar10":
        assert "cifar-10-python.tar.gz" in msg


def test_unknown_name_and_split_list_the_allowed_values():
    with pytest.raises(ValueError, match="'fashion-mnist'.*got 'imagenet'"):
        data.load_dataset("imagenet")
    with pytest.raises(ValueError, match="split must be one of.*got 'val'"):
        data.load_dataset("mnist", "val")


def test_caption_for_label():
    assert data.caption_for_label("fashion-mnist", 7) == "a photo of a sneaker"
    assert data.caption_for_label("fashion-mnist", 9, template=1) == "a picture of an ankle boot"
    assert data.caption_for_label("cifar10", torch.tensor(0)) == "a photo of an airplane"
    assert data.caption_for_label("mnist", 3, template="a drawing of {}") == "a drawing of the digit three"
    for name, names in data.CLASS_NAMES.items():
        captions = {data.caption_for_label(name, k) for k in range(len(names))}
        assert len(captions) == len(names)  # every class gets its own caption
    with pytest.raises(ValueError, match="label must be in 0..9.*got 10"):
        data.caption_for_label("cifar10", 10)
    with pytest.raises(ValueError, match="dataset_name must be one of"):
        data.caption_for_label("shapes", 0)


@pytest.mark.parametrize("name, shape", [("mnist", (1, 28, 28)), ("fashion-mnist", (1, 28, 28)),
                                         ("cifar10", (3, 32, 32))])
def test_smoke_mode_stand_in_warns_and_matches_shape(name, shape, empty_root, monkeypatch, capsys):
    monkeypatch.setenv("MINIDIFF_SMOKE", "1")
    monkeypatch.setattr(data, "_download", lambda *a: pytest.fail("smoke mode must not download"))
    with pytest.warns(UserWarning, match="STAND-IN"):
        ds = data.load_dataset(name, root=empty_root)
    assert "STAND-IN" in capsys.readouterr().out
    assert ds.stand_in and ds.name == name and len(ds) == data.STAND_IN_SIZE
    assert ds.images.shape == (data.STAND_IN_SIZE, *shape) and ds.images.dtype == torch.float32
    assert ds.images.min() >= -1 and ds.images.max() <= 1 and ds.images.std() > 0.1
    assert ds.labels.dtype == torch.int64 and set(ds.labels.tolist()) == set(range(10))
    assert len(ds.class_names) == 10
    with pytest.warns(UserWarning, match="STAND-IN"):  # every call warns, not only the first
        again = data.load_dataset(name, root=empty_root, download=False)
        test = data.load_dataset(name, "test", root=empty_root)
    assert torch.equal(again.images, ds.images)  # deterministic
    assert not torch.equal(test.images, ds.images)


def test_without_smoke_mode_missing_data_is_never_substituted(empty_root, monkeypatch):
    monkeypatch.setenv("MINIDIFF_SMOKE", "0")
    monkeypatch.setenv("MINIDIFF_DATA", str(empty_root))
    with pytest.raises(FileNotFoundError, match="sudo apt-get install dataset-fashion-mnist"):
        data.load_dataset("fashion-mnist", download=False)


def test_failed_download_says_how_to_get_the_data(empty_root, monkeypatch):
    def offline(*args):
        raise OSError("Name or service not known")
    monkeypatch.setattr(data, "_download", offline)
    with pytest.raises(FileNotFoundError, match="(?s)put train-images.*download failed.*Name or service") as info:
        data.load_dataset("mnist", root=empty_root)
    assert isinstance(info.value.__cause__, OSError)


@needs_fashion
def test_smoke_mode_still_uses_real_data_when_present(default_root, monkeypatch):
    monkeypatch.setenv("MINIDIFF_SMOKE", "1")
    ds = data.load_dataset("fashion-mnist", "test", download=False)
    assert not ds.stand_in and ds.images.shape == (10000, 1, 28, 28)


def test_half_extracted_cifar_names_the_folder_and_the_fix(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(b"\x80\x04 truncated")  # an interrupted extraction: one partial batch
    with pytest.raises(ValueError) as info:
        data.load_dataset("cifar10", root=tmp_path, download=False)
    msg = str(info.value)
    assert str(folder) in msg and "incomplete or damaged" in msg
    assert "delete that folder" in msg and "cifar-10-python.tar.gz" in msg
