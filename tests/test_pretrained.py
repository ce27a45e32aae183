"""Pretrained loader: round trip through a weights folder, unknown names, damaged files, shipped models."""
import json

import pytest
import torch

from minidiff import pretrained
from minidiff.denoiser import Denoiser
from minidiff.models.unet import unet_from_preset
from minidiff.samplers import sample
from minidiff.schedules import alphas_cumprod_from_betas, make_betas, sampling_sigmas
from minidiff.training.checkpoint import CheckpointError, save_model


@pytest.fixture
def weights_dir(tmp_path):
    torch.manual_seed(0)
    net = unet_from_preset("tiny", base_channels=8, channel_mults=(1, 2), num_groups=4, attn_levels=(), num_classes=10)
    torch.nn.init.normal_(net.conv_out.weight, std=0.1)
    denoiser = Denoiser(net, alphas_cumprod_from_betas(make_betas("cosine", 1000)), "eps").eval()
    save_model(tmp_path / "toy.safetensors", denoiser, schedule="cosine", card={"steps": 0, "note": "test"})
    return tmp_path, denoiser


def test_round_trip(weights_dir):
    folder, original = weights_dir
    assert pretrained.available(weights_dir=folder) == ["toy"]
    loaded = pretrained.load("toy", weights_dir=folder, clip_x0=False)
    assert pretrained.model_card("toy", weights_dir=folder) == {"steps": 0, "note": "test"}
    x, sigma, labels = torch.randn(3, 1, 28, 28), torch.tensor([0.1, 1.0, 10.0]), torch.tensor([0, 5, 10])
    assert torch.equal(loaded(x, sigma, class_labels=labels), original(x, sigma, class_labels=labels))


def test_load_clips_x0_to_the_data_range_by_default(weights_dir):
    folder, original = weights_dir
    x, sigma = torch.randn(2, 1, 28, 28), torch.tensor([100.0, 1000.0])  # 1/a ~ sigma amplifies eps errors
    raw = original(x, sigma)
    assert raw.abs().max() > 1  # the case the clamp exists for
    clipped = pretrained.load("toy", weights_dir=folder)(x, sigma)
    assert torch.equal(clipped, raw.clamp(-1, 1))


def test_other_safetensors_files_are_not_listed(weights_dir):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(weights_dir[0] / "classifier.safetensors"), metadata={"format": "other"})
    assert pretrained.available(weights_dir=weights_dir[0]) == ["toy"]


def test_unknown_name_lists_available(weights_dir):
    with pytest.raises(KeyError, match=r"unknown pretrained model 'nope'.*\['toy'\]"):
        pretrained.load("nope", weights_dir=weights_dir[0])
    with pytest.raises(KeyError, match="available"):
        pretrained.model_card("nope", weights_dir=weights_dir[0])


def test_corrupted_file_gives_clear_error(weights_dir):
    path = weights_dir[0] / "toy.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"pretrained model 'toy' cannot be loaded.*corrupted or truncated"):
        pretrained.load("toy", weights_dir=weights_dir[0])


def test_corrupted_model_card_gives_clear_error(weights_dir):
    (weights_dir[0] / "toy.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="model card .*toy.json is corrupted"):
        pretrained.model_card("toy", weights_dir=weights_dir[0])


@pytest.mark.parametrize("name", pretrained.available())
def test_every_shipped_model_loads_and_samples(name):
    """Each model shipped in minidiff/weights loads on CPU, has a model card and samples finite images."""
    card = pretrained.model_card(name)
    assert json.dumps(card) and "config" in card
    denoiser = pretrained.load(name)
    c = denoiser.net.config
    extra = {"class_labels": torch.arange(2)} if c.num_classes is not None else None
    x = sample(denoiser, (2, c.in_channels, 28, 28), sampling_sigmas(denoiser.alphas_cumprod, 4, "leading"),
               generator=torch.Generator().manual_seed(0), device="cpu", extra_args=extra)
    assert x.shape == (2, c.in_channels, 28, 28) and torch.isfinite(x).all()
