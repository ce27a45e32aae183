"""The one denoiser contract, the table of parameterizations (eps / x0 / v / flow), and conversions between them.

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
| F                            | ``out``        | the raw network output                                        |
| c_skip, c_out                | ``c_skip, c_out`` | x0_hat = c_skip x_t + c_out F (Karras et al. 2022, Eq. 7)  |
| c_in                         | ``c_in``       | the net sees c_in x_t (1 except for flow: 1 / (a + b))        |
| u = eps - x_0                | ``flow``       | velocity of the straight path (1 - t) x0 + t eps (Lipman 2023)|

Every parameterization is one row of ``PARAMETERIZATIONS``: its (c_skip, c_out), its input scale c_in and its
regression target.
The Denoiser, the loss (``minidiff.losses``) and min-SNR weighting all read the table; none branches on the name.
Training on the target makes x0_hat = c_skip x_t + c_out F exact: target = (x0 - c_skip x_t) / c_out.

Training losses live in ``minidiff.losses``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from minidiff.forward import check_sigma
from minidiff.schedules import sigma_to_t, sigmas_from_alphas_cumprod, vp_coefficients
from minidiff.utils import append_dims, check_tensor

__all__ = [
    "Parameterization", "PARAMETERIZATIONS", "PREDICTIONS", "get_parameterization",
    "eps_from_x0", "x0_from_eps", "x0_from_v", "v_from_x0_eps", "eps_from_v", "Denoiser", "NFECounter",
    "num_classes_of",
]

_EPS_AT_ZERO_SNR = ("eps-prediction is undefined at zero SNR (sigma = inf, alpha_bar = 0): x0 = (x - b eps) / a "
                    "divides by a = 0. Use prediction='v' (or 'x0') with zero-terminal-SNR schedules "
                    "(Lin et al. 2024, Sec. 3.2)")


@dataclass(frozen=True)
class Parameterization:
    """What a network predicts, as functions of (a, b) = vp_coefficients(sigma) (EDM's preconditioning, Eq. 7).

    ``coefficients(a, b) -> (c_skip, c_out)`` with x0_hat = c_skip x_t + c_out F(c_in x_t),
    ``target(x0, eps, a, b)``, the regression target of F, and ``c_in(a, b)``, the scale of the net's input.
    """

    name: str
    coefficients: Callable
    target: Callable
    zero_snr_ok: bool  # False where c_skip = 1 / a is infinite at sigma = inf
    c_in: Callable = lambda a, b: torch.ones_like(a)


# One row per parameterization; x_t = a x0 + b eps.
PARAMETERIZATIONS = {
    # eps: x0 = (x_t - b eps) / a (Ho et al. 2020, Eq. 15)
    "eps": Parameterization("eps", lambda a, b: (1 / a, -b / a), lambda x0, eps, a, b: eps, zero_snr_ok=False),
    # x0: the net predicts the clean image directly
    "x0": Parameterization("x0", lambda a, b: (0 * a, 1 + 0 * a), lambda x0, eps, a, b: x0, zero_snr_ok=True),
    # v = a eps - b x0, x0 = a x_t - b v (Salimans & Ho 2022, Sec. 4)
    "v": Parameterization("v", lambda a, b: (a, -b), lambda x0, eps, a, b: a * eps - b * x0, zero_snr_ok=True),
    # flow: the straight path x = (1 - t) x0 + t eps = x_t / (a + b) with t = b / (a + b); the net sees it and
    # predicts the velocity u = dx/dt = eps - x0; x0 = x - t u (Lipman et al. 2023, Eq. 23; Liu et al. 2023, Eq. 1)
    "flow": Parameterization("flow", lambda a, b: (1 / (a + b), -b / (a + b)), lambda x0, eps, a, b: eps - x0,
                             zero_snr_ok=True, c_in=lambda a, b: 1 / (a + b)),
}
PREDICTIONS = tuple(PARAMETERIZATIONS)


def get_parameterization(prediction: str) -> Parameterization:
    """The row of ``PARAMETERIZATIONS`` called ``prediction``; a clear error for an unknown name."""
    if prediction not in PARAMETERIZATIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    return PARAMETERIZATIONS[prediction]


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
                 clip_x0: bool = False, image_shape: tuple | None = None):
        super().__init__()
        self.parameterization = get_parameterization(prediction)
        self.net = net
        self.prediction = prediction
        self.clip_x0 = bool(clip_x0)
        self.image_shape = tuple(image_shape) if image_shape is not None else None  # (C, H, W) of one sample
        self.alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu()
        sigmas = sigmas_from_alphas_cumprod(self.alphas_cumprod)
        self.sigma_min, self.sigma_max = sigmas.min().item(), sigmas.max().item()  # sigma_max = inf at zero SNR

    @property
    def num_classes(self) -> int | None:
        """K for a class-conditional net (its null class has id K), else None."""
        return getattr(getattr(self.net, "config", None), "num_classes", None)

    @property
    def context_dim(self) -> int | None:
        """D of the context sequence (B, L, D) a text-conditioned net cross-attends to, else None."""
        return getattr(getattr(self.net, "config", None), "context_dim", None)

    def null_condition(self, batch_size: int, device=None) -> dict:
        """The unconditional branch for CFG: ``{"class_labels": K * ones(B)}`` for a class-conditional net.

        A text model's null condition is the encoded empty prompt, which only its text encoder can build
        (the text-to-image pipeline does that); an unconditional net has none.
        """
        if self.num_classes is not None:
            return {"class_labels": torch.full((batch_size,), self.num_classes, dtype=torch.int64, device=device)}
        if self.context_dim is not None:
            raise ValueError("null_condition: this net is conditioned on a context sequence; its null condition is "
                             "the empty prompt encoded by its text encoder (use the text-to-image pipeline)")
        raise ValueError("null_condition: this net is unconditional, so it has no null condition (and needs no CFG)")

    def predict(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        """The raw network output (eps, x0, v or the flow velocity) at noise level sigma (B,), given c_in x."""
        sigma = check_sigma(x, sigma)
        t = sigma_to_t(sigma, self.alphas_cumprod).to(x.dtype)  # float (B,)
        c_in = self.parameterization.c_in(*_coeffs(x, sigma))
        return self.net(c_in * x, t, **cond)

    def forward(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        """x0_hat = D(x, sigma, **cond), converted from the net's parameterization."""
        check_tensor("x", x, shape_doc="(B, C, H, W)")
        sigma = check_sigma(x, sigma)
        if not self.parameterization.zero_snr_ok and torch.isinf(sigma).any():
            raise ValueError(_EPS_AT_ZERO_SNR)
        out = self.predict(x, sigma, **cond)
        if out.shape != x.shape:
            raise ValueError(f"net output must have the shape of x {tuple(x.shape)}, got {tuple(out.shape)}")
        c_skip, c_out = self.parameterization.coefficients(*_coeffs(x, sigma))
        x0_hat = c_skip * x + c_out * out
        return x0_hat.clamp(-1, 1) if self.clip_x0 else x0_hat


def num_classes_of(denoiser) -> int | None:
    """K of a class-conditional denoiser (a ``Denoiser`` or anything exposing ``num_classes``), else None."""
    return getattr(denoiser, "num_classes", None)


class NFECounter(nn.Module):
    """A pass-through denoiser that counts its calls: the number of function evaluations (NFE) of a sampler run."""

    def __init__(self, denoiser):
        super().__init__()
        self.denoiser, self.calls = denoiser, 0

    @property
    def num_classes(self) -> int | None:
        return num_classes_of(self.denoiser)

    def forward(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        self.calls += 1
        return self.denoiser(x, sigma, **cond)
