"""Editing: image-to-image, inpainting (training-free and the dedicated model), RePaint, outpainting, masks.

The behavioural tests run the shipped text model (a few steps, four scenes) because what they check, that the
unedited part of a picture survives, only means something for a trained model; the rules (strength, masks,
errors, exactness of the wrappers) are checked on small inputs and against diffusers where it has the rule.
"""
import types

import pytest
import torch

from minidiff import pretrained
from minidiff.data.shapes import caption
from minidiff.eval.text import prompt_attrs, real_images
from minidiff.forward import q_sample_sigma
from minidiff.inpainting import InpaintDenoiser, check_mask, img2img_start, img2img_start_latents, latent_mask
from minidiff.models.inpainting_net import (InpaintingNet, inpainting_condition, random_latent_masks,
                                            widen_for_inpainting)
from minidiff.pipelines import TextToImagePipeline
from minidiff.pipelines.editing import outpaint_canvas
from minidiff.samplers import sample_ddpm, sample_repaint
from minidiff.schedules import sampling_sigmas
from minidiff.training.checkpoint import load_text_model, save_text_model

KW = {"steps": 8, "progress": False}


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def pipe():
    return pretrained.load_pipeline("shapes64-text")


@pytest.fixture(scope="module")
def scenes():
    attrs = prompt_attrs(4, objects=2, split="seen", seed=11)
    return real_images(attrs, seed=11), [caption(a) for a in attrs]


@pytest.fixture(scope="module")
def round_trip(pipe, scenes):
    images, _ = scenes
    return pipe.vae.decode_latents(pipe.vae.encode_latents(images)).clamp(-1, 1)


def _box_mask(n=4, top=16, left=16, size=32):
    m = torch.zeros(n, 1, 64, 64)
    m[:, :, top:top + size, left:left + size] = 1
    return m


# ================================================================ image to image

@pytest.mark.parametrize("steps", [1, 7, 20, 50])
def test_start_index_is_diffusers_rule(steps):
    from diffusers import StableDiffusionImg2ImgPipeline
    for strength in [0.0, 0.05, 0.2, 0.33, 0.5, 0.75, 0.99, 1.0]:
        fake = types.SimpleNamespace(scheduler=types.SimpleNamespace(timesteps=torch.arange(steps).flip(0), order=1))
        timesteps, n = StableDiffusionImg2ImgPipeline.get_timesteps(fake, steps, strength, "cpu")
        assert img2img_start(steps, strength) == steps - n == steps - len(timesteps)


@pytest.mark.parametrize("strength", [-0.1, 1.5, float("nan"), True, "0.5", None])
def test_bad_strength_is_named(pipe, scenes, strength):
    with pytest.raises(ValueError, match="strength must be a number in \\[0, 1\\]"):
        pipe.image_to_image(scenes[1], scenes[0], strength=strength, **KW)


def test_strength_0_is_the_round_trip_and_1_is_text_to_image(pipe, scenes, round_trip):
    images, prompts = scenes
    assert torch.equal(pipe.image_to_image(prompts, images, strength=0.0, generator=_gen(), **KW), round_trip)
    one = pipe.image_to_image(prompts, images, strength=1.0, generator=_gen(3), **KW)
    assert torch.equal(one, pipe.text_to_image(prompts, generator=_gen(3), **KW))


def test_one_image_many_prompts_and_too_few_steps(pipe, scenes):
    image = scenes[0][:1]
    prompts = ["a large red circle", "a small blue square", "a large white cross"]
    out = pipe.image_to_image(prompts, image, strength=0.5, generator=_gen(), **KW)
    assert out.shape == (3, 3, 64, 64) and not torch.equal(out[0], out[1])
    mask = _box_mask(1)
    assert pipe.inpaint(prompts, image, mask, generator=_gen(), **KW).shape == (3, 3, 64, 64)
    with pytest.raises(ValueError, match="0 sampling steps"):
        pipe.image_to_image(prompts[0], image, strength=0.1, steps=8, progress=False)


def test_one_prompt_with_a_negative_prompt_per_image(pipe, scenes):
    images, prompts = scenes
    out = pipe.image_to_image(prompts[0], images, negative_prompt=prompts, strength=0.5, generator=_gen(), **KW)
    assert out.shape == images.shape


def test_judging_slots_follows_the_judges_object_order():
    """The unedited input judged against the edited caption: the edited object is wrong, the kept one right,
    whatever the relation (the judge reads "A below B" as "B above A")."""
    from minidiff.eval.classifiers import load_classifier
    from minidiff.eval.editing import object_correct, replace_scenes
    from minidiff.eval.text import judge
    scenes = replace_scenes(80, seed=5)
    result = judge(scenes["images"], scenes["target"], load_classifier("shapes"))
    edited = object_correct(result, scenes["target"], scenes["slot"], heads=("shape", "color"))
    kept = object_correct(result, scenes["target"], 1 - scenes["slot"])
    swapped = (scenes["target"][:, 6] == 1) | (scenes["target"][:, 6] == 3)
    assert 0 < swapped.sum() < 80
    assert edited.double().mean() < 0.1 and kept.double().mean() > 0.85
    assert kept[swapped].double().mean() > 0.85 and kept[~swapped].double().mean() > 0.85


def test_more_strength_changes_more(pipe, scenes, round_trip):
    images, _ = scenes
    prompts = ["a large white cross"] * len(images)  # a prompt unlike every scene: the edit must move away
    change = [(pipe.image_to_image(prompts, images, strength=s, generator=_gen(1), **KW) - round_trip).abs().mean()
              for s in (0.25, 0.5, 0.75, 1.0)]
    assert all(a < b for a, b in zip(change, change[1:])), change


def test_start_latents_noise_the_input_at_the_start_level():
    z0, sigmas = torch.randn(2, 4, 4, 4), torch.tensor([80.0, 10.0, 2.0, 0.5, 0.0])
    x, tail = img2img_start_latents(z0, sigmas, 0.5, generator=_gen(5))
    noise = torch.randn(z0.shape, generator=_gen(5))
    assert torch.equal(tail, sigmas[2:])
    torch.testing.assert_close(x, q_sample_sigma(z0, torch.full((2,), 2.0), noise))


# ================================================================ masks

def test_mask_rule_any_pixel_marks_its_cell():
    m = torch.zeros(1, 1, 64, 64)
    m[0, 0, 5, 9] = 1.0  # one pixel: latent cell (1, 2) at factor 4
    lat = latent_mask(check_mask(m, 1, (64, 64)), (16, 16))
    assert lat.shape == (1, 1, 16, 16) and lat.sum() == 1 and lat[0, 0, 1, 2] == 1


def test_mask_forms_and_soft_values():
    hw = torch.zeros(64, 64, dtype=torch.bool)
    hw[:8, :8] = True
    as_2d, as_4d = check_mask(hw, 3, (64, 64)), check_mask(hw[None, None].float().expand(3, 1, 64, 64), 3, (64, 64))
    assert as_2d.shape == (3, 1, 64, 64) and torch.equal(as_2d, as_4d)
    soft = torch.full((1, 1, 64, 64), 0.49)
    soft[..., 0, 0] = 0.5
    assert check_mask(soft, 1, (64, 64)).sum() == 1  # binarised at 0.5


@pytest.mark.parametrize("mask, message", [
    (torch.zeros(4, 64, 64), "shape"), (torch.zeros(4, 3, 64, 64), "shape"), (torch.zeros(4, 1, 32, 32), "shape"),
    (torch.zeros(2, 1, 64, 64), "shape"), (torch.zeros(1, 1, 64, 64, dtype=torch.int64), "dtype"),
    (torch.full((64, 64), 2.0), "\\[0, 1\\]"), (torch.full((64, 64), -0.5), "\\[0, 1\\]"),
    (torch.full((64, 64), float("nan")), "\\[0, 1\\]"), ([[0, 1]], "tensor"), (torch.zeros(32, 32), "shape")])
def test_bad_masks_are_named(pipe, scenes, mask, message):
    with pytest.raises(ValueError, match=f"mask .*{message}"):
        pipe.inpaint(scenes[1], scenes[0], mask, **KW)


def test_all_zero_mask_is_a_no_op_and_says_so(pipe, scenes, round_trip):
    with pytest.warns(UserWarning, match="mask selects no pixel .*round trip"):
        out = pipe.inpaint(scenes[1], scenes[0], torch.zeros(64, 64), generator=_gen(), **KW)
    assert torch.equal(out, round_trip)
    with pytest.warns(UserWarning, match="mask selects no pixel"):  # a soft 0.3 mask binarises to nothing
        pipe.inpaint(scenes[1], scenes[0], torch.full((64, 64), 0.3), generator=_gen(), steps=1, progress=False)


def test_bad_images_and_prompt_counts_are_named(pipe, scenes):
    images, prompts = scenes
    with pytest.raises(ValueError, match="batch axis.*images\\[None\\]"):
        pipe.image_to_image(prompts[0], images[0], **KW)
    with pytest.raises(ValueError, match="images must lie in \\[-1, 1\\]"):
        pipe.image_to_image(prompts, images * 3, **KW)
    with pytest.raises(ValueError, match="multiples of 4"):
        pipe.image_to_image(prompts, images[..., :62], **KW)
    with pytest.raises(ValueError, match="float tensor"):
        pipe.inpaint(prompts, (images > 0).long(), _box_mask(), **KW)
    with pytest.raises(ValueError, match="one per image \\(4\\), got 2"):
        pipe.inpaint(prompts[:2], images, _box_mask(), **KW)
    with pytest.raises(ValueError, match="8-bit pixels: x.float\\(\\) / 127.5 - 1"):
        pipe.image_to_image(prompts, ((images + 1) * 127.5).to(torch.uint8), **KW)
    with pytest.raises(ValueError, match="numpy array: torch.from_numpy"):
        pipe.image_to_image(prompts, images.numpy(), **KW)
    with pytest.raises(ValueError, match="keep_unmasked must be True or False, got 'no'"):
        pipe.inpaint(prompts, images, _box_mask(), keep_unmasked="no", **KW)


def test_images_in_0_1_are_warned_about(pipe, scenes):
    images, prompts = scenes
    with pytest.warns(UserWarning, match="no value below 0.*images \\* 2 - 1"):
        pipe.image_to_image(prompts[:1], (images[:1] + 1) / 2, strength=0.0, steps=1, progress=False)


@pytest.mark.parametrize("method, options, match", [
    ("image_to_image", {"stength": 0.5}, "image_to_image\\(\\) got an unknown option 'stength' \\(did you mean "
                                         "'strength'\\?\\); its options: strength, output, negative_prompt"),
    ("inpaint", {"strength": 0.5}, "inpaint\\(\\) got an unknown option 'strength'; its options: output, jumps, keep_unmasked"),
    ("outpaint", {"mask": None}, "outpaint\\(\\) got an unknown option 'mask'"),
    ("outpaint", {"gudance": 3.0}, "did you mean 'guidance'"),
])
def test_unknown_editing_options_are_named(pipe, scenes, method, options, match):
    images, prompts = scenes
    args = {"image_to_image": (prompts, images), "inpaint": (prompts, images, _box_mask()),
            "outpaint": (prompts, images)}[method]
    extra = {"right": 8} if method == "outpaint" else {}
    with pytest.raises(ValueError, match=match):
        getattr(pipe, method)(*args, **extra, **options, **KW)


# ================================================================ training-free inpainting

class _Spy(torch.nn.Module):
    """A denoiser that records its input and returns a fixed guess."""

    def forward(self, x, sigma, **cond):
        self.seen = x.clone()
        return torch.full_like(x, 0.3)


def test_wrapper_feeds_the_noised_original_and_returns_z0_outside():
    z0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    m = torch.zeros(2, 1, 8, 8)
    m[:, :, 2:5, 3:7] = 1
    spy, x, sigma = _Spy(), torch.randn(2, 4, 8, 8), torch.full((2,), 3.0)
    out = InpaintDenoiser(spy, z0, m, noise)(x, sigma)
    known = q_sample_sigma(z0, sigma, noise)
    assert torch.equal(spy.seen, m * x + (1 - m) * known)
    assert torch.equal(out, m * 0.3 + (1 - m) * z0)


def test_training_free_keeps_the_unmasked_part(pipe, scenes, round_trip):
    images, prompts = scenes
    mask = _box_mask()
    z = pipe.inpaint(prompts, images, mask, generator=_gen(2), output="latents", keep_unmasked=False, **KW)
    z0 = pipe.vae.encode_latents(images)
    lat = latent_mask(mask, (16, 16)).expand_as(z)
    assert torch.equal(z[lat == 0], z0[lat == 0])  # exactly z0 in every kept latent cell, from the wrapper alone
    out = pipe.vae.decode_latents(z)
    keep = (mask == 0).expand_as(out)
    err, floor = (out - images).abs()[keep].mean().item(), (round_trip - images).abs()[keep].mean().item()
    assert err <= floor + 0.01, (err, floor)  # only the decoder's reach across the mask edge adds error
    inside = (mask == 1).expand_as(out)
    assert (out - round_trip).abs()[inside].mean() > 0.02  # and the masked part was regenerated


def test_repaint_with_one_jump_is_ddpm_and_costs_jumps_times_more():
    calls = []

    def denoiser(x, sigma, **cond):
        calls.append(1)
        return torch.tanh(x) * 0.5
    sigmas, x = torch.tensor([20.0, 5.0, 1.0, 0.2, 0.0]), torch.randn(2, 3, 4, 4)
    assert torch.equal(sample_repaint(denoiser, x, sigmas, generator=_gen(4), jumps=1),
                       sample_ddpm(denoiser, x, sigmas, generator=_gen(4)))
    calls.clear()
    sample_repaint(denoiser, x, sigmas, generator=_gen(4), jumps=3)
    assert len(calls) == 3 * 3 + 1  # the last step, to sigma = 0, is taken once
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="jumps must be an int >= 1"):
            sample_repaint(denoiser, x, sigmas, jumps=bad)


def test_repaint_jump_back_has_the_forward_marginal():
    """Going back up from sigma_next to sigma with sample_repaint's rule gives x ~ a x0 + b eps at sigma."""
    sigmas = torch.tensor([4.0, 1.0, 0.0])
    x0 = torch.full((20000, 1, 1, 1), 0.7)

    def denoiser(x, sigma, **cond):
        return torch.full_like(x, 0.7)
    seen = []
    x_start = q_sample_sigma(x0, torch.full((20000,), 4.0), torch.randn(x0.shape, generator=_gen(9)))
    sample_repaint(denoiser, x_start, sigmas, generator=_gen(8), jumps=2,
                   callback=lambda info: seen.append(info["x"].clone()) if info["i"] == 0 else None)
    a, b = 1 / (1 + 16) ** 0.5, 4 / (1 + 16) ** 0.5
    back = seen[1]  # the second try at level 0: after the jump back
    assert abs(back.mean().item() - a * 0.7) < 0.02 and abs(back.std().item() - b) < 0.02


def test_repaint_jump_back_continues_from_the_step_it_undoes():
    """The jump back is q(x_i | x_next): it scales x_next by a_i / a_next and adds independent noise, so
    cov(x_i, x_next) = (a_i / a_next) var(x_next) (a re-noised x0_hat, or a fresh draw, would have cov 0)."""
    sigmas, n = torch.tensor([4.0, 1.0, 0.0]), 20000
    states = []

    def denoiser(x, sigma, **cond):
        states.append(x.clone())
        return torch.zeros_like(x)  # x_next then depends on x only through the DDPM mean and fresh noise
    x_start = torch.randn(n, 1, 1, 1, generator=_gen(3)) * 2.0
    sample_repaint(denoiser, x_start, sigmas, generator=_gen(8), jumps=2)
    a0, a1 = 1 / (1 + 16) ** 0.5, 1 / (1 + 1) ** 0.5
    first, back = states[0].flatten(), states[1].flatten()  # x at level 0, and x at level 0 after the jump back
    # x_next = m * first + noise, with the DDPM posterior mean coefficient m for x0_hat = 0
    alpha = (a0 / a1) ** 2
    m = alpha**0.5 * (1 / (1 + 1)) / (16 / (1 + 16))  # sqrt(alpha) b_next^2 / b^2
    expected = (a0 / a1) * m * first.var()
    assert abs(torch.cov(torch.stack([back, first]))[0, 1] - expected) < 0.03 * first.var()


def test_inpaint_with_repaint_runs_and_keeps_the_outside(pipe, scenes):
    images, prompts = scenes
    z = pipe.inpaint(prompts, images, _box_mask(), jumps=2, generator=_gen(), output="latents", steps=4,
                     keep_unmasked=False, progress=False)
    lat = latent_mask(_box_mask(), (16, 16)).expand_as(z)
    assert torch.equal(z[lat == 0], pipe.vae.encode_latents(images)[lat == 0])


# ================================================================ outpainting

def test_outpaint_extends_the_canvas_and_keeps_the_input(pipe, scenes, round_trip):
    images, prompts = scenes
    wide = pipe.outpaint(prompts, images, right=32, generator=_gen(), **KW)
    assert wide.shape == (4, 3, 64, 96)
    left = wide[..., :60] - round_trip[..., :60]  # away from the seam (one latent cell) the input is kept
    assert left.abs().mean() < 0.01
    tall = pipe.outpaint(prompts, images, top=16, bottom=16, generator=_gen(), **KW)
    assert tall.shape == (4, 3, 96, 64)


@pytest.mark.parametrize("margins", [{}, {"right": 30}, {"left": -4}, {"top": 2.0}])
def test_bad_outpaint_margins_are_named(margins):
    with pytest.raises(ValueError, match="margin"):
        outpaint_canvas(torch.zeros(1, 4, 16, 16), **margins)


# ================================================================ the dedicated inpainting model

def test_widened_net_computes_the_text_model_before_fine_tuning(pipe):
    net = pipe.denoiser.net
    wide = widen_for_inpainting(net).eval()
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([30.0, 700.0])
    ids, mask = net.text_encoder.tokenizer(["a small red circle", "a large blue square"])
    cond = inpainting_condition(torch.randn(2, 4, 16, 16), (torch.rand(2, 1, 16, 16) > 0.5).float())
    with torch.no_grad():
        assert torch.equal(wide(x, t, tokens=ids, token_mask=mask, **cond), net(x, t, tokens=ids, token_mask=mask))
    with pytest.raises(ValueError, match="already widened"):
        widen_for_inpainting(wide)


def test_training_masks():
    m = random_latent_masks(2000, (16, 16), generator=_gen(1))
    assert set(m.unique().tolist()) <= {0.0, 1.0} and (m.flatten(1).sum(1) > 0).all()
    full = (m.flatten(1).mean(1) == 1).float().mean().item()
    assert abs(full - 0.1) < 0.03  # p_full = 0.1
    assert torch.equal(m[:50], random_latent_masks(2000, (16, 16), generator=_gen(1))[:50])


def test_inpainting_model_file_round_trip_and_pipeline(pipe, tmp_path, scenes):
    wide = widen_for_inpainting(pipe.denoiser.net)
    torch.nn.init.normal_(wide.unet.conv_in.weight, std=0.05)  # the mask channels now matter
    denoiser = type(pipe.denoiser)(wide, pipe.denoiser.alphas_cumprod, "v", image_shape=(4, 16, 16)).eval()
    path = save_text_model(tmp_path / "inp.safetensors", denoiser)
    loaded = load_text_model(path)
    assert isinstance(loaded.net, InpaintingNet)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), denoiser.state_dict().values()))
    inp = TextToImagePipeline(loaded, pipe.vae)
    images, prompts = scenes
    assert inp.text_to_image(prompts, generator=_gen(), **KW).shape == (4, 3, 64, 64)
    z = inp.inpaint(prompts, images, _box_mask(), generator=_gen(), output="latents", **KW)
    lat = latent_mask(_box_mask(), (16, 16)).expand_as(z)
    assert torch.equal(z[lat == 0], pipe.vae.encode_latents(images)[lat == 0])  # keep_unmasked
    with pytest.raises(ValueError, match="image_to_image needs the text model"):
        inp.image_to_image(prompts, images, **KW)


def test_sampling_sigmas_tail_is_what_img2img_runs(pipe):
    sigmas = sampling_sigmas(pipe.denoiser.alphas_cumprod, 10, "trailing")
    _, tail = img2img_start_latents(torch.zeros(1, 4, 2, 2), sigmas, 0.3)
    assert len(tail) - 1 == 3 and tail[-1] == 0


def test_inpainting_fine_tune_starts_from_the_text_model_and_exports_a_card(tmp_path):
    import json

    from minidiff.files import WEIGHTS_DIR, file_sha256
    from minidiff.training.text import TextTrainConfig, train_text
    from minidiff.training.text_export import export_inpainting_model

    base = WEIGHTS_DIR / "shapes64-text.safetensors"
    config = TextTrainConfig(steps=2, batch_size=4, warmup=1, lr=1e-4, inpainting=True, init=str(base), ckpt_every=2,
                             sample_every=10**6)
    result = train_text(config, tmp_path / "run", latents=torch.randn(16, 4, 16, 16, generator=_gen(0)),
                        captions=["a small red circle"] * 16, progress=False)
    assert isinstance(result["net"], InpaintingNet) and result["net"].unet.conv_in.weight.shape[1] == 9
    text = load_text_model(base).net.state_dict()
    tuned = result["net"].state_dict()
    assert (tuned["unet.conv_out.weight"] - text["unet.conv_out.weight"]).abs().max() < 0.01  # fine-tuned, not new
    path = export_inpainting_model(tmp_path / "run", tmp_path / "inp.safetensors", n_eval=4, progress=False)
    card = json.loads(path.with_suffix(".json").read_text())
    assert set(card["metrics"]["replace"]) == {"inpainting model", "inpainting model, no paste-back", "training-free",
                                               "training-free, DDPM", "training-free + RePaint (5 jumps)"}
    assert [r["strength"] for r in card["metrics"]["recolor_by_img2img"]] == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert card["base_model"] == {"name": "shapes64-text", "sha256": file_sha256(base)}
    assert isinstance(load_text_model(path).net, InpaintingNet) and card["sha256"] == file_sha256(path)


def test_repaint_from_zero_terminal_snr_is_finite():
    def denoiser(x, sigma, **cond):
        return torch.tanh(x)
    x = sample_repaint(denoiser, torch.randn(2, 3, 4, 4, generator=_gen(1)),
                       torch.tensor([float("inf"), 3.0, 0.5, 0.0]), generator=_gen(2), jumps=3)
    assert torch.isfinite(x).all()


def test_shipped_inpainting_model_keeps_the_outside_and_matches_its_base(scenes, round_trip):
    import json

    from minidiff.files import WEIGHTS_DIR
    inp = pretrained.load_pipeline("shapes64-inpaint")
    card = pretrained.model_card("shapes64-inpaint")
    text_card = json.loads((WEIGHTS_DIR / "shapes64-text-v1.json").read_text())
    assert inp.is_inpainting_model and card["base_model"]["sha256"] == text_card["sha256"]  # fine-tuned from the first text model
    images, prompts = scenes
    mask = _box_mask()
    out = inp.inpaint(prompts, images, mask, generator=_gen(2), **KW)
    keep = (mask == 0).expand_as(out)
    err, floor = (out - images).abs()[keep].mean().item(), (round_trip - images).abs()[keep].mean().item()
    assert err <= floor + 0.01, (err, floor)
    assert (out - round_trip).abs()[(mask == 1).expand_as(out)].mean() > 0.02
