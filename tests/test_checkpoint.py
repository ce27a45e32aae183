"""Checkpoints: full round trip, damaged files give clear errors, a failed write keeps the old file."""
import os

import pytest
import torch
from safetensors.torch import save_file

from minidiff import files
from minidiff.denoiser import Denoiser
from minidiff.models.unet import unet_from_preset
from minidiff.schedules import alphas_cumprod_from_betas, make_betas
from minidiff.training import EMA, make_optimizer
from minidiff.training.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint, save_model

SMALL = dict(base_channels=8, channel_mults=(1, 2), num_groups=4, attn_levels=(1,), num_classes=3)


def _trained_state(seed=0, steps=3):
    """A small UNet, EMA, AdamW + warmup after a few real optimizer steps, and a used generator."""
    torch.manual_seed(seed)
    net = unet_from_preset("tiny", **SMALL)
    opt, sched = make_optimizer(net, lr=1e-3, warmup_steps=5)
    ema = EMA(net, 0.9)
    for _ in range(steps):
        loss = net(torch.randn(2, 1, 12, 12), torch.rand(2) * 999, class_labels=torch.tensor([0, 2])).square().mean()
        loss = loss + sum(p.square().sum() for p in net.parameters()) * 1e-3
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        ema.update(net)
    gen = torch.Generator().manual_seed(123)
    torch.rand(5, generator=gen)
    return net, ema, opt, sched, gen


def _save(path, state, step=3):
    net, ema, opt, sched, gen = state
    return save_checkpoint(path, model=net, step=step, ema=ema, optimizer=opt, scheduler=sched,
                           generators={"data": gen}, config={"note": "hello", "lr": 1e-3})


def test_round_trip_restores_everything(tmp_path):
    a = _trained_state(seed=0)
    torch.manual_seed(77)
    _save(tmp_path / "c.safetensors", a)
    expected_global = torch.rand(3)
    b = _trained_state(seed=1, steps=1)
    b[4].manual_seed(999)
    state = load_checkpoint(tmp_path / "c.safetensors", model=b[0], ema=b[1], optimizer=b[2], scheduler=b[3],
                            generators={"data": b[4]})
    assert state["step"] == 3 and state["config"] == {"note": "hello", "lr": 1e-3}
    for pa, pb in zip(a[0].state_dict().values(), b[0].state_dict().values()):
        assert torch.equal(pa, pb)
    assert all(torch.equal(a[1].shadow[k], b[1].shadow[k]) for k in a[1].shadow) and b[1].step == 3
    sa, sb = a[2].state_dict(), b[2].state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for pid in sa["state"]:
        for key in sa["state"][pid]:
            assert torch.equal(sa["state"][pid][key], sb["state"][pid][key]), (pid, key)
    assert a[3].state_dict() == b[3].state_dict()
    assert torch.equal(torch.rand(3), expected_global)  # the global RNG continues as after the save
    assert torch.equal(torch.rand(4, generator=a[4]), torch.rand(4, generator=b[4]))


def test_truncated_file_gives_clear_error(tmp_path):
    path = _save(tmp_path / "c.safetensors", _trained_state())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupted or truncated") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("content", [b"", b"not a safetensors file at all", b"\xff" * 64])
def test_garbage_file_gives_clear_error(tmp_path, content):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        load_checkpoint(path)


def test_foreign_safetensors_file_is_rejected(tmp_path):
    path = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match="not a minidiff-checkpoint"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="not a minidiff-model"):
        load_model(path)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_checkpoint(tmp_path / "nope.safetensors")


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "c.safetensors"
    state = _trained_state()
    _save(path, state, step=3)
    before = path.read_bytes()

    def crash(fd):
        raise OSError("disk died during fsync")

    monkeypatch.setattr(files.os, "fsync", crash)
    with pytest.raises(OSError, match="disk died"):
        _save(path, state, step=4)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert load_checkpoint(path, restore_rng=False)["step"] == 3
    assert sorted(os.listdir(tmp_path)) == ["c.safetensors"]  # the temporary file was removed


def _denoiser():
    torch.manual_seed(0)
    net = unet_from_preset("tiny", **SMALL, zero_init=False)
    torch.nn.init.normal_(net.conv_out.weight, std=0.1)  # zero-initialised output would hide mistakes
    return Denoiser(net, alphas_cumprod_from_betas(make_betas("cosine", 100)), "v")


def test_save_model_round_trip_float32_is_exact(tmp_path):
    d = _denoiser()
    save_model(tmp_path / "m.safetensors", d, schedule="cosine")
    d2 = load_model(tmp_path / "m.safetensors")
    assert d2.prediction == "v" and torch.equal(d2.alphas_cumprod, d.alphas_cumprod)
    assert d2.net.config == d.net.config and not d2.training
    x, sigma, labels = torch.randn(2, 1, 12, 12), torch.tensor([0.5, 3.0]), torch.tensor([1, 3])
    d.eval()
    assert torch.equal(d(x, sigma, class_labels=labels), d2(x, sigma, class_labels=labels))


def test_save_model_float16_is_smaller_and_close(tmp_path):
    d = _denoiser().eval()
    save_model(tmp_path / "a.safetensors", d)
    save_model(tmp_path / "b.safetensors", d, dtype=torch.float16, card={"steps": 0})
    assert (tmp_path / "b.safetensors").stat().st_size < 0.6 * (tmp_path / "a.safetensors").stat().st_size
    assert (tmp_path / "b.json").is_file()
    d2 = load_model(tmp_path / "b.safetensors")
    assert next(d2.parameters()).dtype == torch.float32
    x, sigma = torch.randn(2, 1, 12, 12), torch.tensor([0.5, 3.0])
    torch.testing.assert_close(d2(x, sigma), d(x, sigma), atol=2e-2, rtol=2e-2)


def _flip_a_tensor_byte(path):
    """Flip one byte inside the tensor data (after the JSON header), as a bad disk sector would."""
    raw = bytearray(path.read_bytes())
    header_len = int.from_bytes(raw[:8], "little")
    raw[8 + header_len + (len(raw) - 8 - header_len) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_flipped_tensor_bytes_are_caught_in_models_checkpoints_and_classifiers(tmp_path):
    """Every minidiff file records the SHA-256 of its tensors; a flipped byte is an error naming the file."""
    from minidiff import pretrained
    from minidiff.eval.classifiers import build_classifier, load_classifier, save_classifier
    from minidiff.files import WEIGHTS_DIR

    model = save_model(tmp_path / "m.safetensors", _denoiser())
    state = _trained_state()
    ckpt = _save(tmp_path / "c.safetensors", state)
    clf = save_classifier(build_classifier("fashion-mnist"), tmp_path / "clf.safetensors")
    for path in (model, ckpt, clf):
        _flip_a_tensor_byte(path)
    with pytest.raises(CheckpointError, match=r"m\.safetensors is corrupted: its tensors do not match"):
        load_model(model)
    with pytest.raises(CheckpointError, match=r"c\.safetensors is corrupted"):
        load_checkpoint(ckpt, model=state[0])
    with pytest.raises(CheckpointError, match=r"clf\.safetensors is corrupted"):
        load_classifier(clf, check_card=False)
    shipped = tmp_path / "weights"
    shipped.mkdir()
    for suffix in (".safetensors", ".json"):
        (shipped / f"fashion-mnist-cond{suffix}").write_bytes((WEIGHTS_DIR / f"fashion-mnist-cond{suffix}").read_bytes())
    pretrained.load("fashion-mnist-cond", weights_dir=shipped)  # intact copy loads
    _flip_a_tensor_byte(shipped / "fashion-mnist-cond.safetensors")
    with pytest.raises(CheckpointError, match="corrupted.*Reinstall minidiff"):
        pretrained.load("fashion-mnist-cond", weights_dir=shipped)


def test_model_file_records_the_image_shape(tmp_path):
    from minidiff import pretrained

    assert pretrained.load("fashion-mnist-cond").image_shape == (1, 28, 28)
    den = _denoiser()
    den.image_shape = (1, 12, 12)
    assert load_model(save_model(tmp_path / "m.safetensors", den)).image_shape == (1, 12, 12)
