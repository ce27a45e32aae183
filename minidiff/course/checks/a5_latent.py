"""Checks for assignment A5, the latent space: the reparameterization trick, the KL to the prior, the scaling factor.

References: minidiff.models.vae.DiagonalGaussian (``sample`` and ``kl``) and ``latent_std`` (whose inverse
``set_scaling_factor`` stores). The probe inputs make every listed mistake distinguishable: log-variances far from
0 and of both signs, non-zero means, batches of several samples, channels with different means and stds.
Wrong variants are written out on purpose, to name a mistake.
"""
from __future__ import annotations

import numbers

import torch

from minidiff.course.checks import Mismatch, StudentError, call, expect, task
from minidiff.course.checks.diagnose import probe_inputs
from minidiff.models.vae import DiagonalGaussian, latent_std
from minidiff.utils import randn

F64 = torch.float64
SD_SCALING_FACTOR = 0.18215  # Stable Diffusion's, for its own autoencoder (Rombach et al. 2022, Sec. 4.3.2)


def _posterior(g: torch.Generator, shape, logvar_range, dtype=torch.float32):
    """(mean, logvar): means around 0.5 with spread 1, log-variances uniform in ``logvar_range``."""
    lo, hi = logvar_range
    mean = 0.5 + torch.randn(shape, generator=g, dtype=F64)
    logvar = lo + (hi - lo) * torch.rand(shape, generator=g, dtype=F64)
    return mean.to(dtype), logvar.to(dtype)


def _posterior_cases(g: torch.Generator):
    yield "batch of 3 latents (4, 4, 4), logvar in [-4, 3]", _posterior(g, (3, 4, 4, 4), (-4.0, 3.0))
    yield "batch of 1, logvar in [-3, 2]", _posterior(g, (1, 4, 2, 2), (-3.0, 2.0))
    yield "float64 latents, logvar in [-3, 3]", _posterior(g, (2, 4, 3, 3), (-3.0, 3.0), F64)
    yield "vector latents (B, D) = (4, 8), logvar in [-2, 4]", _posterior(g, (4, 8), (-2.0, 4.0))


# ----------------------------------------------------------------------------- the reparameterization trick
def reference_reparameterize(mean, logvar, eps):
    """z = mean + std * eps with the library's std (the probe's reference, for a given eps)."""
    d = DiagonalGaussian(mean, logvar)
    return d.mean + d.std * eps


def _reparameterize_wrong(mean, logvar, eps):
    """The usual mistakes in z = mean + std * eps, as (message, thunk) pairs for ``expect``."""
    std = torch.exp(0.5 * logvar)
    return [
        ("uses exp(logvar), the variance, as the scale of eps; the scale is the standard deviation "
         "std = exp(0.5 * logvar)", lambda: mean + torch.exp(logvar) * eps),
        ("uses logvar itself as the standard deviation; logvar is log(std^2), so std = exp(0.5 * logvar)",
         lambda: mean + logvar * eps),
        ("uses 0.5 * logvar = log(std) without the exp; std = exp(0.5 * logvar)",
         lambda: mean + 0.5 * logvar * eps),
        ("forgot the mean: z = mean + std * eps, not std * eps", lambda: std * eps),
        ("uses exp(-0.5 * logvar) = 1 / std; the scale of eps is std = exp(0.5 * logvar)",
         lambda: mean + torch.exp(-0.5 * logvar) * eps),
        ("scales the mean by std as well: z = mean + std * eps, only eps is scaled",
         lambda: std * (mean + eps)),
        ("computes mean - std * eps: the same distribution, but with the eps you are given z is "
         "mean + std * eps (Kingma & Welling 2014, Eq. 10)", lambda: mean - std * eps),
    ]


@task("A5.reparameterize", func="reparameterize", points=2, references=("minidiff.models.vae.DiagonalGaussian",))
def check_reparameterize(student) -> str:
    n = 0
    for case, (mean, logvar) in _posterior_cases(torch.Generator().manual_seed(51)):
        n += 1
        seed = 500 + n
        eps = randn(mean.shape, generator=torch.Generator().manual_seed(seed), dtype=mean.dtype)  # what sample() draws
        want = DiagonalGaussian(mean, logvar).sample(generator=torch.Generator().manual_seed(seed))

        def probe(mean=mean, logvar=logvar, eps=eps, case=case):
            probe_inputs(student, (mean, logvar, eps), {}, {
                2: (randn(eps.shape, generator=torch.Generator().manual_seed(9), dtype=eps.dtype),
                    "z = mean + std * eps uses the eps you are given; do not draw your own"),
                1: (logvar + 1.0, "the spread of z around the mean is std = exp(0.5 * logvar)"),
                0: (mean + 1.0, "z is centred on the mean"),
            }, reference_reparameterize, call=call, case=case)
        got = call(student, mean, logvar, eps)
        expect(got, want, case=case, what="z", probe=probe, wrong=_reparameterize_wrong(mean, logvar, eps),
               dtype_hint="Keep the dtype of mean.")
    return f"matches minidiff.models.vae.DiagonalGaussian.sample on {n} cases (batch of 1, float64, (B, D) latents)"


# ----------------------------------------------------------------------------- KL to the prior
def _kl_cases(g: torch.Generator):
    yield "batch of 3 latents (4, 4, 4), logvar in [-4, 3]", _posterior(g, (3, 4, 4, 4), (-4.0, 3.0))
    yield "batch of 1, logvar in [-3, 2]", _posterior(g, (1, 4, 2, 2), (-3.0, 2.0))
    zeros = torch.zeros(2, 4, 2, 2)
    yield "posterior equal to the prior (mean 0, logvar 0): the KL is 0", (zeros, zeros.clone())
    yield "float64 latents, logvar in [-3, 3]", _posterior(g, (2, 4, 3, 3), (-3.0, 3.0), F64)
    yield "vector latents (B, D) = (4, 8), logvar in [-2, 4]", _posterior(g, (4, 8), (-2.0, 4.0))


def _kl_wrong(mean, logvar):
    """The usual mistakes in KL = 0.5 * sum(mean^2 + var - 1 - logvar), as (message, thunk) pairs for ``expect``."""
    var = torch.exp(logvar)
    terms = mean**2 + var - 1 - logvar

    def per_sample(t):
        return t.flatten(1).sum(dim=1)
    return [
        ("forgot the factor 0.5: KL = 0.5 * sum(mean^2 + var - 1 - logvar)", lambda: per_sample(terms)),
        ("averages over the latent elements; the KL of the whole latent is their sum (flatten(1).sum(1))",
         lambda: 0.5 * terms.flatten(1).mean(dim=1)),
        ("sums over the batch too: return one KL per sample, shape (B,); sum over every axis but the "
         "batch axis (flatten(1).sum(dim=1))", lambda: 0.5 * terms.sum()),
        ("averages everything into one number: return one KL per sample, shape (B,), summed over every "
         "axis but the batch axis", lambda: 0.5 * terms.mean()),
        ("averages the per-sample KLs over the batch: return one KL per sample, shape (B,)",
         lambda: 0.5 * per_sample(terms).mean()),
        ("has the wrong sign on the logvar term: KL = 0.5 * sum(mean^2 + var - 1 - logvar)",
         lambda: 0.5 * per_sample(mean**2 + var - 1 + logvar)),
        ("uses the std exp(0.5 * logvar) where the variance exp(logvar) is needed",
         lambda: 0.5 * per_sample(mean**2 + torch.exp(0.5 * logvar) - 1 - logvar)),
        ("forgot the -1: KL = 0.5 * sum(mean^2 + var - 1 - logvar), which is 0 when the posterior is "
         "the prior", lambda: 0.5 * per_sample(mean**2 + var - logvar)),
        ("forgot mean^2: a posterior far from 0 must cost KL", lambda: 0.5 * per_sample(var - 1 - logvar)),
        ("treats logvar as log(std): the variance is exp(logvar), not exp(2 * logvar)",
         lambda: 0.5 * per_sample(mean**2 + torch.exp(2 * logvar) - 1 - 2 * logvar)),
        ("returns -KL, the term of the ELBO (Kingma & Welling 2014, App. B); the KL itself is "
         "0.5 * sum(mean^2 + var - 1 - logvar) >= 0", lambda: -0.5 * per_sample(terms)),
        ("computes KL(N(0, I) || q), the reverse direction; the loss uses KL(q || N(0, I)) = "
         "0.5 * sum(mean^2 + var - 1 - logvar)",
         lambda: 0.5 * per_sample(torch.exp(-logvar) * (1 + mean**2) - 1 + logvar)),
        ("sums over the channel axis only; sum over every axis but the batch axis (flatten(1).sum(1))",
         lambda: 0.5 * terms.sum(dim=1)),
    ]


def _kl_shape_mistake(got, want: torch.Tensor, mean: torch.Tensor, case: str) -> Mismatch | None:
    """Name a KL of the wrong shape that no listed variant matched: one number, or no sum at all."""
    if not torch.is_tensor(got) or got.shape == want.shape:
        return None
    if got.numel() == 1:
        return Mismatch(f"returns one number for the whole batch; the KL is per sample, shape {tuple(want.shape)}: "
                        f"sum over every axis but the batch axis [case: {case}]")
    if got.shape == mean.shape:
        return Mismatch(f"returns the KL of every latent element, shape {tuple(got.shape)}; sum them over every "
                        f"axis but the batch axis, shape {tuple(want.shape)} [case: {case}]")
    return None


def _call_kl(student, mean, logvar, case: str):
    """The student's KL; an axis error on (B, D) latents (a sum over dims (1, 2, 3)) gets a hint."""
    try:
        return call(student, mean, logvar)
    except StudentError as e:
        if mean.ndim == 2 and "out of range" in str(e):
            raise StudentError(f"{e} Hint: here the latents are vectors (B, D); sum over every axis but the batch "
                               f"axis, however many there are: .flatten(1).sum(dim=1) [case: {case}]") from e
        raise


@task("A5.kl_diagonal_gaussian", func="kl_diagonal_gaussian", points=3,
      references=("minidiff.models.vae.DiagonalGaussian",))
def check_kl(student) -> str:
    n = 0
    for case, (mean, logvar) in _kl_cases(torch.Generator().manual_seed(52)):
        n += 1

        def probe(mean=mean, logvar=logvar, case=case):
            probe_inputs(student, (mean, logvar), {}, {
                0: (mean + 1.0, "the KL grows with mean^2: the posterior's distance from the prior's mean 0"),
                1: (logvar - 1.0, "the KL depends on the variance exp(logvar)"),
            }, lambda m, lv: DiagonalGaussian(m, lv).kl(), call=call, case=case)
        got = _call_kl(student, mean, logvar, case)
        want = DiagonalGaussian(mean, logvar).kl()
        try:
            expect(got, want, case=case, what="KL", rtol=1e-4, atol=1e-4, probe=probe,
                   wrong=_kl_wrong(mean, logvar), dtype_hint="Keep the dtype of mean.")
        except Mismatch as e:
            named = _kl_shape_mistake(got, want, mean, case) if str(e).startswith("KL has shape") else None
            if named is not None:
                raise named from e
            raise
    return (f"matches minidiff.models.vae.DiagonalGaussian.kl on {n} cases (the prior itself, batch of 1, float64, "
            f"(B, D) latents)")


# ----------------------------------------------------------------------------- the scaling factor
class _GivenLatents:
    """A stand-in autoencoder whose posterior sample is its input, so that ``latent_std`` measures given latents."""

    class _Point:
        def __init__(self, z):
            self.z = z

        def sample(self, *, generator=None):
            return self.z

    def encode(self, z):
        return self._Point(z)


def reference_scaling_factor(latents) -> float:
    """1 / latent_std: what set_scaling_factor stores, for latents already encoded."""
    return 1.0 / latent_std(_GivenLatents(), latents)


def _latents(g: torch.Generator, B: int, means, stds, hw: int, dtype=torch.float32) -> torch.Tensor:
    """(B, C, hw, hw) latents whose channel c has mean means[c] and std stds[c]."""
    m, s = (torch.tensor(v, dtype=F64).reshape(1, -1, 1, 1) for v in (means, stds))
    return (m + s * torch.randn((B, len(means), hw, hw), generator=g, dtype=F64)).to(dtype)


def _scaling_cases(g: torch.Generator):
    yield ("8 latents (4, 8, 8), channels with different means and stds",
           _latents(g, 8, [0.5, -1.0, 2.0, 0.0], [0.5, 1.0, 2.0, 4.0], 8))
    yield ("latents as large as Stable Diffusion's (std about 5.5: the factor is about 0.18)",
           _latents(g, 6, [1.0, -2.0, 0.5, 3.0], [5.0, 6.0, 5.5, 4.5], 8))
    yield "batch of 1, 3 channels, small latents (std about 0.2)", _latents(g, 1, [0.1, 0.0, -0.2], [0.2, 0.3, 0.1], 16)
    yield "float64 latents", _latents(g, 5, [0.0, 1.0, -1.0, 0.5], [1.5, 0.7, 1.0, 2.5], 8, F64)


def _one_number(got):
    """A student's answer as a float64 0-d tensor when it is one number (a float, a NumPy scalar such as
    np.std's float32, or a one-element floating tensor)."""
    if isinstance(got, numbers.Real) and not isinstance(got, bool):
        return torch.tensor(float(got), dtype=F64)
    if torch.is_tensor(got) and got.numel() == 1 and got.is_floating_point():
        return got.detach().double().reshape(())
    return None


def _not_one_number(got, z: torch.Tensor, case: str) -> Mismatch:
    """Name what a tensor answer with several values is: per channel or per sample, std or its inverse."""
    if not torch.is_tensor(got):
        return Mismatch(f"returns {type(got).__name__}; the scaling factor is one number, a Python float "
                        f"(float(...) or .item()) [case: {case}]")
    g = got.detach().double().flatten()
    zd = z.double()
    named = [(zd.std(dim=(0, 2, 3)), "returns one factor per channel"),
             (1 / zd.std(dim=(0, 2, 3)), "returns one factor per channel"),
             (zd.flatten(1).std(dim=1), "returns one value per sample"),
             (1 / zd.flatten(1).std(dim=1), "returns one value per sample")]
    for value, what in named:
        if g.shape == value.shape and torch.allclose(g, value, rtol=1e-3):
            shape = "(C,)" if "channel" in what else "(B,)"
            return Mismatch(f"{what} (shape {shape}, here {tuple(got.shape)}); the scaling factor is one number, "
                            f"1 / std over all elements of the latents (every sample, channel and position "
                            f"together), so that all channels are scaled alike [case: {case}]")
    return Mismatch(f"returns a tensor of shape {tuple(got.shape)}; the scaling factor is one number, 1 / std over "
                    f"all elements of the latents (a Python float: float(...) or .item()) [case: {case}]")


def _scaling_wrong(z: torch.Tensor):
    """The usual mistakes in s_z = 1 / std(z), as (message, thunk) pairs for ``expect``."""
    zd = z.double()
    return [
        ("returns the std of the latents; the scaling factor is its inverse, 1 / std (so that the scaled "
         "latents have std 1)", lambda: zd.std()),
        ("divides by the variance; the scaling factor is 1 / std, the square root of the variance",
         lambda: 1 / zd.var()),
        ("divides by the largest |z|: that fits the latents' range, not their spread; the scaling factor "
         "is 1 / std", lambda: 1 / zd.abs().max()),
        ("divides by the mean absolute value mean(|z|); the scaling factor is 1 / std",
         lambda: 1 / zd.abs().mean()),
        ("divides by sqrt(mean(z^2)), which does not subtract the latents' mean; the std does (torch.std)",
         lambda: 1 / zd.pow(2).mean().sqrt()),
        ("averages the per-channel stds; one std over all elements also counts the differences between the "
         "channels' means: take the std of the whole tensor", lambda: 1 / zd.std(dim=(0, 2, 3)).mean()),
        ("uses only the first sample of the batch; take the std over all the latents you are given",
         lambda: 1 / zd[0].std()),
        (f"returns Stable Diffusion's {SD_SCALING_FACTOR}: that number belongs to SD's autoencoder; compute "
         f"1 / std of the latents you are given", lambda: torch.tensor(SD_SCALING_FACTOR, dtype=F64)),
    ]


@task("A5.scaling_factor", func="scaling_factor", points=2,
      references=("minidiff.models.vae.latent_std", "minidiff.models.vae.set_scaling_factor"))
def check_scaling_factor(student) -> str:
    n = 0
    for case, z in _scaling_cases(torch.Generator().manual_seed(53)):
        n += 1
        got = call(student, z)
        number = _one_number(got)
        if number is None:
            raise _not_one_number(got, z, case)
        want = torch.tensor(reference_scaling_factor(z), dtype=F64)

        def probe(z=z, case=case):
            probe_inputs(student, (z,), {}, {0: (z * 3.0, "the factor is 1 / std of the latents you are given")},
                         reference_scaling_factor, call=call, case=case)
        # rtol 1e-3: the std with or without Bessel's correction (torch.std, np.std) are both right on these sizes
        expect(number, want, case=case, what="scaling factor", rtol=1e-3, atol=0.0, probe=probe,
               wrong=_scaling_wrong(z))
    return f"matches 1 / minidiff.models.vae.latent_std on {n} sets of latents (batch of 1, float64, std 0.2 to 5.5)"
