"""Checks for assignment A3, samplers: one DDIM step with eta, one Euler step, one Heun step.

Convention (docs/DESIGN.md): the state x is the VP x_t = a x0 + b eps, with (a, b) = vp_coefficients(sigma);
the denoiser returns x0_hat. References: minidiff.samplers.sample_ddim / sample_euler / sample_heun, one step each
(``library_step``). The denoiser is the exact one of a Gaussian mixture (minidiff.toy), so no network is needed.
Wrong variants are written out on purpose, to name a mistake.
"""
from __future__ import annotations

import math

import torch

from minidiff import samplers, schedules, toy
from minidiff.course.checks import Mismatch, call, expect, extra_noise, library_step, task
from minidiff.course.checks.diagnose import probe_inputs

F64 = torch.float64
INF = math.inf


class _CountingDenoiser:
    """The exact denoiser of a 2-component Gaussian mixture over (C, H, W) images, counting its calls."""

    def __init__(self, shape, g: torch.Generator):
        d = math.prod(shape)
        self.mixture = toy.GaussianMixture(torch.randn(2, d, generator=g, dtype=F64), torch.tensor([0.4, 0.7]))
        self.calls = 0

    def __call__(self, x, sigma, **cond):
        self.calls += 1
        return self.mixture.denoiser(x, sigma)


def _coeffs(sigma: float) -> tuple[float, float]:
    a, b = schedules.vp_coefficients(sigma)
    return a.item(), b.item()


def _cases(g: torch.Generator, levels):
    """(label, denoiser, x, sigma, sigma_next) for each (label, sigma, sigma_next, batch, dtype) in ``levels``."""
    for label, sigma, sigma_next, batch, dtype in levels:
        den = _CountingDenoiser((2, 4, 4), g)
        yield label, den, torch.randn((batch, 2, 4, 4), generator=g, dtype=dtype), sigma, sigma_next


def _parts(den, x, sigma, sigma_next):
    """x0_hat, eps_hat and the coefficients, to build wrong variants."""
    a, b = _coeffs(sigma)
    a_n, b_n = _coeffs(sigma_next)
    x0 = den.mixture.denoiser(x, sigma)
    return x0, (x - a * x0) / b, a, b, a_n, b_n


# ----------------------------------------------------------------------------- DDIM
DDIM_LEVELS = [("sigma 2 -> 1, eta = 0", 2.0, 1.0, 0.0, 3, torch.float32),
               ("sigma 2 -> 1, eta = 1", 2.0, 1.0, 1.0, 3, torch.float32),
               ("sigma 5 -> 0.5, eta = 0.5, batch of 1", 5.0, 0.5, 0.5, 1, torch.float32),
               ("zero terminal SNR: sigma inf -> 3, eta = 0", INF, 3.0, 0.0, 2, torch.float32),
               ("last step: sigma 0.5 -> 0, eta = 1", 0.5, 0.0, 1.0, 2, torch.float32),
               ("float64, sigma 1.5 -> 0.7, eta = 0.3", 1.5, 0.7, 0.3, 2, F64)]


@task("A3.ddim_step", func="ddim_step", points=3, references=("minidiff.samplers.sample_ddim",))
def check_ddim_step(student) -> str:
    g = torch.Generator().manual_seed(4)
    for n, (label, sigma, sigma_next, eta, batch, dtype) in enumerate(DDIM_LEVELS):
        (_, den, x, _, _), = _cases(g, [(label, sigma, sigma_next, batch, dtype)])
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(200 + n), dtype=x.dtype)
        def probe(den=den, x=x, sigma=sigma, sigma_next=sigma_next, eta=eta, z=z, label=label):
            if eta > 0 and sigma_next > 0:
                probe_inputs(student, (den, x, sigma, sigma_next, eta, z), {}, {
                    5: (torch.randn(x.shape, generator=torch.Generator().manual_seed(8), dtype=x.dtype),
                        "with eta > 0 the step adds sigma_eta times the noise you are given; do not draw your own"),
                }, call=call, case=label)
        got = call(student, den, x, sigma, sigma_next, eta, z)
        want = library_step(samplers.sample_ddim, den, x, sigma, sigma_next, eta=eta,
                            generator=torch.Generator().manual_seed(200 + n))
        x0, eps, a, b, a_n, b_n = _parts(den, x, sigma, sigma_next)
        var = eta**2 * (1 - (a / a_n) ** 2) * b_n**2 / b**2

        def ddim(direction, noise_std, eps_hat=eps):
            return a_n * x0 + direction * eps_hat + noise_std * z
        expect(got, want, case=label, what="x_next", probe=probe, wrong=[
            ("ignores eta: with eta > 0 DDIM adds noise of variance eta^2 beta_tilde and shrinks the eps "
             "direction to sqrt(1 - alpha_bar_next - sigma_eta^2)", lambda: ddim(b_n, 0.0)),
            ("adds the noise sigma_eta z but keeps the direction sqrt(1 - alpha_bar_next) eps_hat; it must shrink "
             "to sqrt(1 - alpha_bar_next - sigma_eta^2) eps_hat (Song et al. 2021, Eq. 12)",
             lambda: ddim(b_n, math.sqrt(var))),
            ("multiplies the noise by the variance sigma_eta^2; use its square root sigma_eta",
             lambda: ddim(math.sqrt(max(b_n**2 - var, 0)), var)),
            ("uses eta instead of eta^2 in sigma_eta^2 = eta^2 beta_tilde",
             lambda: ddim(math.sqrt(max(b_n**2 - var / eta, 0)), math.sqrt(var / eta))),
            ("has the wrong sign on the eps_hat term", lambda: ddim(-math.sqrt(max(b_n**2 - var, 0)), math.sqrt(var))),
            ("uses sqrt(1 - alpha_bar) of the current level for the eps direction; it is the next level's",
             lambda: ddim(math.sqrt(max(b**2 - var, 0)), math.sqrt(var))),
            ("computes eps_hat = (x - x0_hat) / sqrt(1 - alpha_bar); it is (x - sqrt(alpha_bar) x0_hat) / "
             "sqrt(1 - alpha_bar)", lambda: ddim(math.sqrt(max(b_n**2 - var, 0)), math.sqrt(var), (x - x0) / b)),
            ("scales the noise wrongly: its standard deviation is sigma_eta = eta sqrt(beta_tilde)",
             lambda: extra_noise(got, want, z)),
        ])
    return f"matches minidiff.samplers.sample_ddim on {len(DDIM_LEVELS)} steps (eta 0, 0.3, 0.5, 1; sigma = inf; last step)"


# ----------------------------------------------------------------------------- Euler
EULER_LEVELS = [("sigma 2 -> 1", 2.0, 1.0, 3, torch.float32),
                ("sigma 10 -> 5, batch of 1", 10.0, 5.0, 1, torch.float32),
                ("zero terminal SNR: sigma inf -> 3", INF, 3.0, 2, torch.float32),
                ("last step: sigma 0.5 -> 0", 0.5, 0.0, 2, torch.float32),
                ("float64, sigma 1.5 -> 0.7", 1.5, 0.7, 2, F64)]


def _euler_variants(den, x, sigma, sigma_next):
    x0, d, a, b, a_n, b_n = _parts(den, x, sigma, sigma_next)
    h = sigma_next - sigma
    return [
        ("returns the VE state x / sqrt(alpha_bar) + (sigma_next - sigma) d; multiply by sqrt(alpha_bar_next) "
         "to get back to the VP state", lambda: x / a + h * d),
        ("steps the VP state x directly, x + (sigma_next - sigma) (x - x0_hat) / sigma; Euler runs on the VE "
         "state x / sqrt(alpha_bar): convert, step, and scale back by sqrt(alpha_bar_next)",
         lambda: x + h * (x - x0) / sigma),
        ("steps in the wrong direction: sigma decreases, so x_ve_next = x_ve + (sigma_next - sigma) d",
         lambda: a_n * (x / a - h * d)),
        ("scales back with sqrt(alpha_bar) of sigma; use sqrt(alpha_bar_next) of sigma_next",
         lambda: a * (x / a + h * d)),
    ]


@task("A3.euler_step", func="euler_step", points=2, references=("minidiff.samplers.sample_euler",))
def check_euler_step(student) -> str:
    for label, den, x, sigma, sigma_next in _cases(torch.Generator().manual_seed(5), EULER_LEVELS):
        got = call(student, den, x, sigma, sigma_next)
        calls = den.calls
        want = library_step(samplers.sample_euler, den, x, sigma, sigma_next)
        expect(got, want, case=label, what="x_next", wrong=_euler_variants(den, x, sigma, sigma_next))
        if calls != 1:
            raise Mismatch(f"calls the denoiser {calls} times; the task asks for exactly one call per Euler step "
                           f"(section 2): compute x0_hat once and reuse it [case: {label}]")
    return f"matches minidiff.samplers.sample_euler on {len(EULER_LEVELS)} steps (sigma = inf and the last step included)"


# ----------------------------------------------------------------------------- Heun
HEUN_LEVELS = [("sigma 2 -> 1", 2.0, 1.0, 3, torch.float32),
               ("sigma 10 -> 5, batch of 1", 10.0, 5.0, 1, torch.float32),
               ("last step: sigma 1 -> 0 (an Euler step)", 1.0, 0.0, 2, torch.float32),
               ("zero terminal SNR: sigma inf -> 3 (an Euler step)", INF, 3.0, 2, torch.float32),
               ("float64, sigma 1.5 -> 0.7", 1.5, 0.7, 2, F64)]


@task("A3.heun_step", func="heun_step", points=3, references=("minidiff.samplers.sample_heun",))
def check_heun_step(student) -> str:
    for label, den, x, sigma, sigma_next in _cases(torch.Generator().manual_seed(6), HEUN_LEVELS):
        got = call(student, den, x, sigma, sigma_next)
        calls = den.calls
        euler_only = sigma_next == 0 or math.isinf(sigma)
        if euler_only and torch.is_tensor(got) and not torch.isfinite(got).all():
            raise Mismatch(f"returns NaN/inf: on a step to sigma = 0 or from sigma = inf the correction divides by "
                           f"zero (or multiplies by inf); take a plain Euler step there [case: {label}]")
        want = library_step(samplers.sample_heun, den, x, sigma, sigma_next)
        x0, d, a, b, a_n, b_n = _parts(den, x, sigma, sigma_next)
        h = sigma_next - sigma

        def heun(weight_d, weight_d_next):
            x_euler = a_n * x0 + b_n * d
            x0_next = den.mixture.denoiser(x_euler, sigma_next)
            d_next = (x_euler - a_n * x0_next) / b_n
            return a_n * (x / a + h * (weight_d * d + weight_d_next * d_next))
        expect(got, want, case=label, what="x_next", wrong=[
            ("takes a plain Euler step: Heun corrects it with the slope at sigma_next, "
             "x_ve + (sigma_next - sigma) (d + d_next) / 2", lambda: a_n * x0 + b_n * d),
            ("uses only the slope d_next at sigma_next; Heun averages the two slopes, (d + d_next) / 2",
             lambda: heun(0.0, 1.0)),
            ("adds the two slopes without halving them: use (d + d_next) / 2", lambda: heun(1.0, 1.0)),
        ] + _euler_variants(den, x, sigma, sigma_next))
        if euler_only and calls != 1:
            raise Mismatch(f"calls the denoiser {calls} times on a step that must be a plain Euler step "
                           f"[case: {label}]")
        if not euler_only and calls != 2:
            raise Mismatch(f"calls the denoiser {calls} times; a Heun step needs 2 calls [case: {label}]")
    return f"matches minidiff.samplers.sample_heun on {len(HEUN_LEVELS)} steps (Euler to sigma = 0 and from sigma = inf)"
