"""Data-parallel training: ``train()`` under torchrun, with PyTorch's DistributedDataParallel (DDP).

    torchrun --nproc_per_node 4 -m minidiff.train --dataset cifar10 --preset cifar --batch-size 256 --out runs/c10

torchrun starts one process per GPU and gives each its place in the environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT; https://pytorch.org/docs/stable/elastic/run.html). ``start`` joins them into one process
group (NCCL on CUDA, where LOCAL_RANK picks the GPU; gloo on the CPU), ``wrap`` puts the net in DDP, which averages the
gradients of all processes during ``backward`` so that every copy of the net takes the same optimizer step
(https://pytorch.org/docs/stable/notes/ddp.html). Without torchrun every function here is a no-op, and
``train()`` runs exactly as in one process.

| name         | meaning                                                                         |
|--------------|---------------------------------------------------------------------------------|
| rank         | this process, 0 .. world_size - 1; rank 0 writes every file and the logs        |
| world_size   | number of processes (WORLD_SIZE)                                                 |
| local_rank   | this process on its machine (LOCAL_RANK); on CUDA it trains on ``cuda:local_rank`` |
| part         | this rank's slice of the global batch, ``batch_part``                            |

Why N processes take the step one process takes: ``batch_size`` is the **global** batch. Every rank holds the same
seeded generators, so every rank draws the same global batch indices, label dropout, t and eps (``step_noise``), and
trains on its part of each; the mean of the ranks' gradients (what DDP computes) is then the gradient of the global
batch's mean loss. Only the order of float sums differs. The generators' states are in the checkpoint, so resume
works as in one process, even with another number of processes. Dropout inside the net draws from the global
generator, which ``seed_step`` reseeds every step from (seed, step, rank): different masks on every rank, and the
same masks after a resume.
"""
from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from minidiff.guidance import condition_dropout
from minidiff.losses import sample_t
from minidiff.utils import randn

__all__ = ["launched", "rank", "world_size", "is_main", "start", "batch_part", "wrap", "step_noise",
           "mean_over_ranks", "seed_step", "barrier"]


def launched() -> bool:
    """True when torchrun started this process as one of several (WORLD_SIZE > 1) or a process group is running."""
    return dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank() -> int:
    """This process's rank (0 without torchrun); read from the environment before the group starts."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """Number of training processes (1 without torchrun)."""
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """True on rank 0, the one process that writes checkpoints, sample grids, config and logs."""
    return rank() == 0


def start(device: torch.device) -> torch.device:
    """Join the process group torchrun describes and return this rank's device: CUDA -> NCCL on ``cuda:LOCAL_RANK``,
    CPU -> gloo. Without torchrun: ``device``. The group is started once per process and destroyed when the process
    exits (c10d names a new default group's store keys as it named the last one's, so a second
    ``init_process_group`` in one process can read the old group's addresses: "Gloo connectFullMesh failed")."""
    if not launched():
        return device
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"distributed training runs on cpu or cuda, got device {device}; pass --device cpu or cuda")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank() % torch.cuda.device_count())))
        torch.cuda.set_device(device)
    if not dist.is_initialized():  # else a caller (or an earlier train() in this process) started it
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
        atexit.register(dist.destroy_process_group)
    return device


def batch_part(batch_size: int, *, ranks: tuple[int, int] | None = None) -> slice:
    """Rows of the global batch this rank trains on: rank r of N gets rows [r B/N, (r+1) B/N), so the ranks' parts
    together are the global batch, in order. ``ranks`` = (r, N), this process's by default. Raises unless N divides
    ``batch_size``."""
    r, n = ranks if ranks is not None else (rank(), world_size())
    if batch_size % n:
        fits = [b for b in (batch_size - batch_size % n, batch_size + n - batch_size % n) if b > 0]
        raise ValueError(f"batch_size must be divisible by the world size (the number of processes), got "
                         f"batch_size={batch_size} and world size {n}: batch_size is the global batch, split evenly "
                         f"over the processes; use {' or '.join(map(str, fits))}")
    per_rank = batch_size // n
    return slice(r * per_rank, (r + 1) * per_rank)


def wrap(net: nn.Module, device: torch.device) -> nn.Module:
    """``net`` in DistributedDataParallel when several processes train, else ``net`` itself. Train through the
    wrapper; the EMA, checkpoints and samples use ``net`` (DDP keeps its parameters equal on every rank)."""
    if world_size() == 1:
        return net
    return DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)


def step_noise(labels, shape: tuple, *, T: int, p_uncond: float, null_id: int, generator: torch.Generator,
               part: slice, device, dtype, t_sampling: str = "uniform", m: float = 0.0, s: float = 1.0) -> tuple:
    """(labels, t, eps) of one training step, drawn for the whole global batch of ``shape`` (B, C, H, W) exactly as
    ``train_step`` and ``diffusion_loss`` draw them in one process (label dropout, then t, then eps), cut to
    ``part``. ``labels`` are the global batch's (or None); the returned ones are dropped already. t follows
    ``losses.sample_t`` (``t_sampling``, ``m``, ``s``)."""
    if labels is not None and p_uncond > 0:
        labels = condition_dropout(labels, p_uncond, null_id, generator=generator)
    t = sample_t(shape[0], T, generator=generator, t_sampling=t_sampling, m=m, s=s).to(device)
    noise = randn(shape, generator=generator, device=device, dtype=dtype)
    return (labels[part] if labels is not None else None), t[part], noise[part]


def mean_over_ranks(value: float, device: torch.device) -> float:
    """The mean of ``value`` over the ranks (the global batch's loss from its parts'); ``value`` in one process."""
    if world_size() == 1:
        return value
    total = torch.tensor([value], dtype=torch.float64, device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(total)
    return total.item() / world_size()


def seed_step(seed: int, step: int) -> None:
    """Reseed the global generator (dropout in the net) from (seed, step, rank) when several processes train, so that
    every rank draws its own masks and a resumed run the same ones (each rank's own generator state is not saved)."""
    if world_size() > 1:
        torch.manual_seed(hash((seed, step, rank())) % 2**63)  # a tuple of ints hashes alike in every process


def barrier() -> None:
    """Wait for every rank (e.g. until rank 0 has written the last checkpoint); a no-op in one process."""
    if world_size() > 1:
        dist.barrier()
