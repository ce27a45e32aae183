"""Pretrained loader: round trip through a weights folder, unknown names, damaged files, shipped models, and a
quality floor on the shipped class-conditional model that a broken model cannot pass."""
import copy
import json

import pytest
import torch

from minidiff import pretrained
from minidiff.data.shapes import make_shapes
from minidiff.denoiser import Denoiser
from minidiff.eval import class_accuracy, load_classifier
from minidiff.eval.metrics import psnr
from minidiff.guidance import CFGDenoiser
from minidiff.models.unet import unet_from_preset
from minidiff.models.vae import AutoencoderKL, reconstruct
from minidiff.samplers import sample
from minidiff.schedules import alphas_cumprod_from_betas, make_betas, sampling_sigmas
from minidiff.training.checkpoint import CheckpointError, save_model


@pytest.fixture
def weights_dir(tmp_path):
    torch.manual_seed(0)
    net = unet_from_preset("tiny", base_channels=8, channel_mults=(1, 2), num_groups=4, attn_levels=(), num_classes=10,
                           zero_init=False)
    torch.nn.init.normal_(net.conv_out.weight, std=0.1)
    denoiser = Denoiser(net, alphas_cumprod_from_betas(make_betas("cosine", 1000)), "eps").eval()
    save_model(tmp_path / "toy.safetensors", denoiser, schedule="cosine", card={"steps": 0, "note": "test"})
    return tmp_path, denoiser


def test_round_trip(weights_dir):
    folder, original = weights_dir
    assert pretrained.available(weights_dir=folder) == ["toy"]
    loaded = pretrained.load("toy", weights_dir=folder, clip_x0=False)
    assert pretrained.model_card("toy", weights_dir=folder) == {"steps": 0, "note": "test"}
    x, sigma, labels = torch.randn(3, 1, 28, 28), torch.tensor([0.1, 1.0, 10.0]), torch.tensor([0, 5, 10])
    assert torch.equal(loaded(x, sigma, class_labels=labels), original(x, sigma, class_labels=labels))


def test_load_clips_x0_to_the_data_range_by_default(weights_dir):
    folder, original = weights_dir
    x, sigma = torch.randn(2, 1, 28, 28), torch.tensor([100.0, 1000.0])  # 1/a ~ sigma amplifies eps errors
    raw = original(x, sigma)
    assert raw.abs().max() > 1  # the case the clamp exists for
    clipped = pretrained.load("toy", weights_dir=folder)(x, sigma)
    assert torch.equal(clipped, raw.clamp(-1, 1))


def test_other_safetensors_files_are_not_listed(weights_dir):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(weights_dir[0] / "classifier.safetensors"), metadata={"format": "other"})
    assert pretrained.available(weights_dir=weights_dir[0]) == ["toy"]


def test_unknown_name_lists_available(weights_dir):
    with pytest.raises(KeyError, match=r"unknown pretrained model 'nope'.*\['toy'\]"):
        pretrained.load("nope", weights_dir=weights_dir[0])
    with pytest.raises(KeyError, match="available"):
        pretrained.model_card("nope", weights_dir=weights_dir[0])


@pytest.mark.parametrize("typo", ["shapes64-txt", "Shapes64-Text", "shapes64_text", "shapes64-text.safetensors"])
def test_a_near_miss_name_suggests_the_model(typo):
    with pytest.raises(ValueError, match=f"unknown pretrained model '{typo}' \\(did you mean 'shapes64-text'\\?\\)") as e:
        pretrained.load(typo)
    assert str(e.value).startswith("unknown pretrained model")  # no KeyError quotes around the message
    assert isinstance(e.value, KeyError)  # and still a KeyError, for code that catches that


def test_classifier_and_clip_files_point_to_their_loaders():
    for name, loader in [("classifier-shapes", "minidiff.eval.classifiers.load_classifier\\('shapes'\\)"),
                         ("shapes-clip", "minidiff.models.clip.load_clip\\('shapes-clip'\\)")]:
        with pytest.raises(ValueError, match=f"load it with {loader}") as e:
            pretrained.load_pipeline(name)
        assert "did you mean" not in str(e.value)
    with pytest.raises(ValueError, match="weights folder .*does not exist"):
        pretrained.load("toy", weights_dir="/nonexistent/weights")


@pytest.mark.parametrize("device, match", [
    ("gpu", "device must be 'cpu', 'cuda'"), ("cuda", "CUDA is not available on this machine"),
    (0, "device=0, but CUDA is not available")])
def test_loading_on_a_device_this_machine_lacks_is_named(device, match):
    if torch.cuda.is_available() and device != "gpu":
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match=match):
        pretrained.load("shapes64-vae", device=device)


def test_corrupted_file_gives_clear_error(weights_dir):
    path = weights_dir[0] / "toy.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"pretrained model 'toy' cannot be loaded.*corrupted or truncated"):
        pretrained.load("toy", weights_dir=weights_dir[0])


def test_corrupted_model_card_gives_clear_error(weights_dir):
    (weights_dir[0] / "toy.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="model card .*toy.json is corrupted"):
        pretrained.model_card("toy", weights_dir=weights_dir[0])


@pytest.mark.parametrize("name", pretrained.available())
def test_every_shipped_model_loads_and_samples(name):
    """Each model shipped in minidiff/weights loads on CPU, has a model card and samples finite images."""
    card = pretrained.model_card(name)
    model = pretrained.load(name)
    if isinstance(model, AutoencoderKL):  # an autoencoder: encode and decode a shapes image
        assert json.dumps(card) and "vae" in card and card["sha256"]
        x = make_shapes(2, size=64, seed=5)[0]
        assert model.decode_latents(model.encode_latents(x)).shape == x.shape
        return
    if hasattr(model.net, "text_encoder"):  # a text-to-image model: through its pipeline, with its autoencoder
        assert json.dumps(card) and "train" in card and card["latent"]["vae"] in pretrained.available()
        pipe = pretrained.load_pipeline(name)
        x = pipe.text_to_image(["a small red circle", ""], steps=4, generator=torch.Generator().manual_seed(0),
                               progress=False)
        assert x.shape == (2, 3, 64, 64) and torch.isfinite(x).all() and x.abs().max() <= 1
        return
    assert json.dumps(card) and "config" in card
    c = model.net.config
    shape = tuple(model.image_shape) if model.image_shape is not None else (c.in_channels, 28, 28)
    extra = {"class_labels": torch.arange(2)} if c.num_classes is not None else None
    x = sample(model, (2, *shape), sampling_sigmas(model.alphas_cumprod, 4, "leading"),
               generator=torch.Generator().manual_seed(0), device="cpu", extra_args=extra)
    assert x.shape == (2, *shape) and torch.isfinite(x).all()
    if "latent" in card:  # a latent model decodes through the autoencoder its card names
        assert not model.clip_x0
        assert pretrained.model_card(card["latent"]["vae"])["sha256"] == card["latent"]["vae_sha256"]


# ----------------------------------------------------------------------------- the shipped autoencoder's bar
@pytest.fixture(scope="module")
def shapes_vae():
    if "shapes64-vae" not in pretrained.available():
        pytest.skip("shapes64-vae is not shipped in minidiff/weights")
    return pretrained.load("shapes64-vae")


def test_shipped_autoencoder_reconstructs_held_out_images_and_its_scaled_latents_have_unit_std(shapes_vae):
    """64 images the autoencoder never saw (seed 7; training used seed 0, the card's test set seed 1): PSNR >= 30 dB
    (the card: 40.9 dB on 1000) and the std of scaled posterior samples in [0.9, 1.1] (the card: 0.994)."""
    x = make_shapes(64, size=64, seed=7)[0]
    assert psnr(x, reconstruct(shapes_vae, x)).mean() >= 30.0
    z = shapes_vae.encode_latents(x, generator=torch.Generator().manual_seed(0))
    assert z.shape == (64, 4, 16, 16) and 0.9 <= float(z.std()) <= 1.1


def test_a_broken_autoencoder_fails_the_bar(shapes_vae):
    broken = copy.deepcopy(shapes_vae)
    with torch.no_grad():
        broken.decoder[-1].weight.mul_(0.5)  # a decoder whose output layer lost half its gain
    x = make_shapes(64, size=64, seed=7)[0]
    assert psnr(x, reconstruct(broken, x)).mean() < 30.0


# ----------------------------------------------------------------------------- quality floor of the shipped model
# 4 samples per class x 10 classes, DPM-Solver++(2M), 20 trailing steps, guidance 3: the model card's row for these
# settings has class accuracy 0.965 (n = 200). At n = 40 the binomial sd at p = 0.965 is 0.029, so the floor 0.7 is
# 9 sd below it: P(accuracy < 0.7) = P(X <= 27 | n = 40, p = 0.965) = 6e-10 (and 4e-3 even for a model at 0.85).
# A model that has lost its classes scores about chance, 0.1: P(X >= 28 | n = 40, p = 0.1) < 1e-15; even at
# p = 0.3 it is 2e-7. The sampling is seeded, so the value is the same on every run (0.975 when written).
PER_CLASS, STEPS, GUIDANCE, FLOOR = 4, 20, 3.0, 0.7


@pytest.fixture(scope="module")
def classifier():
    return load_classifier("fashion-mnist")


def guided_class_accuracy(denoiser, classifier) -> float:
    """Class accuracy of PER_CLASS seeded samples of each class, DPM-Solver++(2M) over STEPS trailing sigmas with
    classifier-free guidance GUIDANCE against the null class (id K = denoiser.num_classes)."""
    K = denoiser.num_classes
    labels = torch.arange(K).repeat(PER_CLASS)
    guided = CFGDenoiser(denoiser, GUIDANCE, uncond={"class_labels": torch.tensor(K)})
    images = sample(guided, (len(labels), 1, 28, 28), sampling_sigmas(denoiser.alphas_cumprod, STEPS),
                    sampler="dpmpp_2m", generator=torch.Generator().manual_seed(0), device="cpu",
                    extra_args={"class_labels": labels})
    assert images.shape == (len(labels), 1, 28, 28) and torch.isfinite(images).all()
    return class_accuracy(classifier, images, labels)


CLASS_MODELS = ["fashion-mnist-cond", "fashion-mnist-cond-eps", "fashion-mnist-cond-fm"]  # the default, the first eps
# diffusion model and its flow-matching twin


@pytest.mark.parametrize("name", CLASS_MODELS)
def test_shipped_conditional_model_draws_the_class_it_is_asked_for(classifier, name):
    """The shipped classifier recognises the requested class in at least 70% of 40 guided samples (4 per class):
    clipped noise, blobs, or good garments of the wrong class all score near chance (10%) instead."""
    denoiser = pretrained.load(name)
    assert denoiser.num_classes == 10
    accuracy = guided_class_accuracy(denoiser, classifier)
    assert accuracy >= FLOOR, f"{name}: class accuracy {accuracy:.3f} < {FLOOR} (its card: >= 0.96 at n = 200)"


def test_shipped_flow_model_is_flow_matching_on_the_straight_path():
    """fashion-mnist-cond-fm predicts the velocity on the straight path, and its card says it was trained with the
    diffusion model's recipe apart from those two settings."""
    fm = pretrained.load("fashion-mnist-cond-fm")
    assert fm.prediction == "flow" and fm.alphas_cumprod[-1] == 0
    assert torch.allclose(fm.alphas_cumprod, alphas_cumprod_from_betas(make_betas("straight", 1000)))
    fm_card, dm_card = pretrained.model_card("fashion-mnist-cond-fm"), pretrained.model_card("fashion-mnist-cond-eps")
    differ = {k for k in dm_card["config"] if fm_card["config"].get(k) != dm_card["config"][k]}
    assert differ <= {"prediction", "schedule", "val_every", "val_size"}, differ
    # the same U-Net (the newer card also records zero_init, a field added after the diffusion model was trained)
    assert {k: fm_card["unet"][k] for k in dm_card["unet"]} == dm_card["unet"] and fm_card["steps"] == dm_card["steps"]
    rows = fm_card["flow_vs_diffusion"]["rows"]
    assert {r["model"] for r in rows} == {"fashion-mnist-cond-eps", "fashion-mnist-cond-fm"} and {r["nfe"] for r in rows} == {5, 10, 20, 50}


def _zero_all_weights(net):
    for p in net.parameters():
        p.zero_()  # eps_hat = 0: x0_hat is the clipped noisy input at every step


def _zero_class_embedding(net):
    net.class_emb.weight.zero_()  # every class, and the null class, look alike: an unconditional model, CFG a no-op


@pytest.mark.parametrize("breakage", [_zero_all_weights, _zero_class_embedding], ids=["zeroed", "labels-ignored"])
def test_quality_floor_fails_a_broken_model(classifier, breakage):
    """The floor can fail: the same metric on the default shipped model (the other two share its U-Net, so one
    model shows it; CI time) with its weights zeroed (it then samples clipped
    noise, which still has the right shape and range) or with its class embedding zeroed (images with no class)
    falls below it."""
    name = "fashion-mnist-cond"
    denoiser = pretrained.load(name)
    with torch.no_grad():
        breakage(denoiser.net)
    accuracy = guided_class_accuracy(denoiser, classifier)
    assert accuracy < FLOOR, f"a broken model reached class accuracy {accuracy:.3f} >= {FLOOR}"


# ----------------------------------------------------------------------------- issue 19: the retrained default
def _unguided_samples(name: str, n_per_class: int = 4) -> torch.Tensor:
    """DPM-Solver++(2M), 20 trailing steps, no guidance, seeded: the settings of the issue's bar."""
    denoiser = pretrained.load(name)
    labels = torch.arange(10).repeat(n_per_class)
    return sample(denoiser, (len(labels), 1, 28, 28), sampling_sigmas(denoiser.alphas_cumprod, 20), sampler="dpmpp_2m",
                  generator=torch.Generator().manual_seed(0), device="cpu", extra_args={"class_labels": labels})


def test_default_model_is_not_blown_out_where_the_eps_model_was():
    """At guidance 1 the first (eps, cosine) model over-exposes: its samples have several times the real images'
    share of pure-white pixels. The retrained default stays within the issue's 1.5x of real on the same 40 draws,
    and the check can fail: the eps model's samples do not pass it."""
    from minidiff.eval.classifiers import training_data
    from minidiff.eval.metrics import saturated_share

    real = saturated_share(training_data("fashion-mnist", "test", n=1000, seed=1)[0])
    assert 0.005 < real < 0.02  # about 1% of a Fashion-MNIST image is white
    assert saturated_share(_unguided_samples("fashion-mnist-cond")) <= 1.5 * real
    assert saturated_share(_unguided_samples("fashion-mnist-cond-eps")) > 1.5 * real


def test_default_model_card_verdict_is_its_rows_verdict():
    """The card's verdict is recomputed from its own rows by the benchmark that wrote it, and records the bar's
    row (DPM-Solver++ 2M, 20 trailing steps, guidance 1) with its saturation beside the real images'."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "checkpoint_quality.py"
    spec = importlib.util.spec_from_file_location("checkpoint_quality", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    card = pretrained.model_card("fashion-mnist-cond")
    assert card["config"]["prediction"] == "flow" and card["config"]["lr_schedule"] == "cosine"
    rows = card["metrics"]["rows"]
    assert card["metrics"]["verdict"] == module.verdict(rows)
    bar = [r for r in rows if (r["sampler"], r["steps"], r["spacing"], r["guidance"]) == ("dpmpp_2m", 20, "trailing", 1.0)]
    assert len(bar) == 1 and bar[0]["saturation_real"] > 0 and bar[0]["n"] == card["metrics"]["n_per_row"]
