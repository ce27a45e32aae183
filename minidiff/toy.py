"""Toy data with an exact denoiser: Gaussian mixtures, the closed-form PF-ODE of a Gaussian, a distance.

For data x0 ~ sum_k w_k N(m_k, diag(s_k^2)) and the VP state x = a x0 + b eps (a = sqrt(alpha_bar),
b = sqrt(1 - alpha_bar), from the VE sigma), everything is Gaussian and the ideal denoiser
E[x0 | x] is analytic (Bishop 2006, Eq. 2.116 per component, then Bayes over components):

| quantity                     | formula                                                 |
|------------------------------|---------------------------------------------------------|
| marginal of component k      | N(x; a m_k, a^2 s_k^2 + b^2)                            |
| responsibility r_k(x)        | w_k N(x; a m_k, a^2 s_k^2 + b^2) / sum_j (same for j)   |
| component posterior mean     | m_k + a s_k^2 / (a^2 s_k^2 + b^2) (x - a m_k)           |
| E[x0 | x]                    | sum_k r_k(x) (component posterior mean)                 |

It is finite at sigma = inf (a = 0: the prior mean) and at sigma = 0 (a = 1, b = 0: x itself), so samplers
can be tested on any schedule, zero terminal SNR included, without a network.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from minidiff.schedules import vp_coefficients
from minidiff.utils import append_dims

__all__ = ["GaussianMixture", "ring_mixture", "grid_mixture", "gaussian_pf_ode_endpoint", "sliced_wasserstein",
           "ToyMLP", "fit_toy"]

F64 = torch.float64


def _as_param(name: str, value, shape_hint: str) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=F64)
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} must be finite, got {t.tolist()}")
    if t.ndim == 0:
        raise ValueError(f"{name} must have shape {shape_hint}, got a scalar")
    return t


class GaussianMixture:
    """x0 ~ sum_k w_k N(m_k, diag(s_k^2)) in D dims, with samples and the exact denoiser E[x0 | x_t]."""

    def __init__(self, means, stds, weights=None):
        self.means = _as_param("means", means, "(K, D)")
        if self.means.ndim != 2:
            raise ValueError(f"means must have shape (K, D), got {tuple(self.means.shape)}")
        K, D = self.means.shape
        stds = _as_param("stds", stds, "(K,) or (K, D)")
        if stds.shape == (K,):
            stds = stds[:, None].expand(K, D)
        if stds.shape != (K, D) or (stds <= 0).any():
            raise ValueError(f"stds must be > 0 with shape ({K},) or ({K}, {D}), got {stds.tolist()}")
        self.stds = stds.contiguous()
        w = torch.full((K,), 1.0 / K, dtype=F64) if weights is None else _as_param("weights", weights, "(K,)")
        if w.shape != (K,) or (w <= 0).any():
            raise ValueError(f"weights must be > 0 with shape ({K},), got {w.tolist()}")
        self.weights = w / w.sum()

    @classmethod
    def gaussian(cls, mean, std) -> "GaussianMixture":
        """A single Gaussian N(mean, diag(std^2)) (K = 1); ``std`` is a number or a (D,) tensor."""
        mean = torch.as_tensor(mean, dtype=F64).reshape(1, -1)
        std = torch.as_tensor(std, dtype=F64).reshape(1, -1).expand_as(mean)
        return cls(mean, std)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, *, generator=None, dtype=torch.float32) -> torch.Tensor:
        """n data points (n, D): a component by weight, then its Gaussian."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=F64)
        return (self.means[k] + self.stds[k] * z).to(dtype)

    def mean(self) -> torch.Tensor:
        """Exact mean of the mixture (D,)."""
        return self.weights @ self.means

    def cov(self) -> torch.Tensor:
        """Exact covariance of the mixture (D, D): sum_k w_k (diag(s_k^2) + m_k m_k^T) - mu mu^T."""
        mu = self.mean()
        second = torch.einsum("k,kd,ke->de", self.weights, self.means, self.means)
        return second + torch.diag(self.weights @ self.stds**2) - torch.outer(mu, mu)

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim < 2 or x[0].numel() != self.dim:
            raise ValueError(f"x must have shape (B, {self.dim}) (or (B, ...) with {self.dim} values per sample), "
                             f"got {tuple(x.shape)}")
        return x.reshape(x.shape[0], self.dim).to(F64)

    def _moments(self, x: torch.Tensor, sigma: torch.Tensor):
        """Per-component marginal variance (B, K, D) and the centred x - a m_k (B, K, D), float64."""
        xf = self._flat(x)
        sigma = torch.as_tensor(sigma, dtype=F64, device=x.device).reshape(-1).expand(xf.shape[0])
        a, b = (append_dims(c, 3) for c in vp_coefficients(sigma))  # (B, 1, 1)
        var = a**2 * self.stds.to(x.device) ** 2 + b**2
        return a, var, xf[:, None, :] - a * self.means.to(x.device)

    def _responsibilities(self, var: torch.Tensor, centred: torch.Tensor) -> torch.Tensor:
        log_p = -0.5 * (centred**2 / var + var.log()).sum(-1) + self.weights.to(var.device).log()
        return torch.softmax(log_p, dim=-1)  # (B, K)

    def posterior_weights(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """Responsibilities r_k(x) = p(component k | x_t) (B, K), exact."""
        _, var, centred = self._moments(x, sigma)
        return self._responsibilities(var, centred)

    def denoiser(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        """Exact E[x0 | x_t] under the denoiser contract (x the VP state, sigma (B,) VE levels, inf allowed)."""
        a, var, centred = self._moments(x, sigma)
        r = self._responsibilities(var, centred)
        post = self.means.to(x.device) + a * self.stds.to(x.device) ** 2 / var * centred  # (B, K, D)
        return torch.einsum("bk,bkd->bd", r, post).reshape(x.shape).to(x.dtype)

    __call__ = denoiser


def ring_mixture(k: int = 8, radius: float = 2.0, std: float = 0.15) -> GaussianMixture:
    """k equal 2-D Gaussians on a circle: the classic toy for multi-modal sampling (lecture 03)."""
    angle = torch.arange(k, dtype=F64) * (2 * math.pi / k)
    return GaussianMixture(radius * torch.stack([angle.cos(), angle.sin()], 1), torch.full((k,), std))


def grid_mixture(side: int = 3, spacing: float = 1.5, std: float = 0.15) -> GaussianMixture:
    """side x side equal 2-D Gaussians on a centred square grid."""
    c = (torch.arange(side, dtype=F64) - (side - 1) / 2) * spacing
    means = torch.cartesian_prod(c, c)
    return GaussianMixture(means, torch.full((len(means),), std))


def gaussian_pf_ode_endpoint(x: torch.Tensor, sigma, sigma_end=0.0, *, mean, std) -> torch.Tensor:
    """Exact PF-ODE solution from (x, sigma) to sigma_end for data N(mean, diag(std^2)), VP states in and out.

    Along the VE PF-ODE dy/dsigma = (y - D(y; sigma)) / sigma with y = x / a, the standardized value
    z = (y - mean) / sqrt(std^2 + sigma^2) = (x - a mean) / sqrt(a^2 std^2 + b^2) is constant
    (Karras et al. 2022, Eq. 3 with the Gaussian denoiser). The second form is finite at sigma = inf.
    """
    def coeffs(level):
        level = torch.as_tensor(level, dtype=F64, device=x.device)
        if level.ndim > 1 or (level < 0).any() or torch.isnan(level).any():
            raise ValueError(f"sigma levels must be >= 0 scalars or (B,) tensors, got {level}")
        return (append_dims(c, x.ndim) for c in vp_coefficients(level.reshape(-1) if level.ndim else level))

    mean, std = torch.as_tensor(mean, dtype=F64), torch.as_tensor(std, dtype=F64)
    a, b = coeffs(sigma)
    a_end, b_end = coeffs(sigma_end)
    z = (x.to(F64) - a * mean) / (a**2 * std**2 + b**2).sqrt()
    return (a_end * mean + z * (a_end**2 * std**2 + b_end**2).sqrt()).to(x.dtype)


def sliced_wasserstein(u: torch.Tensor, v: torch.Tensor, *, n_projections: int = 128, generator=None) -> torch.Tensor:
    """Sliced 1-Wasserstein distance between two point clouds (N, D) and (M, D) (Bonneel et al. 2015).

    Each random direction's 1-D W1 is computed from the two empirical quantile functions on a common grid.
    """
    if u.ndim != 2 or v.ndim != 2 or u.shape[1] != v.shape[1]:
        raise ValueError(f"u and v must be (N, D) and (M, D) with equal D, got {tuple(u.shape)} and {tuple(v.shape)}")
    dirs = torch.randn(u.shape[1], n_projections, generator=generator, dtype=F64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pu = (dirs.T @ u.to(F64).T).sort(-1).values  # (P, N) sorted projections: empirical quantiles
    pv = (dirs.T @ v.to(F64).T).sort(-1).values  # (P, M)
    q = (torch.arange(max(len(u), len(v)), dtype=F64) + 0.5) / max(len(u), len(v))
    iu, iv = (q * len(u)).long(), (q * len(v)).long()
    return (pu[:, iu] - pv[:, iv]).abs().mean()


class ToyMLP(nn.Module):
    """A small MLP ``net(x, t) -> tensor like x`` for 2-D toy data, the U-Net's contract on vectors (B, D).

    t (B,) in [0, T) enters as sin/cos features at ``frequencies`` octaves (Vaswani et al. 2017's embedding,
    the U-Net's ``timestep_embedding`` in miniature), concatenated with x.
    """

    def __init__(self, dim: int = 2, T: int = 1000, hidden: int = 128, frequencies: int = 8):
        super().__init__()
        if dim < 1 or T < 1 or hidden < 1 or frequencies < 1:
            raise ValueError(f"dim, T, hidden and frequencies must be >= 1, got {dim}, {T}, {hidden}, {frequencies}")
        self.T, self.frequencies = T, frequencies
        self.net = nn.Sequential(nn.Linear(dim + 2 * frequencies, hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                 nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or t.shape != (x.shape[0],):
            raise ValueError(f"ToyMLP takes x (B, D) and t (B,), got {tuple(x.shape)} and {tuple(t.shape)}")
        octaves = 2.0 ** torch.arange(self.frequencies, dtype=x.dtype, device=x.device)
        phase = (t.to(x.dtype) / self.T)[:, None] * octaves[None] * math.pi
        return self.net(torch.cat([x, phase.sin(), phase.cos()], dim=1))


def fit_toy(net: nn.Module, mixture: GaussianMixture, alphas_cumprod, prediction: str, *, steps: int,
            batch_size: int = 256, lr: float = 2e-3, generator: torch.Generator | None = None) -> nn.Module:
    """Train ``net`` on fresh samples of ``mixture`` with Adam and ``losses.diffusion_loss`` (DDPM Alg. 1 with the
    target of ``prediction``); returns it in eval mode. Lecture 11 writes this loop out; tests call it."""
    from minidiff.losses import diffusion_loss  # imported here: losses imports the denoiser, which toy must not

    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got steps={steps}, batch_size={batch_size}")
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(steps):
        loss = diffusion_loss(net, mixture.sample(batch_size, generator=generator), alphas_cumprod, prediction,
                              generator=generator)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()
