"""Text conditioning, the parts below the pipeline: tokenizer, text encoders, cross-attention with a context mask
and its recorded maps, caption dropout, and CFG with the empty (or a negative) prompt.

Each property is checked against something that cannot be fudged: golden ids, every caption of the course's
grammars, invariances that a leaking mask would break (with a control showing that the same check fails when
the mask lets padding in), the CFG formula computed from separate forwards, and a binomial bound. The pipeline,
model files, training, the tiny CLIP and the judge are in ``test_text_pipeline.py``.
"""
import contextlib
import itertools
import json
import math
import warnings

import pytest
import torch

from minidiff.data.datasets import CLASS_NAMES, TEMPLATES, caption_for_label
from minidiff.data.shapes import COLORS, RELATIONS, SHAPES, SIZES, caption, sample_attrs
from minidiff.data.tokenizer import BOS, EOS, PAD, UNK, Tokenizer, split_words
from minidiff.denoiser import Denoiser
from minidiff.guidance import CFGDenoiser, caption_dropout
from minidiff.models.attention import record_cross_attention
from minidiff.models.text_encoder import (PooledTextEncoder, TextConditionedNet, TransformerBlock,
                                          TransformerTextEncoder, check_tokens, encoder_from_spec)
from minidiff.models.unet import unet_from_preset
from minidiff.pipelines.text_to_image import guided_text_denoiser
from minidiff.schedules import alphas_cumprod_from_betas, make_betas

TOK = Tokenizer()
PROMPTS = ["a small red circle", "a large blue square above a small green cross", ""]


@contextlib.contextmanager
def _no_warnings():
    """Turn every warning into an error inside the block."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def _all_shapes_attrs():
    """Every attribute vector of the shapes grammar: 60 one-object and 60 * 60 * 4 two-object scenes."""
    objects = list(itertools.product(range(len(SHAPES)), range(len(COLORS)), range(len(SIZES))))
    rows = [list(o) + [-1, -1, -1, -1] for o in objects]
    rows += [list(o1) + list(o2) + [r] for o1 in objects for o2 in objects for r in range(len(RELATIONS))]
    return torch.tensor(rows, dtype=torch.int64)


def _random_unet(context_dim=16):
    """The tiny latent U-Net with cross-attention at levels 1, 2 and every branch random (no zero init anywhere:
    the output conv is always zero-initialised, so it is randomised too, else every output would be 0)."""
    unet = unet_from_preset("tiny", in_channels=4, out_channels=4, context_dim=context_dim, attn_levels=(1, 2),
                            zero_init=False)
    torch.nn.init.normal_(unet.conv_out.weight, std=0.05)
    return unet.eval()


# ================================================================ tokenizer

def test_golden_ids_of_a_known_caption():
    ids, mask = TOK(["a small red circle left of a large blue square"])
    # a=4 small=5 large=6 red=7 blue=9 circle=13 square=14 left=20 of=22 (the course vocabulary's order)
    assert ids.tolist() == [[BOS, 4, 5, 7, 13, 20, 22, 4, 6, 9, 14, EOS, PAD, PAD, PAD, PAD]]
    assert ids.dtype == torch.int64 and mask.dtype == torch.bool
    assert mask.tolist() == [[True] * 12 + [False] * 4]
    assert TOK.decode(ids) == ["a small red circle left of a large blue square"]
    assert TOK.decode(ids[0]) == TOK.decode(ids)  # (L,) as well as (B, L)


def test_empty_prompt_and_str_input():
    ids, mask = TOK("")  # a str is one prompt
    assert ids.tolist() == [[BOS, EOS] + [PAD] * 14] and mask.sum().item() == 2
    assert TOK.decode(ids) == [""]
    assert torch.equal(TOK("A Small RED Circle")[0], TOK(["a small red circle"])[0])  # lower-cased


def test_every_shapes_caption_tokenizes_exactly_and_round_trips():
    captions = [caption(a) for a in _all_shapes_attrs()]  # all 14,460
    with _no_warnings():
        ids, mask = TOK(captions)
    assert ids.shape == (len(captions), TOK.max_length)
    assert not (ids == UNK).any()
    assert torch.equal(mask.sum(1), torch.tensor([len(c.split()) + 2 for c in captions]))  # one id a word
    assert (ids[torch.arange(len(ids)), mask.sum(1) - 1] == EOS).all()
    assert TOK.decode(ids) == captions


def test_every_label_caption_and_class_name_tokenizes_without_unk():
    texts = [caption_for_label(d, k, template=j) for d in CLASS_NAMES for k in range(len(CLASS_NAMES[d]))
             for j in range(len(TEMPLATES))]
    texts += [name for names in CLASS_NAMES.values() for name in names]
    with _no_warnings():
        ids, _ = TOK(texts)
    assert not (ids == UNK).any()
    assert TOK.decode(ids) == [" ".join(split_words(t)) for t in texts]
    assert split_words("T-shirt/top") == ["t-shirt", "/", "top"]


def test_unknown_words_warn_naming_them_and_become_unk():
    with pytest.warns(UserWarning, match=r"\['hexagon', 'zebra'\] became <unk>"):
        ids, _ = TOK(["a zebra circle above a hexagon"])
    assert ids[0, :8].tolist() == [BOS, 4, UNK, 13, 18, 4, UNK, EOS]
    assert TOK.decode(ids) == ["a <unk> circle above a <unk>"]
    with pytest.warns(UserWarning, match=r"\['cirlce', 'squre'\] became <unk>.*did you mean: 'cirlce' -> 'circle'\?, "
                                         r"'squre' -> 'square'\?"):
        TOK(["a red cirlce above a blue squre"])


def test_truncation_warns_keeping_eos_last_or_raises():
    tok = Tokenizer(max_length=6)
    prompt = "a small red circle above a large blue square"  # 9 words, room for 4
    with pytest.warns(UserWarning, match=r"has 9 words but max_length=6 leaves room for 4.*after 'circle'"):
        ids, mask = tok([prompt])
    assert ids.tolist() == [[BOS, 4, 5, 7, 13, EOS]] and mask.all()
    with pytest.raises(ValueError, match="max_length=6.*larger max_length"):
        Tokenizer(max_length=6, truncation="error")([prompt])
    with _no_warnings():
        assert tok(["a small red circle"])[0].tolist() == [[BOS, 4, 5, 7, 13, EOS]]  # exactly full: no warning


def test_tokenizer_bad_input_is_refused():
    with pytest.raises(ValueError, match="prompts is empty"):
        TOK([])
    for bad in (None, 5, b"a red circle"):
        with pytest.raises(ValueError, match="prompts must be a str or a list of str, got"):
            TOK(bad)
    with pytest.raises(ValueError, match="a prompt must be a str, got int"):
        TOK(["a red circle", 3])
    with pytest.raises(ValueError, match="max_length must be an int >= 2"):
        Tokenizer(max_length=1)
    with pytest.raises(ValueError, match="truncation must be 'warn' or 'error'"):
        Tokenizer(truncation="cut")
    with pytest.raises(ValueError, match="duplicates or specials"):
        Tokenizer(["red", "red"])
    with pytest.raises(ValueError, match="duplicates or specials"):
        Tokenizer(["red", "<pad>"])


# ================================================================ text encoders

@pytest.fixture(scope="module")
def encoders():
    torch.manual_seed(0)
    return {causal: TransformerTextEncoder(dim=32, layers=2, heads=4, causal=causal).eval() for causal in (False, True)}


def _junk_in_padding(ids, mask, seed=1):
    """ids with every padded position replaced by a random real word (the mask is unchanged)."""
    junk = torch.randint(4, len(TOK), ids.shape, generator=torch.Generator().manual_seed(seed))
    return torch.where(mask, ids, junk)


@pytest.mark.parametrize("causal", [False, True])
def test_real_positions_do_not_depend_on_padded_tokens(encoders, causal):
    enc = encoders[causal]
    ids, mask = enc.tokenize(PROMPTS)
    junk = _junk_in_padding(ids, mask)
    with torch.no_grad():
        out, out_mask = enc(ids, mask)
        out_junk, _ = enc(junk, mask)
        short, _ = enc(ids[:, :12], mask[:, :12])  # less padding after the same tokens
        ignored, _ = enc(ids, torch.ones_like(mask))  # control: a mask that lets padding in
        ignored_junk, _ = enc(junk, torch.ones_like(mask))
    assert out.shape == (3, 16, 32) and torch.equal(out_mask, mask)
    torch.testing.assert_close(out_junk[mask], out[mask], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(short[mask[:, :12]], out[:, :12][mask[:, :12]], atol=1e-6, rtol=1e-5)
    assert (out_junk[~mask] - out[~mask]).abs().max() > 1e-2  # the junk did reach the padded positions
    if not causal:  # and, were it not masked, it would reach the real ones (a causal model never looks ahead)
        assert (ignored_junk[mask] - ignored[mask]).abs().max() > 1e-3


def test_causal_output_at_i_ignores_later_tokens(encoders):
    ids, mask = TOK(["a large blue square above a small green cross"])
    n = int(mask.sum())
    for j in (2, 5, n - 2):  # change word j
        other = ids.clone()
        other[0, j] = 7 if ids[0, j] != 7 else 8
        for causal, enc in encoders.items():
            with torch.no_grad():
                a, b = enc(ids, mask)[0][0], enc(other, mask)[0][0]
            delta = (a - b).abs().amax(-1)  # (L,)
            assert (delta[j:n] > 1e-4).all()  # the changed word and everything after it see the change
            if causal:
                assert (delta[:j] == 0).all(), f"causal position < {j} saw token {j}"
            else:
                assert (delta[:j] > 1e-4).all()


def test_pooled_encoder_is_the_masked_mean(encoders):
    pooled = PooledTextEncoder(encoders[False])
    ids, mask = pooled.tokenize(PROMPTS)
    with torch.no_grad():
        context, pmask = pooled(ids, mask)
        junk, _ = pooled(_junk_in_padding(ids, mask), mask)
        tokens, _ = encoders[False](ids, mask)
    assert context.shape == (3, 1, 32) and pmask.shape == (3, 1) and pmask.all()
    expected = torch.stack([tokens[b, mask[b]].mean(0) for b in range(3)])[:, None]
    torch.testing.assert_close(context, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(junk, context, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("pooled", [False, True])
def test_encoder_from_spec_rebuilds_the_same_encoder(encoders, pooled):
    enc = PooledTextEncoder(encoders[True]) if pooled else encoders[True]
    spec = json.loads(json.dumps(enc.spec()))  # JSON-able: it goes into the model file
    rebuilt = encoder_from_spec(spec)
    assert type(rebuilt) is type(enc) and rebuilt.spec() == spec
    rebuilt.load_state_dict(enc.state_dict())
    ids, mask = enc.tokenize(PROMPTS)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(ids, mask)[0], enc(ids, mask)[0])
    with pytest.raises(ValueError, match="unknown .*text encoder kind 'bert'; known: .*'minilm'"):
        encoder_from_spec({**spec, "kind": "bert"})


def test_token_checks(encoders):
    enc = encoders[False]
    ids, mask = enc.tokenize(["a red circle"])
    with pytest.raises(ValueError, match="tokens must be an int64 tensor"):
        enc(ids.int(), mask)
    with pytest.raises(ValueError, match="token_mask must be a bool tensor of shape"):
        enc(ids, mask.long())
    with pytest.raises(ValueError, match=rf"ids in 0..{len(TOK) - 1}"):
        enc(torch.full_like(ids, len(TOK)), mask)
    with pytest.raises(ValueError, match="length 20 > max_length 16"):
        enc(torch.ones(1, 20, dtype=torch.int64), torch.ones(1, 20, dtype=torch.bool))
    check_tokens(ids, mask, len(TOK))  # fine
    with pytest.raises(ValueError, match="heads must divide dim"):
        TransformerBlock(30, 4)
    with pytest.raises(ValueError, match=r"context_dim \(16\) must equal the text encoder's dim \(32\)"):
        TextConditionedNet(_random_unet(16), enc)


# ================================================================ cross-attention

@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return _random_unet()


def _attn_inputs(B=3, L=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, t = torch.randn(B, 4, 16, 16, generator=g), torch.tensor([10.0, 400.0, 900.0])[:B]
    context = torch.randn(B, L, 16, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)[:B]
    return x, t, context, mask


@torch.no_grad()
def test_unet_ignores_masked_context_tokens(unet):
    x, t, context, mask = _attn_inputs()
    other = torch.where(mask[..., None], context, 5 * torch.randn(context.shape, generator=torch.Generator().manual_seed(1)))
    out = unet(x, t, context=context, context_mask=mask)
    torch.testing.assert_close(unet(x, t, context=other, context_mask=mask), out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(unet(x, t, context=context, context_mask=torch.ones_like(mask)),
                               unet(x, t, context=context), atol=0, rtol=0)  # all True = no mask
    # controls: the same change is visible without the mask, and the context matters at all
    assert (unet(x[:2], t[:2], context=other[:2]) - unet(x[:2], t[:2], context=context[:2])).abs().max() > 1e-3
    assert (out - unet(x, t)).abs().max() > 1e-3


@torch.no_grad()
def test_all_masked_row_equals_no_context(unet):
    x, t, context, mask = _attn_inputs()
    mask = mask.clone()
    mask[1] = False
    out = unet(x, t, context=context, context_mask=mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[1:2], unet(x[1:2], t[1:2]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[0:1], unet(x[0:1], t[0:1], context=context[0:1], context_mask=mask[0:1]),
                               atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_recorded_maps_are_distributions_over_real_tokens(unet):
    x, t, context, mask = _attn_inputs()
    plain = unet(x, t, context=context, context_mask=mask)  # the scaled_dot_product_attention path
    recorder = record_cross_attention(unet)
    with recorder as maps:
        recorded = unet(x, t, context=context, context_mask=mask)
    torch.testing.assert_close(recorded, plain, atol=1e-5, rtol=1e-5)  # recording does not change the output
    # tiny preset, levels (16, 8, 4) px: down 1 and 2, the middle, up 2 (x2) and up 1 (x2)
    assert [m.shape[2] for m in maps] == [8, 4, 4, 4, 4, 8, 8] and len(maps) == len(recorder.blocks)
    for m in maps:
        assert m.shape == (3, 4, m.shape[2], m.shape[2], 6)  # (B, heads, H, W, L)
        torch.testing.assert_close(m.sum(-1), torch.ones(m.shape[:-1]), atol=1e-5, rtol=0)
        assert (m.permute(0, 4, 1, 2, 3)[~mask] == 0).all()  # exactly 0 on masked tokens
        assert (m.permute(0, 4, 1, 2, 3)[mask] > 0).all()
    assert all(not b.record and b.attention_maps is None for b in recorder.blocks)
    unet(x, t, context=context, context_mask=mask)
    assert len(maps) == 7  # the hooks are gone after the with block


@torch.no_grad()
def test_pooled_context_is_one_key_attended_everywhere(encoders):
    """The pooled ablation's claim: with one key, every pixel's attention to it is 1 (it cannot say where)."""
    torch.manual_seed(0)
    net = TextConditionedNet(_random_unet(32), PooledTextEncoder(encoders[False])).eval()
    ids, mask = net.text_encoder.tokenize(PROMPTS[:2])
    x, t = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([100.0, 600.0])
    with record_cross_attention(net) as maps:
        net(x, t, tokens=ids, token_mask=mask)
    assert len(maps) == 7 and all(m.shape[-1] == 1 and torch.equal(m, torch.ones_like(m)) for m in maps)


def test_record_needs_cross_attention():
    with pytest.raises(ValueError, match="no cross-attention"):
        record_cross_attention(unet_from_preset("tiny"))


# ================================================================ caption dropout

def _captions(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TOK([caption(sample_attrs(generator=g)) for _ in range(n)])


EMPTY = TOK([""])


def test_caption_dropout_extremes_and_inputs_untouched():
    ids, mask = _captions(16)
    before = ids.clone(), mask.clone()
    same = caption_dropout(ids, mask, 0.0, empty=EMPTY, generator=torch.Generator().manual_seed(0))
    assert torch.equal(same[0], ids) and torch.equal(same[1], mask)
    gone = caption_dropout(ids, mask, 1.0, empty=EMPTY, generator=torch.Generator().manual_seed(0))
    assert torch.equal(gone[0], EMPTY[0].expand(16, -1)) and torch.equal(gone[1], EMPTY[1].expand(16, -1))
    assert torch.equal(ids, before[0]) and torch.equal(mask, before[1])


def test_caption_dropout_drops_whole_rows_at_rate_p():
    n, p = 4000, 0.3
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, len(TOK), (n, TOK.max_length), generator=g)  # random words, random lengths 3..16
    mask = torch.arange(TOK.max_length) < torch.randint(3, TOK.max_length + 1, (n, 1), generator=g)
    ids = torch.where(mask, ids, PAD)
    before = ids.clone(), mask.clone()
    out_ids, out_mask = caption_dropout(ids, mask, p, empty=EMPTY, generator=torch.Generator().manual_seed(0))
    kept = (out_ids == ids).all(1) & (out_mask == mask).all(1)
    dropped = (out_ids == EMPTY[0]).all(1) & (out_mask == EMPTY[1]).all(1)
    assert (kept ^ dropped).all()  # every row is its caption or the empty prompt, never a mix
    assert abs(int(dropped.sum()) - n * p) < 5 * math.sqrt(n * p * (1 - p))  # binomial, 5 sigma
    assert torch.equal(ids, before[0]) and torch.equal(mask, before[1])
    again = caption_dropout(ids, mask, p, empty=EMPTY, generator=torch.Generator().manual_seed(0))
    other = caption_dropout(ids, mask, p, empty=EMPTY, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again[0], out_ids) and torch.equal(again[1], out_mask)
    assert not torch.equal(other[0], out_ids)


def test_caption_dropout_refuses_bad_arguments():
    ids, mask = _captions(4)
    for p in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="p .caption dropout probability. must be in"):
            caption_dropout(ids, mask, p, empty=EMPTY)
    with pytest.raises(ValueError, match="the same L"):
        caption_dropout(ids, mask, 0.1, empty=Tokenizer(max_length=8)([""]))


# ================================================================ CFG with the empty prompt

@pytest.fixture(scope="module")
def text_denoiser():
    torch.manual_seed(0)
    net = TextConditionedNet(_random_unet(16), TransformerTextEncoder(dim=16, layers=1, heads=2)).eval()
    return Denoiser(net, alphas_cumprod_from_betas(make_betas("cosine", 1000)), "v", image_shape=(4, 16, 16))


def _cfg_inputs():
    g = torch.Generator().manual_seed(3)
    ids, mask = TOK(["a small red circle", "a large blue square above a small green cross"])
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor([0.5, 3.0]), ids, mask


@torch.no_grad()
def test_cfg_with_the_empty_prompt(text_denoiser):
    D = text_denoiser
    x, sigma, ids, mask = _cfg_inputs()
    uncond = {"tokens": EMPTY[0], "token_mask": EMPTY[1]}
    x0_c = D(x, sigma, tokens=ids, token_mask=mask)
    x0_u = D(x, sigma, tokens=EMPTY[0].expand(2, -1), token_mask=EMPTY[1].expand(2, -1))
    assert (x0_c - x0_u).abs().max() > 1e-3  # the prompt matters, so the checks below can fail
    cfg = {w: CFGDenoiser(D, w, uncond=uncond)(x, sigma, tokens=ids, token_mask=mask) for w in (0.0, 1.0, 4.0)}
    assert torch.equal(cfg[1.0], x0_c)
    assert torch.equal(cfg[0.0], x0_u)
    torch.testing.assert_close(cfg[4.0], x0_u + 4.0 * (x0_c - x0_u), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_negative_prompt_is_the_unconditional_branch(text_denoiser):
    D = text_denoiser
    x, sigma, ids, mask = _cfg_inputs()
    prompts = TOK.decode(ids)
    negative = "a large green triangle"
    n_ids, n_mask = TOK([negative, negative])
    x0_c = D(x, sigma, tokens=ids, token_mask=mask)
    x0_n = D(x, sigma, tokens=n_ids, token_mask=n_mask)
    guided, cond = guided_text_denoiser(D, TOK, prompts, negative_prompt=negative, guidance=3.0)
    plain, _ = guided_text_denoiser(D, TOK, prompts, guidance=3.0)
    with_neg, without = guided(x, sigma, **cond), plain(x, sigma, **cond)
    torch.testing.assert_close(with_neg, x0_n + 3.0 * (x0_c - x0_n), atol=1e-5, rtol=1e-5)
    assert (with_neg - without).abs().max() > 1e-3
    per_prompt, _ = guided_text_denoiser(D, TOK, prompts, negative_prompt=[negative, negative], guidance=3.0)
    assert torch.equal(per_prompt(x, sigma, **cond), with_neg)
    as_uncond = CFGDenoiser(D, 3.0, uncond={"tokens": n_ids[:1], "token_mask": n_mask[:1]})
    torch.testing.assert_close(as_uncond(x, sigma, **cond), with_neg, atol=1e-6, rtol=1e-6)
