"""Text to image, the parts around the model: the pipeline (shapes, seeds, errors, every sampler), text-model
files (round trip, edited specs), ``pretrained.load_pipeline``, training (held-out pairs, config, bit-exact
resume), the tiny CLIP (hard negatives, loss, files) and the judge (the shipped classifier on real renders).

A randomly initialised tiny text net stands in for the shipped one (its outputs are not trivial: every branch,
the output conv included, is random), with the shipped autoencoder to decode. Lower-level pieces (tokenizer,
encoders, cross-attention, caption dropout, CFG) are in ``test_text.py``.
"""
import itertools
import json
import math
import os
import re
from dataclasses import replace

import pytest
import torch

from minidiff import pretrained
from minidiff.data.shapes import COLORS, SHAPES, caption, parse_caption, render, sample_attrs
from minidiff.denoiser import Denoiser
from minidiff.files import WEIGHTS_DIR, CheckpointError, file_sha256, read_safetensors, write_safetensors
from minidiff.models import clip as clip_module
from minidiff.models.clip import CLIPConfig, TinyCLIP, clip_loss, clip_score, hard_negative, load_clip, save_clip
from minidiff.models.text_encoder import PooledTextEncoder, TextConditionedNet, TransformerTextEncoder
from minidiff.models.unet import unet_from_preset
from minidiff.pipelines import TextToImagePipeline
from minidiff.samplers import SAMPLERS, sample
from minidiff.schedules import alphas_cumprod_from_betas, make_betas, sampling_sigmas
from minidiff.training import text as text_module
from minidiff.training.checkpoint import checkpoint_config, load_text_model, save_model, save_text_model
from minidiff.training.text import HELD_OUT, TextTrainConfig, _setup, build_text_net, held_out_mask, train_text
from minidiff.training.text_export import ema_denoiser

PROMPTS = ["a small red circle", "a large blue square above a small green cross"]
AB = alphas_cumprod_from_betas(make_betas("cosine", 1000))
_REAL_GRID = text_module.sample_prompts_grid


def _has_held_out_pair(text: str) -> bool:
    """The oracle for held_out_mask, read from the caption: "... red square ..." is the pair (red, square)."""
    words = text.split()
    return any((c, s) in HELD_OUT for c, s in itertools.pairwise(words))


def _text_denoiser(*, pooled=False, causal=False, seed=0):
    torch.manual_seed(seed)
    unet = unet_from_preset("tiny", in_channels=4, out_channels=4, context_dim=16, attn_levels=(1, 2),
                            zero_init=False)
    torch.nn.init.normal_(unet.conv_out.weight, std=0.05)  # always zero-initialised: randomise it too
    encoder = TransformerTextEncoder(dim=16, layers=1, heads=2, causal=causal)
    net = TextConditionedNet(unet, PooledTextEncoder(encoder) if pooled else encoder)
    return Denoiser(net, AB, "v", image_shape=(4, 16, 16)).eval()


@pytest.fixture(scope="module")
def vae():
    return pretrained.load("shapes64-vae")


@pytest.fixture(scope="module")
def pipe(vae):
    return TextToImagePipeline(_text_denoiser(), vae)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ================================================================ the pipeline

def test_images_shape_range_and_seeds(pipe):
    kw = {"steps": 2, "progress": False}
    images = pipe.text_to_image(PROMPTS, generator=_gen(0), **kw)
    assert images.shape == (2, 3, 64, 64) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1 and images.std() > 0.01
    z = pipe.text_to_image(PROMPTS, generator=_gen(0), output="latents", **kw)
    assert z.shape == (2, 4, 16, 16)
    assert torch.equal(pipe.vae.decode_latents(z).clamp(-1, 1), images)  # images = decoded latents of that seed
    assert torch.equal(pipe.text_to_image(PROMPTS, generator=_gen(0), output="latents", **kw), z)
    assert (pipe.text_to_image(PROMPTS, generator=_gen(1), output="latents", **kw) - z).abs().max() > 1e-2


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_runs_through_the_pipeline(pipe, sampler):
    """At guidance 1 the pipeline is the sampler on the conditional denoiser: the same latents, bit for bit."""
    z = pipe.text_to_image(PROMPTS[:1], guidance=1.0, sampler=sampler, steps=2, generator=_gen(0),
                           output="latents", progress=False)
    ids, mask = pipe.tokenizer(PROMPTS[:1])
    direct = sample(pipe.denoiser, (1, 4, 16, 16), sampling_sigmas(AB, 2, "trailing"), sampler=sampler,
                    generator=_gen(0), device="cpu", extra_args={"tokens": ids, "token_mask": mask})
    assert z.shape == (1, 4, 16, 16) and torch.isfinite(z).all()
    assert torch.equal(z, direct)
    guided = pipe.text_to_image(PROMPTS[:1], guidance=4.0, sampler=sampler, steps=2, generator=_gen(0),
                                output="latents", progress=False)
    assert torch.isfinite(guided).all() and (guided - z).abs().max() > 1e-4


def test_negative_prompt_changes_the_picture(pipe):
    kw = {"steps": 2, "output": "latents", "progress": False}
    base = pipe.text_to_image(PROMPTS, generator=_gen(0), **kw)
    neg = pipe.text_to_image(PROMPTS, negative_prompt="a large white cross", generator=_gen(0), **kw)
    assert (base - neg).abs().max() > 1e-3


@pytest.mark.parametrize("kwargs, match", [
    ({"prompts": []}, "prompts is empty"),
    ({"prompts": ["a red circle", 3]}, "prompts must be strings"),
    ({"negative_prompt": ["a", "b", "c"]},
     r"negative_prompt must be one str or a list with one per prompt \(2\), got a list of 3"),
    ({"guidance": -1.0}, "guidance must be a finite number >= 0.*got -1.0"),
    ({"guidance": float("nan")}, "guidance must be a finite number >= 0.*got nan"),
    ({"guidance_rescale": 2.0}, r"guidance_rescale must be a number in \[0, 1\]"),
    ({"guidance_rescale": "a"}, r"guidance_rescale must be a number in \[0, 1\].*got 'a'"),
    ({"sampler": "plms"}, f"sampler must be one of {re.escape(str(sorted(SAMPLERS)))}, got 'plms'"),
    ({"sampler": ["euler"]}, r"sampler must be one of .*got \['euler'\]"),
    ({"steps": 0}, "steps must be an int from 1 to 1000 .*got 0"),
    ({"steps": 2.5}, "steps must be an int from 1 to 1000 .*got 2.5"),
    ({"steps": 10**6, "spacing": "karras"}, "steps must be an int from 1 to 1000 .*got 1000000"),
    ({"prompts": None}, "prompts must be a str or a list of str, got NoneType"),
    ({"prompts": 5}, "prompts must be a str or a list of str, got int"),
    ({"prompts": b"abc"}, "prompts must be a str or a list of str, got bytes"),
    ({"negative_prompt": 5}, "negative_prompt must be None, a str or a list of str, got int"),
    ({"spacing": "cubic"}, "spacing must be one of .*'trailing'.*got 'cubic'"),
    ({"output": "pil"}, "output must be 'images' or 'latents', got 'pil'"),
])
def test_bad_arguments_name_themselves(pipe, kwargs, match):
    prompts = kwargs.pop("prompts", PROMPTS)
    with pytest.raises(ValueError, match=match):
        pipe.text_to_image(prompts, steps=kwargs.pop("steps", 2), progress=False, **kwargs)


def test_pipeline_parts(pipe, vae):
    context, mask = pipe.encode_prompt(PROMPTS)
    assert context.shape == (2, 16, 16) and mask.sum(1).tolist() == [6, 11]
    assert pipe.tokenizer is pipe.text_encoder.tokenizer and "latents (4, 16, 16)" in repr(pipe)
    with pytest.raises(ValueError, match="must wrap a TextConditionedNet"):
        TextToImagePipeline(Denoiser(unet_from_preset("tiny"), AB), vae)


# ================================================================ text-model files

@torch.no_grad()
def _outputs(denoiser):
    ids, mask = denoiser.net.text_encoder.tokenize(PROMPTS + [""])
    x = torch.randn(3, 4, 16, 16, generator=_gen(5))
    return denoiser(x, torch.tensor([0.3, 2.0, 8.0]), tokens=ids, token_mask=mask)


@pytest.mark.parametrize("kind", ["joint", "pooled", "causal"])
def test_text_model_round_trip(tmp_path, kind):
    denoiser = _text_denoiser(pooled=kind == "pooled", causal=kind == "causal")
    path = save_text_model(tmp_path / "m.safetensors", denoiser, card={"name": "m"})
    loaded = load_text_model(path)
    assert type(loaded.net.text_encoder) is type(denoiser.net.text_encoder)
    assert loaded.net.text_encoder.spec() == denoiser.net.text_encoder.spec()
    assert loaded.prediction == "v" and loaded.image_shape == (4, 16, 16) and not loaded.training
    assert torch.equal(loaded.alphas_cumprod, denoiser.alphas_cumprod)
    assert torch.equal(_outputs(loaded), _outputs(denoiser))
    assert json.loads((tmp_path / "m.json").read_text()) == {"name": "m"}


def _edit_spec(path, out, edit):
    tensors, meta = read_safetensors(path)
    if callable(edit):
        spec = json.loads(meta["spec"])
        edit(spec)
        meta["spec"] = json.dumps(spec)
    else:
        meta["spec"] = edit
    del meta["sha256"]
    write_safetensors(out, tensors, meta)
    return out


@pytest.mark.parametrize("name, edit", [
    ("not json", "{unet: "),
    ("no encoder", lambda s: s.pop("encoder")),
    ("unknown encoder kind", lambda s: s["encoder"].update(kind="bert")),
    ("encoder dim", lambda s: s["encoder"].update(dim=32)),
    ("encoder layers", lambda s: s["encoder"].update(layers=2)),
    ("one more word", lambda s: s["encoder"]["vocabulary"].append("hexagon")),
    ("pooled flag", lambda s: s["encoder"].update(pooled=True)),
    ("unet width", lambda s: s["unet"].update(base_channels=64)),
    ("unet field", lambda s: s["unet"].update(wings=2)),
])
def test_edited_spec_is_a_checkpoint_error(tmp_path, name, edit):
    path = save_text_model(tmp_path / "m.safetensors", _text_denoiser())
    edited = _edit_spec(path, tmp_path / "edited.safetensors", edit)
    with pytest.raises(CheckpointError, match="edited.safetensors: its spec or weights do not describe a text model"):
        load_text_model(edited)


def test_damaged_or_foreign_file_is_a_checkpoint_error(tmp_path):
    path = save_text_model(tmp_path / "m.safetensors", _text_denoiser())
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        load_text_model(tmp_path / "cut.safetensors")
    save_model(tmp_path / "plain.safetensors", Denoiser(unet_from_preset("tiny"), AB))
    with pytest.raises(CheckpointError, match="plain.safetensors"):
        load_text_model(tmp_path / "plain.safetensors")


@pytest.fixture
def weights_dir(tmp_path, vae):
    """A weights folder with the shipped autoencoder and latent model (linked) and a small text model."""
    for name in ("shapes64-vae", "shapes64-latent"):
        for suffix in (".safetensors", ".json"):
            os.symlink(WEIGHTS_DIR / f"{name}{suffix}", tmp_path / f"{name}{suffix}")
    path = save_text_model(tmp_path / "tiny-text.safetensors", _text_denoiser())
    vae_sha = pretrained.model_card("shapes64-vae")["sha256"]
    card = {"name": "tiny-text", "latent": {"vae": "shapes64-vae", "vae_sha256": vae_sha}, "sha256": file_sha256(path)}
    (tmp_path / "tiny-text.json").write_text(json.dumps(card))
    return tmp_path


def test_load_pipeline(weights_dir):
    assert pretrained.available(weights_dir=weights_dir) == ["shapes64-latent", "shapes64-vae", "tiny-text"]
    pipe = pretrained.load_pipeline("tiny-text", weights_dir=weights_dir)
    assert isinstance(pipe, TextToImagePipeline) and pipe.name == "tiny-text" and pipe.card["name"] == "tiny-text"
    assert torch.equal(_outputs(pipe.denoiser), _outputs(_text_denoiser()))
    assert isinstance(pretrained.load("tiny-text", weights_dir=weights_dir).net, TextConditionedNet)
    for name in ("shapes64-latent", "shapes64-vae"):
        with pytest.raises(ValueError, match=rf"'{name}' is not a text-to-image model; load it with "
                                             rf"load\('{name}'\). Text-to-image models: \['tiny-text'\]"):
            pretrained.load_pipeline(name, weights_dir=weights_dir)
    with pytest.raises(KeyError, match="unknown pretrained model 'nope'"):
        pretrained.load_pipeline("nope", weights_dir=weights_dir)
    with pytest.raises(ValueError, match="clip_x0 applies to pixel-space denoisers"):
        pretrained.load("tiny-text", weights_dir=weights_dir, clip_x0=True)


def test_wrong_name_error_survives_a_damaged_neighbour(weights_dir):
    """Asking for a non-text model gets the ValueError listing the text models, even when another file in the
    folder is damaged (that file's damage is reported when it is loaded, not when something else is asked for)."""
    (weights_dir / "broken.safetensors").write_bytes(b"not a safetensors file")
    assert "broken" in pretrained.available(weights_dir=weights_dir)  # listed, so that load("broken") can explain
    with pytest.raises(ValueError, match=r"Text-to-image models: \['tiny-text'\]"):
        pretrained.load_pipeline("shapes64-vae", weights_dir=weights_dir)


def test_load_pipeline_refuses_another_autoencoder(weights_dir):
    card = json.loads((weights_dir / "tiny-text.json").read_text())
    card["latent"]["vae_sha256"] = "0" * 64
    (weights_dir / "tiny-text.json").write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match="trained on the latents of another 'shapes64-vae'"):
        pretrained.load_pipeline("tiny-text", weights_dir=weights_dir)


# ================================================================ training helpers

def test_held_out_mask_is_about_pairs_in_either_slot():
    g = torch.Generator().manual_seed(0)
    attrs = torch.stack([sample_attrs(generator=g) for _ in range(3000)])
    expected = torch.tensor([_has_held_out_pair(caption(a)) for a in attrs])
    assert torch.equal(held_out_mask(attrs), expected)
    assert 0.05 < expected.float().mean() < 0.3  # both kinds are common in the sample
    pick = {t: parse_caption(t) for t in ("a small red square", "a large blue circle left of a small red circle",
                                          "a small red circle above a large blue square",
                                          "a small green circle below a large red triangle")}
    assert held_out_mask(torch.stack(list(pick.values()))).tolist() == [True, True, False, False]


def test_fine_tune_may_add_the_position_code_and_attention_levels_and_nothing_else(tmp_path):
    denoiser = _text_denoiser()
    path = save_text_model(tmp_path / "m.safetensors", denoiser)
    grown = build_text_net(TextTrainConfig(init=str(path), unet={"attn_levels": [0, 1, 2], "attn_pos": True}))
    assert grown.unet.config.attn_pos and not denoiser.net.unet.config.attn_pos
    assert grown.unet.config.attn_levels == (0, 1, 2)
    assert torch.equal(_outputs(Denoiser(grown.eval(), AB, "v")), _outputs(denoiser))  # it starts where it was
    assert not build_text_net(TextTrainConfig(init=str(path))).unet.config.attn_pos
    with pytest.raises(ValueError, match=r"attn_levels can only gain levels: the trained U-Net has \[1, 2\], "
                                         r"got \[2\]"):
        build_text_net(TextTrainConfig(init=str(path), unet={"attn_levels": [2]}))
    with pytest.raises(ValueError, match=r"can gain only \['attn_pos', 'attn_levels'\], "
                                         r"got changes to \['num_heads'\]"):
        build_text_net(TextTrainConfig(init=str(path), unet={"attn_levels": [1, 2], "num_heads": 2}))
    saved = save_text_model(tmp_path / "g.safetensors", Denoiser(grown.eval(), AB, "v", image_shape=(4, 16, 16)))
    spec = load_text_model(saved).net.unet.config  # the options travel in the file's spec
    assert spec.attn_pos and spec.attn_levels == (0, 1, 2)


def test_text_train_config_refuses_bad_values():
    with pytest.raises(ValueError, match="encoder must be one of \\['joint', 'pooled', 'clip'\\], got 'bert'"):
        TextTrainConfig(encoder="bert")
    for p in (-0.1, 1.1):
        with pytest.raises(ValueError, match="p_uncond must be in \\[0, 1\\]"):
            TextTrainConfig(p_uncond=p)
    with pytest.raises(ValueError, match="steps must be >= 0"):
        TextTrainConfig(steps=-1)
    with pytest.raises(ValueError, match="encoder='clip' needs a trained tiny CLIP"):
        build_text_net(TextTrainConfig(encoder="clip"))
    with pytest.raises(ValueError, match="lr_schedule must be one of \\['constant', 'cosine'\\], got 'linear'"):
        TextTrainConfig(lr_schedule="linear")
    for share in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="two_object_share must be None or in \\(0, 1\\)"):
            TextTrainConfig(two_object_share=share)


def test_two_object_share_sets_what_the_batches_hold(tmp_path, train_data, monkeypatch):
    """With ``two_object_share`` the trainer draws batches with that share of two-object captions (checked on the
    ids the loss sees), and the run still resumes from its checkpoint."""
    latents, captions = train_data
    seen = []
    real_dropout = text_module.caption_dropout

    def spy(ids, mask, p, **kw):
        seen.append(ids.clone())
        return real_dropout(ids, mask, p, **kw)
    monkeypatch.setattr(text_module, "caption_dropout", spy)
    monkeypatch.setattr(text_module, "sample_prompts_grid", lambda *a, **k: None)  # not what is tested here
    config = _config(steps=8, batch_size=48, ckpt_every=8, two_object_share=0.9)
    train_text(config, tmp_path / "run", latents=latents, captions=captions, device="cpu", progress=False)
    tokenizer = text_module.TransformerTextEncoder(dim=16, layers=1).tokenizer
    two_ids = {tuple(row.tolist()) for row, c in zip(tokenizer(captions)[0], captions) if len(c.split()) > 4}
    share = sum(tuple(r.tolist()) in two_ids for ids in seen for r in ids) / sum(len(ids) for ids in seen)
    data_share = len([c for c in captions if len(c.split()) > 4]) / len(captions)
    assert abs(share - 0.9) < 0.07 and abs(data_share - 0.9) > 0.2, (share, data_share)



def test_a_fine_tune_resumes_and_exports_whatever_its_init_file_holds_now(tmp_path, train_data, monkeypatch):
    """A run started from an init file keeps its own architecture when that file is later replaced (here by a model
    that has gained an attention level, as a newly shipped model may) or removed: resume and export read the
    checkpoint's spec, not the init file."""
    latents, captions = train_data
    monkeypatch.setattr(text_module, "sample_prompts_grid", lambda *a, **k: None)
    init = save_text_model(tmp_path / "init.safetensors", _text_denoiser())
    kw = {"latents": latents, "captions": captions, "device": "cpu", "progress": False}
    config = lambda steps: _config(steps=steps, init=str(init), unet={"attn_levels": [1, 2]})  # noqa: E731
    full = train_text(config(6), tmp_path / "full", **kw)
    train_text(config(3), tmp_path / "resumed", **kw)
    grown = build_text_net(TextTrainConfig(init=str(init), unet={"attn_levels": [0, 1, 2]}))
    save_text_model(init, Denoiser(grown.eval(), AB, "v", image_shape=(4, 16, 16)))  # the init file is replaced
    resumed = train_text(config(6), tmp_path / "resumed", resume=True, **kw)
    assert resumed["net"].unet.config.attn_levels == (1, 2)
    assert all(torch.equal(a, b) for a, b in zip(full["net"].state_dict().values(),
                                                  resumed["net"].state_dict().values()))
    init.unlink()  # and then removed
    exported, _ = ema_denoiser(tmp_path / "full")
    assert exported.net.unet.config.attn_levels == (1, 2)
    assert torch.equal(_outputs(exported), _outputs(Denoiser(full["ema_net"], AB, "v", image_shape=(4, 16, 16))))


# ================================================================ training: bit-exact resume

def _config(**overrides):
    return TextTrainConfig(**{"encoder_dim": 16, "encoder_layers": 1, "steps": 6, "batch_size": 8, "warmup": 2,
                              "ckpt_every": 3, "sample_every": 1000, "p_uncond": 0.25,
                              "unet": {"attn_levels": [1, 2], "base_channels": 16}, **overrides})


@pytest.fixture(scope="module")
def train_data():
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(64, 4, 16, 16, generator=g)
    return latents, [caption(sample_attrs(generator=g)) for _ in range(64)]


def _small_grid(net, alphas_cumprod, config, path, *, decode=None):
    """The run's real sample grid (EMA copy, CFG, 20 steps, PNG) for one prompt instead of 12 x 4: it is the
    slowest part of a 6-step run."""
    return _REAL_GRID(net, alphas_cumprod, config, path, decode=decode, prompts=text_module.SAMPLE_PROMPTS[:1],
                      n_per_prompt=1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, train_data):
    """6 steps in one go; 3 steps, then resumed to 6 in the same folder (ckpt_every=3)."""
    latents, captions = train_data
    root = tmp_path_factory.mktemp("text-runs")
    kw = {"latents": latents, "captions": captions, "device": "cpu", "progress": False}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(text_module, "sample_prompts_grid", _small_grid)
        full = train_text(_config(), root / "full", **kw)
        first = train_text(_config(steps=3), root / "resumed", **kw)
        first = {"losses": list(first["losses"]), "net": {k: v.clone() for k, v in first["net"].state_dict().items()}}
        resumed = train_text(_config(), root / "resumed", resume=True, **kw)
    return {"root": root, "full": full, "first": first, "resumed": resumed, "kw": kw}


def test_resume_is_bit_exact(runs):
    full, first, resumed = runs["full"], runs["first"], runs["resumed"]
    assert len(full["losses"]) == 6 and full["step"] == resumed["step"] == 6
    assert first["losses"] == full["losses"][:3]
    assert resumed["losses"] == full["losses"]  # the same floats, not close ones
    assert len(set(full["losses"])) == 6  # a real run: every step saw another batch
    for name, nets in (("net", (full["net"], resumed["net"])), ("ema", (full["ema_net"], resumed["ema_net"]))):
        a, b = (n.state_dict() for n in nets)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name} {k} differs after resume"
    moved = [k for k, v in first["net"].items() if not torch.equal(v, full["net"].state_dict()[k])]
    assert len(moved) > 10  # steps 4-6 changed the weights: "identical" above is not "untouched"


def test_run_folder_after_resume(runs):
    saved = checkpoint_config(runs["root"] / "resumed" / "checkpoint.safetensors")
    assert saved["step"] == 6
    assert [(s["start_step"], s["end_step"]) for s in saved["sessions"]] == [(0, 3), (3, 6)]
    assert saved["encoder"]["kind"] == "transformer" and saved["train"]["steps"] == 6
    for run in ("full", "resumed"):
        assert (runs["root"] / run / "samples" / "step_0000006.png").is_file()


def test_resume_refuses_a_changed_config(runs, train_data):
    with pytest.raises(ValueError, match=r"cannot resume .*config differs.*'lr': \(0.001, 0.002\)"):
        train_text(_config(lr=2e-3, steps=7), runs["root"] / "resumed", resume=True, **runs["kw"])
    with pytest.raises(ValueError, match="p_uncond"):
        train_text(_config(p_uncond=0.5, steps=7), runs["root"] / "resumed", resume=True, **runs["kw"])


def test_cosine_lr_schedule_decays_to_zero_at_the_last_step():
    rates = {}
    for schedule in ("constant", "cosine"):
        run = text_module._setup(_config(lr_schedule=schedule, steps=10, warmup=2), torch.device("cpu"), None)
        rates[schedule] = []
        for _ in range(10):
            rates[schedule].append(run["optimizer"].param_groups[0]["lr"])
            run["optimizer"].step()
            run["scheduler"].step()
        rates[schedule].append(run["optimizer"].param_groups[0]["lr"])
    assert rates["constant"][2:] == [1e-3] * 9
    assert rates["cosine"][:3] == pytest.approx([5e-4, 1e-3, 1e-3]) and rates["cosine"][-1] == pytest.approx(0.0)
    assert all(a > b for a, b in zip(rates["cosine"][2:], rates["cosine"][3:]))  # strictly down after warmup


def test_resume_reads_an_older_checkpoint_without_lr_schedule(runs, tmp_path):
    """A checkpoint written before ``lr_schedule`` existed resumes as the default ("constant")."""
    tensors, meta = read_safetensors(runs["root"] / "full" / "checkpoint.safetensors")
    config = json.loads(meta["config"])
    del config["train"]["lr_schedule"]
    meta["config"] = json.dumps(config)
    meta.pop("sha256", None)
    run_dir = tmp_path / "old"
    run_dir.mkdir()
    write_safetensors(run_dir / "checkpoint.safetensors", tensors, meta)
    out = train_text(_config(steps=7), run_dir, resume=True, **runs["kw"])
    assert out["step"] == 7 and len(out["losses"]) == 7


def test_train_text_refuses_mismatched_data(tmp_path, train_data):
    latents, captions = train_data
    with pytest.raises(ValueError, match="non-empty and of one length, got 64 and 63"):
        train_text(_config(), tmp_path, latents=latents, captions=captions[:63], device="cpu", progress=False)


# ================================================================ tiny CLIP

SMALL_CLIP = CLIPConfig(dim=16, layers=1, heads=2, embed_dim=16, widths=(8, 8, 16, 16))


def _mirror(a):
    """The same picture described from the other object: swap the objects and reverse the relation."""
    return torch.cat([a[3:6], a[0:3], torch.tensor([{0: 1, 1: 0, 2: 3, 3: 2}[int(a[6])]])])


def test_hard_negative_changes_exactly_one_thing():
    g = torch.Generator().manual_seed(0)
    kinds = set()
    for _ in range(600):
        a = sample_attrs(generator=g)
        neg = hard_negative(a, generator=g)
        b = parse_caption(neg)
        assert neg != caption(a)
        diff = (a != b).nonzero().flatten().tolist()
        if len(diff) == 1:
            kinds.add("relation" if diff[0] == 6 else ("shape", "color", "size")[diff[0] % 3])
        else:
            k = diff[0]
            assert diff == [k, k + 3] and k in (0, 1) and b[k] == a[k + 3] and b[k + 3] == a[k], (caption(a), neg)
            kinds.add(("swap_shape", "swap_color")[k])
        if a[3] < 0:
            assert (b[3:] == -1).all()
    assert kinds == {"shape", "color", "size", "relation", "swap_shape", "swap_color"}


def test_hard_negatives_of_the_shipped_clip_recipe_hold_no_held_out_pair(monkeypatch, tmp_path):
    """Without ``exclude`` about 8% of the negatives of held-out-free scenes hold a held-out pair ("a large red
    square" as the wrong caption of a blue square); with it, none does, and the negative is still one change away."""
    def held(b):
        return bool(held_out_mask(torch.as_tensor(b)[None]))
    g = torch.Generator().manual_seed(0)
    scenes = [a for a in (sample_attrs(generator=g) for _ in range(1500)) if not held(a)]
    plain = [held(parse_caption(hard_negative(a, generator=g))) for a in scenes]
    kept = [parse_caption(hard_negative(a, generator=g, exclude=held)) for a in scenes]
    assert sum(plain) > 0.03 * len(scenes) and not any(held(b) for b in kept)
    assert all((a != b).sum() in (1, 2) for a, b in zip(scenes, kept))
    seen = {}
    monkeypatch.setattr(clip_module, "train_clip", lambda images, attrs, **kw: seen.update(kw) or TinyCLIP(SMALL_CLIP))
    monkeypatch.setattr(clip_module, "save_clip", lambda out, model: out)
    monkeypatch.setattr(clip_module, "evaluate_clip", lambda model: {})
    monkeypatch.setattr(clip_module, "file_sha256", lambda out: "")
    two_scenes = (torch.zeros(2, 3, 64, 64), None, torch.tensor([[1, 2, 0, -1, -1, -1, -1], [0, 1, 0, -1, -1, -1, -1]]))
    dataset = type("Scenes", (), {"tensors": lambda self: two_scenes})
    monkeypatch.setattr(clip_module, "ShapesDataset", lambda n, **kw: dataset())
    clip_module.train_shapes_clip(tmp_path / "clip.safetensors", steps=1, n=2)
    red_square = torch.tensor([SHAPES.index("square"), COLORS.index("red"), 0, -1, -1, -1, -1])
    assert HELD_OUT[0] == ("red", "square") and seen["exclude_negative"](red_square)
    assert not seen["exclude_negative"](torch.tensor([SHAPES.index("square"), COLORS.index("blue"), 0, -1, -1, -1, -1]))


def test_hard_negative_is_false_of_the_image():
    """Two identical objects: "X above X" and "X below X" describe the same pictures, so the reversed relation
    is no negative at all (every swap of identical objects is rejected as the same caption; this is the one
    change that is textually different but true)."""
    a = parse_caption("a small red circle above a small red circle")
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        b = parse_caption(hard_negative(a, generator=g))
        assert not torch.equal(b, _mirror(a)), f"hard negative {caption(b)!r} is true of {caption(a)!r}'s images"


def _clip_batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    attrs = [torch.tensor([s, c, z, -1, -1, -1, -1]) for s, c, z in [(0, 0, 1), (1, 2, 0), (2, 1, 1), (3, 3, 0),
                                                                     (4, 4, 1), (0, 5, 0), (1, 0, 1), (2, 2, 0)][:n]]
    return torch.stack([render(a, 32, generator=g) for a in attrs]), [caption(a) for a in attrs]


def test_clip_loss_formula_gradients_and_learning():
    torch.manual_seed(0)
    model = TinyCLIP(SMALL_CLIP)
    images, caps = _clip_batch()
    negs = [hard_negative(parse_caption(c), generator=torch.Generator().manual_seed(k)) for k, c in enumerate(caps)]
    loss = clip_loss(model, images, caps, negs)
    f, g = model.image_embed(images), model.text_embed(caps + negs)
    logits = model.logit_scale.exp() * f @ g.T  # (8, 16): image -> [captions; negatives]
    i2t = (torch.logsumexp(logits, 1) - logits.diagonal()).mean()
    t2i = (torch.logsumexp(logits[:, :8], 0) - logits.diagonal()).mean()  # text -> images: captions only
    torch.testing.assert_close(loss, (i2t + t2i) / 2)
    loss.backward()
    for part in (model.cnn, model.image_proj, model.text, model.text_proj):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(25):
        opt.zero_grad()
        clip_loss(model, images, caps).backward()
        opt.step()
    with torch.no_grad():
        matched, shuffled = clip_loss(model, images, caps), clip_loss(model, images, caps[1:] + caps[:1])
    assert matched < math.log(8) - 0.5 and shuffled > matched + 2.0, (float(matched), float(shuffled))


def test_clip_save_load_score_and_text_tower(tmp_path):
    torch.manual_seed(0)
    model = TinyCLIP(SMALL_CLIP).eval()
    images, caps = _clip_batch(4)
    loaded = load_clip(save_clip(tmp_path / "clip.safetensors", model, card={"name": "clip"}))
    assert loaded.config == model.config and (tmp_path / "clip.json").is_file()
    with torch.no_grad():
        assert torch.equal(loaded.image_embed(images), model.image_embed(images))
        assert torch.equal(loaded.text_embed(caps), model.text_embed(caps))
        cos = (model.image_embed(images) * model.text_embed(caps)).sum(-1)
    score = clip_score(loaded, images, caps)
    assert score.shape == (4,) and (score >= 0).all() and (score <= 100).all()
    torch.testing.assert_close(score, 100 * cos.clamp(min=0))
    with pytest.raises(ValueError, match="one prompt per image, got 4 images and 3 prompts"):
        clip_score(model, images, caps[:3])
    with pytest.raises(FileNotFoundError, match="no tiny CLIP"):
        load_clip(tmp_path / "missing.safetensors")
    tower = model.text_encoder()
    assert not tower.training and not any(p.requires_grad for p in tower.parameters()) and tower.blocks[0].causal
    ids, mask = tower.tokenize(caps)
    with torch.no_grad():
        assert torch.equal(tower(ids, mask)[0], model.text(ids, mask)[0])
    tower.token_emb.weight.data.zero_()
    assert model.text.token_emb.weight.abs().sum() > 0  # a copy, not the CLIP's own tower


def test_encoder_init_clip_starts_the_joint_encoder_from_the_clip_tower_and_trains_it(tmp_path, train_data,
                                                                                       monkeypatch):
    """encoder_init='clip': the joint encoder's first weights are the tiny CLIP's text tower (a copy), and
    training moves them, unlike encoder='clip' (frozen); the CLIP itself is untouched. encoder_lr_scale gives the
    encoder its own AdamW group at lr * scale."""
    torch.manual_seed(0)
    clip = TinyCLIP(SMALL_CLIP).eval()
    before = {k: v.clone() for k, v in clip.text.state_dict().items()}
    config = _config(encoder_init="clip", steps=3, ckpt_every=3)
    net = build_text_net(config, clip=clip)
    assert all(p.requires_grad for p in net.text_encoder.parameters())
    assert all(torch.equal(v, before[k]) for k, v in net.text_encoder.state_dict().items())
    monkeypatch.setattr(text_module, "sample_prompts_grid", _small_grid)
    latents, captions = train_data
    run = train_text(config, tmp_path / "run", latents=latents, captions=captions, clip=clip, device="cpu",
                     progress=False)
    trained = run["net"].text_encoder.state_dict()
    assert not torch.equal(trained["token_emb.weight"], before["token_emb.weight"])
    assert all(torch.equal(v, before[k]) for k, v in clip.text.state_dict().items())
    assert run["net"].text_encoder.spec()["causal"]  # saved (and reloaded) as the CLIP tower's causal shape
    scaled = _setup(replace(config, encoder_lr_scale=0.1), "cpu", clip)
    lrs = {id(p): g["initial_lr"] for g in scaled["optimizer"].param_groups for p in g["params"]}
    encoder = {id(p) for p in scaled["net"].text_encoder.parameters()}
    assert len(lrs) == sum(1 for p in scaled["net"].parameters() if p.requires_grad)
    assert {lr for i, lr in lrs.items() if i in encoder} == {0.1 * config.lr}
    assert {lr for i, lr in lrs.items() if i not in encoder} == {config.lr}
    with pytest.raises(ValueError, match="encoder_lr_scale must be > 0, got 0"):
        TextTrainConfig(encoder_lr_scale=0)
    with pytest.raises(ValueError, match="encoder_init must be one of \\[None, 'clip'\\].*got encoder_init='bert'"):
        TextTrainConfig(encoder_init="bert")
    with pytest.raises(ValueError, match="needs encoder='joint' and init=None; got encoder_init='clip' with enc"):
        TextTrainConfig(encoder="pooled", encoder_init="clip")
    with pytest.raises(ValueError, match="encoder_init='clip' needs a trained tiny CLIP"):
        build_text_net(config)


def test_cli_loads_the_clip_it_is_given_for_encoder_init(tmp_path, capsys):
    """--clip names the tiny CLIP that --encoder-init clip starts from (the shipped budget model's is not the
    shipped shapes-clip); a missing one is a one-line error before any latents are made."""
    missing = tmp_path / "fixed.safetensors"
    with pytest.raises(SystemExit) as e:
        text_module.main(["train", "--out", str(tmp_path / "run"), "--encoder-init", "clip", "--clip", str(missing)])
    assert e.value.code == 2 and f"no tiny CLIP at {missing}" in capsys.readouterr().err


# ================================================================ the judge

@pytest.fixture(scope="module")
def classifier():
    from minidiff.eval.classifiers import load_classifier
    return load_classifier("shapes")


def test_prompt_attrs_splits_are_what_they_say():
    from minidiff.eval.text import prompt_attrs
    for objects in (1, 2):
        for split in ("seen", "held_out"):
            attrs = prompt_attrs(30, objects=objects, split=split, seed=3)
            assert attrs.shape == (30, 7)
            assert ((attrs[:, 3] >= 0) == (objects == 2)).all()
            assert all(_has_held_out_pair(caption(a)) == (split == "held_out") for a in attrs)
    assert torch.equal(attrs, prompt_attrs(30, objects=2, split="held_out", seed=3))  # a seed, a set
    assert not torch.equal(attrs, prompt_attrs(30, objects=2, split="held_out", seed=4))
    with pytest.raises(ValueError, match="objects must be 1 or 2 and split 'seen' or 'held_out'"):
        prompt_attrs(5, objects=3, split="seen")


def test_judge_passes_real_images_and_fails_a_wrong_colour(classifier):
    from minidiff.eval.text import judge, prompt_attrs, real_images, summarize
    attrs = prompt_attrs(40, objects=1, split="seen", seed=0)
    real = summarize(judge(real_images(attrs), attrs, classifier))
    assert set(real) == {"shape", "color", "size", "relation", "all"}
    assert real["all"] > 0.8
    wrong = attrs.clone()
    wrong[:, 1] = (wrong[:, 1] + 1 + torch.arange(40) % 5) % len(COLORS)  # every colour replaced by another
    assert (wrong[:, 1] != attrs[:, 1]).all()
    result = judge(real_images(wrong), attrs, classifier)
    scores = summarize(result)
    assert scores["color"] < 0.2 and scores["all"] <= scores["color"]
    assert scores["shape"] > 0.8 and scores["size"] > 0.8  # only the colour is judged wrong
    assert result["all"].dtype == torch.bool and result["all"].shape == (40,)
    with pytest.raises(ValueError, match="one attrs row per image, got 40 images and 39 attrs"):
        judge(real_images(attrs), attrs[:39], classifier)
