"""The two few-step methods of ``training.distill`` as functions: one DDIM step in the VP state, progressive
distillation's target and loss (Salimans & Ho 2022, Alg. 2), consistency distillation's loss and multistep
consistency sampling (Song et al. 2023, Alg. 2 and 1). ``training/distill.py`` holds the loop that trains with them.

Both methods train a *student* (a copy of the teacher's net, same parameterization) through the one contract
``D(x, sigma, **cond) -> x0_hat`` on the VP state x = a x0 + b eps, (a, b) = vp_coefficients(sigma). The teacher is
any denoiser: a ``Denoiser``, or a ``CFGDenoiser`` around one, whose student then distills the guidance
(Meng et al. 2023, "On Distillation of Guided Diffusion Models", stage 1, at one fixed guidance scale).

- Progressive distillation (Salimans & Ho 2022, Alg. 2): one DDIM step of the student equals two of the teacher;
  every round halves N, and the student of round k is the teacher of round k + 1. Their Sec. 4 finds eps-prediction
  unsuited to few steps (x0 = (z - b eps) / a amplifies errors where a is small): prefer v, x0 or flow teachers.
- Consistency distillation (Song et al. 2023, "Consistency Models", Alg. 2): the student's x0_hat is the
  consistency function f(x, sigma), trained to give the same answer at adjacent points of a teacher's PF-ODE
  trajectory; ``consistency_sample`` (their Alg. 1) then samples in one or a few steps.

| symbol                 | code                     | meaning                                                 |
|------------------------|--------------------------|---------------------------------------------------------|
| N                      | ``n_steps``              | the student's sampling steps (its teacher takes 2N)     |
| sigma, sigma', sigma'' | ``s, s_mid, s_next``     | student level i, the teacher's midpoint, level i + 1    |
| z, z', z''             | ``z, z1, z2``            | VP state at sigma, after one and two teacher DDIM steps |
| x0_tilde               | ``x0_tilde``             | the x0 whose one DDIM step from z lands on z'' (Alg. 2) |
| w = max(1/sigma^2, 1)  | ``truncated_snr_weight`` | max(SNR, 1), the loss weight (Salimans & Ho, Sec. 4)    |
| f_theta(x, sigma)      | ``consistency_fn``       | consistency function: x0_hat, and x itself at sigma = 0 |
| sigma_{n+1} > sigma_n  | ``s_n1, s_n``            | adjacent levels of the consistency grid                 |
| x_{n+1}, x_hat_n       | ``x_n1, x_hat_n``        | data noised to sigma_{n+1}; one teacher DDIM step down  |
| theta^- = theta        | ``torch.no_grad()``      | the target network: the student itself, stop-gradient   |
"""
from __future__ import annotations

import torch

from minidiff.denoiser import Denoiser
from minidiff.forward import q_sample_sigma
from minidiff.samplers import _denoise, _noise, _prepare, _report, _steps
from minidiff.schedules import sampling_sigmas, vp_coefficients
from minidiff.utils import append_dims, randn

__all__ = ["ddim_update", "ddim_step", "progressive_sigmas", "progressive_target", "truncated_snr_weight",
           "progressive_loss", "consistency_fn", "consistency_loss", "consistency_sample"]


def _ab(x: torch.Tensor, sigma: torch.Tensor):
    """(a, b) = vp_coefficients(sigma) for sigma (B,), broadcast against x."""
    a, b = vp_coefficients(sigma.to(device=x.device, dtype=x.dtype))
    return append_dims(a, x.ndim), append_dims(b, x.ndim)


def _is_power_of_2(n) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 1 and n & (n - 1) == 0


# ----------------------------------------------------------------------------- DDIM in the VP state
def ddim_update(x, x0_hat, sigma, sigma_next) -> torch.Tensor:
    """x' = a' x0_hat + b' eps_hat, eps_hat = (x - a x0_hat) / b: DDIM with eta = 0 (Song et al. 2021, Eq. 12).
    sigma, sigma_next (B,); sigma > 0 (at sigma = inf: a = 0, b = 1, eps_hat = x)."""
    a, b = _ab(x, sigma)
    a_next, b_next = _ab(x, sigma_next)
    return a_next * x0_hat + b_next * (x - a * x0_hat) / b


def ddim_step(denoiser, x, sigma, sigma_next, **cond) -> torch.Tensor:
    """One deterministic DDIM step of ``denoiser`` from sigma to sigma_next (B,), Song et al. 2021, Eq. 12."""
    return ddim_update(x, denoiser(x, sigma, **cond), sigma, sigma_next)


# ----------------------------------------------------------------------------- progressive distillation
def progressive_sigmas(alphas_cumprod, n_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher grid of 2N steps, student grid of N steps), trailing spacing; the student's is every other level
    of the teacher's (Salimans & Ho 2022, Alg. 2: t' = t - 0.5/N, t'' = t - 1/N)."""
    if not _is_power_of_2(n_steps):
        raise ValueError(f"n_steps must be a power of 2 (1, 2, 4, ...; each round halves it), got {n_steps!r}")
    teacher = sampling_sigmas(alphas_cumprod, 2 * n_steps, "trailing")
    student = sampling_sigmas(alphas_cumprod, n_steps, "trailing")
    if not torch.equal(student, teacher[::2]):  # T / 2N is exact in binary, so this holds for every T
        raise ValueError(f"the {n_steps}-step grid is not every other level of the {2 * n_steps}-step grid")
    return teacher, student


@torch.no_grad()
def progressive_target(teacher, z, s, s_mid, s_next, **cond) -> torch.Tensor:
    """x0_tilde = (z'' - (b''/b) z) / (a'' - (b''/b) a) after two teacher DDIM steps z -> z' -> z''
    (Salimans & Ho 2022, Alg. 2, with their (alpha, sigma) = our (a, b)). At the last step b'' = 0 and a'' = 1,
    so x0_tilde = z'' exactly; at s = inf (a = 0, b = 1) it is (z'' - b'' z) / a''."""
    z1 = ddim_step(teacher, z, s, s_mid, **cond)
    z2 = ddim_step(teacher, z1, s_mid, s_next, **cond)
    a, b = _ab(z, s)
    a2, b2 = _ab(z, s_next)
    return (z2 - (b2 / b) * z) / (a2 - (b2 / b) * a)


def truncated_snr_weight(sigma: torch.Tensor) -> torch.Tensor:
    """w = max(SNR, 1) with SNR = a^2 / b^2 = 1 / sigma^2 (Salimans & Ho 2022, Sec. 4); 1 at sigma = inf."""
    return (1 / sigma**2).clamp(min=1.0)


def _base(teacher, strict: bool = True) -> Denoiser | None:
    """The Denoiser inside a teacher (a Denoiser, or a wrapper with ``.denoiser``: CFGDenoiser, NFECounter)."""
    d = teacher
    while not isinstance(d, Denoiser) and hasattr(d, "denoiser"):
        d = d.denoiser
    if not isinstance(d, Denoiser) and strict:
        raise ValueError(f"teacher must be a Denoiser or wrap one in .denoiser (CFGDenoiser), got "
                         f"{type(teacher).__name__}")
    return d if isinstance(d, Denoiser) else None


def _check_pair(teacher, student) -> None:
    """The student must be a Denoiser with the teacher's parameterization and noise table."""
    if not isinstance(student, Denoiser):
        raise ValueError(f"student must be a minidiff Denoiser (see make_student), got {type(student).__name__}")
    base = _base(teacher, strict=False)
    if base is not None and base.prediction != student.prediction:
        raise ValueError(f"student.prediction must equal the teacher's ({base.prediction!r}), got "
                         f"{student.prediction!r}: the student starts as a copy of the teacher's net")
    if base is not None and not torch.equal(base.alphas_cumprod, student.alphas_cumprod):
        raise ValueError("student.alphas_cumprod must equal the teacher's (both follow the same noise table)")


def _levels(sigmas, B: int, generator, stride: int, like: torch.Tensor) -> list[torch.Tensor]:
    """Per sample a step i ~ U{0..N-1} (N = (len(sigmas) - 1) / stride) and its levels sigmas[stride i + k]."""
    i = torch.randint(0, (len(sigmas) - 1) // stride, (B,), generator=generator)
    return [sigmas[stride * i + k].to(device=like.device, dtype=like.dtype) for k in range(stride + 1)]


def progressive_loss(teacher, student, x0, sigmas, *, generator, **cond) -> torch.Tensor:
    """mean_B max(SNR, 1) ||x0_hat_student(z, sigma) - x0_tilde||^2 at a student level i ~ U{0..N-1}
    (Salimans & Ho 2022, Alg. 2); ``sigmas`` is the teacher's grid of 2N steps (``progressive_sigmas``)."""
    _check_pair(teacher, student)
    s, s_mid, s_next = _levels(sigmas, x0.shape[0], generator, 2, x0)
    eps = randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    z = q_sample_sigma(x0, s, eps)  # z = a x0 + b eps; at s = inf exactly eps
    x0_tilde = progressive_target(teacher, z, s, s_mid, s_next, **cond)
    per_sample = ((student(z, s, **cond) - x0_tilde) ** 2).flatten(1).mean(1)  # (B,), mean over pixels
    return (truncated_snr_weight(s) * per_sample).mean()


# ----------------------------------------------------------------------------- consistency distillation
def consistency_fn(denoiser, x, sigma, **cond) -> torch.Tensor:
    """f(x, sigma) = x0_hat, and f(x, 0) = x: the boundary condition of Song et al. 2023 (Eq. 3), with our grid's
    last level sigma = 0 as their epsilon. The eps, v and flow rows already give c_skip -> 1, c_out -> 0 as
    sigma -> 0 (their Eq. 5), so f is continuous there; the x0 row (c_skip = 0) needs this explicit rule."""
    return torch.where(append_dims(sigma == 0, x.ndim), x, denoiser(x, sigma, **cond))


def consistency_loss(teacher, student, x0, sigmas, *, generator, **cond) -> torch.Tensor:
    """mean_B ||f_theta(x_{n+1}, s_{n+1}) - stopgrad f_theta(x_hat_n, s_n)||^2 (Song et al. 2023, Alg. 2, Eq. 7
    with lambda = 1, theta^- = theta as in Geng et al. 2024, and d = squared L2: Song uses LPIPS for images),
    x_hat_n one teacher DDIM step from x_{n+1} (their Eq. 6 with DDIM as the solver)."""
    _check_pair(teacher, student)
    s_n1, s_n = _levels(sigmas, x0.shape[0], generator, 1, x0)
    eps = randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_n1 = q_sample_sigma(x0, s_n1, eps)
    with torch.no_grad():
        x_hat_n = ddim_step(teacher, x_n1, s_n1, s_n, **cond)  # = the teacher's x0_hat when s_n = 0
        target = consistency_fn(student, x_hat_n, s_n, **cond)
    return ((consistency_fn(student, x_n1, s_n1, **cond) - target) ** 2).flatten(1).mean(1).mean()


@torch.no_grad()
def consistency_sample(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None, progress=False,
                       noise_sampler=None):
    """Multistep consistency sampling (Song et al. 2023, Alg. 1): x0 = f(x, sigma_0), then for each next level
    x = a x0 + b z with fresh z and x0 = f(x, sigma); one step per level above 0. The samplers' signature."""
    s, a, b, cond = _prepare(x, sigmas, extra_args, callback)
    noise = _noise(x, generator, noise_sampler)
    for i in _steps(len(s) - 1, progress):
        x0_hat = _denoise(denoiser, x, s[i], cond)  # f(x, sigma_i), sigma_i > 0
        _report(callback, i, s[i], s[i + 1], x, x0_hat)
        x = a[i + 1] * x0_hat + b[i + 1] * noise(s[i], s[i + 1]) if s[i + 1] > 0 else x0_hat
    return x
