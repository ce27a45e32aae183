"""A word-level tokenizer for the course's caption grammars: text -> (token ids (B, L), attention mask (B, L)).

Stable Diffusion's CLIP tokenizer (Radford et al. 2021) is byte-pair encoding over 49,408 tokens; the course's
captions use about 80 words, so a word-level vocabulary is exact and readable. The same rules as CLIP's:

| token     | id | meaning                                                                 |
|-----------|----|-------------------------------------------------------------------------|
| ``<pad>`` | 0  | fills every prompt up to ``max_length`` (mask False: never attended to)  |
| ``<bos>`` | 1  | starts every prompt                                                      |
| ``<eos>`` | 2  | ends every prompt; the empty prompt "" is ``<bos> <eos>``                |
| ``<unk>`` | 3  | any word not in the vocabulary, with a warning naming it                  |

Every prompt is padded to the same ``max_length`` (CLIP: 77; here 16 fits the longest caption, 10 words + 2),
so the conditional and unconditional (empty-prompt) branches of classifier-free guidance stack into one batch.
A prompt with more than ``max_length - 2`` words is truncated, keeping ``<eos>`` last, with a warning
(``truncation="warn"``, CLIP's behaviour) or refused with a ValueError (``truncation="error"``).
"""
from __future__ import annotations

import difflib
import re
import warnings

import torch

from minidiff.data.datasets import CLASS_NAMES, TEMPLATES, _PHRASES
from minidiff.data.shapes import WORDS

__all__ = ["SPECIAL_TOKENS", "PAD", "BOS", "EOS", "UNK", "Tokenizer", "course_vocabulary", "split_words"]

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD, BOS, EOS, UNK = range(4)
_WORD = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*|[^\sa-z0-9]")  # words (t-shirt is one) and single punctuation marks


def split_words(text: str) -> list[str]:
    """Lower-case ``text`` and split it into words and punctuation marks: "T-shirt/top" -> ["t-shirt", "/", "top"]."""
    if not isinstance(text, str):
        raise ValueError(f"a prompt must be a str, got {type(text).__name__}: {text!r}")
    return _WORD.findall(text.lower())


def course_vocabulary() -> tuple[str, ...]:
    """Every word of the shapes grammar, of the class names and of the label captions (``caption_for_label``)."""
    words = dict.fromkeys(WORDS)
    for names in CLASS_NAMES.values():
        for name in names:
            words.update(dict.fromkeys(split_words(name)))
    for template in TEMPLATES:
        for phrases in _PHRASES.values():
            for phrase in phrases:
                words.update(dict.fromkeys(split_words(template.format(phrase))))
    return tuple(words)


class Tokenizer:
    """Word-level tokenizer with CLIP's special tokens: ``tok(prompts) -> (ids int64 (B, L), mask bool (B, L))``."""

    def __init__(self, vocabulary=None, *, max_length: int = 16, truncation: str = "warn"):
        words = tuple(course_vocabulary() if vocabulary is None else vocabulary)
        clash = [w for w in words if w in SPECIAL_TOKENS]
        if clash or len(set(words)) != len(words):
            raise ValueError(f"vocabulary must be unique words without the special tokens {SPECIAL_TOKENS}, "
                             f"got duplicates or specials: {clash or [w for w in words if words.count(w) > 1][:5]}")
        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an int >= 2 (room for <bos> and <eos>), got {max_length!r}")
        if truncation not in ("warn", "error"):
            raise ValueError(f"truncation must be 'warn' or 'error', got {truncation!r}")
        self.vocabulary = SPECIAL_TOKENS + words
        self.ids = {w: i for i, w in enumerate(self.vocabulary)}
        self.max_length, self.truncation = max_length, truncation

    def __len__(self) -> int:
        return len(self.vocabulary)

    def __repr__(self) -> str:
        return f"Tokenizer({len(self)} tokens, max_length={self.max_length}, truncation={self.truncation!r})"

    def encode_one(self, prompt: str) -> list[int]:
        """Token ids of one prompt, ``<bos> ... <eos>``, unpadded (warns about unknown words and truncation)."""
        words = split_words(prompt)
        unknown = sorted({w for w in words if w not in self.ids})
        if unknown:
            close = {w: difflib.get_close_matches(w, self.vocabulary[len(SPECIAL_TOKENS):], n=1) for w in unknown}
            hints = ", ".join(f"{w!r} -> {c[0]!r}?" for w, c in close.items() if c)
            warnings.warn(f"prompt {prompt!r}: words not in the vocabulary {unknown} became <unk>; the model has "
                          f"never seen them" + (f" (did you mean: {hints})" if hints else "") +
                          " (known words: tokenizer.vocabulary)", stacklevel=3)
        room = self.max_length - 2
        if len(words) > room:
            message = (f"prompt {prompt!r} has {len(words)} words but max_length={self.max_length} leaves room "
                       f"for {room} (plus <bos> and <eos>)")
            if self.truncation == "error":
                raise ValueError(message + "; shorten it or build the Tokenizer with a larger max_length")
            warnings.warn(message + f"; the words after {words[room - 1]!r} were dropped", stacklevel=3)
            words = words[:room]
        return [BOS] + [self.ids.get(w, UNK) for w in words] + [EOS]

    def __call__(self, prompts) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids (B, max_length) int64 padded with <pad>, mask (B, max_length) bool, True on real tokens)."""
        if not isinstance(prompts, (str, list, tuple)):
            raise ValueError(f"prompts must be a str or a list of str, got {type(prompts).__name__}")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("prompts is empty: give at least one prompt (\"\" is the empty prompt)")
        ids = torch.full((len(prompts), self.max_length), PAD, dtype=torch.int64)
        for b, prompt in enumerate(prompts):
            row = self.encode_one(prompt)
            ids[b, :len(row)] = torch.tensor(row)
        return ids, ids != PAD

    def decode(self, ids) -> list[str]:
        """Token ids (B, L) or (L,) back to text, without special tokens (``<unk>`` is kept)."""
        ids = torch.as_tensor(ids)
        rows = ids[None] if ids.ndim == 1 else ids
        return [" ".join(self.vocabulary[i] for i in row.tolist() if i not in (PAD, BOS, EOS)) for row in rows]
