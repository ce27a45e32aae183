"""Checks for assignment A1, the forward process: linear and cosine alphas_cumprod, q_sample, SNR.

The references are minidiff.schedules and minidiff.forward. The ``wrong=`` lists hold the mistakes students
make (each written out on purpose, so a message can name it); they are never used as the reference.
"""
from __future__ import annotations

import math

import torch

from minidiff import forward, schedules
from minidiff.course.checks import call, expect, task
from minidiff.course.checks.diagnose import probe_inputs

F64 = torch.float64
DTYPE_TABLE = "Schedule tables are float64: create them with dtype=torch.float64."


def _ab(betas: torch.Tensor) -> torch.Tensor:
    return schedules.alphas_cumprod_from_betas(betas)


def _shift(ab: torch.Tensor) -> torch.Tensor:
    """alpha_bar one step late: [1, ab_0, ..., ab_{T-2}]."""
    return torch.cat([ab.new_ones(1), ab[:-1]])


# ----------------------------------------------------------------------------- linear schedule
@task("A1.linear_alphas_cumprod", func="linear_alphas_cumprod", points=1,
      references=("minidiff.schedules.linear_betas", "minidiff.schedules.alphas_cumprod_from_betas"))
def check_linear(student) -> str:
    cases = [("T = 1000, default betas", (1000,), {}),
             ("T = 10, beta_start = 0.001, beta_end = 0.2", (10, 0.001, 0.2), {}),
             ("T = 2", (2,), {"beta_start": 0.01, "beta_end": 0.3})]
    for case, args, kw in cases:
        got = call(student, *args, **kw)
        betas = schedules.linear_betas(*args, **kw)
        T = len(betas)

        def probe(args=args, kw=kw, case=case):
            if len(args) == 3:
                probe_inputs(student, args, kw, {2: (0.3, "the betas run from beta_start to beta_end"),
                                                 1: (0.002, "the betas run from beta_start to beta_end")},
                             lambda *a, **k: _ab(schedules.linear_betas(*a, **k)), call=call, case=case)
        b0, b1 = (args[1], args[2]) if len(args) == 3 else (kw.get("beta_start", 1e-4), kw.get("beta_end", 0.02))
        expect(got, _ab(betas), case=case, what="alphas_cumprod", dtype_hint=DTYPE_TABLE, probe=probe, wrong=[
            ("returns the betas; alphas_cumprod is the product of alphas = 1 - betas", betas),
            ("uses 1 - 2 beta_t: alpha_t = 1 - beta_t", lambda: torch.cumprod(1 - 2 * betas, 0)),
            ("takes T + 1 points and drops the first: use torch.linspace(beta_start, beta_end, T)",
             lambda: _ab(torch.linspace(b0, b1, T + 1, dtype=F64)[1:])),
            ("forgot the cumulative product: alpha_bar_t = prod_{s<=t} (1 - beta_s) (torch.cumprod)", 1 - betas),
            ("multiplies the betas; the product is over the alphas, 1 - beta", lambda: torch.cumprod(betas, 0)),
            ("is off by one: alpha_bar_0 must already include beta_0 (alpha_bar_0 = 1 - beta_0, not 1)",
             lambda: _shift(_ab(betas))),
            ("returns sqrt(alpha_bar); the schedule table is alpha_bar itself", lambda: _ab(betas).sqrt()),
            ("does not end at beta_end: use torch.linspace(beta_start, beta_end, T), T points including both ends",
             lambda: _ab(torch.linspace(b0, b1, T + 1, dtype=F64)[:-1])),
        ])
    return f"matches minidiff.schedules.linear_betas + alphas_cumprod_from_betas on {len(cases)} cases"


# ----------------------------------------------------------------------------- cosine schedule
def _f(T: int, s: float, square: bool = True) -> torch.Tensor:
    """f(t) = cos^2(((t/T + s)/(1 + s)) pi/2) for t = 0..T (Nichol & Dhariwal 2021, Eq. 17), for wrong variants."""
    c = torch.cos((torch.arange(T + 1, dtype=F64) / T + s) / (1 + s) * math.pi / 2)
    return c**2 if square else c.abs()


@task("A1.cosine_alphas_cumprod", func="cosine_alphas_cumprod", points=2,
      references=("minidiff.schedules.cosine_betas",))
def check_cosine(student) -> str:
    cases = [("T = 1000, s = 0.008, max_beta = 0.999", (1000,), {}),
             ("T = 10 (the cap on beta matters at the end)", (10,), {}),
             ("T = 50, s = 0.1, max_beta = 0.5", (50,), {"s": 0.1, "max_beta": 0.5})]
    for case, args, kw in cases:
        got = call(student, *args, **kw)
        T, s, max_beta = args[0], kw.get("s", 0.008), kw.get("max_beta", 0.999)
        betas = schedules.cosine_betas(T, s=s, max_beta=max_beta)
        f = _f(T, s)
        expect(got, _ab(betas), case=case, what="alphas_cumprod", dtype_hint=DTYPE_TABLE, wrong=[
            ("does not cap beta_t at max_beta: alpha_bar at the last step collapses to ~0; clip the betas "
             "1 - alpha_bar(t+1)/alpha_bar(t) at max_beta, then take the cumulative product", f[1:] / f[0]),
            ("is off by one: alphas_cumprod[0] is 1; index t holds alpha_bar after t + 1 steps, f(t+1)/f(0)",
             lambda: _ab(torch.cat([torch.zeros(1, dtype=F64), 1 - f[1:-1] / f[:-2]]).clamp(max=max_beta))),
            ("is off by one: alphas_cumprod[0] is 1; index t holds alpha_bar after t + 1 steps, f(t+1)/f(0)",
             f[:-1] / f[0]),
            ("forgot to square the cosine: f(t) = cos^2(...)",
             lambda: _ab((1 - _f(T, s, False)[1:] / _f(T, s, False)[:-1]).clamp(max=max_beta))),
            ("forgot to divide by f(0): alpha_bar(t) = f(t) / f(0), so that alpha_bar(0) = 1",
             lambda: _ab((1 - f[1:] / f[:-1]).clamp(max=max_beta)) * f[0]),
            ("takes the cumulative product of the betas; it is the product of the alphas, 1 - beta",
             lambda: torch.cumprod(betas, 0)),
            ("returns sqrt(alpha_bar); the schedule table is alpha_bar itself", lambda: _ab(betas).sqrt()),
            ("clamps beta from below (clamp(min=...)); cap it from above at max_beta: clamp(max=max_beta)",
             lambda: _ab((1 - f[1:] / f[:-1]).clamp(min=max_beta))),
            ("uses pi instead of pi / 2 inside the cosine: f(t) = cos^2(((t/T + s) / (1 + s)) pi / 2)",
             lambda: _ab((1 - (torch.cos((torch.arange(T + 1, dtype=F64) / T + s) / (1 + s) * math.pi) ** 2)[1:]
                          / (torch.cos((torch.arange(T + 1, dtype=F64) / T + s) / (1 + s) * math.pi) ** 2)[:-1])
                         .clamp(max=max_beta))),
            ("ignores the offset s: use (t/T + s) / (1 + s)",
             lambda: _ab(schedules.cosine_betas(T, s=0.0, max_beta=max_beta))),
            ("returns the betas, not alpha_bar", betas),
        ])
    return f"matches minidiff.schedules.cosine_betas + alphas_cumprod_from_betas on {len(cases)} cases"


# ----------------------------------------------------------------------------- q_sample
def _q_sample_cases(g: torch.Generator):
    ab = _ab(schedules.linear_betas(1000))
    ab_zero = _ab(schedules.rescale_zero_terminal_snr(schedules.linear_betas(1000)))
    T = len(ab)

    def batch(shape, t, table=ab, dtype=torch.float32):
        x0 = torch.randn(shape, generator=g, dtype=dtype).clamp(-1, 1)
        return x0, torch.as_tensor(t, dtype=torch.int64), torch.randn(shape, generator=g, dtype=dtype), table
    yield "random batch, t in [0, T)", batch((4, 1, 8, 8), [3, 250, 600, 999])
    yield "t = 0", batch((3, 2, 5, 5), [0, 0, 0])
    yield "t = T-1", batch((3, 2, 5, 5), [T - 1] * 3)
    yield "batch of 1", batch((1, 3, 4, 4), [123])
    yield "float64 x0", batch((2, 1, 6, 6), [10, 900], dtype=F64)
    yield "zero terminal SNR schedule at t = T-1 (x_t must be pure noise)", batch((2, 1, 6, 6), [T - 1, 500], ab_zero)


@task("A1.q_sample", func="q_sample", points=2, references=("minidiff.forward.q_sample",))
def check_q_sample(student) -> str:
    n = 0
    for case, (x0, t, noise, ab) in _q_sample_cases(torch.Generator().manual_seed(1)):
        n += 1
        def probe(x0=x0, t=t, noise=noise, ab=ab, case=case):  # the given noise and t must drive the answer
            probe_inputs(student, (x0, t, noise, ab), {}, {
                2: (torch.randn(noise.shape, generator=torch.Generator().manual_seed(5)),
                    "use the noise you are given; do not draw your own with torch.randn"),
                1: ((t + 100) % len(ab), "x_t depends on the timestep t through alphas_cumprod[t]"),
            }, forward.q_sample, call=call, case=case)
        got = call(student, x0, t, noise, ab,
                   hint="alphas_cumprod[t] has shape (B,): reshape it to (B, 1, 1, 1) to broadcast against x0, "
                        "e.g. with minidiff.append_dims(a, x0.ndim)")
        want = forward.q_sample(x0, t, noise, ab)

        def mix(c_x0, c_noise):
            shape = (-1,) + (1,) * (x0.ndim - 1)
            return c_x0.reshape(shape).to(x0) * x0 + c_noise.reshape(shape).to(x0) * noise
        a = ab[t]
        expect(got, want, case=case, what="x_t", probe=probe, wrong=[
            ("uses alphas_cumprod[t] where sqrt(alphas_cumprod[t]) is needed, and 1 - alphas_cumprod[t] where "
             "its sqrt is needed: compare the noise scale at t = 0", lambda: mix(a, 1 - a)),
            ("scales the noise by 1 - alphas_cumprod[t]; it must be sqrt(1 - alphas_cumprod[t]) (a standard "
             "deviation, not a variance)", lambda: mix(a.sqrt(), 1 - a)),
            ("scales x0 by alphas_cumprod[t]; it must be sqrt(alphas_cumprod[t])", lambda: mix(a, (1 - a).sqrt())),
            ("swaps the two coefficients: x0 gets sqrt(alpha_bar_t), the noise sqrt(1 - alpha_bar_t)",
             lambda: mix((1 - a).sqrt(), a.sqrt())),
            ("subtracts the noise; x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps", lambda: mix(a.sqrt(), -(1 - a).sqrt())),
            ("scales the noise by 1 - sqrt(alpha_bar_t); it is sqrt(1 - alpha_bar_t)", lambda: mix(a.sqrt(), 1 - a.sqrt())),
            ("treats alphas_cumprod as the per-step alphas and multiplies them again; the table already holds "
             "alpha_bar_t: index it with t", lambda: mix(torch.cumprod(ab, 0)[t].sqrt(), (1 - torch.cumprod(ab, 0)[t]).sqrt())),
            ("is off by one: it uses alphas_cumprod[t - 1]; t indexes the table directly",
             lambda: forward.q_sample(x0, (t - 1) % len(ab), noise, ab)),
            ("is off by one: it uses alphas_cumprod[t + 1]; t indexes the table directly",
             lambda: forward.q_sample(x0, t + 1, noise, ab)),
        ], dtype_hint="alphas_cumprod is float64: cast the coefficients to x0's dtype (.to(x0.dtype)) so x_t "
                      "keeps the dtype of x0.")
    return f"matches minidiff.forward.q_sample on {n} cases (t = 0, t = T-1, batch of 1, float64, zero terminal SNR)"


# ----------------------------------------------------------------------------- SNR
@task("A1.snr", func="snr", points=1, references=("minidiff.schedules.snr", "minidiff.schedules.log_snr"))
def check_snr(student) -> str:
    cases = [("linear schedule, T = 1000", _ab(schedules.linear_betas(1000))),
             ("cosine schedule, T = 100", _ab(schedules.cosine_betas(100))),
             ("zero terminal SNR (last alpha_bar = 0, so the last SNR is 0)",
              _ab(schedules.rescale_zero_terminal_snr(schedules.linear_betas(50))))]
    for case, ab in cases:
        got = call(student, ab.clone())
        want = schedules.snr(ab)
        expect(got, want, case=case, what="SNR", rtol=1e-6, atol=1e-8, dtype_hint="Keep the float64 of the table.",
               wrong=[
                   ("computes the inverse, (1 - alpha_bar) / alpha_bar = sigma^2; SNR = alpha_bar / (1 - alpha_bar)",
                    lambda: (1 - ab) / ab),
                   ("takes a square root: sqrt(alpha_bar / (1 - alpha_bar)) = 1/sigma is a ratio of standard "
                    "deviations; SNR is a ratio of variances", lambda: (ab / (1 - ab)).sqrt()),
                   ("squares the ratio: SNR = alpha_bar / (1 - alpha_bar) is already a ratio of variances",
                    lambda: (ab / (1 - ab)) ** 2),
                   ("computes sigma = sqrt((1 - alpha_bar) / alpha_bar), the noise level; SNR = 1 / sigma^2",
                    lambda: ((1 - ab) / ab).sqrt()),
                   ("uses sqrt(alpha_bar) in the numerator; SNR = alpha_bar / (1 - alpha_bar)",
                    lambda: ab.sqrt() / (1 - ab)),
                   ("returns log SNR; the task asks for SNR itself", lambda: schedules.log_snr(ab)),
                   ("divides by alpha_bar's complement wrongly: SNR = alpha_bar / (1 - alpha_bar), not "
                    "alpha_bar / (1 + alpha_bar)", lambda: ab / (1 + ab)),
               ])
    return f"matches minidiff.schedules.snr on {len(cases)} schedules, zero terminal SNR included"
