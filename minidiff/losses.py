"""Training losses: the regression target of each parameterization, min-SNR weights and the diffusion loss.

| symbol             | code name          | meaning                                                        |
|--------------------|--------------------|----------------------------------------------------------------|
| t                  | ``t``              | training timestep in 0..T-1: uniform (DDPM Alg. 1) or logit-normal |
| m, s               | ``m, s``           | location and scale of the logit-normal (Esser et al. 2024, Eq. 19) |
| eps                | ``noise``          | the Gaussian noise of x_t = a x0 + b eps                       |
| F, F_target        | ``out, target``    | network output and its target (``PARAMETERIZATIONS``)          |
| w(t)               | ``weights``        | per-sample weight; min-SNR-gamma (Hang et al. 2023)            |
"""
from __future__ import annotations

import torch
from torch import nn

from minidiff.denoiser import _EPS_AT_ZERO_SNR, get_parameterization
from minidiff.forward import q_sample
from minidiff.schedules import sigmas_from_alphas_cumprod, snr, vp_coefficients
from minidiff.utils import append_dims, randn

__all__ = ["T_SAMPLINGS", "sample_t", "training_target", "min_snr_weights", "diffusion_loss"]

T_SAMPLINGS = ("uniform", "logit_normal")  # densities of the training timestep t


def sample_t(B: int, T: int, *, generator: torch.Generator | None = None, device=None, t_sampling: str = "uniform",
             m: float = 0.0, s: float = 1.0) -> torch.Tensor:
    """B training timesteps in 0..T-1 (int64), drawn from ``generator`` on its device (or ``device``).

    ``"uniform"``: t ~ U{0..T-1} (Ho et al. 2020, Alg. 1). ``"logit_normal"``: the fraction t/T is logit-normal,
    u ~ N(m, s^2), t = floor(T sigmoid(u)) (Esser et al. 2024, "Scaling Rectified Flow Transformers", Eq. 19), which
    spends more of training on the middle of the path, where the target is hardest to predict, and less at its ends.
    """
    if t_sampling not in T_SAMPLINGS:
        raise ValueError(f"t_sampling must be one of {list(T_SAMPLINGS)}, got {t_sampling!r}")
    if not s > 0:
        raise ValueError(f"the logit-normal scale s must be > 0 (Esser et al. use 1), got {s}")
    device = generator.device if generator is not None else device
    if t_sampling == "uniform":
        return torch.randint(0, T, (B,), generator=generator, device=device)
    u = m + s * torch.randn((B,), generator=generator, device=device, dtype=torch.float64)
    return (torch.sigmoid(u) * T).floor().clamp(0, T - 1).to(torch.int64)


def training_target(x0: torch.Tensor, eps: torch.Tensor, sigma, prediction: str) -> torch.Tensor:
    """Regression target for the net: eps (Ho et al. 2020, Eq. 14), x0, v (Salimans & Ho 2022) or the flow velocity
    eps - x0 (Lipman et al. 2023, Eq. 23), from the table."""
    row = get_parameterization(prediction)
    sqrt_ab, sqrt_1m_ab = vp_coefficients(torch.as_tensor(sigma, dtype=x0.dtype, device=x0.device))
    return row.target(x0, eps, append_dims(sqrt_ab, x0.ndim), append_dims(sqrt_1m_ab, x0.ndim))


def min_snr_weights(snr_t: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting"), per sample.

    Each weight turns its parameterization's MSE into min(SNR, gamma) * ||x0 - x0_hat||^2. Since
    x0 - x0_hat = c_out (F_target - F), the weight is min(SNR, gamma) * c_out^2, which gives
    eps: min(SNR, gamma) / SNR;   x0: min(SNR, gamma);   v: min(SNR, gamma) / (SNR + 1).
    """
    row = get_parameterization(prediction)
    if not gamma > 0:
        raise ValueError(f"min_snr_gamma must be > 0 (Hang et al. use 5), got {gamma}")
    snr_t = torch.as_tensor(snr_t, dtype=torch.float64)
    a, b = vp_coefficients(snr_t.rsqrt())  # sigma = 1 / sqrt(SNR)
    _, c_out = row.coefficients(a, b)
    return snr_t.clamp(max=gamma) * c_out**2


def diffusion_loss(net: nn.Module, x0: torch.Tensor, alphas_cumprod: torch.Tensor, prediction: str = "eps", *,
                   t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                   generator: torch.Generator | None = None, min_snr_gamma: float | None = None,
                   **cond) -> torch.Tensor:
    """Scalar MSE between net(x_t, t, **cond) and the target of ``prediction`` (DDPM L_simple, Ho et al. 2020, Eq. 14).

    t ~ U{0..T-1} and eps ~ N(0, I) are drawn from ``generator`` unless given (pass t from ``sample_t`` for another
    density); ``min_snr_gamma`` adds per-sample weights (see ``min_snr_weights``). The net receives t as a float (B,)
    tensor.
    """
    row = get_parameterization(prediction)
    ab = torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu()
    if not row.zero_snr_ok and ab[-1] == 0:
        raise ValueError(f"prediction={prediction!r} with a zero-terminal-SNR schedule: {_EPS_AT_ZERO_SNR}")
    B, T = x0.shape[0], len(ab)
    if t is None:
        t = sample_t(B, T, generator=generator, device=x0.device).to(x0.device)
    if noise is None:
        noise = randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_t = q_sample(x0, t, noise, ab)
    sigma = sigmas_from_alphas_cumprod(ab)[t.cpu()].to(x0)  # (B,)
    a, b = (append_dims(c, x0.ndim) for c in vp_coefficients(sigma))
    out = net(row.c_in(a, b) * x_t, t.to(x0.dtype), **cond)  # c_in = 1 except for flow (Karras et al. 2022, Eq. 7)
    target = training_target(x0, noise, sigma, prediction)
    if out.shape != target.shape:
        raise ValueError(f"net output must have the shape of x0 {tuple(x0.shape)}, got {tuple(out.shape)}")
    per_sample = ((out - target) ** 2).flatten(1).mean(dim=1)  # (B,)
    if min_snr_gamma is not None:
        weights = min_snr_weights(snr(ab)[t.cpu()], min_snr_gamma, prediction)
        per_sample = per_sample * weights.to(per_sample)
    return per_sample.mean()
