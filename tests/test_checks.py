"""minidiff.course.checks: correct implementations pass; realistic wrong ones fail with a message naming the mistake.

The implementations below are what a student would write (from the equations, not from the library), so a
check that wrongly rejects a correct answer, or accepts a wrong one, fails here.
"""
import math

import pytest
import torch

from minidiff.course import checks
from minidiff.schedules import vp_coefficients


# ----------------------------------------------------------------------------- correct student answers
def linear_alphas_cumprod(T, beta_start=1e-4, beta_end=0.02):
    return torch.cumprod(1 - torch.linspace(beta_start, beta_end, T, dtype=torch.float64), 0)


def cosine_alphas_cumprod(T, s=0.008, max_beta=0.999):
    f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
    return torch.cumprod(1 - (1 - f[1:] / f[:-1]).clamp(max=max_beta), 0)


def q_sample(x0, t, noise, alphas_cumprod):
    ab = alphas_cumprod[t].to(x0.dtype).reshape(-1, *[1] * (x0.ndim - 1))
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


def snr(alphas_cumprod):
    return alphas_cumprod / (1 - alphas_cumprod)


def ddpm_loss(net, x0, t, noise, alphas_cumprod):
    return ((net(q_sample(x0, t, noise, alphas_cumprod), t) - noise) ** 2).mean()


def ddpm_step(x_t, t, eps_hat, betas, noise):
    ab = torch.cumprod(1 - betas, 0)
    beta, ab_t = betas[t].item(), ab[t].item()
    ab_prev = ab[t - 1].item() if t > 0 else 1.0
    mean = (x_t - beta / math.sqrt(1 - ab_t) * eps_hat) / math.sqrt(1 - beta)
    return mean + math.sqrt((1 - ab_prev) / (1 - ab_t) * beta) * noise if t > 0 else mean


def _ab(sigma):
    return [c.item() for c in vp_coefficients(sigma)]


def ddim_step(denoiser, x, sigma, sigma_next, eta, noise):
    (a, b), (a_n, b_n) = _ab(sigma), _ab(sigma_next)
    x0 = denoiser(x, sigma * x.new_ones(x.shape[0]))
    eps = (x - a * x0) / b
    var = eta**2 * (b_n**2 / b**2) * (1 - a**2 / a_n**2)
    return a_n * x0 + math.sqrt(b_n**2 - var) * eps + math.sqrt(var) * noise


def euler_step(denoiser, x, sigma, sigma_next):
    (a, b), (a_n, b_n) = _ab(sigma), _ab(sigma_next)
    x0 = denoiser(x, sigma * x.new_ones(x.shape[0]))
    return a_n * x0 + b_n * (x - a * x0) / b  # = a_n (x_ve + (sigma_next - sigma) d)


def heun_step(denoiser, x, sigma, sigma_next):
    (a, b), (a_n, b_n) = _ab(sigma), _ab(sigma_next)
    x0 = denoiser(x, sigma * x.new_ones(x.shape[0]))
    d = (x - a * x0) / b
    x_next = a_n * x0 + b_n * d
    if sigma_next == 0 or math.isinf(sigma):
        return x_next
    d_next = (x_next - a_n * denoiser(x_next, sigma_next * x.new_ones(x.shape[0]))) / b_n
    return a_n * (x / a + (sigma_next - sigma) * (d + d_next) / 2)


def condition_dropout(labels, p, null_id, *, generator=None):
    drop = torch.rand(labels.shape, generator=generator) < p
    return torch.where(drop, torch.full_like(labels, null_id), labels)


def cfg_combine(x0_cond, x0_uncond, guidance_scale):
    return x0_uncond + guidance_scale * (x0_cond - x0_uncond)


def cfg_denoise(denoiser, x, sigma, class_labels, null_id, guidance_scale):
    out = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]),
                   class_labels=torch.cat([class_labels, torch.full_like(class_labels, null_id)]))
    x0_cond, x0_uncond = out.chunk(2)
    return cfg_combine(x0_cond, x0_uncond, guidance_scale)


def reparameterize(mean, logvar, eps):
    return mean + torch.exp(0.5 * logvar) * eps


def kl_diagonal_gaussian(mean, logvar):
    return 0.5 * (mean**2 + torch.exp(logvar) - 1 - logvar).flatten(1).sum(dim=1)


def scaling_factor(latents):
    return 1.0 / latents.std().item()


def cross_attention(x, context, context_mask, w_q, w_k, w_v):
    q, k, v = x @ w_q, context @ w_k, context @ w_v
    logits = (q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])).masked_fill(~context_mask[:, None, :], float("-inf"))
    attn = logits.softmax(dim=-1).nan_to_num(0.0)  # a prompt without a real token attends to nothing
    return attn @ v, attn


def caption_dropout(tokens, token_mask, p, empty_ids, empty_mask, *, generator=None):
    drop = (torch.rand((tokens.shape[0],), generator=generator) < p)[:, None]
    return torch.where(drop, empty_ids, tokens), torch.where(drop, empty_mask, token_mask)


def img2img_start(z0, sigmas, strength, noise):
    if not 0 <= strength <= 1:
        raise ValueError("strength must be in [0, 1]")
    n = len(sigmas) - 1
    start = n - min(int(n * strength), n)
    tail = sigmas[start:]
    if start == 0:
        return noise.clone(), tail
    s = float(tail[0])
    a, b = 1 / math.sqrt(1 + s**2), s / math.sqrt(1 + s**2)
    return a * z0 + b * noise, tail


def inpaint_denoise(denoiser, x, sigma, z0, mask, noise):
    s = sigma.reshape(-1, 1, 1, 1)
    a, b = 1 / torch.sqrt(1 + s**2), s / torch.sqrt(1 + s**2)
    x_in = mask * x + (1 - mask) * (a * z0 + b * noise)
    return mask * denoiser(x_in, sigma) + (1 - mask) * z0


CORRECT = {
    "A1.linear_alphas_cumprod": linear_alphas_cumprod, "A1.cosine_alphas_cumprod": cosine_alphas_cumprod,
    "A1.q_sample": q_sample, "A1.snr": snr, "A2.ddpm_loss": ddpm_loss, "A2.ddpm_step": ddpm_step,
    "A3.ddim_step": ddim_step, "A3.euler_step": euler_step, "A3.heun_step": heun_step,
    "A4.condition_dropout": condition_dropout, "A4.cfg_combine": cfg_combine, "A4.cfg_denoise": cfg_denoise,
    "A5.reparameterize": reparameterize, "A5.kl_diagonal_gaussian": kl_diagonal_gaussian,
    "A5.scaling_factor": scaling_factor, "A6.cross_attention": cross_attention, "A6.caption_dropout": caption_dropout,
    "A7.img2img_start": img2img_start, "A7.inpaint_denoise": inpaint_denoise,
}


def test_every_task_has_a_correct_answer_here():
    assert set(CORRECT) == set(checks.TASKS)


@pytest.mark.parametrize("name", sorted(CORRECT))
def test_correct_answer_passes(name, capsys):
    result = checks.check(name, CORRECT[name])
    assert result.passed, result.message
    assert result.points == result.max_points == checks.TASKS[name].points
    assert capsys.readouterr().out.startswith(f"PASS {name}")


# ----------------------------------------------------------------------------- wrong student answers
def _q(x0, t, noise, ab, f_x0, f_noise):
    a = ab[t].to(x0.dtype).reshape(-1, *[1] * (x0.ndim - 1))
    return f_x0(a) * x0 + f_noise(a) * noise


def _ddim(eta_used, shrink=True, sign=1.0):
    def step(denoiser, x, sigma, sigma_next, eta, noise):
        (a, b), (a_n, b_n) = _ab(sigma), _ab(sigma_next)
        x0 = denoiser(x, sigma * x.new_ones(x.shape[0]))
        var = eta_used(eta) ** 2 * (b_n**2 / b**2) * (1 - a**2 / a_n**2)
        direction = math.sqrt(b_n**2 - var) if shrink else b_n
        return a_n * x0 + sign * direction * (x - a * x0) / b + math.sqrt(var) * noise
    return step


def _ddpm(std):
    def step(x_t, t, eps_hat, betas, noise):
        ab = torch.cumprod(1 - betas, 0)
        beta, ab_t = betas[t].item(), ab[t].item()
        beta_tilde = (1 - (ab[t - 1].item() if t > 0 else 1.0)) / (1 - ab_t) * beta
        mean = (x_t - beta / math.sqrt(1 - ab_t) * eps_hat) / math.sqrt(1 - beta)
        return mean + std(beta, beta_tilde) * noise if t > 0 else mean
    return step


def _heun(correct_last=False, weights=(0.5, 0.5)):
    def step(denoiser, x, sigma, sigma_next):
        (a, b), (a_n, b_n) = _ab(sigma), _ab(sigma_next)
        x0 = denoiser(x, sigma * x.new_ones(x.shape[0]))
        d = (x - a * x0) / b
        x_next = a_n * x0 + b_n * d
        if not correct_last and (sigma_next == 0 or math.isinf(sigma)):
            return x_next
        d_next = (x_next - a_n * denoiser(x_next, sigma_next * x.new_ones(x.shape[0]))) / b_n
        return a_n * (x / a + (sigma_next - sigma) * (weights[0] * d + weights[1] * d_next))
    return step


def _dropout(where_drop, fill=None):
    def dropout(labels, p, null_id, *, generator=None):
        r = torch.rand(labels.shape, generator=generator)
        return torch.where(where_drop(r, p), torch.full_like(labels, null_id if fill is None else fill), labels)
    return dropout


def _cross(scale=lambda d: 1 / math.sqrt(d), keep=lambda mask: mask[:, None, :], dim=-1):
    def attention(x, context, context_mask, w_q, w_k, w_v):
        q, k, v = x @ w_q, context @ w_k, context @ w_v
        logits = (q @ k.transpose(1, 2) * scale(q.shape[-1])).masked_fill(~keep(context_mask), float("-inf"))
        attn = logits.softmax(dim).nan_to_num(0.0)
        return attn @ v, attn
    return attention


def _img2img(start=lambda n, s: n - min(int(n * s), n), noised=lambda z0, noise, a, b, s: a * z0 + b * noise,
             whole_at_1=True):
    def start_level(z0, sigmas, strength, noise):
        if not 0 <= strength <= 1:
            raise ValueError("strength must be in [0, 1]")
        n = len(sigmas) - 1
        i = start(n, strength)
        tail = sigmas[i:]
        if i == 0 and whole_at_1:
            return noise.clone(), tail
        s = float(tail[0])
        a, b = _ab(s)
        return noised(z0, noise, a, b, s), tail
    return start_level


def _inpaint(fed=lambda x, z0, m, known: m * x + (1 - m) * known, out=lambda x0_hat, z0, m: m * x0_hat + (1 - m) * z0,
             level=lambda sigma: sigma.reshape(-1, 1, 1, 1)):
    def step(denoiser, x, sigma, z0, mask, noise):
        s = level(sigma)
        a, b = 1 / torch.sqrt(1 + s**2), s / torch.sqrt(1 + s**2)
        return out(denoiser(fed(x, z0, mask, a * z0 + b * noise), sigma), z0, mask)
    return step


def _inplace_dropout(labels, p, null_id, *, generator=None):
    labels[torch.rand(labels.shape, generator=generator) < p] = null_id
    return labels


WRONG = [
    # A1
    ("A1.linear_alphas_cumprod", lambda T, beta_start=1e-4, beta_end=0.02: 1 - torch.linspace(beta_start, beta_end, T, dtype=torch.float64), "cumulative product"),
    ("A1.linear_alphas_cumprod", lambda T, beta_start=1e-4, beta_end=0.02: torch.cumprod(1 - torch.linspace(beta_start, beta_end, T), 0), "float64"),
    ("A1.linear_alphas_cumprod", lambda T, beta_start=1e-4, beta_end=0.02: torch.cat([torch.ones(1, dtype=torch.float64), linear_alphas_cumprod(T, beta_start, beta_end)[:-1]]), "off by one"),
    ("A1.cosine_alphas_cumprod", lambda T, s=0.008, max_beta=0.999: (lambda f: f[1:] / f[0])(torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2), "max_beta"),
    ("A1.cosine_alphas_cumprod", lambda T, s=0.008, max_beta=0.999: (lambda f: f[:-1] / f[0])(torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2), "off by one"),
    ("A1.cosine_alphas_cumprod", lambda T, s=0.008, max_beta=0.999: cosine_alphas_cumprod(T, 0.0, max_beta), "offset s"),
    ("A1.q_sample", lambda x0, t, n, ab: _q(x0, t, n, ab, lambda a: a, lambda a: 1 - a), "where sqrt(alphas_cumprod[t]) is needed"),
    ("A1.q_sample", lambda x0, t, n, ab: _q(x0, t, n, ab, lambda a: a.sqrt(), lambda a: 1 - a), "sqrt(1 - alphas_cumprod[t])"),
    ("A1.q_sample", lambda x0, t, n, ab: q_sample(x0, (t - 1) % len(ab), n, ab), "off by one"),
    ("A1.q_sample", lambda x0, t, n, ab: _q(x0, t, n, ab, lambda a: (1 - a).sqrt(), lambda a: a.sqrt()), "swaps"),
    ("A1.q_sample", lambda x0, t, n, ab: ab[t].sqrt() * x0 + (1 - ab[t]).sqrt() * n, "(B, 1, 1, 1)"),
    ("A1.q_sample", lambda x0, t, n, ab: ab[t].sqrt().reshape(-1, 1, 1, 1) * x0 + (1 - ab[t]).sqrt().reshape(-1, 1, 1, 1) * n, "dtype"),
    ("A1.snr", lambda ab: (1 - ab) / ab, "inverse"),
    ("A1.snr", lambda ab: (ab / (1 - ab)).sqrt(), "square root"),
    ("A1.snr", lambda ab: ab.log() - (1 - ab).log(), "log SNR"),
    # A2
    ("A2.ddpm_loss", lambda net, x0, t, n, ab: ((net(q_sample(x0, t, n, ab), t) - x0) ** 2).mean(), "target is the noise"),
    ("A2.ddpm_loss", lambda net, x0, t, n, ab: ((net(x0, t) - n) ** 2).mean(), "noisy x_t"),
    ("A2.ddpm_loss", lambda net, x0, t, n, ab: ((net(q_sample(x0, t, n, ab), t + 1) - n) ** 2).mean(), "t + 1"),
    ("A2.ddpm_loss", lambda net, x0, t, n, ab: ((net(_q(x0, t, n, ab, lambda a: a, lambda a: 1 - a), t) - n) ** 2).mean(), "need a sqrt"),
    ("A2.ddpm_loss", lambda net, x0, t, n, ab: ((net(q_sample(x0, t, n, ab), t) - n) ** 2).mean().item(), "Python float"),
    ("A2.ddpm_loss", lambda net, x0, t, n, ab: ((net(q_sample(x0, t, n, ab), t) - n) ** 2).mean().detach(), "without a gradient"),
    ("A2.ddpm_loss", lambda net, x0, t, n, ab: ((net(q_sample(x0, t, n, ab), t) - n) ** 2).sum(), "sums"),
    ("A2.ddpm_step", lambda x, t, e, betas, z: ddpm_step(x, t, e, betas, z) + (math.sqrt(betas[0].item()) * z if t == 0 else 0), "noise at the last step"),
    ("A2.ddpm_step", _ddpm(std=lambda beta, beta_tilde: math.sqrt(beta)), "fixed_large"),
    ("A2.ddpm_step", lambda x, t, e, betas, z: ddpm_step(x, t, -e, betas, z), "subtracts"),
    ("A2.ddpm_step", lambda x, t, e, betas, z: ddpm_step(x, max(t - 1, 0), e, betas, z), "off by one"),
    ("A2.ddpm_step", _ddpm(std=lambda beta, beta_tilde: beta_tilde), "sqrt(beta_tilde_t)"),
    # A3
    ("A3.ddim_step", _ddim(lambda eta: 0.0), "ignores eta"),
    ("A3.ddim_step", _ddim(lambda eta: eta, shrink=False), "shrink"),
    ("A3.ddim_step", _ddim(lambda eta: eta, sign=-1.0), "wrong sign"),
    ("A3.ddim_step", _ddim(lambda eta: math.sqrt(eta)), "eta instead of eta^2"),
    ("A3.euler_step", lambda den, x, s, s_n: x + (s_n - s) * (x - den(x, s * x.new_ones(len(x)))) / s, "VE state"),
    ("A3.euler_step", lambda den, x, s, s_n: (lambda a, x0: x / a + (s_n - s) * (x / a - x0) / s)(_ab(s)[0], den(x, s * x.new_ones(len(x)))), "multiply by sqrt(alpha_bar_next)"),
    ("A3.euler_step", lambda den, x, s, s_n: (lambda a, x0: _ab(s_n)[0] * (x / a - (s_n - s) * (x / a - x0) / s))(_ab(s)[0], den(x, s * x.new_ones(len(x)))), "wrong direction"),
    ("A3.heun_step", lambda den, x, s, s_n: euler_step(den, x, s, s_n), "plain Euler step"),
    ("A3.heun_step", _heun(weights=(0.0, 1.0)), "only the slope d_next"),
    ("A3.heun_step", _heun(weights=(1.0, 1.0)), "without halving"),
    ("A3.heun_step", _heun(correct_last=True), "plain Euler step there"),
    # A4
    ("A4.condition_dropout", _dropout(lambda r, p: r >= p), "probability 1 - p"),
    ("A4.condition_dropout", _dropout(lambda r, p: r < p, fill=0), "null_id"),
    ("A4.condition_dropout", _inplace_dropout, "in place"),
    ("A4.condition_dropout", lambda labels, p, null_id, *, generator=None: condition_dropout(labels, p, null_id), "ignores the generator"),
    ("A4.cfg_combine", lambda c, u, w: c + w * (u - c), "inverted"),
    ("A4.cfg_combine", lambda c, u, w: c + w * (c - u), "guidance_scale = 1 means no guidance"),
    ("A4.cfg_combine", lambda c, u, w: w * (c - u), "forgot to add the unconditional"),
    ("A4.cfg_denoise", lambda den, x, s, y, null, w: cfg_combine(den(x, s, class_labels=y), den(x, s, class_labels=torch.full_like(y, null)), w), "one forward pass"),
    ("A4.cfg_denoise", lambda den, x, s, y, null, w: cfg_combine(*reversed(den(torch.cat([x, x]), torch.cat([s, s]), class_labels=torch.cat([y, torch.full_like(y, null)])).chunk(2)), w), "inverted"),
    ("A4.cfg_denoise", lambda den, x, s, y, null, w: cfg_combine(*den(torch.cat([x, x]), torch.cat([s, s]), class_labels=torch.cat([y, y])).chunk(2), w), "unconditional half needs null_id"),
    ("A4.cfg_denoise", lambda den, x, s, y, null, w: cfg_combine(*den(torch.cat([x, x]), s, class_labels=torch.cat([y, torch.full_like(y, null)])).chunk(2), w), "raised ValueError"),
    # A5
    ("A5.reparameterize", lambda mean, logvar, eps: mean + torch.exp(logvar) * eps, "the variance, as the scale of eps"),
    ("A5.reparameterize", lambda mean, logvar, eps: torch.exp(0.5 * logvar) * eps, "forgot the mean"),
    ("A5.reparameterize", lambda mean, logvar, eps: mean + torch.exp(0.5 * logvar) * torch.randn_like(mean), "draws its own random numbers"),
    ("A5.kl_diagonal_gaussian", lambda mean, logvar: kl_diagonal_gaussian(mean, logvar) * 2, "forgot the factor 0.5"),
    ("A5.kl_diagonal_gaussian", lambda mean, logvar: kl_diagonal_gaussian(mean, logvar).sum(), "sums over the batch too"),
    ("A5.kl_diagonal_gaussian", lambda mean, logvar: 0.5 * (mean**2 + torch.exp(logvar) - logvar).flatten(1).sum(1), "forgot the -1"),
    ("A5.scaling_factor", lambda latents: latents.std().item(), "returns the std of the latents"),
    ("A5.scaling_factor", lambda latents: 1 / latents.std(dim=(0, 2, 3)), "returns one factor per channel"),
    ("A5.scaling_factor", lambda latents: 1 / latents.var().item(), "divides by the variance"),
    # A6
    ("A6.cross_attention", _cross(scale=lambda d: 1.0), "does not scale the logits"),
    ("A6.cross_attention", _cross(keep=lambda mask: ~mask[:, None, :]), "inverts the mask"),
    ("A6.cross_attention", _cross(dim=1), "softmax over the image tokens"),
    ("A6.cross_attention", _cross(keep=lambda mask: torch.ones_like(mask)[:, None, :]), "ignores context_mask"),
    ("A6.caption_dropout", lambda ids, mask, p, e_ids, e_mask, *, generator=None: caption_dropout(ids, mask, p, e_ids, e_mask), "ignores the generator"),
    ("A6.caption_dropout", lambda ids, mask, p, e_ids, e_mask, *, generator=None: caption_dropout(ids, mask, p, torch.zeros_like(e_ids), torch.zeros_like(e_mask), generator=generator), "padding only"),
    ("A6.caption_dropout", lambda ids, mask, p, e_ids, e_mask, *, generator=None: (caption_dropout(ids, mask, p, e_ids, e_mask, generator=generator)[0], mask.clone()), "keeps its mask"),
    ("A6.caption_dropout", lambda ids, mask, p, e_ids, e_mask, *, generator=None: caption_dropout(ids, mask, 1 - p, e_ids, e_mask, generator=generator), "probability 1 - p"),
    # A7
    ("A7.img2img_start", _img2img(start=lambda n, s: min(int(n * s), n)), "that many steps are *skipped*"),
    ("A7.img2img_start", _img2img(start=lambda n, s: n - round(n * s)), "rounds N * strength"),
    ("A7.img2img_start", _img2img(noised=lambda z0, noise, a, b, s: z0 + s * noise), "VE state z0 + sigma * noise"),
    ("A7.img2img_start", _img2img(whole_at_1=False), "strength 1 ignores the input"),
    ("A7.inpaint_denoise", _inpaint(fed=lambda x, z0, m, known: (1 - m) * x + m * known, out=lambda x0_hat, z0, m: (1 - m) * x0_hat + m * z0), "inverts the mask"),
    ("A7.inpaint_denoise", _inpaint(out=lambda x0_hat, z0, m: x0_hat), "does not put z0 back in the output"),
    ("A7.inpaint_denoise", _inpaint(fed=lambda x, z0, m, known: m * x + (1 - m) * z0), "feeds the clean z0"),
    ("A7.inpaint_denoise", _inpaint(level=lambda sigma: sigma[0]), "uses sigma[0] for every sample"),
]


@pytest.mark.parametrize("name, fn, phrase", WRONG, ids=[f"{n}-{p}" for n, _, p in WRONG])
def test_wrong_answer_fails_naming_the_mistake(name, fn, phrase):
    result = checks.run_task(name, fn)
    assert not result.passed and result.points == 0, result.message
    assert phrase in result.message, result.message


def test_every_task_has_three_wrong_answers():
    counts = {name: sum(n == name for n, _, _ in WRONG) for name in checks.TASKS}
    assert min(counts.values()) >= 3, counts


def test_a6_reference_is_the_library_cross_attention():
    """The A6 check's reference is AttentionBlock's cross-attention with one head and no LayerNorm, projection or
    biases (so d = C), a prompt of padding only included (output 0: "all masked" is "no context")."""
    from torch import nn

    from minidiff.course.checks.a6_attention import reference_cross_attention
    from minidiff.models.attention import AttentionBlock
    g = torch.Generator().manual_seed(0)
    B, N, L, C, D = 3, 6, 5, 8, 7
    x, context = torch.randn(B, N, C, generator=g), torch.randn(B, L, D, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    w_q, w_k, w_v = (torch.randn(shape, generator=g) for shape in ((C, C), (D, C), (D, C)))
    block = AttentionBlock(C, num_heads=1, num_groups=1, context_dim=D)
    block.norm_cross, block.proj_cross = nn.Identity(), nn.Identity()
    with torch.no_grad():
        block.q_cross.weight.copy_(w_q.T)
        block.kv_cross.weight.copy_(torch.cat([w_k, w_v], dim=1).T)
        block.q_cross.bias.zero_()
        block.kv_cross.bias.zero_()
        out = block._cross(x, context, mask)
    want_out, want_attn = reference_cross_attention(x, context, mask, w_q, w_k, w_v)
    assert torch.allclose(out, want_out, atol=1e-5)
    assert torch.allclose(want_attn[:2].sum(-1), torch.ones(2, N)) and not want_attn[2].any()
    assert not want_attn[:2].masked_select(~mask[:2, None, :].expand(2, N, L)).any()  # padded keys: exactly 0


# ----------------------------------------------------------------------------- robustness
def test_not_attempted_and_student_exceptions_are_reported(capsys):
    def stub(ab):
        raise NotImplementedError()

    def crashes(ab):
        return ab / undefined_name  # noqa: F821

    assert checks.check("A1.snr", stub).status == "not attempted"
    assert "NOT ATTEMPTED A1.snr (0/1)" in capsys.readouterr().out
    namespace = {}  # the grader's re-check compiles definitions; without their source a bare stub is still one
    exec(compile("def snr(ab):\n    raise NotImplementedError()\n", "<no source>", "exec"), namespace)  # noqa: S102
    assert checks.run_task("A1.snr", namespace["snr"]).status == "not attempted"
    exec(compile("def snr(ab):\n    raise NotImplementedError('a message: not the stub')\n", "<no source>", "exec"),
         namespace)  # noqa: S102
    assert checks.run_task("A1.snr", namespace["snr"]).status == "error"
    result = checks.run_task("A1.snr", crashes)
    assert result.status == "error" and "NameError" in result.message
    assert f"(line {crashes.__code__.co_firstlineno + 1}: `return ab / undefined_name" in result.message  # the student's own line


def test_calling_the_library_reference_is_not_accepted():
    from minidiff import forward

    def q_sample_wrapper(x0, t, noise, alphas_cumprod):
        return forward.q_sample(x0, t, noise, alphas_cumprod)
    for fn in (forward.q_sample, q_sample_wrapper):
        result = checks.run_task("A1.q_sample", fn)
        assert not result.passed and "minidiff.forward.q_sample" in result.message


def test_a_slow_function_is_stopped_by_the_time_limit():
    def loops(ab):
        while True:
            pass
    result = checks.run_task("A1.snr", loops, time_limit=0.5)
    assert result.status == "error" and "did not finish" in result.message


def test_results_are_logged_for_the_grader(tmp_path, monkeypatch):
    log = tmp_path / "log.jsonl"
    monkeypatch.setenv(checks.LOG_ENV, str(log))
    checks.check("A1.snr", snr, quiet=True)
    checks.regrade({"snr": lambda ab: 1 / ab}, ["A1.snr", "A1.q_sample"], log_path=str(log), nonce="n1")
    import json
    lines = [json.loads(s) for s in log.read_text().splitlines()]
    assert [(d["source"], d["task"], d["passed"]) for d in lines] == [
        ("notebook", "A1.snr", True), ("grader", "A1.snr", False), ("grader", "A1.q_sample", False)]
    assert lines[2]["status"] == "missing" and "check cell missing or not executed" in lines[2]["message"]
    assert lines[1]["nonce"] == "n1"
