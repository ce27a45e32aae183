"""Flow matching in the course's coordinates: the straight path, its time t, the velocity, and an Euler sampler.

Flow matching (Lipman et al. 2023) and rectified flow (Liu et al. 2023) train a net to predict the velocity
u = dx/dt = eps - x0 of the straight path x = (1 - t) x0 + t eps, t in [0, 1], and sample by integrating the ODE
dx/dt = u from t = 1 (noise) to t = 0 (data). Nothing else changes: the path is one more VP table
(``schedules.straight_betas``), the velocity one more row of ``denoiser.PARAMETERIZATIONS`` ("flow"), so the
denoiser contract, CFG and every sampler of ``minidiff.samplers`` work unchanged.

| symbol                  | code                  | meaning                                                   |
|-------------------------|-----------------------|-----------------------------------------------------------|
| t                       | ``t``                 | flow time, b / (a + b) = sigma / (1 + sigma); 1 is noise  |
| x = (1 - t) x0 + t eps  | ``x_flow``            | the point on the straight path; x_flow = x_t / (a + b)    |
| x_t = a x0 + b eps      | ``x``                 | the same point as the VP state the samplers carry         |
| u = eps - x0            | ``u``                 | the velocity, dx/dt (Lipman et al. 2023, Eq. 23)          |
| x0_hat = x - t u_hat    | ``x0_hat``            | what the denoiser returns                                 |

One Euler step of the flow ODE, x' = x + (t' - t) u_hat, is exactly one DDIM (eta = 0) step in the VP state and
one Euler step of the VE ODE (``tests/test_flow.py`` checks both). The learned flow's paths are not straight
(it follows the average velocity through each point; lecture 11 measures them): what the row changes is the
network's target and its input scale, not the solver.
"""
from __future__ import annotations

import torch

from minidiff.denoiser import get_parameterization
from minidiff.samplers import _denoise, _prepare, _report, _steps
from minidiff.schedules import _as_sigma, vp_coefficients
from minidiff.utils import append_dims, check_tensor

__all__ = ["flow_time", "sigma_from_flow_time", "to_flow", "from_flow", "straight_path", "velocity",
           "sample_flow_euler"]


def flow_time(sigma) -> torch.Tensor:
    """t = sigma / (1 + sigma) = b / (a + b), the time of the straight path at VE noise level sigma; inf gives 1."""
    sigma = _as_sigma(sigma)
    return torch.where(torch.isinf(sigma), torch.ones_like(sigma), sigma / (1 + sigma))


def sigma_from_flow_time(t) -> torch.Tensor:
    """sigma = t / (1 - t), the inverse of ``flow_time``; t = 1 gives inf (pure noise)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    if torch.isnan(t).any() or (t < 0).any() or (t > 1).any():
        raise ValueError(f"t must lie in [0, 1] (0 is data, 1 is noise), got range [{t.min().item()}, {t.max().item()}]")
    return torch.where(t == 1, torch.full_like(t, float("inf")), t / (1 - t).clamp(min=1e-300))


def _scale(x: torch.Tensor, sigma) -> torch.Tensor:
    """The flow row's c_in = 1 / (a + b) for sigma (B,) or a scalar, broadcast against x: x_flow = c_in x_t."""
    a, b = vp_coefficients(torch.as_tensor(sigma, dtype=x.dtype, device=x.device))
    c_in = get_parameterization("flow").c_in(a, b)
    return append_dims(c_in, x.ndim) if c_in.ndim else c_in


def to_flow(x: torch.Tensor, sigma) -> torch.Tensor:
    """The VP state x_t = a x0 + b eps as the point (1 - t) x0 + t eps of the straight path: x_t / (a + b)."""
    check_tensor("x", x, shape_doc="(B, ...)")
    return x * _scale(x, sigma)


def from_flow(x_flow: torch.Tensor, sigma) -> torch.Tensor:
    """The inverse of ``to_flow``: x_t = (a + b) x_flow."""
    check_tensor("x_flow", x_flow, shape_doc="(B, ...)")
    return x_flow / _scale(x_flow, sigma)


def straight_path(x0: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
    """x = (1 - t) x0 + t eps, the conditional flow of Lipman et al. 2023, Eq. 20 (sigma_min = 0), t scalar or (B,)."""
    check_tensor("x0", x0, shape_doc="(B, ...)")
    if eps.shape != x0.shape:
        raise ValueError(f"eps must have the shape of x0 {tuple(x0.shape)}, got {tuple(eps.shape)}")
    t = torch.as_tensor(t, dtype=x0.dtype, device=x0.device)
    if (t < 0).any() or (t > 1).any():
        raise ValueError("t must lie in [0, 1] (0 is data, 1 is noise)")
    t = append_dims(t, x0.ndim) if t.ndim else t
    return (1 - t) * x0 + t * eps


def velocity(x: torch.Tensor, x0_hat: torch.Tensor, sigma) -> torch.Tensor:
    """u_hat = (x_flow - x0_hat) / t, the velocity implied by a denoiser's x0_hat at VP state x (t > 0)."""
    t = flow_time(sigma).to(x)
    if (t == 0).any():
        raise ValueError("velocity: sigma must be > 0 (at t = 0 the velocity is not determined by x0_hat)")
    t = append_dims(t, x.ndim) if t.ndim else t
    return (to_flow(x, sigma) - x0_hat) / t


def sample_flow_euler(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None, progress=False,
                      noise_sampler=None):
    """Euler steps of the flow ODE dx/dt = u in flow time: x' = x + (t' - t) u_hat (Liu et al. 2023, Alg. 1).

    The sampler signature of ``minidiff.samplers``: ``x`` is the VP state at ``sigmas[0]`` (for pure noise,
    sigma = inf, that is eps itself) and the result the VP state at sigma = 0. Deterministic: ``generator`` and
    ``noise_sampler`` are accepted and ignored. Equal to ``sample_ddim`` with eta = 0, written in the flow's time.
    """
    s, _, _, cond = _prepare(x, sigmas, extra_args, callback)
    t = flow_time(torch.tensor(s, dtype=torch.float64)).tolist()
    with torch.no_grad():
        x_flow = to_flow(x, s[0])
        for i in _steps(len(s) - 1, progress):
            x_t = from_flow(x_flow, s[i])
            x0_hat = _denoise(denoiser, x_t, s[i], cond)
            _report(callback, i, s[i], s[i + 1], x_t, x0_hat)  # the VP state before the step, as every sampler
            u_hat = (x_flow - x0_hat) / t[i]
            x_flow = x_flow + (t[i + 1] - t[i]) * u_hat
        return x_flow  # t = 0: the flow point is the data point, x_t = x_flow
