"""Checks for assignment A2, DDPM: the eps-prediction training loss and one ancestral sampling step.

References: minidiff.losses.diffusion_loss and minidiff.samplers.sample_ddpm (variance="fixed_small"),
run for one step with ``library_step``. Wrong variants are written out on purpose, to name a mistake.
"""
from __future__ import annotations

import torch
from torch import nn

from minidiff import denoiser as denoiser_mod
from minidiff import forward, losses, samplers, schedules
from minidiff.course.checks import Mismatch, call, expect, extra_noise, library_step, task
from minidiff.course.checks.diagnose import probe_inputs

F64 = torch.float64


class _TinyEpsNet(nn.Module):
    """A fixed random 'network' net(x, t) whose output depends on both x and t (int or float timesteps)."""

    def __init__(self, channels: int, g: torch.Generator, dtype=torch.float32):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, dtype=dtype)
        with torch.no_grad():
            self.conv.weight.copy_(0.3 * torch.randn(self.conv.weight.shape, generator=g, dtype=dtype))
            self.conv.bias.copy_(0.1 * torch.randn(self.conv.bias.shape, generator=g, dtype=dtype))
        self.t_gain = nn.Parameter(torch.tensor(0.5, dtype=dtype))

    def forward(self, x, t):
        t = torch.as_tensor(t, device=x.device).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))  # (B, 1, 1, 1)
        return torch.tanh(self.conv(x)) + self.t_gain * torch.sin(t / 137.0)


# ----------------------------------------------------------------------------- training loss
def _loss_cases(g: torch.Generator):
    lin = schedules.alphas_cumprod_from_betas(schedules.linear_betas(1000))
    cos = schedules.alphas_cumprod_from_betas(schedules.cosine_betas(1000))

    def case(shape, t, ab, dtype=torch.float32):
        net = _TinyEpsNet(shape[1], g, dtype)
        x0 = torch.randn(shape, generator=g, dtype=dtype).clamp(-1, 1)
        return net, x0, torch.as_tensor(t, dtype=torch.int64), torch.randn(shape, generator=g, dtype=dtype), ab
    yield "random batch, linear schedule", case((4, 2, 8, 8), [5, 300, 700, 999], lin)
    yield "t = 0", case((3, 2, 6, 6), [0, 0, 0], lin)
    yield "t = T-1", case((3, 2, 6, 6), [999] * 3, lin)
    yield "batch of 1, cosine schedule", case((1, 2, 6, 6), [400], cos)
    yield "float64 batch", case((2, 1, 6, 6), [50, 950], lin, F64)


@task("A2.ddpm_loss", func="ddpm_loss", points=3, references=("minidiff.losses.diffusion_loss",))
def check_ddpm_loss(student) -> str:
    n = 0
    for case, (net, x0, t, noise, ab) in _loss_cases(torch.Generator().manual_seed(2)):
        n += 1
        def probe(net=net, x0=x0, t=t, noise=noise, ab=ab, case=case):
            def reference(net, x0, t, noise, ab):
                with torch.no_grad():
                    return losses.diffusion_loss(net, x0, ab, "eps", t=t, noise=noise)
            probe_inputs(student, (net, x0, t, noise, ab), {}, {
                3: (torch.randn(noise.shape, generator=torch.Generator().manual_seed(6)),
                    "the loss uses the noise you are given, in x_t and as the target; do not draw your own"),
                2: ((t + 250) % len(ab), "the net must see the given timesteps t, and x_t is built at t"),
            }, reference, call=call, case=case)
        got = call(student, net, x0, t, noise, ab)
        if isinstance(got, float):
            raise Mismatch(f"returns a Python float (.item()?): return the loss tensor so that loss.backward() "
                           f"can train the net [case: {case}]")
        with torch.no_grad():
            want = losses.diffusion_loss(net, x0, ab, "eps", t=t, noise=noise)
            x_t = forward.q_sample(x0, t, noise, ab)
            a = ab[t].to(x0).reshape(-1, 1, 1, 1)
            x_t_no_sqrt = a * x0 + (1 - a) * noise

        def mse(pred, target):
            return ((pred - target) ** 2).mean()
        with torch.no_grad():
            expect(got, want, case=case, what="loss", rtol=1e-4, atol=1e-6, probe=probe, wrong=[
                ("regresses onto x0; for eps-prediction the target is the noise eps", lambda: mse(net(x_t, t), x0)),
                ("feeds the clean x0 to the net; it must see the noisy x_t = q_sample(x0, t, noise, alphas_cumprod)",
                 lambda: mse(net(x0, t), noise)),
                ("passes t + 1 to the net; timesteps are 0-indexed here, t in [0, T)",
                 lambda: mse(net(x_t, t + 1), noise)),
                ("builds x_t with alphas_cumprod[t] and 1 - alphas_cumprod[t]; both need a sqrt",
                 lambda: mse(net(x_t_no_sqrt, t), noise)),
                ("uses the absolute error; L_simple is the squared error (Ho et al. 2020, Eq. 14)",
                 lambda: (net(x_t, t) - noise).abs().mean()),
                ("sums the squared errors; L_simple averages them (.mean(), or F.mse_loss)",
                 lambda: ((net(x_t, t) - noise) ** 2).sum()),
                ("sums over the pixels of each image; average over all elements (.mean())",
                 lambda: ((net(x_t, t) - noise) ** 2).flatten(1).sum(1).mean()),
            ])
        if got.ndim != 0:
            raise Mismatch(f"returns shape {tuple(got.shape)}; the loss must be a scalar [case: {case}]")
        if not got.requires_grad:
            raise Mismatch(f"returns a loss without a gradient (torch.no_grad(), .detach() or .item()?): "
                           f"loss.backward() could not train the net [case: {case}]")
    return f"matches minidiff.losses.diffusion_loss (eps) on {n} cases, with gradients"


# ----------------------------------------------------------------------------- one ancestral step
def _eq11(x, t, eps, betas, z, *, large=False, var_as_std=False, sign=-1.0, inv_sqrt_alpha=True, denom="ab"):
    """DDPM Eq. 11 with one deliberate change, to recognise a student's mistake (t may be any index)."""
    ab = schedules.alphas_cumprod_from_betas(betas)
    beta, alpha = betas[t].item(), 1 - betas[t].item()
    ab_t, ab_prev = ab[t].item(), (ab[t - 1].item() if t > 0 else 1.0)
    coef = beta / ((1 - ab_t) if denom == "ab" else beta) ** 0.5
    mean = (x + sign * coef * eps) / (alpha**0.5 if inv_sqrt_alpha else 1.0)
    var = beta if large else (1 - ab_prev) / (1 - ab_t) * beta
    return mean + (var if var_as_std else var**0.5) * z if t > 0 else mean


def _step_cases(g: torch.Generator):
    lin = schedules.linear_betas(1000)

    def case(shape, t, betas=lin, dtype=torch.float32):
        x = torch.randn(shape, generator=g, dtype=dtype)
        return x, t, torch.randn(shape, generator=g, dtype=dtype), betas
    yield "t = 500", case((4, 1, 8, 8), 500)
    yield "t = T-1 (the first sampling step)", case((3, 2, 5, 5), 999)
    yield "t = 1", case((3, 2, 5, 5), 1)
    yield "t = 0 (the last step: no noise)", case((3, 2, 5, 5), 0)
    yield "batch of 1, cosine schedule, t = 600", case((1, 3, 4, 4), 600, schedules.cosine_betas(1000))
    yield "float64, t = 250", case((2, 1, 6, 6), 250, dtype=F64)


@task("A2.ddpm_step", func="ddpm_step", points=3, references=("minidiff.samplers.sample_ddpm",))
def check_ddpm_step(student) -> str:
    n = 0
    for case, (x, t, eps_hat, betas) in _step_cases(torch.Generator().manual_seed(3)):
        n += 1
        sigmas = schedules.sigmas_from_alphas_cumprod(schedules.alphas_cumprod_from_betas(betas))
        sigma, sigma_prev = sigmas[t].item(), (sigmas[t - 1].item() if t > 0 else 0.0)
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(100 + n), dtype=x.dtype)
        def probe(x=x, t=t, eps_hat=eps_hat, betas=betas, z=z, case=case):
            if t > 0:
                probe_inputs(student, (x, t, eps_hat, betas, z), {}, {
                    4: (torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=x.dtype),
                        "for t > 0 the step adds the noise you are given, sqrt(beta_tilde_t) * noise"),
                    2: (eps_hat + 0.5, "the mean of x_{t-1} subtracts beta_t / sqrt(1 - alpha_bar_t) * eps_hat"),
                }, call=call, case=case)
        got = call(student, x, t, eps_hat, betas, z)

        def denoiser(x_in, s):  # the x0_hat that eps_hat implies (the sampler's contract)
            return denoiser_mod.x0_from_eps(x_in.double(), eps_hat.double(), s.double()).to(x_in.dtype)
        want = library_step(samplers.sample_ddpm, denoiser, x, sigma, sigma_prev, variance="fixed_small",
                            generator=torch.Generator().manual_seed(100 + n))
        last = "adds noise at the last step (t = 0): x_0 is the posterior mean, with no noise"
        expect(got, want, case=case, what="x_{t-1}", probe=probe, wrong=[
            ("uses the variance beta_t (fixed_large); the task asks for fixed_small, "
             "beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) * beta_t", lambda: _eq11(x, t, eps_hat, betas, z, large=True)),
            ("multiplies the noise by the variance beta_tilde_t; the standard deviation is sqrt(beta_tilde_t)",
             lambda: _eq11(x, t, eps_hat, betas, z, var_as_std=True)),
            ("adds the eps term; DDPM Eq. 11 subtracts beta_t / sqrt(1 - alpha_bar_t) * eps_hat",
             lambda: _eq11(x, t, eps_hat, betas, z, sign=1.0)),
            ("forgot the factor 1 / sqrt(alpha_t) in front of the mean",
             lambda: _eq11(x, t, eps_hat, betas, z, inv_sqrt_alpha=False)),
            ("divides by sqrt(1 - alpha_t) = sqrt(beta_t); DDPM Eq. 11 divides by sqrt(1 - alpha_bar_t)",
             lambda: _eq11(x, t, eps_hat, betas, z, denom="beta")),
            ("is off by one: it uses the coefficients of t - 1", lambda: _eq11(x, t - 1, eps_hat, betas, z)),
            ("is off by one: it uses the coefficients of t + 1", lambda: _eq11(x, t + 1, eps_hat, betas, z)),
            (last if t == 0 else "scales the noise wrongly: its standard deviation must be sqrt(beta_tilde_t)",
             lambda: extra_noise(got, want, z)),
        ], dtype_hint="Cast the float64 schedule coefficients to x_t's dtype.")
    return f"matches minidiff.samplers.sample_ddpm (fixed_small) on {n} single steps, t = 0 and t = T-1 included"
