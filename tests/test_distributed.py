"""Data-parallel training (``minidiff.training.distributed``): two gloo processes on the CPU train what one process
trains with the same global batch, a two-process resume continues exactly (also in one process), only rank 0
writes files, a batch_size the ranks cannot split is refused, and ``python -m minidiff.train`` runs under torchrun.

Starting processes costs most of the time (each imports torch), so every two-process run happens in one torchrun
launch of this file (``_worker`` below), shared by the tests through a module fixture.
"""
import json
import os
import runpy
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from minidiff.files import read_safetensors
from minidiff.training import TrainConfig, distributed, train

SMALL_UNET = dict(base_channels=8, channel_mults=(1, 2), num_groups=4, attn_levels=())
REPO = Path(__file__).resolve().parents[1]


@dataclass
class Data:
    images: torch.Tensor
    labels: torch.Tensor
    class_names: tuple


def _data() -> Data:
    g = torch.Generator().manual_seed(0)
    return Data(torch.rand(32, 1, 8, 8, generator=g) * 2 - 1, torch.randint(3, (32,), generator=g), ("a", "b", "c"))


def _config(steps: int, *, dropout: float = 0.0, **kw) -> TrainConfig:
    """Global batch 8 (4 per rank), label dropout and min-SNR on, so every random draw of a step is exercised."""
    base = dict(batch_size=8, lr=2e-3, warmup=2, ema_decay=0.9, p_uncond=0.25, min_snr_gamma=5.0, ckpt_every=3,
                sample_every=1000, sample_steps=2, val_every=3, val_size=8, unet={**SMALL_UNET, "dropout": dropout})
    return TrainConfig(steps=steps, **{**base, **kw})


def _worker(root: Path) -> None:
    """One rank of ``torchrun --nproc_per_node 2 tests/test_distributed.py ROOT``: the two-process runs."""
    torch.set_num_threads(1)
    runs, rank = root / "runs", int(os.environ["RANK"])
    sys.argv = ["python -m minidiff.train", "--dataset", "fashion-mnist", "--steps", "2", "--batch-size", "4",
                "--sample-steps", "2", "--val-size", "4", "--no-progress", "--device", "cpu",
                "--unet", json.dumps({"base_channels": 8, "num_groups": 4}), "--out", str(runs / "cli"),
                "--export", str(runs / "cli" / "fm.safetensors")]
    try:  # first, so that it starts the process group, as `torchrun ... -m minidiff.train ...` does
        runpy.run_module("minidiff.train", run_name="__main__")
    except SystemExit as stop:
        assert not stop.code, f"rank {rank}: the command line exited with {stop.code}"
    writes = []  # from here on, every file this rank creates, writes, renames or removes under runs/
    sys.addaudithook(lambda event, args: _record_write(event, args, runs, writes))
    data = _data()
    train(_config(6), runs / "full", data=data, device="cpu", progress=False)
    train(_config(3), runs / "half", data=data, device="cpu", progress=False)
    train(_config(6, dropout=0.1), runs / "dropout-full", data=data, device="cpu", progress=False)
    train(_config(3, dropout=0.1), runs / "dropout-resumed", data=data, device="cpu", progress=False)
    train(_config(6, dropout=0.1), runs / "dropout-resumed", data=data, device="cpu", progress=False, resume=True)
    try:
        train(_config(6, batch_size=7), runs / "odd", data=data, device="cpu", progress=False)
    except ValueError as err:
        (root / f"odd_error_rank{rank}.txt").write_text(str(err))
    (root / f"rank{rank}_writes.json").write_text(json.dumps(writes))


def _record_write(event: str, args: tuple, runs: Path, writes: list) -> None:
    """Audit hook (PEP 578): append (event, path) when a write-like event touches a path under ``runs``."""
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    if event == "open" and isinstance(args[0], (str, os.PathLike)) and isinstance(args[2], int) and args[2] & writing:
        paths = [args[0]]
    elif event in ("os.mkdir", "os.remove", "os.rmdir", "os.chmod", "os.truncate"):
        paths = [args[0]]
    elif event == "os.rename":  # os.rename and os.replace
        paths = [args[0], args[1]]
    else:
        return
    for p in paths:
        if isinstance(p, (str, os.PathLike)) and os.path.abspath(os.fsdecode(p)).startswith(str(runs)):
            writes.append([event, os.fsdecode(p)])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_procs(tmp_path_factory):
    """Run ``_worker`` on 2 gloo processes (loopback only) once; the folder holding what they wrote."""
    root = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), __file__, str(root)]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    return root


def _tensors(run_dir: Path) -> dict:
    return read_safetensors(run_dir / "checkpoint.safetensors")[0]


@pytest.mark.slow  # one torchrun launch shared by these tests: ~50 s, mostly two torch imports
def test_two_processes_train_what_one_process_trains(two_procs, tmp_path):
    one = train(_config(6), tmp_path / "one", data=_data(), device="cpu", progress=False)
    two = _tensors(two_procs / "runs" / "full")
    diffs = [(one["net"].state_dict()[k] - two[f"model.{k}"]).abs().max().item() for k in one["net"].state_dict()]
    diffs += [(v - two[f"ema.{k}"]).abs().max().item() for k, v in one["ema"].shadow.items()]
    print(f"max |1 process - 2 processes| over weights and EMA after 6 steps: {max(diffs):.2e}")  # 1.5e-06 here
    for k, v in one["net"].state_dict().items():
        torch.testing.assert_close(two[f"model.{k}"], v, atol=1e-5, rtol=1e-4, msg=k)
    for k, v in one["ema"].shadow.items():
        torch.testing.assert_close(two[f"ema.{k}"], v, atol=1e-5, rtol=1e-4, msg=f"ema.{k}")
    for key in ("loss", "grad_norm", "val_loss"):  # the logged loss is the global batch's (averaged over ranks)
        torch.testing.assert_close(two[f"extra.{key}"], torch.tensor(one["history"][key], dtype=torch.float64),
                                   atol=1e-5, rtol=1e-4, msg=key)
    assert two["extra.val_step"].tolist() == [3, 6]


@pytest.mark.slow  # one torchrun launch shared by these tests: ~50 s, mostly two torch imports
def test_resume_under_two_processes_continues_exactly(two_procs):
    full, resumed = _tensors(two_procs / "runs" / "dropout-full"), _tensors(two_procs / "runs" / "dropout-resumed")
    assert full.keys() == resumed.keys()
    for k in full:  # weights, EMA, optimizer, generators and history: bit for bit, with dropout on
        assert torch.equal(full[k], resumed[k]), k
    sessions = json.loads(read_safetensors(two_procs / "runs" / "dropout-resumed" / "checkpoint.safetensors")[1]
                          ["config"])["sessions"]
    assert [(s["start_step"], s["end_step"], s["world_size"]) for s in sessions] == [(0, 3, 2), (3, 6, 2)]


@pytest.mark.slow  # one torchrun launch shared by these tests: ~50 s, mostly two torch imports
def test_a_two_process_checkpoint_resumes_in_one_process(two_procs, tmp_path):
    shutil.copytree(two_procs / "runs" / "half", tmp_path / "half")
    resumed = train(_config(6), tmp_path / "half", data=_data(), device="cpu", progress=False, resume=True)
    two = _tensors(two_procs / "runs" / "full")
    for k, v in resumed["net"].state_dict().items():  # batch_size is global: the world size is not in the config
        torch.testing.assert_close(v, two[f"model.{k}"], atol=1e-5, rtol=1e-4, msg=k)


@pytest.mark.slow  # one torchrun launch shared by these tests: ~50 s, mostly two torch imports
def test_only_rank_0_writes_files(two_procs):
    rank0, rank1 = (json.loads((two_procs / f"rank{r}_writes.json").read_text()) for r in (0, 1))
    assert rank1 == [] and ["os.rename", str(two_procs / "runs" / "full" / "checkpoint.safetensors")] in rank0
    for name, steps in (("full", [6]), ("dropout-resumed", [3, 6])):  # a grid at the end of each session
        run = two_procs / "runs" / name
        files = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())
        assert files == ["checkpoint.safetensors", "config.json", *(f"samples/step_{s:07d}.png" for s in steps)]
    cli = two_procs / "runs" / "cli"
    assert (cli / "fm.safetensors").is_file() and (cli / "samples" / "step_0000002.png").is_file()
    assert json.loads((cli / "fm.json").read_text())["steps"] == 2
    assert not any(p.name == ".lock" for p in (two_procs / "runs").rglob("*"))


@pytest.mark.slow  # one torchrun launch shared by these tests: ~50 s, mostly two torch imports
def test_batch_size_must_split_over_the_processes(two_procs):
    for rank in (0, 1):  # both processes stop with the same message, before anything is written
        msg = (two_procs / f"odd_error_rank{rank}.txt").read_text()
        assert "batch_size must be divisible by the world size" in msg and "batch_size=7 and world size 2" in msg
        assert msg.endswith("use 6 or 8")
    assert not (two_procs / "runs" / "odd").exists()
    with pytest.raises(ValueError, match=r"got batch_size=3 and world size 4: .*; use 4$"):
        distributed.batch_part(3, ranks=(0, 4))


def test_batch_parts_and_step_noise_make_up_the_global_batch():
    parts = [distributed.batch_part(12, ranks=(r, 3)) for r in range(3)]
    assert [(p.start, p.stop) for p in parts] == [(0, 4), (4, 8), (8, 12)]
    assert distributed.batch_part(12) == slice(0, 12)  # one process: the whole batch
    labels = torch.arange(12) % 3
    kw = dict(T=50, p_uncond=0.5, null_id=3, device="cpu", dtype=torch.float32)
    one = distributed.step_noise(labels, (12, 1, 4, 4), generator=torch.Generator().manual_seed(1), part=slice(0, 12),
                                 **kw)
    ranks = [distributed.step_noise(labels, (12, 1, 4, 4), generator=torch.Generator().manual_seed(1), part=p, **kw)
             for p in parts]
    for i in range(3):  # dropped labels, t and eps: the ranks' parts, concatenated, are one process's draw
        assert torch.equal(torch.cat([r[i] for r in ranks]), one[i])
    assert (one[0] == 3).any() and (one[0] != 3).any()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
