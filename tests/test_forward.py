"""The forward process q(x_t | x_0): closed form, diffusers parity, shape validation."""
import pytest
import torch

from minidiff import schedules as S
from minidiff.forward import forward_trajectory, q_sample, q_sample_sigma

AB = S.alphas_cumprod_from_betas(S.linear_betas())


def test_q_sample_closed_form(gen):
    x0 = torch.randn(3, 1, 4, 4, generator=gen, dtype=torch.float64)
    noise = torch.randn(3, 1, 4, 4, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 500, 999])
    x_t = q_sample(x0, t, noise, AB)
    for i in range(3):
        ab = AB[t[i]]
        assert torch.allclose(x_t[i], ab.sqrt() * x0[i] + (1 - ab).sqrt() * noise[i], rtol=1e-12)


def test_q_sample_matches_diffusers_add_noise(gen):
    from diffusers import DDPMScheduler
    hf = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    x0 = torch.randn(4, 3, 8, 8, generator=gen)
    noise = torch.randn(4, 3, 8, 8, generator=gen)
    t = torch.tensor([3, 250, 700, 999])
    assert torch.allclose(q_sample(x0, t, noise, AB), hf.add_noise(x0, noise, t), atol=1e-5)


def test_q_sample_sigma_agrees_with_q_sample_on_grid(gen):
    x0 = torch.randn(4, 2, 5, generator=gen, dtype=torch.float64)
    noise = torch.randn(4, 2, 5, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 10, 400, 999])
    sigma = S.sigmas_from_alphas_cumprod(AB)[t]
    assert torch.allclose(q_sample_sigma(x0, sigma, noise), q_sample(x0, t, noise, AB), rtol=1e-10, atol=1e-12)


def test_q_sample_sigma_extremes_are_exact(gen):
    x0 = torch.randn(2, 3, generator=gen)
    noise = torch.randn(2, 3, generator=gen)
    out = q_sample_sigma(x0, torch.tensor([0.0, float("inf")]), noise)
    assert torch.equal(out[0], x0[0]) and torch.equal(out[1], noise[1])


def test_q_sample_marginal_statistics(gen):
    # x0 = 1 everywhere: x_t ~ N(sqrt(ab), 1 - ab); 20000 draws -> mean error ~ 0.007, tolerance 5 std errors
    t_idx = 300
    x0 = torch.ones(20000, 1)
    noise = torch.randn(20000, 1, generator=gen)
    x_t = q_sample(x0, torch.full((20000,), t_idx), noise, AB)
    ab = AB[t_idx].item()
    se = ((1 - ab) / 20000) ** 0.5
    assert abs(x_t.mean().item() - ab**0.5) < 5 * se
    assert abs(x_t.var().item() - (1 - ab)) < 5 * (1 - ab) * (2 / 20000) ** 0.5


@pytest.mark.parametrize("t, match", [
    (torch.tensor([1.0, 2.0]), "int64"),
    (torch.tensor([1, 2, 3]), r"shape \(2,\)"),
    (torch.tensor([0, 1000]), r"t must lie in \[0, 1000\)"),
    (torch.tensor([-1, 3]), r"t must lie in"),
    (5, "int64"),
])
def test_q_sample_rejects_bad_t(t, match):
    x0 = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=match):
        q_sample(x0, t, torch.zeros(2, 3), AB)


def test_shape_mismatches_are_named():
    with pytest.raises(ValueError, match="noise must have the shape of x0"):
        q_sample(torch.zeros(2, 3), torch.tensor([1, 2]), torch.zeros(2, 4), AB)
    with pytest.raises(ValueError, match=r"sigma must have shape \(2,\)"):
        q_sample_sigma(torch.zeros(2, 3), torch.ones(3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="sigma must be >= 0"):
        q_sample_sigma(torch.zeros(2, 3), torch.tensor([1.0, -1.0]), torch.zeros(2, 3))


def test_forward_trajectory_shares_one_noise_draw(gen):
    x0 = torch.randn(2, 1, 4, 4, generator=gen, dtype=torch.float64)
    ts = [0, 100, 500, 999]
    traj = forward_trajectory(x0, AB, ts, generator=torch.Generator().manual_seed(1))
    assert traj.shape == (4, 2, 1, 4, 4)
    eps = [(traj[k] - AB[t].sqrt() * x0) / (1 - AB[t]).sqrt() for k, t in enumerate(ts)]
    for e in eps[1:]:
        assert torch.allclose(e, eps[0], rtol=1e-8, atol=1e-8)
    again = forward_trajectory(x0, AB, ts, generator=torch.Generator().manual_seed(1))
    assert torch.equal(traj, again)
