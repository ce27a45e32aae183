"""Noise schedules as plain functions: betas, alpha_bar, sigma (VE), SNR, timestep spacings.

Every table is a float64 1-D tensor on the CPU; samplers cast per-step scalars to the dtype of x.

| symbol            | code name              | meaning                                               |
|-------------------|------------------------|-------------------------------------------------------|
| beta_t            | ``betas[t]``           | per-step noise variance, DDPM (Ho et al. 2020, Eq. 2) |
| alpha_bar_t       | ``alphas_cumprod[t]``  | prod_{s<=t} (1 - beta_s), DDPM Eq. 4                  |
| sigma_t           | ``sigmas[t]``          | VE noise level sqrt((1 - alpha_bar) / alpha_bar)      |
| SNR_t             | ``snr(...)[t]``        | alpha_bar / (1 - alpha_bar) = 1 / sigma^2             |
| T                 | ``T``                  | number of training timesteps, t in 0..T-1             |
| n                 | ``n``                  | number of sampling steps                              |
"""
from __future__ import annotations

import math

import torch

__all__ = [
    "linear_betas", "scaled_linear_betas", "cosine_betas", "sigmoid_betas", "straight_betas", "SCHEDULES", "make_betas",
    "alphas_cumprod_from_betas", "betas_from_alphas_cumprod", "rescale_zero_terminal_snr",
    "sigmas_from_alphas_cumprod", "alphas_cumprod_from_sigmas", "snr", "log_snr", "vp_coefficients",
    "karras_sigmas", "SPACINGS", "timesteps", "sigmas_for_timesteps", "sigma_to_t", "SAMPLING_SPACINGS",
    "EDM_SIGMA_MAX", "sampling_sigmas",
]

F64 = torch.float64


# ----------------------------------------------------------------------------- validation helpers
def _check_T(T) -> None:
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"T must be a positive int (number of training timesteps), got {T!r}")


def _check_beta_range(beta_start: float, beta_end: float) -> None:
    if not 0.0 < beta_start <= beta_end < 1.0:
        raise ValueError(f"need 0 < beta_start <= beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}")


def _as_table(name: str, x) -> torch.Tensor:
    x = torch.as_tensor(x, dtype=F64)
    if x.ndim != 1 or x.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor, got shape {tuple(x.shape)}")
    if torch.isnan(x).any():
        raise ValueError(f"{name} must not contain NaN")
    return x


def _as_sigma(sigma) -> torch.Tensor:
    if not torch.is_tensor(sigma):
        sigma = torch.as_tensor(sigma, dtype=F64)
    if torch.isnan(sigma).any() or (sigma < 0).any():
        raise ValueError(f"sigma must be >= 0 (inf allowed), got min {sigma.min().item()} or NaN")
    return sigma


# ----------------------------------------------------------------------------- beta schedules
def linear_betas(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Linear betas from beta_start to beta_end, DDPM (Ho et al. 2020, Sec. 4)."""
    _check_T(T)
    _check_beta_range(beta_start, beta_end)
    return torch.linspace(beta_start, beta_end, T, dtype=F64)


def scaled_linear_betas(T: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """Betas linear in sqrt(beta), as in Stable Diffusion (Rombach et al. 2022; diffusers "scaled_linear")."""
    _check_T(T)
    _check_beta_range(beta_start, beta_end)
    return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=F64) ** 2


def cosine_betas(T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Cosine schedule, Nichol & Dhariwal 2021, Eq. 17: alpha_bar(t) = f(t)/f(0), f(t) = cos^2((t/T + s)/(1 + s) pi/2).

    beta_t = 1 - alpha_bar(t+1)/alpha_bar(t), capped at ``max_beta`` to avoid the singularity at t = T.
    """
    _check_T(T)
    if s < 0:
        raise ValueError(f"s must be >= 0, got {s}")
    if not 0.0 < max_beta <= 1.0:
        raise ValueError(f"max_beta must be in (0, 1], got {max_beta}")
    t = torch.arange(T + 1, dtype=F64) / T
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta)


def sigmoid_betas(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Sigmoid betas: beta_start + (beta_end - beta_start) * sigmoid(linspace(-6, 6, T)).

    From GeoDiff (Xu et al. 2022), as diffusers' "sigmoid".
    """
    _check_T(T)
    _check_beta_range(beta_start, beta_end)
    return beta_start + (beta_end - beta_start) * torch.sigmoid(torch.linspace(-6, 6, T, dtype=F64))


def straight_betas(T: int = 1000) -> torch.Tensor:
    """The straight path x = (1 - t) x0 + t eps of flow matching (Lipman et al. 2023, Eq. 20 with sigma_min = 0;
    rectified flow, Liu et al. 2023, Eq. 1) as a VP table, with t_k = (k + 1) / T.

    Its VP state is x_t = x / ((1 - t) + t) scaled to unit norm: a = (1 - t) / r, b = t / r with
    r = sqrt((1 - t)^2 + t^2), so alpha_bar_k = (1 - t_k)^2 / ((1 - t_k)^2 + t_k^2), sigma_k = t_k / (1 - t_k).
    The last entry is pure noise (t = 1, alpha_bar = 0: zero terminal SNR), so eps-prediction cannot use it.
    """
    _check_T(T)
    t = torch.arange(1, T + 1, dtype=F64) / T
    ab = (1 - t) ** 2 / ((1 - t) ** 2 + t**2)
    ab[-1] = 0.0  # exact: t = 1
    return betas_from_alphas_cumprod(ab)


SCHEDULES = {
    "linear": linear_betas,
    "scaled_linear": scaled_linear_betas,
    "cosine": cosine_betas,
    "sigmoid": sigmoid_betas,
    "straight": straight_betas,
}


def make_betas(name: str, T: int = 1000, **kw) -> torch.Tensor:
    """Betas of the schedule called ``name`` (a key of SCHEDULES); extra keywords go to that function."""
    if name not in SCHEDULES:
        raise KeyError(f"unknown schedule name {name!r}; known schedules: {sorted(SCHEDULES)}")
    return SCHEDULES[name](T, **kw)


# ----------------------------------------------------------------------------- conversions
def alphas_cumprod_from_betas(betas) -> torch.Tensor:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s), DDPM (Ho et al. 2020, Eq. 4)."""
    betas = _as_table("betas", betas)
    if (betas < 0).any() or (betas > 1).any():
        raise ValueError(f"betas must lie in [0, 1], got range [{betas.min().item()}, {betas.max().item()}]")
    return torch.cumprod(1 - betas, dim=0)


def betas_from_alphas_cumprod(alphas_cumprod) -> torch.Tensor:
    """Invert the cumulative product: beta_t = 1 - alpha_bar_t / alpha_bar_{t-1} (alpha_bar_{-1} = 1)."""
    ab = _as_table("alphas_cumprod", alphas_cumprod)
    if (ab < 0).any() or (ab > 1).any() or (ab[1:] > ab[:-1]).any():
        raise ValueError("alphas_cumprod must be non-increasing and lie in [0, 1]")
    prev = torch.cat([ab.new_ones(1), ab[:-1]])
    return 1 - ab / prev


def rescale_zero_terminal_snr(betas) -> torch.Tensor:
    """Rescale betas so that the last alpha_bar is exactly 0 (Lin et al. 2024, Alg. 1).

    sqrt(alpha_bar) is shifted so its last entry is 0 and scaled so its first entry is unchanged.
    """
    ab_sqrt = alphas_cumprod_from_betas(betas).sqrt()
    a0, aT = ab_sqrt[0].clone(), ab_sqrt[-1].clone()
    if not a0 > aT:
        raise ValueError("betas: need alpha_bar[0] > alpha_bar[-1] to rescale to zero terminal SNR")
    ab_sqrt = (ab_sqrt - aT) * a0 / (a0 - aT)
    ab = ab_sqrt**2
    ab[-1] = 0.0  # exact by construction; written explicitly against rounding
    return betas_from_alphas_cumprod(ab)


def sigmas_from_alphas_cumprod(alphas_cumprod) -> torch.Tensor:
    """VE noise level sigma = sqrt((1 - alpha_bar) / alpha_bar) (Karras et al. 2022, Table 1); inf at alpha_bar = 0."""
    ab = _as_table("alphas_cumprod", alphas_cumprod)
    if (ab < 0).any() or (ab > 1).any():
        raise ValueError(f"alphas_cumprod must lie in [0, 1], got range [{ab.min().item()}, {ab.max().item()}]")
    return ((1 - ab) / ab).sqrt()  # 1/0 = inf in IEEE arithmetic: zero terminal SNR gives sigma = inf


def alphas_cumprod_from_sigmas(sigmas) -> torch.Tensor:
    """alpha_bar = 1 / (1 + sigma^2); sigma = inf gives alpha_bar = 0."""
    sigmas = _as_sigma(torch.as_tensor(sigmas, dtype=F64))
    return 1 / (1 + sigmas**2)


def snr(alphas_cumprod) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) = 1 / sigma^2 (Kingma et al. 2021, Eq. 1)."""
    ab = _as_table("alphas_cumprod", alphas_cumprod)
    return ab / (1 - ab)


def log_snr(alphas_cumprod) -> torch.Tensor:
    """log SNR = log(alpha_bar) - log(1 - alpha_bar) (Kingma et al. 2021, lambda); -inf at zero terminal SNR."""
    ab = _as_table("alphas_cumprod", alphas_cumprod)
    return ab.log() - torch.log1p(-ab)


def vp_coefficients(sigma) -> tuple[torch.Tensor, torch.Tensor]:
    """(sqrt(alpha_bar), sqrt(1 - alpha_bar)) = (1/sqrt(1+sigma^2), 1/sqrt(1+1/sigma^2)); finite at sigma = 0 and inf.

    A Python number is taken as float64; a tensor keeps its dtype and device.
    """
    sigma = _as_sigma(sigma)
    return torch.rsqrt(1 + sigma**2), torch.rsqrt(1 + sigma ** (-2.0))


# ----------------------------------------------------------------------------- sampling grids
def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022, Eq. 5: n sigmas from sigma_max to sigma_min, uniform in sigma^(1/rho), then a final 0."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if not 0 < sigma_min <= sigma_max < math.inf:
        raise ValueError(f"need 0 < sigma_min <= sigma_max < inf, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if rho <= 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    ramp = torch.linspace(0, 1, n, dtype=F64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


SPACINGS = ("leading", "trailing", "linspace")


def timesteps(T: int, n: int, spacing: str = "trailing", steps_offset: int = 0) -> torch.Tensor:
    """n integer timesteps in [0, T), descending, spaced as in diffusers (Lin et al. 2024, Table 2).

    - "leading":  arange(n) * (T // n) + steps_offset  (DDIM, Song et al. 2021; diffusers' old default)
    - "trailing": round(T - arange(n) * T / n) - 1      (always contains T - 1; Lin et al. 2024, Sec. 3.3)
    - "linspace": round(linspace(0, T - 1, n))
    "trailing" is diffusers' round(arange(T, 0, -T/n)) - 1 written so it always has n entries
    (diffusers' float arange returns n + 1 entries, the last -1, for some n, e.g. T=1000, n=61).
    ``steps_offset`` applies to "leading" only, as in diffusers.
    """
    _check_T(T)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= T:
        raise ValueError(f"n (number of sampling steps) must be an int with 1 <= n <= T={T}, got {n!r}")
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    if steps_offset != 0 and spacing != "leading":
        raise ValueError(f"steps_offset applies to spacing='leading' only, got steps_offset={steps_offset} "
                         f"with spacing={spacing!r}")
    i = torch.arange(n, dtype=F64)
    if spacing == "leading":
        ts = i * (T // n) + steps_offset
    elif spacing == "trailing":
        ts = torch.round(T - i * (T / n)) - 1
    else:
        ts = torch.round(torch.linspace(0, T - 1, n, dtype=F64))
    ts = ts.to(torch.int64).sort(descending=True).values
    if ts[0] > T - 1 or ts[-1] < 0:
        raise ValueError(f"steps_offset={steps_offset} puts timesteps outside [0, {T - 1}] for n={n}")
    return ts


def sigmas_for_timesteps(alphas_cumprod, timesteps) -> torch.Tensor:
    """sigma at each (descending) timestep, then a final 0: the next entry is always the previous timestep's sigma."""
    sigmas = sigmas_from_alphas_cumprod(alphas_cumprod)
    ts = torch.as_tensor(timesteps)
    if ts.ndim != 1 or ts.numel() == 0 or ts.dtype != torch.int64:
        raise ValueError(f"timesteps must be a non-empty 1-D int64 tensor, got shape {tuple(ts.shape)}, {ts.dtype}")
    if ts.min() < 0 or ts.max() >= len(sigmas):
        raise ValueError(f"timesteps must lie in [0, {len(sigmas) - 1}], got range [{ts.min()}, {ts.max()}]")
    if (ts[1:] >= ts[:-1]).any():
        raise ValueError(f"timesteps must be strictly descending, got {ts.tolist()}")
    return torch.cat([sigmas[ts], sigmas.new_zeros(1)])


def sigma_to_t(sigma, alphas_cumprod) -> torch.Tensor:
    """Continuous timestep for sigma: linear interpolation of t in log(sigma) over the table (k-diffusion).

    Exact integers on the grid, clamped to [0, T-1]; sigma = inf maps to T-1; sigma below the table maps to 0.
    The table is first rounded to sigma's dtype, so a grid sigma cast to float32 still maps to an integer.
    Returns a tensor of sigma's shape and (floating) dtype.
    """
    sigma = _as_sigma(sigma)
    out_dtype = sigma.dtype if sigma.is_floating_point() else F64
    table = sigmas_from_alphas_cumprod(alphas_cumprod).to(out_dtype).to(F64)
    T = len(table)
    log_table = table[torch.isfinite(table)].log()  # increasing in t; the finite entries are t = 0..m-1
    log_s = sigma.detach().to(device="cpu", dtype=F64).log()
    if len(log_table) < 2:
        t = torch.zeros_like(log_s)
    else:
        idx = (torch.searchsorted(log_table, log_s, right=True) - 1).clamp(0, len(log_table) - 2)
        lo, hi = log_table[idx], log_table[idx + 1]
        w = torch.where(hi > lo, (log_s - lo) / (hi - lo), torch.zeros_like(log_s)).clamp(0, 1)
        t = idx + w
    t = torch.where(torch.isinf(log_s) & (log_s > 0), torch.full_like(t, T - 1), t)
    return t.to(device=sigma.device, dtype=out_dtype)


SAMPLING_SPACINGS = SPACINGS + ("karras",)
EDM_SIGMA_MAX = 80.0  # Karras et al. 2022, Table 1: sigma_max = 80 for data in [-1, 1]


def sampling_sigmas(alphas_cumprod, n: int, spacing: str = "trailing", *, rho: float = 7.0,
                    sigma_max: float = EDM_SIGMA_MAX) -> torch.Tensor:
    """(n+1,) descending sampling levels ending in 0, for every spacing: the one way to turn a schedule into sigmas.

    - "leading" / "trailing" / "linspace": the table's sigma at ``timesteps(T, n, spacing)`` (Lin et al. 2024,
      Table 2). "trailing" (the default) starts at t = T - 1, the level the model was trained at.
    - "karras": Karras et al. 2022, Eq. 5 (uniform in sigma^(1/rho)) from the table's smallest sigma up to
      min(table max, ``sigma_max``); ``sigma_max`` defaults to EDM's 80. A cosine table reaches sigma ~ 2e4, and
      rho = 7 over that range leaves only 2-3 of 10 levels below sigma = 40, where the image forms; starting at
      80 from N(0, 80^2 I) ignores data of std < 1, a 1e-4 error. ``sigma_max=math.inf`` keeps the whole table
      (diffusers' ``use_karras_sigmas``); ``sigma_max`` applies to "karras" only.
    """
    if spacing not in SAMPLING_SPACINGS:
        raise ValueError(f"spacing must be one of {SAMPLING_SPACINGS}, got {spacing!r}")
    table = sigmas_from_alphas_cumprod(alphas_cumprod)
    if spacing != "karras":
        return sigmas_for_timesteps(alphas_cumprod, timesteps(len(table), n, spacing))
    if not sigma_max > 0:
        raise ValueError(f"sigma_max must be > 0 (math.inf for the whole table), got {sigma_max}")
    finite = table[torch.isfinite(table)]
    if len(finite) == 0:
        raise ValueError("alphas_cumprod has no finite sigma; cannot build Karras sigmas")
    return karras_sigmas(n, finite.min().item(), min(finite.max().item(), sigma_max), rho)
