"""Per-step parity with diffusers' schedulers on the same analytic denoiser, timesteps, start noise and noise draws.

diffusers gets an eps-predicting "model" made from the exact mixture denoiser (eps_hat from x0_hat at the
timestep's sigma); minidiff gets the denoiser itself. Conventions matched here:
- schedule: our alphas_cumprod are diffusers' own (float32) table in float64, so both use one schedule;
- Euler/Heun/Euler-ancestral in diffusers carry the VE sample x / a; we start them from x / a(sigma_0)
  instead of randn * init_noise_sigma and compare a(sigma) * sample with our VP state;
- DDIM: set_alpha_to_one=True (the last step lands on sigma = 0), clip_sample=False;
- DPM-Solver++: solver_order=2, midpoint, final_sigmas_type="zero" (first order on the last step, as ours).
diffusers computes in float32, hence the float32 tolerances.
"""
import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
)

from minidiff import schedules as S
from minidiff.samplers import (
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
)
from minidiff.toy import GaussianMixture

T = 1000
BETAS = S.linear_betas(T).tolist()
TOL = dict(rtol=2e-4, atol=2e-4)
GM = GaussianMixture([[-1.5, 0.0], [1.0, 1.0], [0.5, -1.5]], [0.3, 0.5, 0.2], [0.5, 0.3, 0.2])


def _eps_model(ac64):
    """diffusers-style model(sample_vp, t) -> eps_hat, from the exact x0 denoiser at sigma(t)."""
    table = S.sigmas_from_alphas_cumprod(ac64)

    def model(sample, t):
        sigma = table[int(t)]
        a, b = S.vp_coefficients(sigma)
        x = sample.double()
        return ((x - a * GM.denoiser(x, sigma.expand(len(x)))) / b).float()
    return model


def _ours(fn, x, sigmas, seed=None, **options):
    """Our states before every step, then the final state."""
    states = []
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    out = fn(GM.denoiser, x, sigmas, callback=lambda info: states.append(info["x"]), generator=g, **options)
    return states + [out]


def _diffusers(sched, x, sigmas, seed=None, ve=False, step_kw=None):
    """diffusers' states (as VP) before every step and at the end; ve=True for schedulers that carry x / a."""
    model = _eps_model(sched.alphas_cumprod.double())
    if seed is not None:  # stochastic schedulers draw from this generator in step(), as ours do
        step_kw = {**(step_kw or {}), "generator": torch.Generator().manual_seed(seed)}
    a = S.vp_coefficients(sigmas)[0]
    sample = x / a[0].item() if ve else x.clone()
    states = [sample]
    for t in sched.timesteps:
        model_in = sched.scale_model_input(sample, t)
        sample = sched.step(model(model_in, t), t, sample, **(step_kw or {})).prev_sample
        if getattr(sched, "state_in_first_order", True):  # Heun: keep only completed steps
            states.append(sample)
    if len(states) < len(sigmas):  # Heun's final Euler step leaves it "mid-step"
        states.append(sample)
    return [s * a[i].item() if ve else s for i, s in enumerate(states)]


def _setup(cls, n, **config):
    sched = cls(num_train_timesteps=T, trained_betas=BETAS, **config)
    sched.set_timesteps(n)
    ts = torch.unique_consecutive(sched.timesteps.round().long())
    sigmas = S.sigmas_for_timesteps(sched.alphas_cumprod.double(), ts)
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(n))
    return sched, ts, sigmas, x


def _assert_steps_close(ours, theirs):
    assert len(ours) == len(theirs), (len(ours), len(theirs))
    for i, (o, t) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(o, t, **TOL, msg=lambda m: f"step {i}: {m}")


@pytest.mark.parametrize("n", [1, 10, 50])
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_ddpm_matches_diffusers(n, variance):
    sched, ts, sigmas, x = _setup(DDPMScheduler, n, variance_type=variance, clip_sample=False)
    assert torch.equal(ts, S.timesteps(T, n, "leading"))
    _assert_steps_close(_ours(sample_ddpm, x, sigmas, seed=3, variance=variance),
                        _diffusers(sched, x, sigmas, seed=3))


@pytest.mark.parametrize("n", [1, 10, 50])
@pytest.mark.parametrize("eta", [0.0, 0.6, 1.0])
def test_ddim_matches_diffusers_on_leading_spacing(n, eta):
    sched, ts, sigmas, x = _setup(DDIMScheduler, n, clip_sample=False, set_alpha_to_one=True)
    assert torch.equal(ts, S.timesteps(T, n, "leading"))
    _assert_steps_close(_ours(sample_ddim, x, sigmas, seed=4, eta=eta),
                        _diffusers(sched, x, sigmas, seed=4, step_kw={"eta": eta}))


def test_diffusers_ddim_linspace_uses_wrong_previous_timestep():
    """diffusers' DDIM steps to t - T//n, not to the next listed timestep; with "linspace" these differ.

    n = 10: the list is 999, 888, ..., 111, 0. From t = 111 diffusers lands on the noise level of
    t = 111 - 100 = 11 (and from 999 on 899, which the next call treats as 888). Ours lands on the listed
    timestep; both are checked against DDIM Eq. 12 evaluated by hand.
    """
    sched, ts, sigmas, x = _setup(DDIMScheduler, 10, clip_sample=False, set_alpha_to_one=True,
                                  timestep_spacing="linspace")
    assert ts.tolist() == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    ac, model = sched.alphas_cumprod.double(), _eps_model(sched.alphas_cumprod.double())
    ours = _ours(sample_ddim, x, sigmas)
    for i, (t, listed_prev, diffusers_prev) in enumerate([(999, 888, 899), (111, 0, 11)]):
        x_t = ours[ts.tolist().index(t)]
        eps = model(x_t, t).double()
        x0 = (x_t.double() - (1 - ac[t]).sqrt() * eps) / ac[t].sqrt()

        def eq12(t_prev):  # eta = 0
            return (ac[t_prev].sqrt() * x0 + (1 - ac[t_prev]).sqrt() * eps).float()

        theirs = sched.step(model(x_t, t), t, x_t).prev_sample
        torch.testing.assert_close(ours[ts.tolist().index(t) + 1], eq12(listed_prev), **TOL)
        torch.testing.assert_close(theirs, eq12(diffusers_prev), **TOL)
    assert (ours[-1] - theirs).abs().max() > 1e-2  # at the last step the gap is far above float noise


@pytest.mark.parametrize("n", [1, 10, 50])
def test_euler_matches_diffusers(n):
    sched, ts, sigmas, x = _setup(EulerDiscreteScheduler, n, timestep_spacing="leading")
    assert torch.equal(ts, S.timesteps(T, n, "leading"))
    _assert_steps_close(_ours(sample_euler, x, sigmas), _diffusers(sched, x, sigmas, ve=True))


@pytest.mark.parametrize("n", [1, 10, 50])
def test_euler_ancestral_matches_diffusers_with_same_noise(n):
    sched, ts, sigmas, x = _setup(EulerAncestralDiscreteScheduler, n, timestep_spacing="trailing")
    assert torch.equal(ts, S.timesteps(T, n, "trailing"))
    _assert_steps_close(_ours(sample_euler_ancestral, x, sigmas, seed=7), _diffusers(sched, x, sigmas, seed=7, ve=True))


@pytest.mark.parametrize("n", [1, 2, 10, 25])
def test_heun_matches_diffusers(n):
    """Plain Alg. 1 (max_ratio=inf) is diffusers' Heun; the default guard differs only on steps it guards."""
    sched, ts, sigmas, x = _setup(HeunDiscreteScheduler, n, timestep_spacing="leading")
    assert torch.equal(ts, S.timesteps(T, n, "leading"))
    _assert_steps_close(_ours(sample_heun, x, sigmas, max_ratio=math.inf), _diffusers(sched, x, sigmas, ve=True))


@pytest.mark.parametrize("n", [1, 2, 10, 20, 50])
@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
def test_dpmpp_2m_matches_diffusers(n, spacing):
    sched, ts, sigmas, x = _setup(DPMSolverMultistepScheduler, n, algorithm_type="dpmsolver++", solver_order=2,
                                  solver_type="midpoint", lower_order_final=True, final_sigmas_type="zero",
                                  timestep_spacing=spacing)
    _assert_steps_close(_ours(sample_dpmpp_2m, x, sigmas), _diffusers(sched, x, sigmas))
