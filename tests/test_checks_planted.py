"""Planted mistakes for every graded task: each check must NAME the mistake, not only report a difference.

Issue "Assignment checks that name the mistake": for each graded task (A1-A7), at least six realistic mistakes of
different kinds (math and conventions, ignored inputs, broadcasting, clamping, dtype, in-place edits, calling the
library function the task asks to write, ...) are planted, counting those of tests/test_checks.py and
tests/test_checks_diagnose.py; this file adds new ones, of kinds those files do not cover for that task. Each is a
student function written in a fresh namespace (like a notebook's globals), run through ``run_task``; the test
asserts that the message contains a phrase naming the mistake and is not the generic "max abs difference"
fallback. Correct but different implementations (a loop, another equivalent formula, other torch calls) must pass.
"""
import importlib.util
from collections import Counter
from pathlib import Path

import pytest

from minidiff.course.checks import TASKS, run_task

HEADER = """
import math
import numpy as np
import torch
import torch.nn.functional as F
from minidiff.schedules import vp_coefficients
def coeffs(sigma):
    a, b = vp_coefficients(sigma)
    return a.item(), b.item()
"""

# A2's notebook defines q_sample (from A1) in an earlier cell; ddpm_loss may use it.
Q_SAMPLE = """
def q_sample(x0, t, noise, alphas_cumprod):
    ab = alphas_cumprod[t].to(x0.dtype).reshape(-1, *[1] * (x0.ndim - 1))
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise
"""

# A4's notebook defines cfg_combine before cfg_denoise; a correct one, so that cfg_denoise is tested alone.
CFG_COMBINE = """
def cfg_combine(x0_cond, x0_uncond, guidance_scale):
    return x0_uncond + guidance_scale * (x0_cond - x0_uncond)
"""

# A6: the first line of a cross_attention, and of a caption_dropout that draws one number per prompt.
ATTENTION_HEAD = """
def cross_attention(x, context, context_mask, w_q, w_k, w_v):
    q, k, v = x @ w_q, context @ w_k, context @ w_v
"""
DROPOUT_HEAD = """
def caption_dropout(tokens, token_mask, p, empty_ids, empty_mask, *, generator=None):
    drop = (torch.rand((tokens.shape[0],), generator=generator) < p)[:, None]
"""

# A7: the first lines of an img2img_start that checks strength, and of an inpaint_denoise with a, b per sample.
START_HEAD = """
def img2img_start(z0, sigmas, strength, noise):
    if not 0 <= strength <= 1:
        raise ValueError("strength must be in [0, 1]")
    n = len(sigmas) - 1
"""
INPAINT_HEAD = """
def inpaint_denoise(denoiser, x, sigma, z0, mask, noise):
    s = sigma.reshape(-1, 1, 1, 1)
    a, b = 1 / torch.sqrt(1 + s**2), s / torch.sqrt(1 + s**2)
"""

DDPM_HEAD = """
def ddpm_step(x_t, t, eps_hat, betas, noise):
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)
    beta, ab_t = betas[t].item(), alphas_cumprod[t].item()
    ab_prev = alphas_cumprod[t - 1].item() if t > 0 else 1.0
"""

DDIM_HEAD = """
def ddim_step(denoiser, x, sigma, sigma_next, eta, noise):
    (a, b), (a_next, b_next) = coeffs(sigma), coeffs(sigma_next)
    x0_hat = denoiser(x, sigma * x.new_ones(len(x)))
    eps_hat = (x - a * x0_hat) / b
    var = eta**2 * (b_next**2 / b**2) * (1 - a**2 / a_next**2)
"""

HEUN_HEAD = """
def heun_step(denoiser, x, sigma, sigma_next):
    (a, b), (a_next, b_next) = coeffs(sigma), coeffs(sigma_next)
    x0_hat = denoiser(x, sigma * x.new_ones(len(x)))
    d = (x - a * x0_hat) / b
    x_euler = a_next * x0_hat + b_next * d
"""

HEUN_CORRECTION = """
    d_next = (x_euler - a_next * denoiser(x_euler, sigma_next * x.new_ones(len(x)))) / b_next
"""


def student(source: str, name: str):
    """Define ``name`` from ``source`` in a fresh namespace, as a notebook cell would."""
    namespace = {}
    exec(HEADER + source, namespace)  # noqa: S102 -- the planted student code of this test
    return namespace[name]


def _func(task: str) -> str:
    return TASKS[task].func_name


PLANTED = [
    # (task, kind of mistake, source, phrases the message must contain)
    # ------------------------------------------------------------------------- A1.linear_alphas_cumprod
    ("A1.linear_alphas_cumprod", "cumprod of the betas", """
def linear_alphas_cumprod(T, beta_start=1e-4, beta_end=0.02):
    betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    return torch.cumprod(betas, dim=0)
""", ["multiplies the betas", "1 - beta"]),
    ("A1.linear_alphas_cumprod", "off-by-one: step (end - start) / T", """
def linear_alphas_cumprod(T, beta_start=1e-4, beta_end=0.02):
    t = torch.arange(T, dtype=torch.float64)
    betas = beta_start + (beta_end - beta_start) * t / T
    return torch.cumprod(1 - betas, dim=0)
""", ["does not end at beta_end"]),
    ("A1.linear_alphas_cumprod", "sqrt of the alphas", """
def linear_alphas_cumprod(T, beta_start=1e-4, beta_end=0.02):
    betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    return torch.cumprod((1 - betas).sqrt(), dim=0)
""", ["returns sqrt(alpha_bar)"]),
    ("A1.linear_alphas_cumprod", "numpy instead of torch", """
def linear_alphas_cumprod(T, beta_start=1e-4, beta_end=0.02):
    betas = np.linspace(beta_start, beta_end, T)
    return np.cumprod(1 - betas)
""", ["returns ndarray, expected a tensor"]),
    ("A1.linear_alphas_cumprod", "returns the betas", """
def linear_alphas_cumprod(T, beta_start=1e-4, beta_end=0.02):
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
""", ["returns the betas"]),
    # ------------------------------------------------------------------------- A1.cosine_alphas_cumprod
    ("A1.cosine_alphas_cumprod", "float32: integer arange divided by T", """
def cosine_alphas_cumprod(T, s=0.008, max_beta=0.999):
    u = torch.arange(T + 1)
    f = torch.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=max_beta)
    return torch.cumprod(1 - betas, dim=0)
""", ["returns dtype torch.float32, expected torch.float64", "dtype=torch.float64"]),
    ("A1.cosine_alphas_cumprod", "cos not squared", """
def cosine_alphas_cumprod(T, s=0.008, max_beta=0.999):
    u = torch.arange(T + 1, dtype=torch.float64)
    f = torch.cos((u / T + s) / (1 + s) * math.pi / 2)
    betas = (1 - f[1:] / f[:-1]).clamp(max=max_beta)
    return torch.cumprod(1 - betas, dim=0)
""", ["forgot to square the cosine"]),
    ("A1.cosine_alphas_cumprod", "f(t) not divided by f(0)", """
def cosine_alphas_cumprod(T, s=0.008, max_beta=0.999):
    u = torch.arange(T + 1, dtype=torch.float64)
    f = torch.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2
    return f[1:]
""", ["forgot to divide by f(0)"]),
    ("A1.cosine_alphas_cumprod", "hard-coded 0.999 instead of max_beta", """
def cosine_alphas_cumprod(T, s=0.008, max_beta=0.999):
    u = torch.arange(T + 1, dtype=torch.float64)
    f = torch.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    return torch.cumprod(1 - betas, dim=0)
""", ["does not cap beta_t at max_beta", "max_beta = 0.5"]),
    ("A1.cosine_alphas_cumprod", "returns the betas", """
def cosine_alphas_cumprod(T, s=0.008, max_beta=0.999):
    u = torch.arange(T + 1, dtype=torch.float64)
    f = torch.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta)
""", ["returns the betas"]),
    ("A1.cosine_alphas_cumprod", "off-by-one: starts the table at 1", """
def cosine_alphas_cumprod(T, s=0.008, max_beta=0.999):
    u = torch.arange(T + 1, dtype=torch.float64)
    f = torch.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=max_beta)
    ab = torch.cumprod(1 - betas, dim=0)
    return torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
""", ["is off by one", "alphas_cumprod[0] is 1"]),
    # ------------------------------------------------------------------------- A1.q_sample
    ("A1.q_sample", "modifies x0 in place", """
def q_sample(x0, t, noise, alphas_cumprod):
    a = alphas_cumprod[t].to(x0.dtype).reshape(-1, *[1] * (x0.ndim - 1))
    x0 *= a.sqrt()
    return x0 + (1 - a).sqrt() * noise
""", ["modifies its argument `x0` in place"]),
    ("A1.q_sample", "clamps x_t to [-1, 1]", """
def q_sample(x0, t, noise, alphas_cumprod):
    a = alphas_cumprod[t].to(x0.dtype).reshape(-1, *[1] * (x0.ndim - 1))
    return (a.sqrt() * x0 + (1 - a).sqrt() * noise).clamp(-1, 1)
""", ["clamps its output to [-1, 1]"]),
    ("A1.q_sample", "sign of the noise term", """
def q_sample(x0, t, noise, alphas_cumprod):
    a = alphas_cumprod[t].to(x0.dtype).reshape(-1, *[1] * (x0.ndim - 1))
    return a.sqrt() * x0 - (1 - a).sqrt() * noise
""", ["subtracts the noise"]),
    ("A1.q_sample", "missing sqrt on the x0 coefficient only", """
def q_sample(x0, t, noise, alphas_cumprod):
    a = alphas_cumprod[t].to(x0.dtype).reshape(-1, *[1] * (x0.ndim - 1))
    return a * x0 + (1 - a).sqrt() * noise
""", ["scales x0 by alphas_cumprod[t]", "must be sqrt(alphas_cumprod[t])"]),
    # ------------------------------------------------------------------------- A1.snr
    ("A1.snr", "clamps the SNR", """
def snr(alphas_cumprod):
    return (alphas_cumprod / (1 - alphas_cumprod)).clamp(max=1000)
""", ["clamps its output"]),
    ("A1.snr", "modifies the table in place", """
def snr(alphas_cumprod):
    alphas_cumprod /= 1 - alphas_cumprod
    return alphas_cumprod
""", ["modifies its argument `alphas_cumprod` in place"]),
    ("A1.snr", "returns a Python list", """
def snr(alphas_cumprod):
    return [a / (1 - a) for a in alphas_cumprod]
""", ["returns list, expected a tensor"]),
    ("A1.snr", "sign in the denominator: 1 + alpha_bar", """
def snr(alphas_cumprod):
    return alphas_cumprod / (1 + alphas_cumprod)
""", ["not alpha_bar / (1 + alpha_bar)"]),
    ("A1.snr", "calls the library's snr", """
def snr(alphas_cumprod):
    import minidiff.schedules
    return minidiff.schedules.snr(alphas_cumprod)
""", ["calls the library's reference minidiff.schedules.snr"]),
    # ------------------------------------------------------------------------- A2.ddpm_loss
    ("A2.ddpm_loss", "absolute error", Q_SAMPLE + """
def ddpm_loss(net, x0, t, noise, alphas_cumprod):
    x_t = q_sample(x0, t, noise, alphas_cumprod)
    return (net(x_t, t) - noise).abs().mean()
""", ["uses the absolute error"]),
    ("A2.ddpm_loss", "sums over the pixels of each image", Q_SAMPLE + """
def ddpm_loss(net, x0, t, noise, alphas_cumprod):
    x_t = q_sample(x0, t, noise, alphas_cumprod)
    return ((net(x_t, t) - noise) ** 2).flatten(1).sum(1).mean()
""", ["sums over the pixels of each image"]),
    ("A2.ddpm_loss", "forward pass under torch.no_grad()", Q_SAMPLE + """
def ddpm_loss(net, x0, t, noise, alphas_cumprod):
    with torch.no_grad():
        pred = net(q_sample(x0, t, noise, alphas_cumprod), t)
    return ((pred - noise) ** 2).mean()
""", ["without a gradient"]),
    ("A2.ddpm_loss", "calls the library's diffusion_loss", """
def ddpm_loss(net, x0, t, noise, alphas_cumprod):
    from minidiff import losses
    return losses.diffusion_loss(net, x0, alphas_cumprod, "eps", t=t, noise=noise)
""", ["calls the library's reference minidiff.losses.diffusion_loss"]),
    ("A2.ddpm_loss", "draws its own timesteps", Q_SAMPLE + """
def ddpm_loss(net, x0, t, noise, alphas_cumprod):
    t = torch.randint(0, len(alphas_cumprod), (len(x0),))
    x_t = q_sample(x0, t, noise, alphas_cumprod)
    return ((net(x_t, t) - noise) ** 2).mean()
""", ["draws its own random numbers"]),
    # ------------------------------------------------------------------------- A2.ddpm_step
    ("A2.ddpm_step", "forgets 1 / sqrt(alpha_t)", DDPM_HEAD + """
    mean = x_t - beta / math.sqrt(1 - ab_t) * eps_hat
    return mean + math.sqrt((1 - ab_prev) / (1 - ab_t) * beta) * noise if t > 0 else mean
""", ["forgot the factor 1 / sqrt(alpha_t)"]),
    ("A2.ddpm_step", "alpha_t vs alpha_bar_t in the eps coefficient", DDPM_HEAD + """
    mean = (x_t - beta / math.sqrt(beta) * eps_hat) / math.sqrt(1 - beta)
    return mean + math.sqrt((1 - ab_prev) / (1 - ab_t) * beta) * noise if t > 0 else mean
""", ["divides by sqrt(1 - alpha_t) = sqrt(beta_t)"]),
    ("A2.ddpm_step", "draws its own noise", DDPM_HEAD + """
    mean = (x_t - beta / math.sqrt(1 - ab_t) * eps_hat) / math.sqrt(1 - beta)
    return mean + math.sqrt((1 - ab_prev) / (1 - ab_t) * beta) * torch.randn_like(x_t) if t > 0 else mean
""", ["draws its own random numbers"]),
    ("A2.ddpm_step", "modifies x_t in place", DDPM_HEAD + """
    x_t -= beta / math.sqrt(1 - ab_t) * eps_hat
    mean = x_t / math.sqrt(1 - beta)
    return mean + math.sqrt((1 - ab_prev) / (1 - ab_t) * beta) * noise if t > 0 else mean
""", ["modifies its argument `x_t` in place"]),
    ("A2.ddpm_step", "inverted ratio in beta_tilde", DDPM_HEAD + """
    mean = (x_t - beta / math.sqrt(1 - ab_t) * eps_hat) / math.sqrt(1 - beta)
    return mean + math.sqrt((1 - ab_t) / (1 - ab_prev) * beta) * noise if t > 0 else mean
""", ["scales the noise wrongly", "sqrt(beta_tilde_t)"]),
    ("A2.ddpm_step", "off-by-one: no noise at t = 1 either", DDPM_HEAD + """
    mean = (x_t - beta / math.sqrt(1 - ab_t) * eps_hat) / math.sqrt(1 - beta)
    return mean + math.sqrt((1 - ab_prev) / (1 - ab_t) * beta) * noise if t > 1 else mean
""", ["scales the noise wrongly", "[case: t = 1]"]),
    ("A2.ddpm_step", "clamps x_{t-1} to [-1, 1]", DDPM_HEAD + """
    mean = (x_t - beta / math.sqrt(1 - ab_t) * eps_hat) / math.sqrt(1 - beta)
    x_prev = mean + math.sqrt((1 - ab_prev) / (1 - ab_t) * beta) * noise if t > 0 else mean
    return x_prev.clamp(-1, 1)
""", ["clamps its output to [-1, 1]"]),
    # ------------------------------------------------------------------------- A3.ddim_step
    ("A3.ddim_step", "noise times the variance", DDIM_HEAD + """
    return a_next * x0_hat + math.sqrt(b_next**2 - var) * eps_hat + var * noise
""", ["multiplies the noise by the variance"]),
    ("A3.ddim_step", "eps direction of the current level", DDIM_HEAD + """
    return a_next * x0_hat + math.sqrt(max(b**2 - var, 0)) * eps_hat + math.sqrt(var) * noise
""", ["of the current level"]),
    ("A3.ddim_step", "eps_hat without sqrt(alpha_bar)", """
def ddim_step(denoiser, x, sigma, sigma_next, eta, noise):
    (a, b), (a_next, b_next) = coeffs(sigma), coeffs(sigma_next)
    x0_hat = denoiser(x, sigma * x.new_ones(len(x)))
    eps_hat = (x - x0_hat) / b
    var = eta**2 * (b_next**2 / b**2) * (1 - a**2 / a_next**2)
    return a_next * x0_hat + math.sqrt(b_next**2 - var) * eps_hat + math.sqrt(var) * noise
""", ["computes eps_hat = (x - x0_hat) / sqrt(1 - alpha_bar)"]),
    ("A3.ddim_step", "scales the given noise in place", DDIM_HEAD + """
    noise *= math.sqrt(var)
    return a_next * x0_hat + math.sqrt(b_next**2 - var) * eps_hat + noise
""", ["modifies its argument `noise` in place"]),
    ("A3.ddim_step", "own coefficients: inf / inf at sigma = inf", """
def ddim_step(denoiser, x, sigma, sigma_next, eta, noise):
    a, a_next = 1 / math.sqrt(1 + sigma**2), 1 / math.sqrt(1 + sigma_next**2)
    b, b_next = sigma * a, sigma_next * a_next
    x0_hat = denoiser(x, sigma * x.new_ones(len(x)))
    eps_hat = (x - a * x0_hat) / b
    var = eta**2 * (b_next**2 / b**2) * (1 - a**2 / a_next**2)
    return a_next * x0_hat + math.sqrt(b_next**2 - var) * eps_hat + math.sqrt(var) * noise
""", ["NaN/inf values where the reference is finite", "sigma inf"]),
    ("A3.ddim_step", "drops the noise term", DDIM_HEAD + """
    return a_next * x0_hat + math.sqrt(b_next**2 - var) * eps_hat
""", ["scales the noise wrongly", "sigma_eta"]),
    ("A3.ddim_step", "clamps x_next to [-1, 1]", DDIM_HEAD + """
    return (a_next * x0_hat + math.sqrt(b_next**2 - var) * eps_hat + math.sqrt(var) * noise).clamp(-1, 1)
""", ["clamps its output to [-1, 1]"]),
    ("A3.ddim_step", "calls the library's sample_ddim", """
def ddim_step(denoiser, x, sigma, sigma_next, eta, noise):
    import minidiff
    sigmas = torch.tensor([sigma, sigma_next, 0.0], dtype=torch.float64)
    return minidiff.samplers.sample_ddim(denoiser, x, sigmas, eta=eta)
""", ["calls the library's reference minidiff.samplers.sample_ddim"]),
    # ------------------------------------------------------------------------- A3.euler_step
    ("A3.euler_step", "two denoiser calls", """
def euler_step(denoiser, x, sigma, sigma_next):
    (a, b), (a_next, b_next) = coeffs(sigma), coeffs(sigma_next)
    s = sigma * x.new_ones(len(x))
    return a_next * denoiser(x, s) + b_next * (x - a * denoiser(x, s)) / b
""", ["calls the denoiser 2 times"]),
    ("A3.euler_step", "VE form divides by sqrt(alpha_bar) = 0 at sigma = inf", """
def euler_step(denoiser, x, sigma, sigma_next):
    (a, b), (a_next, b_next) = coeffs(sigma), coeffs(sigma_next)
    x0_hat = denoiser(x, sigma * x.new_ones(len(x)))
    x_ve = x / a
    d = (x_ve - x0_hat) / sigma
    return a_next * (x_ve + (sigma_next - sigma) * d)
""", ["NaN/inf values where the reference is finite", "a division by zero?", "sigma inf"]),
    ("A3.euler_step", "modifies x in place", """
def euler_step(denoiser, x, sigma, sigma_next):
    (a, b), (a_next, b_next) = coeffs(sigma), coeffs(sigma_next)
    x0_hat = denoiser(x, sigma * x.new_ones(len(x)))
    x /= a
    d = (x - x0_hat) / sigma
    return a_next * (x + (sigma_next - sigma) * d)
""", ["modifies its argument `x` in place"]),
    ("A3.euler_step", "calls the library's sample_euler", """
def euler_step(denoiser, x, sigma, sigma_next):
    import minidiff
    return minidiff.samplers.sample_euler(denoiser, x, torch.tensor([sigma, sigma_next, 0.0], dtype=torch.float64))
""", ["calls the library's reference minidiff.samplers.sample_euler"]),
    ("A3.euler_step", "casts the result to float32", """
def euler_step(denoiser, x, sigma, sigma_next):
    (a, b), (a_next, b_next) = coeffs(sigma), coeffs(sigma_next)
    x0_hat = denoiser(x, sigma * x.new_ones(len(x)))
    return (a_next * x0_hat + b_next * (x - a * x0_hat) / b).float()
""", ["returns dtype torch.float32, expected torch.float64"]),
    ("A3.euler_step", "scales back with alpha_bar of sigma", """
def euler_step(denoiser, x, sigma, sigma_next):
    (a, b), (a_next, b_next) = coeffs(sigma), coeffs(sigma_next)
    x0_hat = denoiser(x, sigma * x.new_ones(len(x)))
    d = (x - a * x0_hat) / b
    return a * (x / a + (sigma_next - sigma) * d)
""", ["scales back with sqrt(alpha_bar) of sigma"]),
    # ------------------------------------------------------------------------- A3.heun_step
    ("A3.heun_step", "forgets the sigma = inf case", HEUN_HEAD + """
    if sigma_next == 0:
        return x_euler
""" + HEUN_CORRECTION + """
    return a_next * (x / a + (sigma_next - sigma) * (d + d_next) / 2)
""", ["returns NaN/inf", "from sigma = inf", "zero terminal SNR"]),
    ("A3.heun_step", "three denoiser calls", HEUN_HEAD + """
    if sigma_next == 0 or math.isinf(sigma):
        return x_euler
    d = (x - a * denoiser(x, sigma * x.new_ones(len(x)))) / b
""" + HEUN_CORRECTION + """
    return a_next * (x / a + (sigma_next - sigma) * (d + d_next) / 2)
""", ["calls the denoiser 3 times", "needs 2 calls"]),
    ("A3.heun_step", "clamps x_next to [-1, 1]", HEUN_HEAD + """
    if sigma_next == 0 or math.isinf(sigma):
        return x_euler
""" + HEUN_CORRECTION + """
    return (a_next * (x / a + (sigma_next - sigma) * (d + d_next) / 2)).clamp(-1, 1)
""", ["clamps its output to [-1, 1]"]),
    ("A3.heun_step", "modifies x in place", HEUN_HEAD + """
    if sigma_next == 0 or math.isinf(sigma):
        return x_euler
    x /= a
""" + HEUN_CORRECTION + """
    return a_next * (x + (sigma_next - sigma) * (d + d_next) / 2)
""", ["modifies its argument `x` in place"]),
    ("A3.heun_step", "calls the library's sample_heun", """
def heun_step(denoiser, x, sigma, sigma_next):
    import minidiff
    return minidiff.samplers.sample_heun(denoiser, x, torch.tensor([sigma, sigma_next], dtype=torch.float64))
""", ["calls the library's reference minidiff.samplers.sample_heun"]),
    # ------------------------------------------------------------------------- A4.condition_dropout
    ("A4.condition_dropout", "-1 as the 'no label' id", """
def condition_dropout(labels, p, null_id, *, generator=None):
    drop = torch.rand(labels.shape, generator=generator) < p
    return torch.where(drop, -1, labels)
""", ["neither the original label nor null_id"]),
    ("A4.condition_dropout", "one draw for the whole batch", """
def condition_dropout(labels, p, null_id, *, generator=None):
    drop = torch.rand(1, generator=generator) < p
    return torch.where(drop, torch.full_like(labels, null_id), labels)
""", ["never drops a label", "independently"]),
    ("A4.condition_dropout", "float labels", """
def condition_dropout(labels, p, null_id, *, generator=None):
    drop = torch.rand(labels.shape, generator=generator) < p
    return torch.where(drop, float(null_id), labels.float())
""", ["returns dtype torch.float32, expected torch.int64"]),
    ("A4.condition_dropout", "in place through an alias", """
def condition_dropout(labels, p, null_id, *, generator=None):
    drop = torch.rand(labels.shape, generator=generator) < p
    out = labels
    out[drop] = null_id
    return out
""", ["modifies its argument `labels` in place"]),
    ("A4.condition_dropout", "torch.where arguments swapped", """
def condition_dropout(labels, p, null_id, *, generator=None):
    drop = torch.rand(labels.shape, generator=generator) < p
    return torch.where(drop, labels, torch.full_like(labels, null_id))
""", ["probability 1 - p"]),
    ("A4.condition_dropout", "calls the library's condition_dropout", """
def condition_dropout(labels, p, null_id, *, generator=None):
    from minidiff.guidance import condition_dropout as library_dropout
    return library_dropout(labels, p, null_id, generator=generator)
""", ["calls the library's reference minidiff.guidance.condition_dropout"]),
    ("A4.condition_dropout", "numpy result", """
def condition_dropout(labels, p, null_id, *, generator=None):
    drop = torch.rand(labels.shape, generator=generator) < p
    return np.where(drop.numpy(), null_id, labels.numpy())
""", ["returns ndarray, expected a tensor"]),
    # ------------------------------------------------------------------------- A4.cfg_combine
    ("A4.cfg_combine", "hard-coded guidance scale", """
def cfg_combine(x0_cond, x0_uncond, guidance_scale):
    return x0_uncond + 7.5 * (x0_cond - x0_uncond)
""", ["ignores its input `guidance_scale`"]),
    ("A4.cfg_combine", "modifies x0_uncond in place", """
def cfg_combine(x0_cond, x0_uncond, guidance_scale):
    x0_uncond += guidance_scale * (x0_cond - x0_uncond)
    return x0_uncond
""", ["modifies its argument `x0_uncond` in place"]),
    ("A4.cfg_combine", "sign of the difference", """
def cfg_combine(x0_cond, x0_uncond, guidance_scale):
    return x0_uncond + guidance_scale * (x0_uncond - x0_cond)
""", ["moves away from the conditional prediction"]),
    ("A4.cfg_combine", "off-by-one in the scale: w + 1", """
def cfg_combine(x0_cond, x0_uncond, guidance_scale):
    return x0_uncond + (guidance_scale + 1) * (x0_cond - x0_uncond)
""", ["guidance_scale = 1 means no guidance"]),
    ("A4.cfg_combine", "clamps the guided prediction", """
def cfg_combine(x0_cond, x0_uncond, guidance_scale):
    return (x0_uncond + guidance_scale * (x0_cond - x0_uncond)).clamp(-1, 1)
""", ["clamps its output to [-1, 1]"]),
    # ------------------------------------------------------------------------- A4.cfg_denoise
    ("A4.cfg_denoise", "null_id for both halves", CFG_COMBINE + """
def cfg_denoise(denoiser, x, sigma, class_labels, null_id, guidance_scale):
    null = torch.full_like(class_labels, null_id)
    x0_cond, x0_uncond = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]),
                                  class_labels=torch.cat([null, null])).chunk(2)
    return cfg_combine(x0_cond, x0_uncond, guidance_scale)
""", ["gives null_id to both halves"]),
    ("A4.cfg_denoise", "inline formula with the w = 0 convention", """
def cfg_denoise(denoiser, x, sigma, class_labels, null_id, guidance_scale):
    labels_in = torch.cat([class_labels, torch.full_like(class_labels, null_id)])
    x0_cond, x0_uncond = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), class_labels=labels_in).chunk(2)
    return x0_cond + guidance_scale * (x0_cond - x0_uncond)
""", ["guidance_scale = 1 means no guidance"]),
    ("A4.cfg_denoise", "calls the library's CFGDenoiser", """
def cfg_denoise(denoiser, x, sigma, class_labels, null_id, guidance_scale):
    import minidiff
    guided = minidiff.guidance.CFGDenoiser(denoiser, guidance_scale, uncond={"class_labels": torch.tensor(null_id)})
    return guided(x, sigma, class_labels=class_labels)
""", ["calls the library's reference minidiff.guidance.CFGDenoiser"]),
    ("A4.cfg_denoise", "clamps the guided prediction", CFG_COMBINE + """
def cfg_denoise(denoiser, x, sigma, class_labels, null_id, guidance_scale):
    labels_in = torch.cat([class_labels, torch.full_like(class_labels, null_id)])
    x0_cond, x0_uncond = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), class_labels=labels_in).chunk(2)
    return cfg_combine(x0_cond, x0_uncond, guidance_scale).clamp(-1, 1)
""", ["clamps its output to [-1, 1]"]),
    ("A4.cfg_denoise", "runs the denoiser in float64", CFG_COMBINE + """
def cfg_denoise(denoiser, x, sigma, class_labels, null_id, guidance_scale):
    labels_in = torch.cat([class_labels, torch.full_like(class_labels, null_id)])
    x_in = torch.cat([x, x]).double()
    x0_cond, x0_uncond = denoiser(x_in, torch.cat([sigma, sigma]), class_labels=labels_in).chunk(2)
    return cfg_combine(x0_cond, x0_uncond, guidance_scale)
""", ["returns dtype torch.float64, expected torch.float32", "Keep the dtype of x"]),
    # ------------------------------------------------------------------------- A5.reparameterize
    ("A5.reparameterize", "exp(logvar): the variance as the scale", """
def reparameterize(mean, logvar, eps):
    return mean + torch.exp(logvar) * eps
""", ["uses exp(logvar), the variance", "exp(0.5 * logvar)"]),
    ("A5.reparameterize", "logvar used directly as the std", """
def reparameterize(mean, logvar, eps):
    return mean + logvar * eps
""", ["uses logvar itself as the standard deviation"]),
    ("A5.reparameterize", "0.5 * logvar without the exp", """
def reparameterize(mean, logvar, eps):
    log_std = 0.5 * logvar
    return mean + log_std * eps
""", ["uses 0.5 * logvar = log(std) without the exp"]),
    ("A5.reparameterize", "forgot the mean", """
def reparameterize(mean, logvar, eps):
    std = torch.exp(0.5 * logvar)
    return std * eps
""", ["forgot the mean"]),
    ("A5.reparameterize", "draws its own eps", """
def reparameterize(mean, logvar, eps):
    std = torch.exp(0.5 * logvar)
    return mean + std * torch.randn_like(std)
""", ["draws its own random numbers", "use the noise"]),
    ("A5.reparameterize", "a fixed seed, so eps is ignored", """
def reparameterize(mean, logvar, eps):
    torch.manual_seed(0)
    noise = torch.randn(mean.shape, dtype=mean.dtype)
    return mean + torch.exp(0.5 * logvar) * noise
""", ["ignores its input `eps`"]),
    ("A5.reparameterize", "adds to mean in place", """
def reparameterize(mean, logvar, eps):
    return mean.add_(torch.exp(0.5 * logvar) * eps)
""", ["modifies its argument `mean` in place"]),
    ("A5.reparameterize", "calls the library's DiagonalGaussian", """
def reparameterize(mean, logvar, eps):
    from minidiff.models import vae
    d = vae.DiagonalGaussian(mean, logvar)
    return d.mean + d.std * eps
""", ["calls the library's reference minidiff.models.vae.DiagonalGaussian"]),
    ("A5.reparameterize", "computes in float64", """
def reparameterize(mean, logvar, eps):
    return mean.double() + torch.exp(0.5 * logvar.double()) * eps.double()
""", ["returns dtype torch.float64, expected torch.float32", "Keep the dtype of mean"]),
    # ------------------------------------------------------------------------- A5.kl_diagonal_gaussian
    ("A5.kl_diagonal_gaussian", "missing the 0.5", """
def kl_diagonal_gaussian(mean, logvar):
    return (mean**2 + logvar.exp() - 1 - logvar).flatten(1).sum(dim=1)
""", ["forgot the factor 0.5"]),
    ("A5.kl_diagonal_gaussian", "mean over the latent elements", """
def kl_diagonal_gaussian(mean, logvar):
    return 0.5 * (mean**2 + logvar.exp() - 1 - logvar).flatten(1).mean(dim=1)
""", ["averages over the latent elements", "their sum"]),
    ("A5.kl_diagonal_gaussian", "sums over the batch too", """
def kl_diagonal_gaussian(mean, logvar):
    return 0.5 * torch.sum(mean**2 + logvar.exp() - 1 - logvar)
""", ["sums over the batch too", "shape (B,)"]),
    ("A5.kl_diagonal_gaussian", "sign error on the logvar term", """
def kl_diagonal_gaussian(mean, logvar):
    return 0.5 * (mean**2 + logvar.exp() - 1 + logvar).flatten(1).sum(dim=1)
""", ["wrong sign on the logvar term"]),
    ("A5.kl_diagonal_gaussian", "the std where the variance is needed", """
def kl_diagonal_gaussian(mean, logvar):
    std = torch.exp(0.5 * logvar)
    return 0.5 * (mean**2 + std - 1 - logvar).flatten(1).sum(dim=1)
""", ["uses the std exp(0.5 * logvar) where the variance exp(logvar) is needed"]),
    ("A5.kl_diagonal_gaussian", "forgot the -1", """
def kl_diagonal_gaussian(mean, logvar):
    return 0.5 * (mean**2 + logvar.exp() - logvar).flatten(1).sum(dim=1)
""", ["forgot the -1"]),
    ("A5.kl_diagonal_gaussian", "returns -KL, the ELBO's term", """
def kl_diagonal_gaussian(mean, logvar):
    return 0.5 * (1 + logvar - mean**2 - logvar.exp()).flatten(1).sum(dim=1)
""", ["returns -KL"]),
    ("A5.kl_diagonal_gaussian", "sums over dims (1, 2, 3) only: fails on (B, D) latents", """
def kl_diagonal_gaussian(mean, logvar):
    return 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3))
""", ["raised IndexError", "Hint: here the latents are vectors (B, D)", ".flatten(1).sum(dim=1)"]),
    ("A5.kl_diagonal_gaussian", "no sum: the per-element terms", """
def kl_diagonal_gaussian(mean, logvar):
    return 0.5 * (mean**2 + logvar.exp() - 1 - logvar)
""", ["returns the KL of every latent element"]),
    ("A5.kl_diagonal_gaussian", "calls DiagonalGaussian.kl", """
def kl_diagonal_gaussian(mean, logvar):
    from minidiff.models.vae import DiagonalGaussian
    return DiagonalGaussian(mean, logvar).kl()
""", ["calls the library's reference minidiff.models.vae.DiagonalGaussian"]),
    # ------------------------------------------------------------------------- A5.scaling_factor
    ("A5.scaling_factor", "the std instead of its inverse", """
def scaling_factor(latents):
    return latents.std().item()
""", ["returns the std of the latents", "its inverse"]),
    ("A5.scaling_factor", "per-channel std: a tensor instead of one number", """
def scaling_factor(latents):
    return 1 / latents.std(dim=(0, 2, 3))
""", ["returns one factor per channel", "one number"]),
    ("A5.scaling_factor", "1 / variance", """
def scaling_factor(latents):
    return 1 / latents.var().item()
""", ["divides by the variance"]),
    ("A5.scaling_factor", "1 / max |z|", """
def scaling_factor(latents):
    return 1 / latents.abs().max().item()
""", ["divides by the largest |z|"]),
    ("A5.scaling_factor", "1 / mean |z|", """
def scaling_factor(latents):
    return 1 / latents.abs().mean().item()
""", ["divides by the mean absolute value"]),
    ("A5.scaling_factor", "Stable Diffusion's constant", """
def scaling_factor(latents):
    return 0.18215
""", ["returns Stable Diffusion's 0.18215"]),
    ("A5.scaling_factor", "root mean square: the mean not subtracted", """
def scaling_factor(latents):
    return 1 / math.sqrt((latents**2).mean().item())
""", ["does not subtract the latents' mean"]),
    ("A5.scaling_factor", "average of the per-channel stds", """
def scaling_factor(latents):
    return 1 / latents.std(dim=(0, 2, 3)).mean().item()
""", ["averages the per-channel stds"]),
    ("A5.scaling_factor", "per-sample std", """
def scaling_factor(latents):
    return 1 / latents.flatten(1).std(dim=1)
""", ["returns one value per sample"]),
    ("A5.scaling_factor", "centres the latents in place", """
def scaling_factor(latents):
    latents -= latents.mean()
    return 1 / latents.pow(2).mean().sqrt().item()
""", ["modifies its argument `latents` in place"]),
    # ------------------------------------------------------------------------- A6.cross_attention
    ("A6.cross_attention", "no 1/sqrt(d) scaling", ATTENTION_HEAD + """
    logits = (q @ k.transpose(1, 2)).masked_fill(~context_mask[:, None, :], float("-inf"))
    attn = logits.softmax(-1).nan_to_num(0.0)
    return attn @ v, attn
""", ["does not scale the logits", "sqrt(d) = sqrt(4)"]),
    ("A6.cross_attention", "divides by d", ATTENTION_HEAD + """
    logits = (q @ k.transpose(1, 2) / q.shape[-1]).masked_fill(~context_mask[:, None, :], float("-inf"))
    attn = logits.softmax(-1).nan_to_num(0.0)
    return attn @ v, attn
""", ["divides the logits by d = 4", "1 / sqrt(d)"]),
    ("A6.cross_attention", "divides by sqrt(C), the image tokens' width", ATTENTION_HEAD + """
    logits = (q @ k.transpose(1, 2) / math.sqrt(x.shape[-1])).masked_fill(~context_mask[:, None, :], float("-inf"))
    attn = logits.softmax(-1).nan_to_num(0.0)
    return attn @ v, attn
""", ["divides the logits by sqrt(C) = sqrt(6)", "divide by sqrt(d)"]),
    ("A6.cross_attention", "divides by sqrt(D), the context's width", ATTENTION_HEAD + """
    logits = (q @ k.transpose(1, 2) / context.shape[-1] ** 0.5).masked_fill(~context_mask[:, None, :], -math.inf)
    attn = logits.softmax(-1).nan_to_num(0.0)
    return attn @ v, attn
""", ["divides the logits by sqrt(D) = sqrt(5)"]),
    ("A6.cross_attention", "softmax over the query axis", ATTENTION_HEAD + """
    logits = (q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])).masked_fill(~context_mask[:, None, :], float("-inf"))
    attn = torch.softmax(logits, dim=1).nan_to_num(0.0)
    return attn @ v, attn
""", ["takes the softmax over the image tokens (dim=1)"]),
    ("A6.cross_attention", "mask inverted (nn.MultiheadAttention's key_padding_mask convention)", ATTENTION_HEAD + """
    logits = (q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])).masked_fill(context_mask[:, None, :], float("-inf"))
    attn = logits.softmax(-1).nan_to_num(0.0)
    return attn @ v, attn
""", ["inverts the mask", "attends only to the padding"]),
    ("A6.cross_attention", "mask ignored", ATTENTION_HEAD + """
    attn = (q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])).softmax(-1)
    return attn @ v, attn
""", ["ignores context_mask"]),
    ("A6.cross_attention", "zeroed after the softmax, not renormalised", ATTENTION_HEAD + """
    attn = (q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])).softmax(-1) * context_mask[:, None, :]
    return attn @ v, attn
""", ["after the softmax without renormalising"]),
    ("A6.cross_attention", "masked after the softmax and renormalised: underflows", ATTENTION_HEAD + """
    attn = (q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])).softmax(-1) * context_mask[:, None, :]
    attn = (attn / attn.sum(-1, keepdim=True)).nan_to_num(0.0)
    return attn @ v, attn
""", ["masks after the softmax and renormalises", "underflow"]),
    ("A6.cross_attention", "masked_fill with 0 instead of -inf", ATTENTION_HEAD + """
    logits = (q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])).masked_fill(~context_mask[:, None, :], 0)
    attn = logits.softmax(-1)
    return attn @ v, attn
""", ["fills the padded logits with 0 instead of -inf"]),
    ("A6.cross_attention", "a fill of -10: padded keys leak", ATTENTION_HEAD + """
    logits = (q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])).masked_fill(~context_mask[:, None, :], -10.0)
    attn = logits.softmax(-1)
    return attn @ v, attn
""", ["not exactly 0", "float('-inf')"]),
    ("A6.cross_attention", "Q from the context, K and V from the image", """
def cross_attention(x, context, context_mask, w_q, w_k, w_v):
    q, k, v = context @ w_q, x @ w_k, x @ w_v
    logits = (q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])).masked_fill(~context_mask[:, None, :], float("-inf"))
    attn = logits.softmax(-1).nan_to_num(0.0)
    return attn @ v, attn
""", ["computes Q from the context and K, V from the image tokens"]),
    ("A6.cross_attention", "transposed weights (nn.Linear's (out, in) layout)", """
def cross_attention(x, context, context_mask, w_q, w_k, w_v):
    q, k, v = F.linear(x, w_q), F.linear(context, w_k), F.linear(context, w_v)
    logits = (q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])).masked_fill(~context_mask[:, None, :], float("-inf"))
    attn = logits.softmax(-1).nan_to_num(0.0)
    return attn @ v, attn
""", ["uses the transposed weights"]),
    ("A6.cross_attention", "NaN for a prompt of padding only", ATTENTION_HEAD + """
    logits = (q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])).masked_fill(~context_mask[:, None, :], float("-inf"))
    attn = logits.softmax(-1)
    return attn @ v, attn
""", ["gives NaN for a prompt with no real token (mask all False)"]),
    ("A6.cross_attention", "-1e9 fill: a prompt of padding only attends uniformly", ATTENTION_HEAD + """
    logits = (q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])).masked_fill(~context_mask[:, None, :], -1e9)
    attn = logits.softmax(-1)
    return attn @ v, attn
""", ["attend uniformly to its padding", "attention 0 and output 0"]),
    ("A6.cross_attention", "mask broadcast along the image tokens", ATTENTION_HEAD + """
    logits = (q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])).masked_fill(~context_mask[:, :, None], float("-inf"))
    attn = logits.softmax(-1).nan_to_num(0.0)
    return attn @ v, attn
""", ["applies the mask along the image tokens"]),
    ("A6.cross_attention", "mask (B, L) not broadcast: a shape error with a hint", ATTENTION_HEAD + """
    logits = (q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])).masked_fill(~context_mask, float("-inf"))
    attn = logits.softmax(-1).nan_to_num(0.0)
    return attn @ v, attn
""", ["raised RuntimeError", "broadcasts to them as context_mask[:, None, :]"]),
    ("A6.cross_attention", "a prefix mask from the lengths", ATTENTION_HEAD + """
    lengths = context_mask.sum(dim=1, keepdim=True)
    keep = torch.arange(context.shape[1]) < lengths
    logits = (q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])).masked_fill(~keep[:, None, :], float("-inf"))
    attn = logits.softmax(-1).nan_to_num(0.0)
    return attn @ v, attn
""", ["treats the mask as a prefix"]),
    ("A6.cross_attention", "forgot W_v: attn @ context", ATTENTION_HEAD + """
    logits = (q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])).masked_fill(~context_mask[:, None, :], float("-inf"))
    attn = logits.softmax(-1).nan_to_num(0.0)
    return attn @ context, attn
""", ["returns attn @ context"]),
    ("A6.cross_attention", "the keys as the values", ATTENTION_HEAD + """
    logits = (q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])).masked_fill(~context_mask[:, None, :], float("-inf"))
    attn = logits.softmax(-1).nan_to_num(0.0)
    return attn @ k, attn
""", ["uses the keys as the values"]),
    ("A6.cross_attention", "softmax by hand without the max: overflow", ATTENTION_HEAD + """
    logits = (q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])).masked_fill(~context_mask[:, None, :], float("-inf"))
    e = torch.exp(logits)
    attn = (e / e.sum(dim=-1, keepdim=True)).nan_to_num(0.0)
    return attn @ v, attn
""", ["without subtracting the row maximum", "overflows"]),
    ("A6.cross_attention", "returns attn transposed", ATTENTION_HEAD + """
    logits = (q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])).masked_fill(~context_mask[:, None, :], float("-inf"))
    attn = logits.softmax(-1).nan_to_num(0.0)
    return attn @ v, attn.transpose(1, 2)
""", ["returns attn transposed"]),
    ("A6.cross_attention", "returns only the output", ATTENTION_HEAD + """
    mask = context_mask[:, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).nan_to_num(0.0)
""", ["returns one tensor", "(out, attn)"]),
    ("A6.cross_attention", "computes in float32", ATTENTION_HEAD + """
    logits = (q.float() @ k.float().transpose(1, 2) / math.sqrt(q.shape[-1]))
    attn = logits.masked_fill(~context_mask[:, None, :], float("-inf")).softmax(-1).nan_to_num(0.0)
    return attn @ v.float(), attn
""", ["returns dtype torch.float32, expected torch.float64", "Keep the dtype of x"]),
    ("A6.cross_attention", "builds the library's AttentionBlock", """
def cross_attention(x, context, context_mask, w_q, w_k, w_v):
    from minidiff.models.attention import AttentionBlock
    block = AttentionBlock(w_q.shape[1], num_heads=1, num_groups=1, context_dim=context.shape[-1])
    return block, None
""", ["calls the library's reference minidiff.models.attention.AttentionBlock"]),
    # ------------------------------------------------------------------------- A6.caption_dropout
    ("A6.caption_dropout", "drops single tokens", """
def caption_dropout(tokens, token_mask, p, empty_ids, empty_mask, *, generator=None):
    drop = torch.rand(tokens.shape, generator=generator) < p
    return torch.where(drop, empty_ids, tokens), torch.where(drop, empty_mask, token_mask)
""", ["drops single tokens", "one draw per row"]),
    ("A6.caption_dropout", "keeps with probability p", """
def caption_dropout(tokens, token_mask, p, empty_ids, empty_mask, *, generator=None):
    keep = (torch.rand((tokens.shape[0],), generator=generator) < p)[:, None]
    return torch.where(keep, tokens, empty_ids), torch.where(keep, token_mask, empty_mask)
""", ["drops a prompt with probability 1 - p"]),
    ("A6.caption_dropout", "draws with > p", """
def caption_dropout(tokens, token_mask, p, empty_ids, empty_mask, *, generator=None):
    drop = (torch.rand((tokens.shape[0],), generator=generator) > p)[:, None]
    return torch.where(drop, empty_ids, tokens), torch.where(drop, empty_mask, token_mask)
""", ["drops a prompt with probability 1 - p", "torch.rand(...) < p"]),
    ("A6.caption_dropout", "padding only instead of the empty prompt", DROPOUT_HEAD + """
    return tokens.masked_fill(drop, 0), token_mask & ~drop
""", ["replaces a dropped prompt with padding only", "<bos> <eos>"]),
    ("A6.caption_dropout", "modifies the batch in place", """
def caption_dropout(tokens, token_mask, p, empty_ids, empty_mask, *, generator=None):
    drop = torch.rand((tokens.shape[0],), generator=generator) < p
    tokens[drop], token_mask[drop] = empty_ids, empty_mask
    return tokens, token_mask
""", ["modifies its argument `tokens` in place"]),
    ("A6.caption_dropout", "ignores the generator", """
def caption_dropout(tokens, token_mask, p, empty_ids, empty_mask, *, generator=None):
    drop = (torch.rand(tokens.shape[0]) < p)[:, None]
    return torch.where(drop, empty_ids, tokens), torch.where(drop, empty_mask, token_mask)
""", ["ignores the generator", "same seed"]),
    ("A6.caption_dropout", "a fixed seed inside", """
def caption_dropout(tokens, token_mask, p, empty_ids, empty_mask, *, generator=None):
    g = torch.Generator().manual_seed(0)
    drop = (torch.rand((tokens.shape[0],), generator=g) < p)[:, None]
    return torch.where(drop, empty_ids, tokens), torch.where(drop, empty_mask, token_mask)
""", ["ignores the generator", "two different generators"]),
    ("A6.caption_dropout", "the first round(p * B) prompts, always", """
def caption_dropout(tokens, token_mask, p, empty_ids, empty_mask, *, generator=None):
    drop = (torch.arange(len(tokens)) < round(p * len(tokens)))[:, None]
    return torch.where(drop, empty_ids, tokens), torch.where(drop, empty_mask, token_mask)
""", ["ignores the generator"]),
    ("A6.caption_dropout", "replaces the ids, keeps the mask", DROPOUT_HEAD + """
    return torch.where(drop, empty_ids, tokens), token_mask.clone()
""", ["replaces the ids of a dropped prompt but keeps its mask"]),
    ("A6.caption_dropout", "clears the mask, keeps the ids", DROPOUT_HEAD + """
    return tokens.clone(), token_mask & ~drop
""", ["changes the mask of a dropped prompt but keeps its ids"]),
    ("A6.caption_dropout", "p = 0 returns the inputs themselves", DROPOUT_HEAD + """
    if p == 0:
        return tokens, token_mask
    return torch.where(drop, empty_ids, tokens), torch.where(drop, empty_mask, token_mask)
""", ["returns the input tensors themselves", "[case: p = 0"]),
    ("A6.caption_dropout", "p = 1 returns the empty prompt itself", DROPOUT_HEAD + """
    if p == 1:
        return empty_ids, empty_mask
    return torch.where(drop, empty_ids, tokens), torch.where(drop, empty_mask, token_mask)
""", ["returns the empty prompt itself, shape (1, 16)", "[case: p = 1"]),
    ("A6.caption_dropout", "one draw for the whole batch", """
def caption_dropout(tokens, token_mask, p, empty_ids, empty_mask, *, generator=None):
    if torch.rand(1, generator=generator).item() < p:
        return empty_ids.repeat(len(tokens), 1), empty_mask.repeat(len(tokens), 1)
    return tokens.clone(), token_mask.clone()
""", ["one draw for the whole batch"]),
    ("A6.caption_dropout", "returns (mask, ids)", DROPOUT_HEAD + """
    return torch.where(drop, empty_mask, token_mask), torch.where(drop, empty_ids, tokens)
""", ["returns (mask, ids)"]),
    ("A6.caption_dropout", "float ids (torch.where with a float fill)", DROPOUT_HEAD + """
    return torch.where(drop, empty_ids.float(), tokens.float()), torch.where(drop, empty_mask, token_mask)
""", ["returns ids of dtype torch.float32", "int64"]),
    ("A6.caption_dropout", "calls the library's caption_dropout", """
def caption_dropout(tokens, token_mask, p, empty_ids, empty_mask, *, generator=None):
    from minidiff import guidance
    return guidance.caption_dropout(tokens, token_mask, p, empty=(empty_ids, empty_mask), generator=generator)
""", ["calls the library's reference minidiff.guidance.caption_dropout"]),
    # ------------------------------------------------------------------------- A7.img2img_start
    ("A7.img2img_start", "returns the levels after the start", START_HEAD + """
    start = n - int(n * strength)
    tail = sigmas[start + 1:]
    if start == 0:
        return noise.clone(), tail
    a, b = coeffs(float(sigmas[start]))
    return a * z0 + b * noise, tail
""", ["returns the levels after the start, sigmas[start + 1:]", "tail = sigmas[start:]"]),
    ("A7.img2img_start", "tail from one level before the noised one", START_HEAD + """
    start = n - int(n * strength)
    if start == 0:
        return noise.clone(), sigmas
    a, b = coeffs(float(sigmas[start]))
    return a * z0 + b * noise, sigmas[start - 1:]
""", ["returns the levels from one earlier, sigmas[start - 1:]", "must be the same level"]),
    ("A7.img2img_start", "alpha_bar and 1 - alpha_bar without the square roots", START_HEAD + """
    start = n - int(n * strength)
    tail = sigmas[start:]
    if start == 0:
        return noise.clone(), tail
    alpha_bar = 1 / (1 + float(tail[0]) ** 2)
    return alpha_bar * z0 + (1 - alpha_bar) * noise, tail
""", ["uses alpha_bar = a^2 and 1 - alpha_bar = b^2", "square roots"]),
    ("A7.img2img_start", "noise weight 1 - a (a lerp)", START_HEAD + """
    start = n - int(n * strength)
    tail = sigmas[start:]
    if start == 0:
        return noise.clone(), tail
    a, _ = coeffs(float(tail[0]))
    return torch.lerp(noise, z0, a), tail
""", ["mixes z0 and noise with weights a and 1 - a", "b = sqrt(1 - a^2)"]),
    ("A7.img2img_start", "no check of strength", """
def img2img_start(z0, sigmas, strength, noise):
    n = len(sigmas) - 1
    start = n - min(int(n * strength), n)
    tail = sigmas[start:]
    if start == 0:
        return noise.clone(), tail
    a, b = coeffs(float(tail[0]))
    return a * z0 + b * noise, tail
""", ["accepts strength = 1.5", "raise a ValueError"]),
    ("A7.img2img_start", "clamps strength into [0, 1] instead of raising", """
def img2img_start(z0, sigmas, strength, noise):
    strength = min(max(strength, 0.0), 1.0)
    n = len(sigmas) - 1
    start = n - int(n * strength)
    tail = sigmas[start:]
    if start == 0:
        return noise.clone(), tail
    a, b = coeffs(float(tail[0]))
    return a * z0 + b * noise, tail
""", ["accepts strength = 1.5", "strength must lie in [0, 1]"]),
    ("A7.img2img_start", "draws its own noise", START_HEAD + """
    start = n - int(n * strength)
    tail = sigmas[start:]
    eps = torch.randn_like(z0)
    if start == 0:
        return eps, tail
    a, b = coeffs(float(tail[0]))
    return a * z0 + b * eps, tail
""", ["draws its own random numbers", "use the noise or generator you are given"]),
    ("A7.img2img_start", "starts from the noise at every strength", START_HEAD + """
    start = n - int(n * strength)
    return noise.clone(), sigmas[start:]
""", ["ignores its input `z0`", "keeps a share a of the input z0"]),
    ("A7.img2img_start", "returns only x", START_HEAD + """
    start = n - int(n * strength)
    if start == 0:
        return noise.clone()
    a, b = coeffs(float(sigmas[start]))
    return a * z0 + b * noise
""", ["returns one tensor", "a tuple (x, tail)"]),
    ("A7.img2img_start", "tail as a Python list", START_HEAD + """
    start = n - int(n * strength)
    tail = sigmas[start:].tolist()
    if start == 0:
        return noise.clone(), tail
    a, b = coeffs(tail[0])
    return a * z0 + b * noise, tail
""", ["return a tuple of two tensors (x, tail)"]),
    ("A7.img2img_start", "tail rebuilt with torch.tensor: float32", START_HEAD + """
    start = n - int(n * strength)
    tail = torch.tensor([float(s) for s in sigmas[start:]])
    if start == 0:
        return noise.clone(), tail
    a, b = coeffs(float(tail[0]))
    return a * z0 + b * noise, tail
""", ["returns dtype torch.float32, expected torch.float64"]),
    ("A7.img2img_start", "x computed in float64", START_HEAD + """
    start = n - int(n * strength)
    tail = sigmas[start:]
    if start == 0:
        return noise.clone(), tail
    a, b = coeffs(float(tail[0]))
    z0, noise = z0.double(), noise.double()
    return a * z0 + b * noise, tail
""", ["returns dtype torch.float64, expected torch.float32", "Keep the dtype of z0"]),
    ("A7.img2img_start", "scales z0 in place", START_HEAD + """
    start = n - int(n * strength)
    tail = sigmas[start:]
    if start == 0:
        return noise.clone(), tail
    a, b = coeffs(float(tail[0]))
    z0 *= a
    return z0 + b * noise, tail
""", ["modifies its argument `z0` in place"]),
    ("A7.img2img_start", "scales the noise in place", START_HEAD + """
    start = n - int(n * strength)
    tail = sigmas[start:]
    if start == 0:
        return noise, tail
    a, b = coeffs(float(tail[0]))
    return a * z0 + noise.mul_(b), tail
""", ["modifies its argument `noise` in place"]),
    ("A7.img2img_start", "calls the library's img2img_start for the index", """
from minidiff.inpainting import img2img_start as start_index
def img2img_start(z0, sigmas, strength, noise):
    start = start_index(len(sigmas) - 1, strength)
    tail = sigmas[start:]
    if start == 0:
        return noise.clone(), tail
    a, b = coeffs(float(tail[0]))
    return a * z0 + b * noise, tail
""", ["uses the library's reference minidiff.inpainting.img2img_start"]),
    ("A7.img2img_start", "calls the library's img2img_start_latents", """
def img2img_start(z0, sigmas, strength, noise):
    from minidiff import inpainting
    return inpainting.img2img_start_latents(z0, sigmas, strength)
""", ["calls the library's reference minidiff.inpainting.img2img_start_latents"]),
    ("A6.cross_attention", "multiplies by sqrt(d) (found by fitting the scale)", ATTENTION_HEAD + """
    logits = (q @ k.transpose(1, 2) * math.sqrt(q.shape[-1])).masked_fill(~context_mask[:, None, :], float("-inf"))
    attn = logits.softmax(-1).nan_to_num(0.0)
    return attn @ v, attn
""", ["scales the logits wrongly", "multiplies them by sqrt(d) = sqrt(4) instead of dividing"]),
    ("A6.cross_attention", "divides by sqrt(N), the number of image tokens", ATTENTION_HEAD + """
    logits = (q @ k.transpose(1, 2) / math.sqrt(x.shape[1])).masked_fill(~context_mask[:, None, :], float("-inf"))
    attn = logits.softmax(-1).nan_to_num(0.0)
    return attn @ v, attn
""", ["divides them by sqrt(N) = sqrt(5), the number of image tokens"]),
    ("A6.cross_attention", "an odd scale: 0.3", ATTENTION_HEAD + """
    logits = (0.3 * q @ k.transpose(1, 2)).masked_fill(~context_mask[:, None, :], float("-inf"))
    attn = logits.softmax(-1).nan_to_num(0.0)
    return attn @ v, attn
""", ["c = 0.3", "the scale is 1 / sqrt(d)"]),
    ("A6.cross_attention", "an additive mask (~m) * -inf: 0 * -inf is NaN", ATTENTION_HEAD + """
    logits = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]) + (~context_mask[:, None, :]) * float("-inf")
    attn = logits.softmax(-1)
    return attn @ v, attn
""", ["NaN attention for prompts that have real tokens", "masked_fill"]),
    ("A6.cross_attention", "the scale applied to attn after the softmax", ATTENTION_HEAD + """
    logits = (q @ k.transpose(1, 2)).masked_fill(~context_mask[:, None, :], float("-inf"))
    attn = logits.softmax(-1).nan_to_num(0.0) / math.sqrt(q.shape[-1])
    return attn @ v, attn
""", ["scales the attention after the softmax", "scale the logits before it"]),
    ("A6.cross_attention", "NaN cleaned in attn after out was computed", ATTENTION_HEAD + """
    logits = (q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])).masked_fill(~context_mask[:, None, :], float("-inf"))
    attn = logits.softmax(-1)
    out = attn @ v
    return out, attn.nan_to_num(0.0)
""", ["returns the right attn but a wrong out (with NaN)", "after its NaN are set to 0"]),
    ("A6.cross_attention", "1 - mask on a bool mask: torch's NotImplementedError is an attempt", ATTENTION_HEAD + """
    pad = 1 - context_mask
    logits = (q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])).masked_fill(pad[:, None, :].bool(), float("-inf"))
    attn = logits.softmax(-1).nan_to_num(0.0)
    return attn @ v, attn
""", ["raised NotImplementedError", "use the `~`", "(line "]),
    ("A6.caption_dropout", "1 - drop on a bool tensor: an attempt, not a stub", DROPOUT_HEAD + """
    keep = 1 - drop
    return tokens * keep + empty_ids * drop, token_mask * keep + empty_mask * drop
""", ["raised NotImplementedError", "logical_not()"]),
    ("A6.caption_dropout", "drop - 1 on a bool tensor: torch raises from C, in the student's own frame", DROPOUT_HEAD + """
    keep = (drop - 1).abs()
    return tokens * keep + empty_ids * drop, token_mask * keep + empty_mask * drop
""", ["raised NotImplementedError: Subtraction"]),
    ("A6.caption_dropout", "empty ids with a mask of all True", DROPOUT_HEAD + """
    return torch.where(drop, empty_ids, tokens), torch.where(drop, torch.ones_like(token_mask), token_mask)
""", ["gives a dropped prompt empty_ids but a mask that is not empty_mask"]),
    ("A6.caption_dropout", "real tokens replaced by <unk>", DROPOUT_HEAD + """
    return torch.where(drop & token_mask, torch.full_like(tokens, 3), tokens), token_mask.clone()
""", ["neither the prompt nor the empty prompt", "exactly empty_ids with empty_mask"]),
    # ------------------------------------------------------------------------- A7.img2img_start (more)
    ("A7.img2img_start", "starts one level late, x at that level too", START_HEAD + """
    start = min(n - int(n * strength) + 1, n)
    tail = sigmas[start:]
    if start == 0:
        return noise.clone(), tail
    a, b = coeffs(float(tail[0]))
    return a * z0 + b * noise, tail
""", ["starts one level late", "start = N - int(N * strength)"]),
    ("A7.img2img_start", "starts one level early, x at that level too", START_HEAD + """
    start = max(n - int(n * strength) - 1, 0)
    tail = sigmas[start:]
    if n - int(n * strength) == 0:
        return noise.clone(), tail
    a, b = coeffs(float(tail[0]))
    return a * z0 + b * noise, tail
""", ["starts one level early"]),
    ("A7.img2img_start", "x noised at the next level", START_HEAD + """
    start = n - int(n * strength)
    tail = sigmas[start:]
    if start == 0:
        return noise.clone(), tail
    a, b = coeffs(float(sigmas[min(start + 1, n)]))
    return a * z0 + b * noise, tail
""", ["noises z0 at the level after the start"]),
    ("A7.img2img_start", "signal weight 1 / (1 + sigma^2)", START_HEAD + """
    start = n - int(n * strength)
    tail = sigmas[start:]
    if start == 0:
        return noise.clone(), tail
    s = float(tail[0])
    return z0 / (1 + s**2) + s / math.sqrt(1 + s**2) * noise, tail
""", ["uses 1 / (1 + sigma^2) as the signal weight"]),
    ("A7.img2img_start", "noise weight sigma", START_HEAD + """
    start = n - int(n * strength)
    tail = sigmas[start:]
    if start == 0:
        return noise.clone(), tail
    s = float(tail[0])
    return z0 / math.sqrt(1 + s**2) + s * noise, tail
""", ["uses sigma as the noise weight"]),
    ("A7.img2img_start", "tail without the final 0", START_HEAD + """
    start = n - int(n * strength)
    tail = sigmas[start:-1]
    if start == 0:
        return noise.clone(), tail
    a, b = coeffs(float(sigmas[start]))
    return a * z0 + b * noise, tail
""", ["drops the final level 0 from tail"]),
    ("A7.inpaint_denoise", "the known region without the signal weight a", INPAINT_HEAD + """
    x_in = mask * x + (1 - mask) * (z0 + b * noise)
    return mask * denoiser(x_in, sigma) + (1 - mask) * z0
""", ["leaves out the signal weight a"]),
    ("A7.inpaint_denoise", "the denoiser given sigma as (B, 1, 1, 1)", INPAINT_HEAD + """
    x_in = mask * x + (1 - mask) * (a * z0 + b * noise)
    return mask * denoiser(x_in, s) + (1 - mask) * z0
""", ["the denoiser takes sigma of shape (B,)", "got (3, 1, 1, 1)"]),
    # ------------------------------------------------------------------------- A7.inpaint_denoise
    ("A7.inpaint_denoise", "mask of the output inverted", INPAINT_HEAD + """
    x0_hat = denoiser(mask * x + (1 - mask) * (a * z0 + b * noise), sigma)
    return (1 - mask) * x0_hat + mask * z0
""", ["inverts the mask of the output"]),
    ("A7.inpaint_denoise", "the denoiser fed x as it is", INPAINT_HEAD + """
    x0_hat = denoiser(x, sigma)
    return mask * x0_hat + (1 - mask) * z0
""", ["feeds the denoiser the state x unchanged", "a z0 + b noise"]),
    ("A7.inpaint_denoise", "VE noising of the known region", INPAINT_HEAD + """
    x_in = mask * x + (1 - mask) * (z0 + s * noise)
    return mask * denoiser(x_in, sigma) + (1 - mask) * z0
""", ["VE state z0 + sigma * noise"]),
    ("A7.inpaint_denoise", "alpha_bar coefficients without the square roots", """
def inpaint_denoise(denoiser, x, sigma, z0, mask, noise):
    alpha_bar = (1 / (1 + sigma**2)).view(-1, 1, 1, 1)
    x_in = mask * x + (1 - mask) * (alpha_bar * z0 + (1 - alpha_bar) * noise)
    return mask * denoiser(x_in, sigma) + (1 - mask) * z0
""", ["uses alpha_bar = a^2 and 1 - alpha_bar = b^2", "square roots"]),
    ("A7.inpaint_denoise", "the noised original in the known region of the output", INPAINT_HEAD + """
    known = a * z0 + b * noise
    x_in = mask * x + (1 - mask) * known
    return mask * denoiser(x_in, sigma) + (1 - mask) * known
""", ["returns the noised original a z0 + b noise in the known region", "z0 itself"]),
    ("A7.inpaint_denoise", "the known region noised without the noise", INPAINT_HEAD + """
    x_in = mask * x + (1 - mask) * a * z0
    return mask * denoiser(x_in, sigma) + (1 - mask) * z0
""", ["ignores its input `noise`"]),
    ("A7.inpaint_denoise", "the denoiser given the first sample's sigma", INPAINT_HEAD + """
    x_in = mask * x + (1 - mask) * (a * z0 + b * noise)
    return mask * denoiser(x_in, sigma[0].expand(len(x))) + (1 - mask) * z0
""", ["right for the first sample of the batch but wrong for the others"]),
    ("A7.inpaint_denoise", "overwrites the known region of x in place", INPAINT_HEAD + """
    keep = mask < 0.5
    x[keep.expand_as(x)] = (a * z0 + b * noise)[keep.expand_as(x)]
    return torch.where(keep, z0, denoiser(x, sigma))
""", ["modifies its argument `x` in place"]),
    ("A7.inpaint_denoise", "fresh noise at every call", INPAINT_HEAD + """
    x_in = mask * x + (1 - mask) * (a * z0 + b * torch.randn_like(z0))
    return mask * denoiser(x_in, sigma) + (1 - mask) * z0
""", ["draws its own random numbers"]),
    ("A7.inpaint_denoise", "wraps the library's InpaintDenoiser", """
from minidiff.inpainting import InpaintDenoiser
def inpaint_denoise(denoiser, x, sigma, z0, mask, noise):
    return InpaintDenoiser(denoiser, z0, mask, noise)(x, sigma)
""", ["uses the library's reference minidiff.inpainting.InpaintDenoiser"]),
    ("A7.inpaint_denoise", "builds InpaintDenoiser through a local import", """
def inpaint_denoise(denoiser, x, sigma, z0, mask, noise):
    import minidiff.inpainting as inpainting
    wrapped = inpainting.InpaintDenoiser(denoiser, z0, mask, noise)
    return wrapped(x, sigma)
""", ["calls the library's reference minidiff.inpainting.InpaintDenoiser"]),
    ("A7.inpaint_denoise", "coefficients in float64", """
def inpaint_denoise(denoiser, x, sigma, z0, mask, noise):
    s = sigma.double().view(-1, 1, 1, 1)
    a, b = 1 / torch.sqrt(1 + s**2), s / torch.sqrt(1 + s**2)
    x_in = mask * x + (1 - mask) * (a * z0 + b * noise)
    return mask * denoiser(x_in, sigma) + (1 - mask) * z0
""", ["returns dtype torch.float64, expected torch.float32", "Keep the dtype of x"]),
]


@pytest.mark.parametrize("case", range(len(PLANTED)), ids=[f"{p[0]}-{p[1]}" for p in PLANTED])
def test_planted_mistake_is_named(case):
    task, _, source, phrases = PLANTED[case]
    result = run_task(task, student(source, _func(task)))
    assert not result.passed and result.points == 0, result.message
    assert result.status in ("fail", "error"), result.message
    for phrase in phrases:
        assert phrase in result.message, result.message
    assert "max abs difference" not in result.message, result.message
    assert "not one of the usual mistakes" not in result.message, result.message


CORRECT = [  # correct but different implementations: no false positives
    # (task, what is different, source)
    ("A1.linear_alphas_cumprod", "a Python loop", """
def linear_alphas_cumprod(T, beta_start=1e-4, beta_end=0.02):
    out, prod = [], 1.0
    for i in range(T):
        beta = beta_start + (beta_end - beta_start) * i / (T - 1)
        prod *= 1 - beta
        out.append(prod)
    return torch.tensor(out, dtype=torch.float64)
"""),
    ("A1.linear_alphas_cumprod", "exp of a cumulative sum of logs", """
def linear_alphas_cumprod(T, beta_start=1e-4, beta_end=0.02):
    betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    return torch.exp(torch.cumsum(torch.log1p(-betas), 0))
"""),
    ("A1.cosine_alphas_cumprod", "a loop with math.cos and min", """
def cosine_alphas_cumprod(T, s=0.008, max_beta=0.999):
    def f(t):
        return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    out, prod = [], 1.0
    for t in range(T):
        prod *= 1 - min(1 - f(t + 1) / f(t), max_beta)
        out.append(prod)
    return torch.tensor(out, dtype=torch.float64)
"""),
    ("A1.cosine_alphas_cumprod", "alpha_bar ratios clamped from below", """
def cosine_alphas_cumprod(T, s=0.008, max_beta=0.999):
    u = torch.linspace(0, 1, T + 1, dtype=torch.float64)
    ab = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    ab = ab / ab[0]
    return torch.cumprod((ab[1:] / ab[:-1]).clamp(min=1 - max_beta), 0)
"""),
    ("A1.q_sample", "append_dims, a gather of sqrt tables and addcmul", """
def q_sample(x0, t, noise, alphas_cumprod):
    from minidiff.utils import append_dims
    a = append_dims(alphas_cumprod.sqrt()[t], x0.ndim).to(x0.dtype)
    b = append_dims((1 - alphas_cumprod).sqrt()[t], x0.ndim).to(x0.dtype)
    return torch.addcmul(a * x0, b, noise)
"""),
    ("A1.snr", "1 / (1 - alpha_bar) - 1", """
def snr(alphas_cumprod):
    return 1 / (1 - alphas_cumprod) - 1
"""),
    ("A1.snr", "exp(log alpha_bar - log1p(-alpha_bar))", """
def snr(alphas_cumprod):
    return torch.exp(torch.log(alphas_cumprod) - torch.log1p(-alphas_cumprod))
"""),
    ("A1.snr", "the squared ratio of the coefficients", """
def snr(alphas_cumprod):
    a, b = alphas_cumprod.sqrt(), (1 - alphas_cumprod).sqrt()
    return (a / b) ** 2
"""),
    ("A2.ddpm_loss", "F.mse_loss, x_t inline with torch.sqrt", """
def ddpm_loss(net, x0, t, noise, alphas_cumprod):
    a = alphas_cumprod[t].to(x0.dtype).view(-1, 1, 1, 1)
    x_t = torch.sqrt(a) * x0 + torch.sqrt(1 - a) * noise
    return F.mse_loss(net(x_t, t), noise)
"""),
    ("A2.ddpm_loss", "nn.MSELoss with the A1 q_sample", Q_SAMPLE + """
def ddpm_loss(net, x0, t, noise, alphas_cumprod):
    return torch.nn.MSELoss()(net(q_sample(x0, t, noise, alphas_cumprod), t), noise)
"""),
    ("A2.ddpm_step", "the posterior mean from x0_hat (DDPM Eq. 7)", DDPM_HEAD + """
    x0_hat = (x_t - math.sqrt(1 - ab_t) * eps_hat) / math.sqrt(ab_t)
    c0 = math.sqrt(ab_prev) * beta / (1 - ab_t)
    ct = math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab_t)
    mean = c0 * x0_hat + ct * x_t
    if t == 0:
        return mean
    return mean + math.sqrt((1 - ab_prev) / (1 - ab_t) * beta) * noise
"""),
    ("A2.ddpm_step", "tensor coefficients, no branch (beta_tilde_0 = 0)", """
def ddpm_step(x_t, t, eps_hat, betas, noise):
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)
    ab_prev_all = torch.cat([torch.ones(1, dtype=betas.dtype), alphas_cumprod[:-1]])
    beta, ab_t, ab_prev = betas[t], alphas_cumprod[t], ab_prev_all[t]
    mean = (x_t - (beta / torch.sqrt(1 - ab_t)).to(x_t.dtype) * eps_hat) / torch.sqrt(1 - beta).to(x_t.dtype)
    std = torch.sqrt(beta * (1 - ab_prev) / (1 - ab_t)).to(x_t.dtype)
    return mean + std * noise
"""),
    ("A3.ddim_step", "sigma_eta written as in Song et al. Eq. 16", """
def ddim_step(denoiser, x, sigma, sigma_next, eta, noise):
    a, b = coeffs(sigma)
    a_next, b_next = coeffs(sigma_next)
    x0_hat = denoiser(x, torch.full((x.shape[0],), sigma, dtype=x.dtype))
    eps_hat = (x - a * x0_hat) / b
    sigma_eta = eta * math.sqrt((1 - a_next**2) / (1 - a**2)) * math.sqrt(1 - a**2 / a_next**2)
    return a_next * x0_hat + math.sqrt(1 - a_next**2 - sigma_eta**2) * eps_hat + sigma_eta * noise
"""),
    ("A3.ddim_step", "a separate branch for eta = 0", DDIM_HEAD + """
    if eta == 0:
        return a_next * x0_hat + b_next * eps_hat
    return a_next * x0_hat + math.sqrt(b_next**2 - var) * eps_hat + math.sqrt(var) * noise
"""),
    ("A3.euler_step", "a_next (x0_hat + sigma_next eps_hat), sigma as a float tensor", """
def euler_step(denoiser, x, sigma, sigma_next):
    a, b = coeffs(sigma)
    a_next, _ = coeffs(sigma_next)
    x0_hat = denoiser(x, torch.full((len(x),), float(sigma)))
    eps_hat = (x - a * x0_hat) / b
    return a_next * (x0_hat + sigma_next * eps_hat)
"""),
    ("A3.euler_step", "the Karras VE form, with a branch for sigma = inf", """
def euler_step(denoiser, x, sigma, sigma_next):
    (a, b), (a_next, b_next) = coeffs(sigma), coeffs(sigma_next)
    x0_hat = denoiser(x, sigma * x.new_ones(len(x)))
    if math.isinf(sigma):
        return a_next * x0_hat + b_next * x
    x_ve = x / a
    d = (x_ve - x0_hat) / sigma
    return a_next * (x_ve + (sigma_next - sigma) * d)
"""),
    ("A3.heun_step", "VE slopes in a helper function (Karras Alg. 1)", """
def heun_step(denoiser, x, sigma, sigma_next):
    def slope(x_ve, s):
        a_s, _ = coeffs(s)
        return (x_ve - denoiser(a_s * x_ve, s * x_ve.new_ones(len(x_ve)))) / s
    a, _ = coeffs(sigma)
    a_next, b_next = coeffs(sigma_next)
    if math.isinf(sigma):
        return a_next * denoiser(x, sigma * x.new_ones(len(x))) + b_next * x
    x_ve = x / a
    d = slope(x_ve, sigma)
    x_ve_next = x_ve + (sigma_next - sigma) * d
    if sigma_next == 0:
        return x_ve_next
    return a_next * (x_ve + (sigma_next - sigma) * 0.5 * (d + slope(x_ve_next, sigma_next)))
"""),
    ("A3.heun_step", "eps slopes, a_next distributed over the sum", HEUN_HEAD + """
    if sigma_next == 0 or math.isinf(sigma):
        return x_euler
""" + HEUN_CORRECTION + """
    return a_next * x / a + a_next * (sigma_next - sigma) * (d + d_next) / 2
"""),
    ("A4.condition_dropout", "masked_fill (not in place)", """
def condition_dropout(labels, p, null_id, *, generator=None):
    return labels.masked_fill(torch.rand(labels.shape, generator=generator) < p, null_id)
"""),
    ("A4.condition_dropout", "torch.bernoulli (other random draws, right statistics)", """
def condition_dropout(labels, p, null_id, *, generator=None):
    drop = torch.bernoulli(torch.full(labels.shape, float(p)), generator=generator).bool()
    return torch.where(drop, null_id, labels)
"""),
    ("A4.condition_dropout", "arithmetic with a keep mask", """
def condition_dropout(labels, p, null_id, *, generator=None):
    keep = (torch.rand(labels.shape, generator=generator) >= p).long()
    return labels * keep + null_id * (1 - keep)
"""),
    ("A4.condition_dropout", "a loop over the labels, one draw each", """
def condition_dropout(labels, p, null_id, *, generator=None):
    out = labels.clone()
    for i in range(len(labels)):
        if torch.rand(1, generator=generator).item() < p:
            out[i] = null_id
    return out
"""),
    ("A4.cfg_combine", "cond + (w - 1) (cond - uncond)", """
def cfg_combine(x0_cond, x0_uncond, guidance_scale):
    return x0_cond + (guidance_scale - 1) * (x0_cond - x0_uncond)
"""),
    ("A4.cfg_combine", "torch.add with alpha", """
def cfg_combine(x0_cond, x0_uncond, guidance_scale):
    return torch.add(x0_uncond, x0_cond - x0_uncond, alpha=guidance_scale)
"""),
    ("A4.cfg_denoise", "repeat and slicing by B", CFG_COMBINE + """
def cfg_denoise(denoiser, x, sigma, class_labels, null_id, guidance_scale):
    B = x.shape[0]
    labels_in = torch.cat([class_labels, class_labels.new_full((B,), null_id)])
    out = denoiser(x.repeat(2, 1, 1, 1), sigma.repeat(2), class_labels=labels_in)
    return cfg_combine(out[:B], out[B:], guidance_scale)
"""),
    ("A4.cfg_denoise", "torch.lerp inline, no cfg_combine", """
def cfg_denoise(denoiser, x, sigma, class_labels, null_id, guidance_scale):
    labels_in = torch.cat([class_labels, torch.full_like(class_labels, null_id)])
    x0_cond, x0_uncond = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), class_labels=labels_in).chunk(2)
    return torch.lerp(x0_uncond, x0_cond, guidance_scale)
"""),
    ("A5.reparameterize", "sqrt(exp(logvar)) and torch.addcmul", """
def reparameterize(mean, logvar, eps):
    return torch.addcmul(mean, torch.sqrt(torch.exp(logvar)), eps)
"""),
    ("A5.reparameterize", "a log-std, then exp", """
def reparameterize(mean, logvar, eps):
    log_std = logvar / 2
    return eps * log_std.exp() + mean
"""),
    ("A5.kl_diagonal_gaussian", "the ELBO form negated, reshape(B, -1)", """
def kl_diagonal_gaussian(mean, logvar):
    return -0.5 * (1 + logvar - mean.pow(2) - logvar.exp()).reshape(len(mean), -1).sum(-1)
"""),
    ("A5.kl_diagonal_gaussian", "a loop over the samples", """
def kl_diagonal_gaussian(mean, logvar):
    out = []
    for m, lv in zip(mean, logvar):
        out.append(0.5 * (m**2 + torch.exp(lv) - 1 - lv).sum())
    return torch.stack(out)
"""),
    ("A5.scaling_factor", "np.std (no Bessel correction), a NumPy float32", """
def scaling_factor(latents):
    return 1 / np.std(latents.numpy())
"""),
    ("A5.scaling_factor", "a 0-d tensor, the std written out", """
def scaling_factor(latents):
    centred = latents - latents.mean()
    return centred.pow(2).sum().div(latents.numel() - 1).rsqrt()
"""),
    ("A6.cross_attention", "einsum, torch.where with -inf, NaN rows set to 0", """
def cross_attention(x, context, context_mask, w_q, w_k, w_v):
    q = torch.einsum("bnc,cd->bnd", x, w_q)
    k, v = torch.einsum("bld,de->ble", context, w_k), torch.einsum("bld,de->ble", context, w_v)
    logits = torch.einsum("bnd,bld->bnl", q, k) / q.shape[-1] ** 0.5
    attn = torch.softmax(torch.where(context_mask[:, None, :], logits, float("-inf")), dim=-1)
    attn = torch.where(attn.isnan(), 0.0, attn)
    return attn @ v, attn
"""),
    ("A6.cross_attention", "F.scaled_dot_product_attention for the output", ATTENTION_HEAD + """
    attn = (q @ k.mT * q.shape[-1] ** -0.5).masked_fill(~context_mask.unsqueeze(1), -torch.inf).softmax(-1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=context_mask[:, None, :])
    return out.nan_to_num(0.0), attn.nan_to_num(0.0)
"""),
    ("A6.cross_attention", "softmax by hand with the max subtracted, finite fill, a loop over the batch", """
def cross_attention(x, context, context_mask, w_q, w_k, w_v):
    outs, attns = [], []
    for xb, cb, mb in zip(x, context, context_mask):
        q, k, v = xb @ w_q, cb @ w_k, cb @ w_v
        logits = torch.where(mb, q @ k.T / math.sqrt(q.shape[1]), torch.finfo(x.dtype).min)
        e = torch.exp(logits - logits.max(dim=1, keepdim=True).values)
        a = e / e.sum(dim=1, keepdim=True) if mb.any() else torch.zeros_like(e)
        outs.append(a @ v)
        attns.append(a)
    return torch.stack(outs), torch.stack(attns)
"""),
    ("A6.caption_dropout", "clone and boolean indexing", """
def caption_dropout(tokens, token_mask, p, empty_ids, empty_mask, *, generator=None):
    drop = torch.rand(len(tokens), generator=generator) < p
    ids, mask = tokens.clone(), token_mask.clone()
    ids[drop], mask[drop] = empty_ids, empty_mask
    return ids, mask
"""),
    ("A6.caption_dropout", "a loop over the prompts, one draw each", """
def caption_dropout(tokens, token_mask, p, empty_ids, empty_mask, *, generator=None):
    rows = []
    for ids, mask in zip(tokens, token_mask):
        dropped = torch.rand(1, generator=generator).item() < p
        rows.append((empty_ids[0], empty_mask[0]) if dropped else (ids, mask))
    return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
"""),
    ("A6.caption_dropout", "integer draws (other random numbers, right statistics)", """
def caption_dropout(tokens, token_mask, p, empty_ids, empty_mask, *, generator=None):
    drop = (torch.randint(0, 1000, (len(tokens), 1), generator=generator) < 1000 * p)
    return torch.where(drop, empty_ids, tokens), torch.where(drop, empty_mask, token_mask)
"""),
    ("A7.img2img_start", "math.floor, vp_coefficients on the tensor level, the noise itself at strength 1", """
def img2img_start(z0, sigmas, strength, noise):
    if strength < 0 or strength > 1:
        raise ValueError(f"strength must lie in [0, 1], got {strength}")
    steps = len(sigmas) - 1
    start = steps - math.floor(steps * strength)
    if start == 0:
        return noise, sigmas
    a, b = vp_coefficients(sigmas[start])
    return a.to(z0.dtype) * z0 + b.to(z0.dtype) * noise, sigmas[start:]
"""),
    ("A7.img2img_start", "diffusers' init_timestep, sqrt(alpha_bar) as tensors", """
def img2img_start(z0, sigmas, strength, noise):
    if not (0.0 <= strength <= 1.0):
        raise ValueError("strength must be between 0 and 1")
    num_steps = sigmas.numel() - 1
    init_timestep = min(int(num_steps * strength), num_steps)
    t_start = max(num_steps - init_timestep, 0)
    tail = sigmas[t_start:].clone()
    if init_timestep == num_steps:
        return noise.clone(), tail
    alpha_bar = 1 / (1 + tail[0] ** 2)
    x = torch.sqrt(alpha_bar) * z0 + torch.sqrt(1 - alpha_bar) * noise
    return x.to(z0.dtype), tail
"""),
    ("A7.img2img_start", "forward.q_sample_sigma per sample, returned as a list", """
from minidiff.forward import q_sample_sigma
def img2img_start(z0, sigmas, strength, noise):
    if not 0 <= strength <= 1:
        raise ValueError("strength must be in [0, 1]")
    n = len(sigmas) - 1
    k = int(n * strength)
    tail = sigmas[n - k:]
    if k == n:
        return [noise.clone(), tail]
    sigma = torch.full((len(z0),), float(tail[0]), dtype=z0.dtype)
    return [q_sample_sigma(z0, sigma, noise), tail]
"""),
    ("A7.inpaint_denoise", "a loop over the batch, torch.where for the output", """
def inpaint_denoise(denoiser, x, sigma, z0, mask, noise):
    x_in = torch.empty_like(x)
    for i in range(len(x)):
        a, b = coeffs(float(sigma[i]))
        x_in[i] = mask[i] * x[i] + (1 - mask[i]) * (a * z0[i] + b * noise[i])
    x0_hat = denoiser(x_in, sigma)
    return torch.where(mask > 0.5, x0_hat, z0)
"""),
    ("A7.inpaint_denoise", "vp_coefficients and torch.lerp for both blends", """
def inpaint_denoise(denoiser, x, sigma, z0, mask, noise):
    a, b = vp_coefficients(sigma)
    a, b = a.view(-1, 1, 1, 1), b.view(-1, 1, 1, 1)
    known = a * z0 + b * noise
    x0_hat = denoiser(torch.lerp(known, x, mask), sigma)
    return torch.lerp(z0, x0_hat, mask)
"""),
    ("A7.inpaint_denoise", "forward.q_sample_sigma and a keep mask", """
from minidiff.forward import q_sample_sigma
def inpaint_denoise(denoiser, x, sigma, z0, mask, noise):
    keep = 1 - mask
    x_in = x * mask + q_sample_sigma(z0, sigma, noise) * keep
    return denoiser(x_in, sigma) * mask + z0 * keep
"""),
]


@pytest.mark.parametrize("case", range(len(CORRECT)), ids=[f"{c[0]}-{c[1]}" for c in CORRECT])
def test_correct_alternative_passes(case):
    task, _, source = CORRECT[case]
    result = run_task(task, student(source, _func(task)))
    assert result.passed and result.status == "pass", result.message
    assert result.points == TASKS[task].points


# ----------------------------------------------------------------------------- coverage over the three files
def _load(filename: str):
    """The test module ``filename`` (next to this one), loaded under a private name to count its cases."""
    path = Path(__file__).with_name(filename)
    spec = importlib.util.spec_from_file_location(f"_planted_counts_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_task_has_six_planted_mistakes_and_a_correct_alternative():
    basic, diagnose = _load("test_checks.py"), _load("test_checks_diagnose.py")
    planted = Counter(p[0] for p in PLANTED) + Counter(w[0] for w in basic.WRONG) + \
        Counter(p[0] for p in diagnose.PLANTED)
    alternatives = Counter(c[0] for c in CORRECT) + Counter(c[0] for c in diagnose.CORRECT)
    assert set(TASKS) <= set(planted), sorted(set(TASKS) - set(planted))
    assert {t: planted[t] for t in TASKS if planted[t] < 6} == {}, dict(planted)
    assert {t for t in TASKS if alternatives[t] < 1} == set(), dict(alternatives)


def test_planted_kinds_are_distinct_within_a_task():
    kinds = Counter((task, kind) for task, kind, _, _ in PLANTED)
    assert [k for k, n in kinds.items() if n > 1] == []
