"""Samplers: stateless functions that walk a list of noise levels from prior noise down to data.

Every sampler has one signature (docs/DESIGN.md)::

    sample_<name>(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None, progress=False,
                  noise_sampler=None, **options)

and only ever asks the denoiser for ``x0_hat = denoiser(x, sigma)``; it never knows whether the network
behind it predicts eps, x0 or v. The state ``x`` is the VP-scaled ``x_t`` of DDPM and ``sigma`` the VE
noise level, so every update is written with (a, b) = (sqrt(alpha_bar), sqrt(1 - alpha_bar)), which stay
finite at sigma = inf (zero terminal SNR) and at sigma = 0.

| symbol                     | code             | meaning                                              |
|----------------------------|------------------|------------------------------------------------------|
| sigma_i, sigma_{i+1}       | ``s, s_next``    | VE noise level of this step and of the next          |
| sqrt(alpha_bar_i)          | ``a, a_next``    | 1 / sqrt(1 + sigma^2)                                |
| sqrt(1 - alpha_bar_i)      | ``b, b_next``    | sigma / sqrt(1 + sigma^2)                            |
| x_i                        | ``x``            | a x0 + b eps (VP state); the VE state is x / a       |
| D(x_i; sigma_i)            | ``x0_hat``       | the denoiser's estimate of x0                        |
| eps_hat = (x - a x0_hat)/b | ``eps_hat``      | implied noise = dx_ve/dsigma of the VE PF-ODE        |
|                            |                  | (Karras et al. 2022, Eq. 3 with sigma(t) = t)        |

Samplers never build an autograd graph (each runs under ``torch.no_grad``): a 1000-step DDPM run outside
``no_grad`` would otherwise keep every step's activations alive. Stochastic samplers draw their fresh noise from
``noise_sampler(sigma, sigma_next) -> tensor like x`` (k-diffusion's hook; default: N(0, I) from ``generator``),
so image-to-image, inpainting and SDE variants can supply their own; deterministic samplers accept and ignore it.

Useful identity: in VE coordinates x/a = x0_hat + s * eps_hat, so an Euler step of the VE ODE to s_next
lands at x0_hat + s_next * eps_hat, i.e. ``a_next * x0_hat + b_next * eps_hat`` in VP coordinates:
Euler on the VE ODE *is* DDIM with eta = 0.
"""
from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from minidiff.schedules import vp_coefficients
from minidiff.utils import check_generator, check_tensor, get_device, randn

__all__ = ["sample_ddpm", "sample_ddim", "sample_euler", "sample_euler_ancestral", "sample_heun",
           "sample_dpmpp_2m", "sample_dpmpp_2m_sde", "sample_repaint", "SAMPLERS", "get_sampler", "sample",
           "VARIANCES"]

VARIANCES = ("fixed_small", "fixed_large")


# ----------------------------------------------------------------------------- shared plumbing
def _check_sigmas(sigmas) -> torch.Tensor:
    """Validate the noise-level list; return it as float64 on the CPU."""
    if not isinstance(sigmas, torch.Tensor):
        raise ValueError(f"sigmas must be a 1-D torch.Tensor, got {type(sigmas).__name__}")
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(f"sigmas must be 1-D with >= 2 entries (n steps need n+1 levels), got shape {tuple(sigmas.shape)}")
    s = sigmas.detach().to("cpu", torch.float64)
    if torch.isnan(s).any() or (s < 0).any():
        raise ValueError(f"sigmas must be >= 0 and not NaN, got {s.tolist()}")
    if s[-1] != 0:
        raise ValueError(f"sigmas must end in 0 (clean data), got last entry {s[-1].item()}")
    if not torch.isfinite(s[1:]).all():
        raise ValueError(f"sigmas may be inf only in the first entry (zero terminal SNR), got {s.tolist()}")
    if (s[1:] >= s[:-1]).any():
        raise ValueError(f"sigmas must be strictly decreasing (a step of zero length carries no information "
                         f"and breaks multistep solvers), got {s.tolist()}")
    return s


def _noise(x: torch.Tensor, generator, noise_sampler):
    """The noise source of a stochastic step: ``noise_sampler`` if given (checked), else N(0, I) from ``generator``."""
    check_generator(generator)
    if noise_sampler is None:
        return lambda s, s_next: randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    if not callable(noise_sampler):
        raise ValueError(f"noise_sampler must be callable as noise_sampler(sigma, sigma_next) -> tensor like x, "
                         f"got {type(noise_sampler).__name__}")

    def checked(s, s_next):
        z = noise_sampler(s, s_next)
        if not isinstance(z, torch.Tensor) or z.shape != x.shape:
            raise ValueError(f"noise_sampler must return a tensor of shape {tuple(x.shape)}, "
                             f"got {getattr(z, 'shape', type(z).__name__)}")
        return z.to(device=x.device, dtype=x.dtype)
    return checked


def _prepare(x, sigmas, extra_args, callback) -> tuple[list[float], list[float], list[float], dict]:
    """Check the sampler inputs; return per-level Python floats (s, a, b) in float64 and the cond dict."""
    check_tensor("x", x, shape_doc="(B, ...)")
    s = _check_sigmas(sigmas)
    if extra_args is not None and not isinstance(extra_args, dict):
        raise ValueError(f"extra_args must be a dict of keyword tensors or None, got {type(extra_args).__name__}")
    if callback is not None and not callable(callback):
        raise ValueError(f"callback must be callable or None, got {type(callback).__name__}")
    a, b = vp_coefficients(s)
    return s.tolist(), a.tolist(), b.tolist(), dict(extra_args or {})


def _denoise(denoiser, x: torch.Tensor, sigma: float, cond: dict) -> torch.Tensor:
    """Call the denoiser under the contract: sigma as a (B,) tensor of x's dtype and device."""
    return denoiser(x, x.new_full((x.shape[0],), sigma), **cond)


def _eps_hat(x: torch.Tensor, x0_hat: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """Implied noise eps_hat = (x - a x0_hat) / b (b > 0: samplers never evaluate at sigma = 0)."""
    return (x - a * x0_hat) / b


def _steps(n: int, progress: bool):
    return tqdm(range(n), disable=not progress, leave=False)


def _report(callback, i, s, s_next, x, x0_hat) -> None:
    if callback is not None:
        callback({"i": i, "sigma": s, "sigma_next": s_next, "x": x, "x0_hat": x0_hat})


def _check_eta(eta: float, hi: float | None = None) -> None:
    if not (isinstance(eta, (int, float)) and eta >= 0 and (hi is None or eta <= hi)):
        allowed = f"0 <= eta <= {hi}" if hi is not None else "eta >= 0"
        raise ValueError(f"eta must be a number with {allowed}, got {eta!r}")


# ----------------------------------------------------------------------------- DDPM and DDIM
def _ddpm_step(x, x0_hat, a, b, a_next, b_next, variance, z):
    """Sample q(x_next | x, x0_hat), Ho et al. 2020, Eq. 6-7, between two arbitrary levels of the list."""
    alpha = (a / a_next) ** 2  # alpha_t = alpha_bar_t / alpha_bar_prev (0 when sigma = inf)
    beta = 1.0 - alpha
    mean = (a_next * beta / b**2) * x0_hat + (math.sqrt(alpha) * b_next**2 / b**2) * x
    if b_next == 0:  # last step: the mean is x0_hat exactly, no noise
        return mean
    var = beta * b_next**2 / b**2 if variance == "fixed_small" else beta
    return mean + math.sqrt(var) * z()


@torch.no_grad()
def sample_ddpm(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None, progress=False,
                noise_sampler=None, variance="fixed_small"):
    """Ancestral DDPM sampling with posterior mean and variance beta_tilde or beta, Ho et al. 2020, Eq. 6-7."""
    if variance not in VARIANCES:
        raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
    s, a, b, cond = _prepare(x, sigmas, extra_args, callback)
    noise = _noise(x, generator, noise_sampler)
    for i in _steps(len(s) - 1, progress):
        x0_hat = _denoise(denoiser, x, s[i], cond)
        _report(callback, i, s[i], s[i + 1], x, x0_hat)
        x = _ddpm_step(x, x0_hat, a[i], b[i], a[i + 1], b[i + 1], variance, lambda: noise(s[i], s[i + 1]))
    return x


@torch.no_grad()
def sample_ddim(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None, progress=False,
                noise_sampler=None, eta=0.0):
    """DDIM update x_next = a_next x0_hat + sqrt(b_next^2 - sigma_eta^2) eps_hat + sigma_eta z, Song et al. 2021, Eq. 12."""
    _check_eta(eta, hi=1.0)
    s, a, b, cond = _prepare(x, sigmas, extra_args, callback)
    noise = _noise(x, generator, noise_sampler)
    for i in _steps(len(s) - 1, progress):
        x0_hat = _denoise(denoiser, x, s[i], cond)
        _report(callback, i, s[i], s[i + 1], x, x0_hat)
        eps_hat = _eps_hat(x, x0_hat, a[i], b[i])
        # sigma_eta^2 = eta^2 * beta_tilde, Song et al. 2021, Eq. 16
        var = eta**2 * (1.0 - (a[i] / a[i + 1]) ** 2) * b[i + 1] ** 2 / b[i] ** 2
        x = a[i + 1] * x0_hat + math.sqrt(max(b[i + 1] ** 2 - var, 0.0)) * eps_hat
        if var > 0:
            x = x + math.sqrt(var) * noise(s[i], s[i + 1])
    return x


# ----------------------------------------------------------------------------- Karras et al. 2022
@torch.no_grad()
def sample_euler(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None, progress=False,
                 noise_sampler=None):
    """Euler on the VE PF-ODE dx/dsigma = eps_hat, Karras et al. 2022, Alg. 1 without the correction."""
    s, a, b, cond = _prepare(x, sigmas, extra_args, callback)
    _noise(x, generator, noise_sampler)  # deterministic: validated, never drawn from
    for i in _steps(len(s) - 1, progress):
        x0_hat = _denoise(denoiser, x, s[i], cond)
        _report(callback, i, s[i], s[i + 1], x, x0_hat)
        # x_ve + (s_next - s) eps_hat = x0_hat + s_next eps_hat (module docstring); scale by a_next for VP
        x = a[i + 1] * x0_hat + b[i + 1] * _eps_hat(x, x0_hat, a[i], b[i])
    return x


HEUN_MAX_RATIO = 10.0  # steps with sigma / sigma_next above this take the Euler step (see sample_heun)


@torch.no_grad()
def sample_heun(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None, progress=False,
                noise_sampler=None, max_ratio=HEUN_MAX_RATIO):
    """Heun's 2nd-order method, Karras et al. 2022, Alg. 1 (Euler on the step to 0 and on a step from inf).

    Also Euler on any step whose ratio sigma / sigma_next exceeds ``max_ratio`` (default ``HEUN_MAX_RATIO``): the trapezoid averages the
    slopes at both ends, and its correction (s_next - s)(d_next - d) / 2 grows with s. On the cosine schedule's
    first trailing step (sigma 2e4 -> 6) it multiplied the slope difference by 1e4 and ended 100-4,500x farther
    from the exact ODE endpoint than the data mean (tests/test_samplers_scan.py). Alg. 1's own levels (Karras
    spacing from 80) never trigger it at 10 or more steps. ``max_ratio=math.inf`` is plain Alg. 1 (diffusers).
    """
    if not max_ratio > 1:
        raise ValueError(f"max_ratio must be > 1 (math.inf: never fall back to Euler), got {max_ratio}")
    s, a, b, cond = _prepare(x, sigmas, extra_args, callback)
    _noise(x, generator, noise_sampler)  # deterministic: validated, never drawn from
    for i in _steps(len(s) - 1, progress):
        x0_hat = _denoise(denoiser, x, s[i], cond)
        _report(callback, i, s[i], s[i + 1], x, x0_hat)
        d = _eps_hat(x, x0_hat, a[i], b[i])
        x_euler = a[i + 1] * x0_hat + b[i + 1] * d
        if s[i + 1] == 0 or s[i] > max_ratio * s[i + 1]:  # includes s = inf
            x = x_euler
            continue
        d_next = _eps_hat(x_euler, _denoise(denoiser, x_euler, s[i + 1], cond), a[i + 1], b[i + 1])
        # x_ve + (s_next - s)(d + d_next)/2 = Euler result + (s_next - s)(d_next - d)/2  (Alg. 1, line 8)
        x = x_euler + a[i + 1] * (s[i + 1] - s[i]) * 0.5 * (d_next - d)
    return x


@torch.no_grad()
def sample_euler_ancestral(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None,
                           progress=False, noise_sampler=None, eta=1.0):
    """Euler step down to sigma_down, then fresh noise of size sigma_up (k-diffusion get_ancestral_step)."""
    _check_eta(eta)
    s, a, b, cond = _prepare(x, sigmas, extra_args, callback)
    noise = _noise(x, generator, noise_sampler)
    for i in _steps(len(s) - 1, progress):
        x0_hat = _denoise(denoiser, x, s[i], cond)
        _report(callback, i, s[i], s[i + 1], x, x0_hat)
        # sigma_up^2 = s_next^2 (s^2 - s_next^2) / s^2, written with s_next^2 / s^2 -> 0 at s = inf
        sigma_up = min(s[i + 1], eta * s[i + 1] * math.sqrt(1.0 - (s[i + 1] / s[i]) ** 2))
        sigma_down = math.sqrt(s[i + 1] ** 2 - sigma_up**2)
        x_ve = x0_hat + sigma_down * _eps_hat(x, x0_hat, a[i], b[i])
        if sigma_up > 0:
            x_ve = x_ve + sigma_up * noise(s[i], s[i + 1])
        x = a[i + 1] * x_ve
    return x


# ----------------------------------------------------------------------------- DPM-Solver++
def _dpmpp_2m(denoiser, x, sigmas, extra_args, callback, generator, progress, noise_sampler, eta):
    """Shared loop of DPM-Solver++(2M) and its SDE variant (midpoint), in the VP state."""
    s, a, b, cond = _prepare(x, sigmas, extra_args, callback)
    noise = _noise(x, generator, noise_sampler)
    x0_old, h_last = None, None
    for i in _steps(len(s) - 1, progress):
        x0_hat = _denoise(denoiser, x, s[i], cond)
        _report(callback, i, s[i], s[i + 1], x, x0_hat)
        if s[i + 1] == 0:  # last step: first order, lands on x0_hat
            return x0_hat
        q = s[i + 1] / s[i]  # = exp(-h), h = lambda_next - lambda, lambda = -log(sigma); 0 at s = inf
        h = math.log(s[i] / s[i + 1])  # inf at s = inf, then r = inf below and the correction vanishes
        x0_d = x0_hat
        if x0_old is not None:
            r = h_last / h
            x0_d = x0_hat + (x0_hat - x0_old) / (2 * r)  # (1 + 1/2r) D_i - (1/2r) D_{i-1}
        x = (b[i + 1] / b[i]) * q**eta * x + a[i + 1] * (1.0 - q ** (1.0 + eta)) * x0_d
        if eta > 0:
            x = x + b[i + 1] * math.sqrt(1.0 - q ** (2.0 * eta)) * noise(s[i], s[i + 1])
        x0_old, h_last = x0_hat, h
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None, progress=False,
                    noise_sampler=None):
    """DPM-Solver++(2M), multistep 2nd order in x0, Lu et al. 2022 (arXiv:2211.01095), Alg. 2."""
    return _dpmpp_2m(denoiser, x, sigmas, extra_args, callback, generator, progress, noise_sampler, eta=0.0)


@torch.no_grad()
def sample_dpmpp_2m_sde(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None, progress=False,
                        noise_sampler=None, eta=1.0):
    """SDE-DPM-Solver++(2M), Lu et al. 2022, Eq. 18-19 (midpoint form as in k-diffusion); eta = 0 is the ODE."""
    _check_eta(eta)
    return _dpmpp_2m(denoiser, x, sigmas, extra_args, callback, generator, progress, noise_sampler, eta=float(eta))


@torch.no_grad()
def sample_repaint(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None, progress=False,
                   noise_sampler=None, jumps=10, variance="fixed_small"):
    """DDPM with resampling, RePaint (Lugmayr et al. 2022, Alg. 1 with jump length j = 1): each step is taken
    ``jumps`` times (Alg. 1's U, the number of resamplings); between tries the state goes back up one level with
    q(x_i | x_next): x_i = (a_i / a_next) x_next + a_i sqrt(s_i^2 - s_next^2) z, so a wrapped inpainting denoiser
    can harmonise the generated region with the known one. jumps = 1 is ``sample_ddpm``. Not in ``SAMPLERS``: it
    costs ``jumps`` times the NFE of DDPM."""
    if isinstance(jumps, bool) or not isinstance(jumps, int) or jumps < 1:
        raise ValueError(f"jumps must be an int >= 1 (1 = plain DDPM; RePaint's paper uses U = 10 resamplings), "
                         f"got {jumps!r}")
    if variance not in VARIANCES:
        raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
    s, a, b, cond = _prepare(x, sigmas, extra_args, callback)
    noise = _noise(x, generator, noise_sampler)
    for i in _steps(len(s) - 1, progress):
        for u in range(jumps if s[i + 1] > 0 else 1):  # the last step, to sigma = 0, is not resampled
            if u:
                std = math.sqrt(max(b[i] ** 2 - (a[i] * b[i + 1] / a[i + 1]) ** 2, 0.0))  # finite at s[i] = inf
                x = (a[i] / a[i + 1]) * x + std * noise(s[i + 1], s[i])
            x0_hat = _denoise(denoiser, x, s[i], cond)
            _report(callback, i, s[i], s[i + 1], x, x0_hat)
            x = _ddpm_step(x, x0_hat, a[i], b[i], a[i + 1], b[i + 1], variance, lambda: noise(s[i], s[i + 1]))
    return x


# ----------------------------------------------------------------------------- registry
SAMPLERS = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
}


def get_sampler(name: str):
    """The sampler function registered under ``name``."""
    if name not in SAMPLERS:
        raise KeyError(f"sampler must be one of {sorted(SAMPLERS)}, got {name!r}")
    return SAMPLERS[name]


def sample(denoiser, shape, sigmas, *, sampler="dpmpp_2m", generator=None, device=None, extra_args=None,
           callback=None, progress=False, **options):
    """Draw x ~ N(0, I) of ``shape`` (with ``generator``) and run the named sampler over ``sigmas``."""
    fn = get_sampler(sampler)
    if isinstance(shape, int) or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape) \
            or len(shape) < 2:
        raise ValueError(f"shape must be a tuple of positive ints (B, C, H, W) for images, got {shape!r}")
    device = torch.device(device) if device is not None else get_device()
    x = randn(shape, generator=generator, device=device)
    return fn(denoiser, x, sigmas, extra_args=extra_args, callback=callback, generator=generator,
              progress=progress, **options)
