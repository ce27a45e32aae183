"""minidiff.toy against independent computations: quadrature, an ODE solver, exact moments."""
import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from minidiff.schedules import vp_coefficients
from minidiff.toy import GaussianMixture, gaussian_pf_ode_endpoint, grid_mixture, ring_mixture, sliced_wasserstein

F64 = torch.float64


def test_denoiser_matches_bayes_by_quadrature():
    """1-D mixture: E[x0 | x] = int x0 p(x0) N(x; a x0, b^2) dx0 / int p(x0) N(x; a x0, b^2) dx0 on a grid."""
    gm = GaussianMixture([[-1.0], [2.0]], [0.4, 0.7], [0.3, 0.7])
    grid = torch.linspace(-8, 10, 200001, dtype=F64)
    prior = sum(w * torch.exp(-0.5 * ((grid - m) / s) ** 2) / s for w, m, s in
                zip(gm.weights, gm.means[:, 0], gm.stds[:, 0]))
    for sigma in [0.05, 0.7, 3.0]:
        a, b = (float(c) for c in vp_coefficients(sigma))
        for x in [-2.0, 0.3, 1.7]:
            lik = torch.exp(-0.5 * ((x - a * grid) / b) ** 2)
            expected = float((grid * prior * lik).sum() / (prior * lik).sum())
            got = float(gm.denoiser(torch.tensor([[x]], dtype=F64), torch.tensor([sigma], dtype=F64)))
            assert got == pytest.approx(expected, abs=1e-6)


def test_denoiser_limits_and_dtype():
    gm = ring_mixture(k=4, radius=1.0)
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    at_inf = gm.denoiser(x, torch.full((5,), math.inf))
    torch.testing.assert_close(at_inf, gm.mean().float().expand(5, 2), atol=1e-6, rtol=0)  # prior mean
    torch.testing.assert_close(gm.denoiser(x, torch.zeros(5)), x)  # sigma = 0: the data point itself
    assert at_inf.dtype == torch.float32
    w = gm.posterior_weights(x, torch.full((5,), 1e-3))
    assert torch.allclose(w.sum(-1), torch.ones(5, dtype=F64)) and w.shape == (5, 4)


def test_pf_ode_endpoint_matches_numerical_ode_solution():
    """Integrate the VE PF-ODE dy/dsigma = (y - D(y)) / sigma with scipy and compare (VP in, VP out)."""
    mean, std = np.array([0.5, -1.0]), np.array([0.3, 1.2])

    def rhs(sigma, y):
        return (y - (mean + std**2 / (std**2 + sigma**2) * (y - mean))) / sigma

    x = torch.tensor([[0.7, -0.4]], dtype=F64)
    sigma0, sigma1 = 20.0, 0.01
    a0, a1 = (float(vp_coefficients(s)[0]) for s in (sigma0, sigma1))
    sol = solve_ivp(rhs, (sigma0, sigma1), x[0].numpy() / a0, rtol=1e-11, atol=1e-12)
    expected = torch.tensor(sol.y[:, -1] * a1)
    got = gaussian_pf_ode_endpoint(x, sigma0, sigma1, mean=torch.tensor(mean), std=torch.tensor(std))
    torch.testing.assert_close(got[0], expected, rtol=1e-7, atol=1e-8)


def test_pf_ode_endpoint_composes_and_is_finite_at_inf():
    mean, std = torch.tensor([1.0, -2.0], dtype=F64), torch.tensor([0.5, 2.0], dtype=F64)
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    mid = gaussian_pf_ode_endpoint(x, math.inf, 2.0, mean=mean, std=std)
    direct = gaussian_pf_ode_endpoint(x, math.inf, 0.0, mean=mean, std=std)
    torch.testing.assert_close(gaussian_pf_ode_endpoint(mid, 2.0, 0.0, mean=mean, std=std), direct)
    torch.testing.assert_close(direct, mean + std * x)  # from pure noise: the standardized value is x itself
    levels = torch.tensor([math.inf, 5.0, 0.0], dtype=F64)  # (B,) levels, one per sample
    assert torch.isfinite(gaussian_pf_ode_endpoint(x, levels, 0.0, mean=mean, std=std)).all()


def test_sample_moments_match_exact_mean_and_cov():
    gm, n = grid_mixture(side=2), 40000
    xs = gm.sample(n, generator=torch.Generator().manual_seed(2), dtype=F64)
    se = (gm.cov().diag() / n).sqrt()
    assert ((xs.mean(0) - gm.mean()).abs() < 4 * se).all()
    assert (torch.cov(xs.T) - gm.cov()).abs().max() < 6 * math.sqrt(2 / n) * gm.cov().abs().max()
    a = gm.sample(10, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, gm.sample(10, generator=torch.Generator().manual_seed(3)))  # same seed, same points


def test_sliced_wasserstein_of_a_shift_in_1d_is_the_shift():
    u = torch.randn(1000, 1, generator=torch.Generator().manual_seed(4), dtype=F64)
    assert float(sliced_wasserstein(u, u + 0.5)) == pytest.approx(0.5, abs=1e-12)
    assert float(sliced_wasserstein(u, u)) == 0.0
    with pytest.raises(ValueError, match="equal D"):
        sliced_wasserstein(u, torch.zeros(3, 2))


@pytest.mark.parametrize("kwargs, message", [
    ({"means": [1.0, 2.0], "stds": [1.0]}, "means must have shape"),
    ({"means": [[0.0], [1.0]], "stds": [1.0, 0.0]}, "stds must be > 0"),
    ({"means": [[0.0], [1.0]], "stds": [1.0, 1.0], "weights": [1.0]}, "weights must be > 0 with shape"),
    ({"means": [[0.0], [math.nan]], "stds": [1.0, 1.0]}, "means must be finite"),
])
def test_bad_mixture_parameters_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GaussianMixture(**kwargs)


def test_denoiser_rejects_wrong_dimension():
    with pytest.raises(ValueError, match=r"x must have shape \(B, 2\)"):
        ring_mixture().denoiser(torch.zeros(4, 3), torch.ones(4))
