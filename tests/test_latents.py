"""The latents cache: encoded once, bit-identical on reload, keyed by the autoencoder's tensors and the data, and a
file of another autoencoder or dataset is refused."""
import shutil

import pytest
import torch

from minidiff.data.latents import cache_path, cached_latents, encode_dataset, latent_dataset, load_latents, vae_hash
from minidiff.files import CheckpointError
from minidiff.models.vae import AutoencoderKL, VAEConfig

SMALL = VAEConfig(base_channels=8, channel_mults=(1, 2, 2))
KEY = {"name": "random", "n": 10, "seed": 0}


def _vae(seed=0):
    torch.manual_seed(seed)
    vae = AutoencoderKL(SMALL).eval()
    vae.scaling_factor.fill_(0.75)
    return vae


IMAGES = torch.rand(10, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
LABELS = torch.arange(10) % 3


class Images:
    """images_fn that counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return IMAGES


def test_encodes_once_then_reads_the_cache_bit_identically(tmp_path):
    vae, images_fn = _vae(), Images()
    first, labels = cached_latents(vae, images_fn, KEY, labels=LABELS.int(), cache_dir=tmp_path, progress=False)
    assert images_fn.calls == 1 and first.shape == (10, 4, 4, 4) and labels.dtype == torch.int64
    assert cache_path(vae, KEY, cache_dir=tmp_path).is_file()
    again, labels_again = cached_latents(vae, images_fn, KEY, labels=LABELS, cache_dir=tmp_path, progress=False)
    assert images_fn.calls == 1  # a hit does not build the dataset
    assert torch.equal(first, again) and torch.equal(labels, labels_again) and torch.equal(labels, LABELS)
    no_labels, none = cached_latents(vae, images_fn, {**KEY, "labels": False}, cache_dir=tmp_path, progress=False)
    assert none is None and torch.equal(no_labels, first) and images_fn.calls == 2


def test_mode_and_seeded_samples(tmp_path):
    vae = _vae()
    mode, _ = cached_latents(vae, Images(), KEY, cache_dir=tmp_path, progress=False)
    assert torch.equal(mode, vae.encode_latents(IMAGES))  # seed=None: the posterior mean, scaled
    a, _ = cached_latents(vae, Images(), KEY, seed=3, cache_dir=tmp_path, progress=False)
    assert not torch.equal(a, mode)
    assert torch.equal(a, vae.encode_latents(IMAGES, generator=torch.Generator().manual_seed(3)))
    assert torch.equal(a, encode_dataset(vae, IMAGES, seed=3, progress=False))  # seed=k: the same draws again
    assert not torch.equal(a, encode_dataset(vae, IMAGES, seed=4, progress=False))
    assert len({cache_path(vae, KEY, seed=s, cache_dir=tmp_path) for s in (None, 0, 3)}) == 3


def test_a_changed_autoencoder_gets_another_cache_file(tmp_path):
    vae = _vae()
    base = cache_path(vae, KEY, cache_dir=tmp_path)
    assert cache_path(_vae(), KEY, cache_dir=tmp_path) == base and vae_hash(vae) == vae_hash(_vae())
    perturbed = _vae()
    with torch.no_grad():
        perturbed.decoder[-1].bias[0] += 1e-6
    rescaled = _vae()
    rescaled.scaling_factor.fill_(0.7500001)
    assert cache_path(perturbed, KEY, cache_dir=tmp_path) != base
    assert cache_path(rescaled, KEY, cache_dir=tmp_path) != base
    assert cache_path(vae, {**KEY, "n": 11}, cache_dir=tmp_path) != base
    assert cache_path(vae, dict(reversed(KEY.items())), cache_dir=tmp_path) == base  # key order does not matter


def test_another_autoencoders_cache_file_is_refused(tmp_path):
    vae, other = _vae(), _vae(seed=1)
    cached_latents(other, Images(), KEY, cache_dir=tmp_path, progress=False)
    path = cache_path(vae, KEY, cache_dir=tmp_path)
    shutil.copy(cache_path(other, KEY, cache_dir=tmp_path), path)  # renamed into this autoencoder's place
    with pytest.raises(CheckpointError, match="holds latents of another autoencoder") as info:
        load_latents(path, vae, KEY)
    assert str(path) in str(info.value)
    images_fn = Images()
    with pytest.raises(CheckpointError, match="another autoencoder"):
        cached_latents(vae, images_fn, KEY, cache_dir=tmp_path, progress=False)
    assert images_fn.calls == 0


def test_another_datasets_cache_file_is_refused(tmp_path):
    vae = _vae()
    cached_latents(vae, Images(), KEY, cache_dir=tmp_path, progress=False)
    path = cache_path(vae, KEY, cache_dir=tmp_path)
    assert torch.equal(load_latents(path, vae, KEY)[0], vae.encode_latents(IMAGES))
    with pytest.raises(CheckpointError, match=r"holds latents of other data .*\"n\": 10.*not .*'n': 11"):
        load_latents(path, vae, {**KEY, "n": 11})
    with pytest.raises(CheckpointError, match=r"other data .*with seed=5"):
        load_latents(path, vae, KEY, seed=5)


@pytest.mark.parametrize("bad", [{"fn": len}, {"shape": {1, 2}}, {"t": torch.zeros(1)}])
def test_non_json_data_key_is_refused(tmp_path, bad):
    images_fn = Images()
    with pytest.raises(ValueError, match="data_key must be a JSON-able dict of the dataset's parameters"):
        cached_latents(_vae(), images_fn, bad, cache_dir=tmp_path, progress=False)
    assert images_fn.calls == 0 and not list(tmp_path.iterdir())


def test_empty_dataset_and_latent_dataset(tmp_path):
    with pytest.raises(ValueError, match="images is empty"):
        encode_dataset(_vae(), IMAGES[:0], progress=False)
    data = latent_dataset(_vae(), Images(), KEY, LABELS, ("a", "b", "c"), name="random", cache_dir=tmp_path,
                          progress=False)
    assert torch.equal(data.images, _vae().encode_latents(IMAGES)) and torch.equal(data.labels, LABELS)
    assert str(cache_path(_vae(), KEY, cache_dir=tmp_path)) in str(data.source)


def test_seeded_latents_do_not_depend_on_the_batch_size():
    images = IMAGES[:, :, :12, :12]  # latents (4, 3, 3): 36 numbers per image
    torch.testing.assert_close(encode_dataset(_vae(), images, seed=1, batch_size=3, progress=False),
                               encode_dataset(_vae(), images, seed=1, progress=False), atol=1e-5, rtol=0)
