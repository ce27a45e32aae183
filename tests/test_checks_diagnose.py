"""The shared diagnoses of minidiff.course.checks name the mistake: planted mistakes of each kind, and correct
alternatives that must still pass.

Each planted mistake is a student function written as a student would (in a fresh namespace, like a notebook's
globals), run through ``run_task``; the test asserts the message names the mistake, not a bare difference.
"""
import pytest

from minidiff.course.checks import run_task

HEADER = """
import math
import torch
from minidiff.schedules import vp_coefficients
def coeffs(sigma):
    a, b = vp_coefficients(sigma)
    return a.item(), b.item()
"""


def student(source: str, name: str):
    """Define ``name`` from ``source`` in a fresh namespace, as a notebook cell would."""
    namespace = {}
    exec(HEADER + source, namespace)  # noqa: S102 -- the planted student code of this test
    return namespace[name]


PLANTED = [
    # (task, function name, source, words the message must contain)
    ("A1.cosine_alphas_cumprod", "cosine_alphas_cumprod", """
import minidiff.schedules
def cosine_alphas_cumprod(T, s=0.008, max_beta=0.999):
    return torch.cumprod(1 - minidiff.schedules.cosine_betas(T, s, max_beta), 0)
""", ["calls the library's reference minidiff.schedules.cosine_betas"]),
    ("A1.linear_alphas_cumprod", "linear_alphas_cumprod", """
def linear_alphas_cumprod(T, beta_start=1e-4, beta_end=0.02):
    from minidiff import schedules as S
    return S.alphas_cumprod_from_betas(S.linear_betas(T, beta_start, beta_end))
""", ["calls the library's reference"]),
    ("A1.q_sample", "q_sample", """
def q_sample(x0, t, noise, alphas_cumprod):
    a = alphas_cumprod[t].to(x0.dtype).reshape(-1, *[1] * (x0.ndim - 1))
    return a.sqrt() * x0 + (1 - a).sqrt() * torch.randn_like(x0)
""", ["draws its own random numbers"]),
    ("A1.q_sample", "q_sample", """
def q_sample(x0, t, noise, alphas_cumprod):
    a = alphas_cumprod[t].to(x0.dtype).reshape(-1, *[1] * (x0.ndim - 1))
    torch.manual_seed(0)
    return a.sqrt() * x0 + (1 - a).sqrt() * torch.randn_like(x0)
""", ["ignores its input `noise`"]),
    ("A1.q_sample", "q_sample", """
def q_sample(x0, t, noise, alphas_cumprod):
    a = alphas_cumprod[500].to(x0.dtype)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise
""", ["ignores its input `t`"]),
    ("A1.q_sample", "q_sample", """
def q_sample(x0, t, noise, alphas_cumprod):
    a = alphas_cumprod[t[0]].to(x0.dtype)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise
""", ["right for the first sample of the batch"]),
    ("A2.ddpm_loss", "ddpm_loss", """
def ddpm_loss(net, x0, t, noise, alphas_cumprod):
    noise = torch.randn_like(x0)
    a = alphas_cumprod[t].to(x0.dtype).reshape(-1, 1, 1, 1)
    return ((net(a.sqrt() * x0 + (1 - a).sqrt() * noise, t) - noise) ** 2).mean()
""", ["draws its own random numbers", "use the noise"]),
    ("A3.ddim_step", "ddim_step", """
def ddim_step(denoiser, x, sigma, sigma_next, eta, noise):
    (a, b), (a_next, b_next) = coeffs(sigma), coeffs(sigma_next)
    x0_hat = denoiser(x, sigma * x.new_ones(len(x)))
    eps_hat = (x - a * x0_hat) / b
    var = eta**2 * (b_next**2 / b**2) * (1 - a**2 / a_next**2)
    return a_next * x0_hat + math.sqrt(b_next**2 - var) * eps_hat + math.sqrt(var) * torch.randn_like(x)
""", ["draws its own random numbers"]),
    ("A3.euler_step", "euler_step", """
def euler_step(denoiser, x, sigma, sigma_next):
    (a, b), (a_next, b_next) = coeffs(sigma), coeffs(sigma_next)
    x0_hat = denoiser(x, sigma * x.new_ones(len(x)))
    return (a_next * x0_hat + b_next * (x - a * x0_hat) / b).clamp(-1, 1)
""", ["clamps its output"]),
    ("A4.condition_dropout", "condition_dropout", """
def condition_dropout(labels, p, null_id, *, generator=None):
    torch.manual_seed(0)
    drop = torch.rand(labels.shape) < p
    return torch.where(drop, torch.full_like(labels, null_id), labels)
""", ["ignores the generator", "two different generators"]),
    ("A4.cfg_combine", "cfg_combine", """
def cfg_combine(x0_cond, x0_uncond, guidance_scale):
    return 2 * (x0_uncond + guidance_scale * (x0_cond - x0_uncond))
""", ["constant factor of 2"]),
    ("A4.cfg_combine", "cfg_combine", """
def cfg_combine(x0_cond, x0_uncond, guidance_scale):
    return -(x0_uncond + guidance_scale * (x0_cond - x0_uncond))
""", ["wrong sign"]),
    ("A4.cfg_denoise", "cfg_denoise", """
def cfg_combine(x0_cond, x0_uncond, guidance_scale):
    return x0_cond + guidance_scale * (x0_uncond - x0_cond) * 0.9
def cfg_denoise(denoiser, x, sigma, class_labels, null_id, guidance_scale):
    labels_in = torch.cat([class_labels, torch.full_like(class_labels, null_id)])
    x0_cond, x0_uncond = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), class_labels=labels_in).chunk(2)
    return cfg_combine(x0_cond, x0_uncond, guidance_scale)
""", ["your cfg_combine is wrong", "with the reference cfg_combine your cfg_denoise passes"]),
]


@pytest.mark.parametrize("case", range(len(PLANTED)), ids=[f"{p[0]}-{p[3][0][:30]}" for p in PLANTED])
def test_planted_mistake_is_named(case):
    task, name, source, words = PLANTED[case]
    result = run_task(task, student(source, name))
    assert not result.passed and result.points == 0, result.message
    for w in words:
        assert w in result.message, result.message
    assert "max abs difference" not in result.message, result.message


CORRECT = [  # different but correct: no false positives
    ("A1.q_sample", "q_sample", """
def q_sample(x0, t, noise, alphas_cumprod):
    out = torch.empty_like(x0)
    for i in range(len(t)):  # one sample at a time
        a = alphas_cumprod[t[i]].item()
        out[i] = math.sqrt(a) * x0[i] + math.sqrt(1 - a) * noise[i]
    return out
"""),
    ("A4.cfg_combine", "cfg_combine", """
def cfg_combine(x0_cond, x0_uncond, guidance_scale):
    return torch.lerp(x0_uncond, x0_cond, guidance_scale)
"""),
    ("A4.cfg_denoise", "cfg_denoise", """
def cfg_combine(x0_cond, x0_uncond, guidance_scale):
    return (1 - guidance_scale) * x0_uncond + guidance_scale * x0_cond
def cfg_denoise(denoiser, x, sigma, class_labels, null_id, guidance_scale):
    labels_in = torch.cat([torch.full_like(class_labels, null_id), class_labels])
    x0_uncond, x0_cond = denoiser(torch.cat([x, x]), sigma.repeat(2), class_labels=labels_in).chunk(2)
    return cfg_combine(x0_cond, x0_uncond, guidance_scale)
"""),
]


@pytest.mark.parametrize("case", range(len(CORRECT)), ids=[c[0] for c in CORRECT])
def test_correct_alternatives_pass(case):
    task, name, source = CORRECT[case]
    result = run_task(task, student(source, name))
    assert result.passed, result.message
