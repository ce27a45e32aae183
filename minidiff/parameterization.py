"""The one denoiser contract, conversions between eps / x0 / v, and the training loss for each.

Contract (docs/DESIGN.md): ``denoiser(x, sigma, **cond) -> x0_hat`` where ``x`` is the VP state
x_t = a x_0 + b eps and ``sigma`` (B,) the VE noise level, with (a, b) = vp_coefficients(sigma).

| symbol                       | code name      | meaning                                                       |
|------------------------------|----------------|---------------------------------------------------------------|
| a = sqrt(alpha_bar)          | ``sqrt_ab``    | signal coefficient, 1 / sqrt(1 + sigma^2)                     |
| b = sqrt(1 - alpha_bar)      | ``sqrt_1m_ab`` | noise coefficient, sigma / sqrt(1 + sigma^2)                  |
| eps_hat                      | ``eps``        | predicted noise (Ho et al. 2020)                              |
| x0_hat                       | ``x0``         | predicted clean data                                          |
| v = a eps - b x_0            | ``v``          | velocity (Salimans & Ho 2022, Sec. 4)                         |
| SNR = a^2 / b^2              | ``snr``        | signal-to-noise ratio 1 / sigma^2                             |
"""
from __future__ import annotations

import torch
from torch import nn

from .forward import check_sigma, q_sample
from .schedules import sigma_to_t, sigmas_from_alphas_cumprod, snr, vp_coefficients
from .utils import append_dims

__all__ = [
    "PREDICTIONS", "eps_from_x0", "x0_from_eps", "x0_from_v", "v_from_x0_eps", "eps_from_v",
    "Denoiser", "training_target", "diffusion_loss", "min_snr_weights",
]

PREDICTIONS = ("eps", "x0", "v")

_EPS_AT_ZERO_SNR = ("eps-prediction is undefined at zero SNR (sigma = inf, alpha_bar = 0): x0 = (x - b eps) / a "
                    "divides by a = 0. Use prediction='v' with zero-terminal-SNR schedules (Lin et al. 2023, Sec. 3.2)")


def _check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


def _coeffs(x: torch.Tensor, sigma) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) for sigma (B,), broadcast against x with append_dims."""
    sqrt_ab, sqrt_1m_ab = vp_coefficients(check_sigma(x, sigma))
    return append_dims(sqrt_ab, x.ndim), append_dims(sqrt_1m_ab, x.ndim)


# ----------------------------------------------------------------------------- conversions
def eps_from_x0(x: torch.Tensor, x0: torch.Tensor, sigma) -> torch.Tensor:
    """eps = (x_t - a x0) / b, from DDPM Eq. 4; undefined at sigma = 0 (b = 0), where it raises."""
    a, b = _coeffs(x, sigma)
    if (b == 0).any():
        raise ValueError("sigma must be > 0 to recover eps from x0 (at sigma = 0, x_t = x0 carries no noise)")
    return (x - a * x0) / b


def x0_from_eps(x: torch.Tensor, eps: torch.Tensor, sigma) -> torch.Tensor:
    """x0 = (x_t - b eps) / a, from DDPM Eq. 4 (Ho et al. 2020, Eq. 15); raises at sigma = inf (a = 0)."""
    a, b = _coeffs(x, sigma)
    if (a == 0).any():
        raise ValueError(_EPS_AT_ZERO_SNR)
    return (x - b * eps) / a


def x0_from_v(x: torch.Tensor, v: torch.Tensor, sigma) -> torch.Tensor:
    """x0 = a x_t - b v (Salimans & Ho 2022, Sec. 4); finite for every sigma, including inf."""
    a, b = _coeffs(x, sigma)
    return a * x - b * v


def eps_from_v(x: torch.Tensor, v: torch.Tensor, sigma) -> torch.Tensor:
    """eps = b x_t + a v (Salimans & Ho 2022, Sec. 4)."""
    a, b = _coeffs(x, sigma)
    return b * x + a * v


def v_from_x0_eps(x0: torch.Tensor, eps: torch.Tensor, sigma) -> torch.Tensor:
    """v = a eps - b x0 (Salimans & Ho 2022, Sec. 4)."""
    a, b = _coeffs(x0, sigma)
    return a * eps - b * x0


# ----------------------------------------------------------------------------- the wrapper
class Denoiser(nn.Module):
    """Wrap ``net(x, t, **cond)`` trained to predict eps, x0 or v into the contract ``D(x, sigma, **cond) -> x0_hat``.

    sigma is mapped to a continuous timestep with ``sigma_to_t`` (k-diffusion's DiscreteEpsDDPMDenoiser),
    so the net sees the same t it saw in training on the grid, and an interpolated t between grid points.
    The float64 table ``alphas_cumprod`` is a plain attribute (not a buffer) so ``.to(dtype)`` never rounds it.

    ``clip_x0=True`` clamps x0_hat to the data range [-1, 1] ("clip_denoised" in Ho et al. 2020's sampler; static
    thresholding in Saharia et al. 2022, Sec. 2.3). An eps-model's x0_hat = (x - b eps_hat) / a multiplies any
    error in eps_hat by 1/a = sqrt(1 + sigma^2), about 2e4 at the last step of the cosine schedule: without the
    clamp a single wrong pixel there can survive the whole reverse process.
    """

    def __init__(self, net: nn.Module, alphas_cumprod: torch.Tensor, prediction: str = "eps", *,
                 clip_x0: bool = False):
        super().__init__()
        _check_prediction(prediction)
        self.net = net
        self.prediction = prediction
        self.clip_x0 = bool(clip_x0)
        self.alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu()
        sigmas = sigmas_from_alphas_cumprod(self.alphas_cumprod)
        self.sigma_min, self.sigma_max = sigmas.min().item(), sigmas.max().item()  # sigma_max = inf at zero SNR

    def predict(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        """The raw network output (eps, x0 or v) at noise level sigma (B,)."""
        sigma = check_sigma(x, sigma)
        t = sigma_to_t(sigma, self.alphas_cumprod).to(x.dtype)  # float (B,)
        return self.net(x, t, **cond)

    def forward(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        """x0_hat = D(x, sigma, **cond), converted from the net's parameterization."""
        sigma = check_sigma(x, sigma)
        if self.prediction == "eps" and torch.isinf(sigma).any():
            raise ValueError(_EPS_AT_ZERO_SNR)
        out = self.predict(x, sigma, **cond)
        if out.shape != x.shape:
            raise ValueError(f"net output must have the shape of x {tuple(x.shape)}, got {tuple(out.shape)}")
        if self.prediction == "x0":
            x0_hat = out
        elif self.prediction == "eps":
            x0_hat = x0_from_eps(x, out, sigma)
        else:
            x0_hat = x0_from_v(x, out, sigma)
        return x0_hat.clamp(-1, 1) if self.clip_x0 else x0_hat


# ----------------------------------------------------------------------------- training
def training_target(x0: torch.Tensor, eps: torch.Tensor, sigma, prediction: str) -> torch.Tensor:
    """Regression target for the net: eps (Ho et al. 2020, Eq. 14), x0, or v (Salimans & Ho 2022)."""
    _check_prediction(prediction)
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    return v_from_x0_eps(x0, eps, sigma)


def min_snr_weights(snr_t: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting"), per sample.

    Each weight turns its parameterization's MSE into min(SNR, gamma) * ||x0 - x0_hat||^2:
    eps: min(SNR, gamma) / SNR;   x0: min(SNR, gamma);   v: min(SNR, gamma) / (SNR + 1).
    """
    _check_prediction(prediction)
    if not gamma > 0:
        raise ValueError(f"min_snr_gamma must be > 0 (Hang et al. use 5), got {gamma}")
    clipped = snr_t.clamp(max=gamma)
    if prediction == "eps":
        return clipped / snr_t
    if prediction == "x0":
        return clipped
    return clipped / (snr_t + 1)


def diffusion_loss(net: nn.Module, x0: torch.Tensor, alphas_cumprod: torch.Tensor, prediction: str = "eps", *,
                   t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                   generator: torch.Generator | None = None, min_snr_gamma: float | None = None,
                   **cond) -> torch.Tensor:
    """Scalar MSE between net(x_t, t, **cond) and the target of ``prediction`` (DDPM L_simple, Ho et al. 2020, Eq. 14).

    t ~ U{0..T-1} and eps ~ N(0, I) are drawn from ``generator`` unless given; ``min_snr_gamma`` adds per-sample
    weights (see ``min_snr_weights``). The net receives t as a float (B,) tensor.
    """
    _check_prediction(prediction)
    ab = torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu()
    if prediction == "eps" and ab[-1] == 0:
        raise ValueError(f"prediction='eps' with a zero-terminal-SNR schedule: {_EPS_AT_ZERO_SNR}")
    B, T = x0.shape[0], len(ab)
    device = generator.device if generator is not None else x0.device
    if t is None:
        t = torch.randint(0, T, (B,), generator=generator, device=device).to(x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype).to(x0.device)
    x_t = q_sample(x0, t, noise, ab)
    sigma = sigmas_from_alphas_cumprod(ab)[t.cpu()].to(x0)  # (B,)
    out = net(x_t, t.to(x0.dtype), **cond)
    target = training_target(x0, noise, sigma, prediction)
    if out.shape != target.shape:
        raise ValueError(f"net output must have the shape of x0 {tuple(x0.shape)}, got {tuple(out.shape)}")
    per_sample = ((out - target) ** 2).flatten(1).mean(dim=1)  # (B,)
    if min_snr_gamma is not None:
        weights = min_snr_weights(snr(ab)[t.cpu()], min_snr_gamma, prediction)
        per_sample = per_sample * weights.to(per_sample)
    return per_sample.mean()
