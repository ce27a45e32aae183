"""Checks for assignment A6, part 2: caption dropout (part 1, masked cross-attention, is a6_attention).

Reference: minidiff.guidance.caption_dropout (Ho & Salimans 2022, Sec. 3.2: train one network conditional and
unconditional by replacing the condition with the null condition, here the empty prompt <bos> <eos>, with
probability p). The probes name each listed mistake: padding instead of the empty prompt, ids or mask replaced
alone, single tokens dropped, the probability inverted, the generator ignored, wrong dtype, order or aliasing.
A different random recipe passes if it is deterministic per seed and drops a fraction p of the prompts.
"""
from __future__ import annotations

import torch

from minidiff import guidance
from minidiff.course.checks import Mismatch, call, expect_pair, task
from minidiff.course.checks.diagnose import name_drop_fraction
from minidiff.data.tokenizer import Tokenizer

_PROMPTS = ("a small red circle", "a large blue square above a small yellow triangle", "a large white cross",
            "a small green diamond left of a large purple circle", "a small yellow square", "a large red triangle",
            "a small blue cross below a small white square", "a large green circle right of a small red diamond")
_TOKENS = {}


def _tokens():
    """(the prompts' ids, their mask, the empty prompt's ids (1, L), its mask (1, L)), made once."""
    if not _TOKENS:
        tokenizer = Tokenizer()
        _TOKENS["all"] = (*tokenizer(list(_PROMPTS)), *tokenizer([""]))
    return _TOKENS["all"]


def _prompt_batch(g, B):
    ids, mask, _, _ = _tokens()
    rows = torch.randint(0, len(_PROMPTS), (B,), generator=g)
    return ids[rows], mask[rows]


def _row_mistake(out_ids, out_mask, ids, mask, empty_ids, empty_mask, case: str) -> Mismatch | None:
    """Name a result whose rows are not each either the prompt or the empty prompt (ids and mask together)."""
    ids_kept, ids_empty = (out_ids == ids).all(dim=1), (out_ids == empty_ids).all(dim=1)
    mask_kept, mask_empty = (out_mask == mask).all(dim=1), (out_mask == empty_mask).all(dim=1)
    if ((ids_kept & mask_kept) | (ids_empty & mask_empty)).all():
        return None
    if ((out_ids == 0).all(dim=1) & ~out_mask.any(dim=1)).any():
        return Mismatch(f"replaces a dropped prompt with padding only (ids all <pad>, mask all False); the empty "
                        f"prompt is <bos> <eos>, what the sampler's unconditional branch uses: use empty_ids and "
                        f"empty_mask [case: {case}]")
    if (ids_empty & mask_kept & ~ids_kept).any():
        return Mismatch(f"replaces the ids of a dropped prompt but keeps its mask: the mask must become "
                        f"empty_mask too [case: {case}]")
    if (ids_kept & mask_empty & ~mask_kept).any() or (ids_kept & ~out_mask.any(dim=1)).any():
        return Mismatch(f"changes the mask of a dropped prompt but keeps its ids: the ids must become empty_ids "
                        f"too [case: {case}]")
    if (ids_empty & ~mask_empty & ~(ids_kept & mask_kept)).any():
        return Mismatch(f"gives a dropped prompt empty_ids but a mask that is not empty_mask: the mask of the empty "
                        f"prompt is True on <bos> <eos> only, so it must become empty_mask [case: {case}]")
    if ((out_ids == ids) | (out_ids == empty_ids)).all():
        return Mismatch(f"drops single tokens: some prompts are partly kept and partly the empty prompt; drop whole "
                        f"prompts, one draw per row: torch.rand((B,), generator=generator) < p [case: {case}]")
    return Mismatch(f"returns rows that are neither the prompt nor the empty prompt: a dropped prompt becomes "
                    f"exactly empty_ids with empty_mask (not <unk>, padding or other tokens) and a kept one is "
                    f"returned unchanged [case: {case}]")


def _dropout_statistics(student) -> None:
    """Accept a different random recipe only if it is deterministic per seed and drops a fraction p of prompts."""
    ids, mask = _prompt_batch(torch.Generator().manual_seed(5), 5000)
    _, _, empty_ids, empty_mask = _tokens()

    def run(p, seed):
        out = call(student, ids, mask, p, empty_ids, empty_mask, generator=torch.Generator().manual_seed(seed))
        return expect_pair(out, "ids, mask", f"5000 prompts, p = {p}")
    first, again = run(0.1, 9), run(0.1, 9)
    if not (torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])):
        raise Mismatch("ignores the generator: the same seed must drop the same prompts "
                       "(pass generator=generator to torch.rand)")
    if torch.equal(first[0], run(0.1, 11)[0]):
        raise Mismatch("ignores the generator: two different generators dropped the same prompts (a fixed "
                       "torch.manual_seed inside the function?); draw with torch.rand((B,), generator=generator)")
    for p in (0.1, 0.7):
        out_ids, _ = run(p, 10)
        name_drop_fraction((out_ids == empty_ids).all(dim=1).double().mean().item(), p, len(ids), "prompts")


def _dropout_result(got, ids, mask, empty_ids, empty_mask, case: str):
    """The student's (ids, mask), after naming a wrong order, dtype, shape, aliasing or a wrong row."""
    out_ids, out_mask = expect_pair(got, "ids, mask", case)
    if out_ids.dtype == torch.bool and out_mask.dtype != torch.bool:
        raise Mismatch(f"returns (mask, ids); return them in the order (ids, mask) [case: {case}]")
    if out_ids.dtype != ids.dtype or out_mask.dtype != torch.bool:
        raise Mismatch(f"returns ids of dtype {out_ids.dtype} and a mask of dtype {out_mask.dtype}; token ids are "
                       f"int64 (like tokens) and the mask is bool [case: {case}]")
    if any((a.data_ptr(), a.shape) == (b.data_ptr(), b.shape) for a, b in ((out_ids, ids), (out_mask, mask))):
        raise Mismatch(f"returns the input tensors themselves; return new tensors (torch.where, or clone), so that "
                       f"changing the result cannot change the batch [case: {case}]")
    if out_ids.shape == empty_ids.shape != ids.shape:
        raise Mismatch(f"returns the empty prompt itself, shape {tuple(out_ids.shape)}; return one row per prompt, "
                       f"shape {tuple(ids.shape)}: broadcast it to the dropped rows (torch.where, or "
                       f"empty_ids.expand(B, -1)) [case: {case}]")
    if out_ids.shape != ids.shape or out_mask.shape != mask.shape:
        raise Mismatch(f"returns ids and mask of shapes {tuple(out_ids.shape)} and {tuple(out_mask.shape)}, "
                       f"expected {tuple(ids.shape)}: one row per prompt [case: {case}]")
    named = _row_mistake(out_ids, out_mask, ids, mask, empty_ids, empty_mask, case)
    if named is not None:
        raise named
    return out_ids, out_mask


def _name_dropout_pattern(dropped: torch.Tensor, r: torch.Tensor, p: float, case: str) -> None:
    """Name a wrong set of dropped prompts (``r``: the recipe's draws); return if it may be another valid recipe."""
    if p in (0, 1):
        raise Mismatch(f"{'drops' if p == 0 else 'keeps'} {int((dropped if p == 0 else ~dropped).sum())} prompts "
                       f"at p = {p:g}; drop where torch.rand(...) < p [case: {case}]")
    inverted = "drops a prompt with probability 1 - p: drop where torch.rand(...) < p, keep it otherwise"
    wrong = [(inverted, r >= p), (inverted, r < 1 - p),
             ("drops every prompt; each prompt is dropped independently with probability p", torch.ones_like(dropped)),
             ("drops no prompt: one draw for the whole batch? draw one number per prompt, "
              "torch.rand((B,), generator=generator) < p", torch.zeros_like(dropped))]
    for message, pattern in wrong if len(r) >= 12 else []:  # a batch of 1 matches by chance
        if torch.equal(dropped, pattern):
            raise Mismatch(f"{message} [case: {case}]")


@task("A6.caption_dropout", func="caption_dropout", points=2, references=("minidiff.guidance.caption_dropout",))
def check_caption_dropout(student) -> str:
    g = torch.Generator().manual_seed(62)
    _, _, empty_ids, empty_mask = _tokens()
    cases = [("B = 4000, p = 0.1", 4000, 0.1), ("B = 16, p = 0.3", 16, 0.3), ("p = 0: no prompt is dropped", 12, 0.0),
             ("p = 1: every prompt is dropped", 12, 1.0), ("batch of 1, p = 0.5", 1, 0.5)]
    exact = True
    for n, (case, B, p) in enumerate(cases):
        ids, mask = _prompt_batch(g, B)
        seed = 600 + n
        got = call(student, ids, mask, p, empty_ids, empty_mask, generator=torch.Generator().manual_seed(seed))
        out_ids, out_mask = _dropout_result(got, ids, mask, empty_ids, empty_mask, case)
        want = guidance.caption_dropout(ids, mask, p, empty=(empty_ids, empty_mask),
                                        generator=torch.Generator().manual_seed(seed))
        if not (torch.equal(out_ids, want[0]) and torch.equal(out_mask, want[1])):
            r = torch.rand((B,), generator=torch.Generator().manual_seed(seed))
            _name_dropout_pattern((out_ids == empty_ids).all(dim=1), r, p, case)
            exact = False
    if not exact:
        _dropout_statistics(student)
        return ("drops whole prompts independently with probability p (your random draws differ from the recipe "
                "torch.rand((B,), generator=generator) < p, but the statistics are right)")
    return f"matches minidiff.guidance.caption_dropout on {len(cases)} cases (p = 0, p = 1, batch of 1)"
