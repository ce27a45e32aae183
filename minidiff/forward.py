"""The forward (noising) process q(x_t | x_0) of DDPM, at a discrete timestep t or a continuous sigma.

| symbol                  | code name                       | meaning                                        |
|-------------------------|---------------------------------|------------------------------------------------|
| x_0                     | ``x0``                          | clean data (B, C, H, W) in [-1, 1]             |
| eps                     | ``noise``                       | standard Gaussian noise, same shape as x0      |
| alpha_bar_t             | ``alphas_cumprod[t]``           | signal fraction at timestep t                  |
| sigma                   | ``sigma``                       | VE noise level sqrt((1-alpha_bar)/alpha_bar)   |
| x_t                     | return value                    | sqrt(alpha_bar) x_0 + sqrt(1-alpha_bar) eps    |
"""
from __future__ import annotations

import torch

from minidiff.schedules import vp_coefficients
from minidiff.utils import append_dims, check_tensor, randn

__all__ = ["q_sample", "q_sample_sigma", "forward_trajectory", "check_timesteps", "check_sigma"]


def check_timesteps(t, batch_size: int, T: int) -> torch.Tensor:
    """Validate a batch of training timesteps: int64 (B,) with values in [0, T)."""
    if not torch.is_tensor(t) or t.dtype != torch.int64:
        raise ValueError(f"t must be an int64 tensor of timesteps, got {type(t).__name__} "
                         f"{getattr(t, 'dtype', '')}")
    if t.shape != (batch_size,):
        raise ValueError(f"t must have shape ({batch_size},) to match the batch, got {tuple(t.shape)}")
    if batch_size > 0 and (t.min() < 0 or t.max() >= T):
        raise ValueError(f"t must lie in [0, {T}) (T={T}), got range [{t.min().item()}, {t.max().item()}]")
    return t


def check_sigma(x: torch.Tensor, sigma) -> torch.Tensor:
    """Validate sigma against the batch of x: a (B,) tensor (or a scalar, expanded), >= 0, inf allowed.

    Returns sigma as a (B,) tensor in x's dtype and on x's device.
    """
    B = x.shape[0]
    sigma = torch.as_tensor(sigma, dtype=x.dtype if x.is_floating_point() else None, device=x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(B)
    if sigma.shape != (B,):
        raise ValueError(f"sigma must have shape ({B},) to match x of shape {tuple(x.shape)}, "
                         f"got {tuple(sigma.shape)}")
    if torch.isnan(sigma).any() or (sigma < 0).any():
        raise ValueError(f"sigma must be >= 0 and not NaN (inf allowed), got min {sigma.min().item()}")
    return sigma.to(x.dtype)


def _check_noise(x0: torch.Tensor, noise: torch.Tensor) -> None:
    check_tensor("x0", x0, shape_doc="(B, ...)")
    check_tensor("noise", noise, shape_doc="like x0")
    if noise.shape != x0.shape:
        raise ValueError(f"noise must have the shape of x0 {tuple(x0.shape)}, got {tuple(noise.shape)}")


def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, DDPM (Ho et al. 2020, Eq. 4)."""
    alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    check_timesteps(t, x0.shape[0], len(alphas_cumprod))
    _check_noise(x0, noise)
    ab = alphas_cumprod[t.cpu()]  # (B,) float64 table lookup on the CPU
    sqrt_ab = append_dims(ab.sqrt().to(x0), x0.ndim)
    sqrt_1m_ab = append_dims((1 - ab).sqrt().to(x0), x0.ndim)
    return sqrt_ab * x0 + sqrt_1m_ab * noise


def q_sample_sigma(x0: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t for a continuous VE noise level sigma (B,): DDPM Eq. 4 with alpha_bar = 1 / (1 + sigma^2)."""
    _check_noise(x0, noise)
    sqrt_ab, sqrt_1m_ab = vp_coefficients(check_sigma(x0, sigma))
    return append_dims(sqrt_ab, x0.ndim) * x0 + append_dims(sqrt_1m_ab, x0.ndim) * noise


def forward_trajectory(x0: torch.Tensor, alphas_cumprod: torch.Tensor, ts, *,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """x_t for each t in ``ts`` with one noise draw shared by all t (DDPM Eq. 4): (len(ts), *x0.shape).

    Sharing eps makes the picture fade smoothly from x_0 to noise, which is what a student wants to see.
    """
    check_tensor("x0", x0, shape_doc="(B, ...)")
    ts = torch.as_tensor(ts, dtype=torch.int64).reshape(-1)
    noise = randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    B = x0.shape[0]
    frames = [q_sample(x0, t.expand(B).clone(), noise, alphas_cumprod) for t in ts]
    return torch.stack(frames)
