"""Bad inputs get errors that name the argument, the value and what to do; nothing is silently wrong; no run is lost.

The rule (docs/DESIGN.md, "Validation"): inputs are checked once, at the boundary a student calls
(``minidiff.utils.check_tensor`` for image-like tensors, ``check_generator`` for randomness, ``TrainConfig`` for a
run), nothing is converted silently, and every error says what is allowed.
"""
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from minidiff import pretrained
from minidiff.denoiser import Denoiser
from minidiff.forward import forward_trajectory, q_sample, q_sample_sigma
from minidiff.models.unet import unet_from_preset
from minidiff.samplers import sample, sample_euler
from minidiff.schedules import alphas_cumprod_from_betas, linear_betas, sampling_sigmas
from minidiff.training import TrainConfig, train
from minidiff.training.rundir import RunLockedError, acquire_lock

REPO = Path(__file__).resolve().parents[1]
AB = alphas_cumprod_from_betas(linear_betas(1000))
X = torch.zeros(2, 1, 8, 8)
T2 = torch.tensor([1, 500])
SMALL = dict(base_channels=8, channel_mults=(1, 2), attn_levels=())


def _denoiser():
    return Denoiser(unet_from_preset("tiny", num_classes=3, **SMALL), AB)


NAN = torch.full((2, 1, 8, 8), float("nan"))
CASES = [  # (call, error type, regex the message must match)
    (lambda: q_sample(X.to(torch.uint8), T2, X, AB), ValueError, r"x0 must be a floating-point.*uint8.*127\.5 - 1"),
    (lambda: q_sample(X.long(), T2, X, AB), ValueError, r"x0 must be a floating-point.*int64"),
    (lambda: q_sample(NAN, T2, X, AB), ValueError, r"x0 must be finite"),
    (lambda: q_sample(X, T2, NAN, AB), ValueError, r"noise must be finite"),
    (lambda: q_sample(X.numpy(), T2, X, AB), ValueError, r"x0 must be a torch.Tensor.*torch.as_tensor"),
    (lambda: q_sample(X, T2.float(), X, AB), ValueError, r"t must be an int64 tensor"),
    (lambda: q_sample_sigma(X, torch.tensor([1.0, -1.0]), X), ValueError, r"sigma must be >= 0"),
    (lambda: forward_trajectory(X.to(torch.uint8), AB, [0, 10]), ValueError, r"x0 must be a floating-point"),
    (lambda: _denoiser()(NAN, torch.ones(2)), ValueError, r"x must be finite"),
    (lambda: _denoiser()(X[0], torch.ones(1)), ValueError, r"x must have 4 dims.*single image.*x\[None\]"),
    (lambda: _denoiser()(X.squeeze(1), torch.ones(2)), ValueError, r"x must have 4 dims.*x\[:, None\]"),
    (lambda: _denoiser()(torch.zeros(2, 3, 8, 8), torch.ones(2)), ValueError, r"x must have 1 channel"),
    (lambda: _denoiser()([[0.0]], torch.ones(1)), ValueError, r"x must be a torch.Tensor.*list"),
    (lambda: _denoiser()(X, torch.ones(2), class_labels=[0, 1]), ValueError, r"class_labels must be an int64 torch.Tensor"),
    (lambda: _denoiser()(X, torch.ones(2), class_labels=np.array([0, 1])), ValueError, r"class_labels must be an int64"),
    (lambda: _denoiser()(X, torch.ones(2), class_labels=torch.tensor([0, 9])), ValueError, r"class_labels must be in 0..3"),
    (lambda: sample_euler(_denoiser(), X.half().to(torch.int8), sampling_sigmas(AB, 2)), ValueError, r"x must be a floating"),
    (lambda: sample(_denoiser(), (2, 1, 8, 8), sampling_sigmas(AB, 2), generator=42, device="cpu"), ValueError,
     r"generator must be a torch.Generator.*got int 42"),
    (lambda: sample(_denoiser(), 8, sampling_sigmas(AB, 2), device="cpu"), ValueError, r"shape must be a tuple"),
    (lambda: sample(_denoiser(), (2, 1, 8, 8), sampling_sigmas(AB, 2), sampler="dpm++", device="cpu"), KeyError,
     r"sampler must be one of"),
    (lambda: TrainConfig(sampler="dpm++"), ValueError, r"sampler must be one of \[.*'dpmpp_2m'"),
    (lambda: TrainConfig(sample_steps=2000), ValueError, r"sample_steps must be <= T = 1000"),
    (lambda: TrainConfig(dataset="imagenet"), ValueError, r"dataset must be one of"),
    (lambda: TrainConfig(preset="huge"), ValueError, r"preset must be one of"),
    (lambda: TrainConfig(schedule="quadratic"), ValueError, r"schedule must be one of"),
    (lambda: TrainConfig(lr=0.0), ValueError, r"need lr > 0"),
    (lambda: TrainConfig(unet={"widht": 3}), ValueError, r"not UNetConfig fields"),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_bad_input_gets_a_clear_error(case):
    call, kind, pattern = CASES[case]
    with pytest.raises(kind, match=pattern):
        call()


def test_floating_dtypes_are_kept_not_converted():
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        out = q_sample(X.to(dtype) + 0.5, T2, X.to(dtype), AB)
        assert out.dtype == dtype and out.abs().sum() > 0  # uint8 used to give all zeros silently


@dataclass
class Data:
    images: torch.Tensor
    labels: torch.Tensor
    class_names: tuple


def _data():
    g = torch.Generator().manual_seed(0)
    return Data(torch.rand(16, 1, 8, 8, generator=g) * 2 - 1, torch.randint(2, (16,), generator=g), ("a", "b"))


def _config(steps=2):
    return TrainConfig(steps=steps, batch_size=2, ckpt_every=1, sample_every=100, sample_steps=2, val_size=4,
                       unet=SMALL)


def test_a_second_live_run_on_one_folder_is_refused(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / ".lock").write_text(f"{os.uname().nodename} {holder.pid}\n")
        with pytest.raises(RunLockedError, match=f"another run \\(pid {holder.pid}\\) is writing"):
            train(_config(), tmp_path, data=_data(), device="cpu", progress=False)
        assert not (tmp_path / "checkpoint.safetensors").exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_runs_lock_and_temp_files_do_not_block_the_next_run(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".lock").write_text(f"{os.uname().nodename} {dead.pid}\n")
    orphan = tmp_path / ".checkpoint.safetensors.abc123.tmp"
    orphan.write_bytes(b"half a checkpoint")
    train(_config(), tmp_path, data=_data(), device="cpu", progress=False)
    assert (tmp_path / "checkpoint.safetensors").is_file() and not orphan.exists()
    assert not (tmp_path / ".lock").exists()  # released at the end
    lock = acquire_lock(tmp_path)
    with pytest.raises(RunLockedError):
        acquire_lock(tmp_path)  # this process holds it
    lock.unlink()


def _cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MINIDIFF_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "minidiff.train", *args], cwd=REPO, env=env, timeout=120,
                          capture_output=True, text=True)


@pytest.mark.parametrize("args, message", [
    (["--sampler", "dpm++"], "sampler must be one of"),
    (["--sample-steps", "2000"], "sample_steps must be <= T"),
    (["--unet", '{"base_channel": 8}'], "not UNetConfig fields"),
])
def test_cli_user_errors_are_one_line_with_status_2_before_any_work(tmp_path, args, message):
    result = _cli("--out", str(tmp_path / "run"), *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "checkpoint.safetensors").exists()


def test_cli_out_that_is_a_file_and_debug_traceback(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    result = _cli("--out", str(f), "--steps", "1")
    assert result.returncode == 2 and "is a file" in result.stderr and "Traceback" not in result.stderr
    debug = _cli("--out", str(f), "--steps", "1", "--debug")
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_shipped_model_rejects_a_single_image_with_a_hint():
    with pytest.raises(ValueError, match="add the batch axis"):
        pretrained.load("fashion-mnist-cond")(torch.zeros(1, 28, 28), torch.ones(1))


def test_explicit_root_is_honoured_and_a_damaged_file_is_named(tmp_path, monkeypatch):
    import shutil

    from minidiff.data import load_dataset
    from minidiff.data.datasets import DEBIAN_FASHION_MNIST_DIR, clear_cache

    if not (DEBIAN_FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("needs Debian's dataset-fashion-mnist")
    monkeypatch.delenv("MINIDIFF_SMOKE", raising=False)  # smoke mode would substitute a stand-in
    clear_cache()
    with pytest.raises(FileNotFoundError, match="was not found") as err:
        load_dataset("fashion-mnist", "test", root=tmp_path, download=False)  # the Debian copy is not used
    assert str(DEBIAN_FASHION_MNIST_DIR) not in str(err.value)
    for f in DEBIAN_FASHION_MNIST_DIR.glob("t10k-*"):
        shutil.copy(f, tmp_path / f.name)
    ds = load_dataset("fashion-mnist", "test", root=tmp_path)
    assert ds.source == str(tmp_path / "t10k-images-idx3-ubyte.gz") and str(tmp_path) in repr(ds)
    clear_cache()
    image_file = tmp_path / "t10k-images-idx3-ubyte.gz"
    image_file.write_bytes(image_file.read_bytes()[:5000])
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte\.gz is damaged.*delete it"):
        load_dataset("fashion-mnist", "test", root=tmp_path)
    clear_cache()


def test_edited_model_spec_names_the_file(tmp_path):
    import json

    from minidiff.files import CheckpointError, read_safetensors, write_safetensors
    from minidiff.training.checkpoint import load_model, save_model

    path = save_model(tmp_path / "m.safetensors", _denoiser())
    tensors, meta = read_safetensors(path)
    for spec, pattern in [("{not json", "spec is not valid JSON"),
                          (json.dumps({**json.loads(meta["spec"]), "unet": {**json.loads(meta["spec"])["unet"],
                                                                             "base_channels": 16}}),
                           "weights do not fit the architecture"),
                          (json.dumps({**json.loads(meta["spec"]), "unet": {"widht": 1}}), "spec is not a valid")]:
        meta.pop("sha256", None)
        write_safetensors(path, tensors, {**meta, "spec": spec})
        with pytest.raises(CheckpointError, match=rf"m\.safetensors.*{pattern}"):
            load_model(path)
