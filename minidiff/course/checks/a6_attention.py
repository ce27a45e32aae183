"""Checks for assignment A6, part 1: masked cross-attention (part 2, caption dropout, is a6_dropout).

References: minidiff.models.attention.AttentionBlock (its cross-attention: softmax(Q K^T / sqrt(d)) V over the real
context tokens, and a prompt without a real token attends to nothing). The
probe inputs make every listed mistake distinguishable: a square case (N = L, C = D = d) where swapped roles and
transposed weights still run, then widths C, D, d that all differ, prompts of different lengths, a mask that is not
a prefix, a prompt of padding only, logits large enough to overflow exp. Wrong variants are written out on purpose.

| symbol  | code name          | meaning                                                          |
|---------|--------------------|------------------------------------------------------------------|
| N, C    | ``x`` (B, N, C)    | image tokens (the H*W positions of a feature map) and their width |
| L, D    | ``context``        | context tokens (one prompt) and their width                      |
| d       | ``w_q.shape[1]``   | width of queries, keys and values                                |
| A       | ``attn`` (B, N, L) | softmax(Q K^T / sqrt(d)) over the L keys; 0 on padded keys        |
"""
from __future__ import annotations

import math

import torch

from minidiff.course.checks import Mismatch, StudentError, call, expect, expect_pair, task

F64 = torch.float64
RTOL, ATOL = 1e-4, 1e-5
LIBRARY_ATTENTION = "minidiff.models.attention.AttentionBlock"


def reference_cross_attention(x, context, context_mask, w_q, w_k, w_v):
    """(out (B, N, d), attn (B, N, L)): Rombach et al. 2022, Eq. 3, single head, padded keys masked; a row with no
    real key attends to nothing (attention 0, output 0), as AttentionBlock's cross-attention."""
    q, k, v = x @ w_q, context @ w_k, context @ w_v  # (B, N, d), (B, L, d), (B, L, d)
    logits = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])  # (B, N, L)
    attn = logits.masked_fill(~context_mask[:, None, :], float("-inf")).softmax(dim=-1)
    attn = torch.where(context_mask.any(dim=1)[:, None, None], attn, torch.zeros_like(attn))
    return attn @ v, attn


def _attend(q, k, v, keep, scale, *, dim=-1, fill=float("-inf"), after=False, renorm=False, by_hand=False,
            empty="zero"):
    """One naive pipeline (mask before or after the softmax, softmax over ``dim``) -> (out, attn). ``empty`` is what
    a fully masked row becomes: "nan" (softmax of -inf only), "zero" (NaN set to 0) or "uniform" (a fill of -1e9)."""
    logits = q @ k.transpose(-2, -1) * scale  # (B, N, L)
    if keep is not None and not after:
        logits = logits.masked_fill(~keep, -1e9 if empty == "uniform" and fill == float("-inf") else fill)
    if by_hand:
        e = logits.exp()
        attn = e / e.sum(dim, keepdim=True)
    else:
        attn = logits.softmax(dim)
    if keep is not None and after:
        attn = attn * keep
        attn = attn / attn.sum(dim, keepdim=True) if renorm else attn
    if empty == "zero":
        attn = attn.nan_to_num(0.0)
    return attn @ v, attn


def _forms(*args, **kwargs):
    """The variant as a student would write it: with NaN-zeroing (the first, canonical form), without, or with a
    finite fill."""
    return [_attend(*args, empty=e, **kwargs) for e in ("zero", "nan", "uniform")]


def _attention_wrong(x, context, context_mask, w_q, w_k, w_v):
    """The usual mistakes in softmax(Q K^T / sqrt(d)) V with a padding mask, as (message, thunk) pairs; a thunk
    returns the variant's forms [(out, attn), ...]."""
    N, C, (L, D), d = x.shape[1], x.shape[2], context.shape[1:], w_q.shape[1]
    q, k, v = x @ w_q, context @ w_k, context @ w_v
    s, keys = 1 / math.sqrt(d), context_mask[:, None, :]  # (B, 1, L): the mask marks keys
    prefix = torch.arange(L) < context_mask.sum(dim=1, keepdim=True)  # (B, L)
    out, attn = reference_cross_attention(x, context, context_mask, w_q, w_k, w_v)
    return [  # the all-padding mistakes first: on a case with such a row, other variants may coincide with them
        ("gives NaN for a prompt with no real token (mask all False): the softmax over no keys is 0 / 0; such a "
         "row attends to nothing, so set its attention (and so its output) to 0",
         lambda: [_attend(q, k, v, keys, s, empty="nan")]),
        ("lets a prompt with no real token (mask all False) attend uniformly to its padding; it must attend to "
         "nothing: attention 0 and output 0 for that row", lambda: [_attend(q, k, v, keys, s, empty="uniform")]),
        ("returns attn transposed, one row per context token; attn is (B, N, L): for each image token a "
         "distribution over the L context tokens", lambda: [(out, attn.transpose(1, 2))]),
        (f"does not scale the logits: softmax(Q K^T / sqrt(d)) divides by sqrt(d) = sqrt({d}), which keeps the "
         f"softmax from saturating as d grows", lambda: _forms(q, k, v, keys, 1.0)),
        (f"divides the logits by d = {d}; the scale is 1 / sqrt(d)", lambda: _forms(q, k, v, keys, 1 / d)),
        (f"divides the logits by sqrt(C) = sqrt({C}), the width of the image tokens; d = {d} is the width of Q and K "
         f"(w_q.shape[1]): divide by sqrt(d)", lambda: _forms(q, k, v, keys, 1 / math.sqrt(C))),
        (f"divides the logits by sqrt(D) = sqrt({D}), the width of the context; d = {d} is the width of Q and K "
         f"(w_q.shape[1]): divide by sqrt(d)", lambda: _forms(q, k, v, keys, 1 / math.sqrt(D))),
        ("takes the softmax over the image tokens (dim=1): each image token's weights over the L context tokens "
         "must sum to 1, so the softmax runs over the last axis (dim=-1)", lambda: _forms(q, k, v, keys, s, dim=1)),
        ("inverts the mask: it attends only to the padding; context_mask is True on real tokens, so fill the logits "
         "with -inf where ~context_mask", lambda: _forms(q, k, v, ~keys, s)),
        ("ignores context_mask: padded tokens get attention too; fill their logits with -inf before the softmax",
         lambda: _forms(q, k, v, None, s)),
        ("zeroes the padded keys after the softmax without renormalising: the real tokens' weights no longer sum "
         "to 1; fill the padded logits with -inf before the softmax instead", lambda: _forms(q, k, v, keys, s,
                                                                                              after=True)),
        ("masks after the softmax and renormalises: the same on paper, but where a padded key has the largest "
         "logit the real tokens' weights underflow to 0 (0 / 0); fill the padded logits with -inf before the softmax",
         lambda: _forms(q, k, v, keys, s, after=True, renorm=True)),
        ("fills the padded logits with 0 instead of -inf: exp(0) = 1, so padded keys still get weight; "
         "use float('-inf')", lambda: _forms(q, k, v, keys, s, fill=0.0)),
        ("applies the mask along the image tokens (context_mask[:, :, None]); it marks the keys: broadcast it as "
         "context_mask[:, None, :] against the logits (B, N, L)", lambda: _forms(q, k, v, context_mask[:, :, None], s)),
        ("treats the mask as a prefix (the first mask.sum() tokens are real); mask the keys wherever context_mask "
         "is False", lambda: _forms(q, k, v, prefix[:, None, :], s)),
        ("computes Q from the context and K, V from the image tokens: the image tokens ask and the words answer, "
         "Q = x @ w_q, K = context @ w_k, V = context @ w_v",
         lambda: _forms(context @ w_q, x @ w_k, x @ w_v, keys, s) if C == D and N == L else []),
        ("uses the transposed weights (x @ w_q.T, ...): w_q is (C, d), so Q = x @ w_q (likewise K and V)",
         lambda: _forms(x @ w_q.T, context @ w_k.T, context @ w_v.T, keys, s)),
        ("returns attn @ context: the values are V = context @ w_v", lambda: _forms(q, k, context, keys, s)),
        ("uses the keys as the values: V = context @ w_v, not context @ w_k", lambda: _forms(q, k, k, keys, s)),
        ("writes the softmax as exp / sum without subtracting the row maximum: exp overflows to inf for large "
         "logits and inf / inf is NaN; use torch.softmax (it subtracts the maximum)",
         lambda: _forms(q, k, v, keys, s, by_hand=True)),
    ]


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a.detach().double(), b.detach().double(), rtol=RTOL, atol=ATOL,
                                                 equal_nan=True)


def _same_pair(got, form) -> bool:
    return _close(got[0], form[0]) and _close(got[1], form[1])


def _name_variant(got, want, wrong, case: str) -> None:
    """Raise the message of the first listed mistake one of whose forms ``got`` matches (NaN where it has NaN); a
    mistake counts only where its canonical form differs from the reference."""
    for message, thunk in wrong:
        try:
            forms = thunk()
        except (IndexError, RuntimeError, ValueError):
            continue  # this mistake cannot even be computed on these shapes, so it is not the one
        if forms and not _same_pair(forms[0], want) and any(_same_pair(got, f) for f in forms):
            raise Mismatch(f"{message} [case: {case}]")


def _name_scale(attn, inputs, want, case: str) -> None:
    """Name logits scaled by a wrong factor c (any c, not only the listed ones): fit log attn = c Q K^T + const
    over each row's real keys and, if masked softmax(c Q K^T) is what the student returned, say what c is."""
    x, context, context_mask, w_q, w_k, w_v = (t.double() if t.is_floating_point() else t for t in inputs)
    (B, N, L), d = want[1].shape, w_q.shape[1]
    if attn.shape != (B, N, L) or not torch.isfinite(attn).all():
        return
    a, raw = attn.detach().double(), (x @ w_q) @ (context @ w_k).transpose(1, 2)  # raw: Q K^T, unscaled
    keys, fits = context_mask[:, None, :].expand(B, N, L), []
    for la, r, k in zip(a.clamp_min(1e-300).log().flatten(0, 1), raw.flatten(0, 1), keys.flatten(0, 1)):
        lc, rc = la[k] - la[k].mean(), r[k] - r[k].mean()
        if k.sum() >= 2 and (rc**2).sum() > 1e-12:
            fits.append((lc * rc).sum() / (rc**2).sum())  # least squares: log attn - const = c (Q K^T)
    if not fits:
        return
    c = float(torch.stack(fits).median())
    if not math.isfinite(c) or math.isclose(c, 1 / math.sqrt(d), rel_tol=1e-3):
        return
    fitted = (raw * c).masked_fill(~keys, float("-inf")).softmax(-1).nan_to_num(0.0)
    if not torch.allclose(fitted, a, rtol=1e-3, atol=1e-5):
        return
    names = {f"multiplies them by sqrt(d) = sqrt({d}) instead of dividing": math.sqrt(d),
             f"divides them by sqrt(N) = sqrt({N}), the number of image tokens": 1 / math.sqrt(N),
             f"divides them by sqrt(L) = sqrt({L}), the number of context tokens": 1 / math.sqrt(L)}
    named = [n for n, v in names.items() if math.isclose(c, v, rel_tol=1e-3)]
    what = " or ".join(named) if named else f"scales them by {c:.4g}"
    raise Mismatch(f"scales the logits wrongly: your attention is softmax(c Q K^T) with c = {c:.4g}, i.e. it {what}; "
                   f"the scale is 1 / sqrt(d) = 1 / sqrt({d}) = {1 / math.sqrt(d):.4g}, d = w_q.shape[1] "
                   f"[case: {case}]")


def _name_structure(out, attn, want, context_mask, case: str) -> None:
    """Name what is wrong with attn (NaN, row sums, weight on padding) or out, if it is recognisable."""
    (B, N, L), d = want[1].shape, want[0].shape[-1]
    if attn.shape != (B, N, L):
        return  # expect() names the shape
    has_words, a = context_mask.any(dim=1), attn.detach().double()
    if torch.isnan(a[~has_words]).any():
        raise Mismatch(f"gives NaN for a prompt with no real token (mask all False): softmax over no keys is 0 / 0; "
                       f"set that row's attention and output to 0 [case: {case}]")
    if torch.isnan(a[has_words]).any():
        raise Mismatch(f"gives NaN attention for prompts that have real tokens: a mask added as mask * -inf makes "
                       f"0 * -inf = NaN on the real tokens; use logits.masked_fill(~context_mask[:, None, :], "
                       f"float('-inf')) [case: {case}]")
    sums = a[has_words].sum(dim=-1)
    if sums.numel() and torch.allclose(sums, torch.full_like(sums, 1 / math.sqrt(d)), rtol=1e-4):
        raise Mismatch(f"scales the attention after the softmax (rows sum to 1 / sqrt(d) = {1 / math.sqrt(d):.4g}); "
                       f"scale the logits before it: softmax(Q K^T / sqrt(d)) [case: {case}]")
    if not torch.allclose(sums, torch.ones_like(sums), atol=1e-4):
        raise Mismatch(f"returns attention rows that do not sum to 1 over the context tokens (sums from "
                       f"{sums.min():.3g} to {sums.max():.3g}): softmax over the last axis, after masking the logits "
                       f"[case: {case}]")
    leak = a.masked_select(~context_mask[:, None, :].expand(B, N, L))
    if leak.numel() and leak.abs().max() > 0:
        raise Mismatch(f"gives padded context tokens a probability of up to {leak.abs().max():.2g}, not exactly 0: "
                       f"fill their logits with float('-inf') before the softmax [case: {case}]")
    if out.ndim == 3 and out.shape[:2] == (B, N) and out.shape[-1] != d:
        raise Mismatch(f"returns out of width {out.shape[-1]}; out = attn @ V has the width d = {d} of "
                       f"V = context @ w_v [case: {case}]")
    if _close(attn, want[1]) and out.shape == want[0].shape and not _close(out, want[0]):
        nan = torch.isnan(out).any()
        raise Mismatch(f"returns the right attn but a wrong out{' (with NaN)' if nan else ''}: out = attn @ V with "
                       f"V = context @ w_v" + (", computed from the attention after its NaN are set to 0"
                                               if nan else "") + f" [case: {case}]")


def _attention_inputs(g, B, N, L, C, D, d, lengths=None, *, mask=None, scale=1.0, dtype=torch.float32):
    """(x, context, context_mask, w_q, w_k, w_v) with logits Q K^T / sqrt(d) of std about 2 * scale."""
    x = scale * torch.randn((B, N, C), generator=g, dtype=F64)
    context = torch.randn((B, L, D), generator=g, dtype=F64)
    w = [1.5 * torch.randn(shape, generator=g, dtype=F64) / math.sqrt(shape[0]) for shape in ((C, d), (D, d), (D, d))]
    if mask is None:
        mask = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]
    return (x.to(dtype), context.to(dtype), torch.as_tensor(mask, dtype=torch.bool), *(t.to(dtype) for t in w))


def _attention_cases(g):
    yield ("square shapes N = L = 5, C = D = d = 4; prompts of 5 and 3 real tokens",
           _attention_inputs(g, 2, 5, 5, 4, 4, 4, [5, 3]))
    yield ("B = 3, N = 6 image tokens, L = 5 context tokens, C = 6, D = 5, d = 3; prompts of 5, 3 and 1 real tokens",
           _attention_inputs(g, 3, 6, 5, 6, 5, 3, [5, 3, 1]))
    yield ("a mask that is not a prefix (padding between real tokens), N = 4, L = 6, C = 5, D = 7, d = 2",
           _attention_inputs(g, 2, 4, 6, 5, 7, 2, mask=[[1, 0, 1, 1, 0, 1], [0, 1, 1, 0, 0, 0]]))
    yield ("a prompt of padding only (mask all False) next to a full one: it attends to nothing, attention 0 and "
           "output 0", _attention_inputs(g, 2, 3, 4, 4, 6, 3, [0, 4]))
    yield ("large logits (up to about 360): the softmax must neither overflow nor underflow",
           _attention_inputs(g, 2, 4, 5, 4, 5, 3, [5, 2], scale=40.0))
    yield "float64, batch of 1, no padding", _attention_inputs(g, 1, 3, 4, 3, 4, 2, [4], dtype=F64)


SHAPE_HINT = ("Hint: the image tokens give the queries, Q = x @ w_q with x (B, N, C) and w_q (C, d); the context "
              "gives the keys and values, K = context @ w_k and V = context @ w_v with w_k, w_v (D, d); the logits "
              "are (B, N, L) and the mask (B, L) broadcasts to them as context_mask[:, None, :].")


def _call_attention(student, inputs, case: str):
    try:
        return call(student, *inputs)
    except StudentError as e:
        if any(s in str(e) for s in ("shapes cannot be multiplied", "size of tensor", "Expected size", "must match")):
            raise StudentError(f"{e} {SHAPE_HINT} [case: {case}]") from e
        raise


@task("A6.cross_attention", func="cross_attention", points=4, references=(LIBRARY_ATTENTION,))
def check_cross_attention(student) -> str:
    n = 0
    for case, inputs in _attention_cases(torch.Generator().manual_seed(61)):
        n += 1
        dtype = inputs[0].dtype
        want = [t.to(dtype) for t in reference_cross_attention(*[t.double() if t.is_floating_point() else t
                                                                  for t in inputs])]
        out, attn = expect_pair(_call_attention(student, inputs, case), "out, attn", case)
        if not _same_pair((out, attn), want):
            _name_variant((out, attn), want, _attention_wrong(*inputs), case)
            _name_scale(attn, inputs, want, case)
            _name_structure(out, attn, want, inputs[2], case)
        hint = "Keep the dtype of x."
        expect(attn, want[1], case=case, what="attn", rtol=RTOL, atol=ATOL, dtype_hint=hint)
        expect(out, want[0], case=case, what="out", rtol=RTOL, atol=ATOL, dtype_hint=hint)
        _name_structure(out, attn, want, inputs[2], case)  # close is not enough: padded keys get exactly 0
    return (f"matches softmax(Q K^T / sqrt(d)) V with padded keys masked (Rombach et al. 2022, Eq. 3; "
            f"{LIBRARY_ATTENTION}) on {n} cases (a mask that is not a prefix, a prompt of padding only, large "
            f"logits, float64)")
