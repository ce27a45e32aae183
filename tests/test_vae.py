"""The KL autoencoder: shapes, the posterior against torch.distributions, clear errors, the scaling factor, its file
format, the LPIPS-style feature distance, and a resumable trainer that is bit-for-bit."""
from dataclasses import asdict

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from minidiff import pretrained
from minidiff.eval.classifiers import load_classifier
from minidiff.models.vae import AutoencoderKL, DiagonalGaussian, VAEConfig, latent_std, reconstruct, set_scaling_factor
from minidiff.training import autoencoder
from minidiff.training.autoencoder import FeatureDistance, VAETrainConfig, train_vae, vae_loss
from minidiff.training.checkpoint import CheckpointError, load_vae, save_vae

SMALL = VAEConfig(base_channels=8, channel_mults=(1, 2, 2))  # same factor 4 as the default, 4x fewer channels


def _vae(seed=0, config=SMALL):
    torch.manual_seed(seed)
    return AutoencoderKL(config).eval()


def _images(n, size=16, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---------------------------------------------------------------- shapes

@pytest.mark.parametrize("size, latent", [(64, 16), (32, 8)])
def test_default_config_is_factor_4_with_4_latent_channels(size, latent):
    vae = _vae(config=VAEConfig())
    assert vae.factor == 4 and vae.latent_shape((3, size, size)) == (4, latent, latent)
    with torch.no_grad():
        posterior = vae.encode(_images(2, size))
        assert posterior.mean.shape == posterior.logvar.shape == (2, 4, latent, latent)
        assert vae.decode(posterior.mode()).shape == (2, 3, size, size)
        recon, post = vae(_images(2, size), generator=torch.Generator().manual_seed(0))
    assert recon.shape == (2, 3, size, size) and post.mean.shape == (2, 4, latent, latent)


def test_non_square_images_and_factor_of_other_configs():
    assert VAEConfig(channel_mults=(1, 2, 4, 4)).factor == 8 and VAEConfig(channel_mults=(1,)).factor == 1
    with torch.no_grad():
        assert _vae().encode(_images(1, 16)[..., :12]).mean.shape == (1, 4, 4, 3)


# ---------------------------------------------------------------- the posterior

def test_kl_matches_torch_distributions(gen):
    mean = torch.randn(3, 4, 5, 5, generator=gen, dtype=torch.float64)
    logvar = torch.rand(3, 4, 5, 5, generator=gen, dtype=torch.float64) * 6 - 3
    q = DiagonalGaussian(mean, logvar)
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(mean, torch.exp(0.5 * logvar)),
                                                 torch.distributions.Normal(0.0, 1.0)).flatten(1).sum(1)
    assert q.kl().shape == (3,)
    torch.testing.assert_close(q.kl(), expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(DiagonalGaussian(torch.zeros(2, 4, 3, 3), torch.zeros(2, 4, 3, 3)).kl(), torch.zeros(2))


def test_sample_is_deterministic_per_seed_and_mode_is_the_mean(gen):
    q = DiagonalGaussian(torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen))
    a = q.sample(generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, q.sample(generator=torch.Generator().manual_seed(5)))
    assert not torch.equal(a, q.sample(generator=torch.Generator().manual_seed(6)))
    assert q.mode() is q.mean


def test_sample_has_the_posterior_mean_and_std(gen):
    mean = torch.tensor([-2.0, 0.0, 3.0]).view(1, 3, 1, 1).expand(1, 3, 200, 200)
    logvar = torch.log(torch.tensor([0.25, 1.0, 4.0])).view(1, 3, 1, 1).expand(1, 3, 200, 200)
    z = DiagonalGaussian(mean, logvar).sample(generator=gen)  # 40,000 draws per channel
    torch.testing.assert_close(z.mean(dim=(0, 2, 3)), torch.tensor([-2.0, 0.0, 3.0]), atol=0.03, rtol=0)
    torch.testing.assert_close(z.std(dim=(0, 2, 3)), torch.tensor([0.5, 1.0, 2.0]), atol=0, rtol=0.02)


def test_logvar_is_clamped_so_exp_stays_finite():
    q = DiagonalGaussian(torch.zeros(1, 1, 1, 2), torch.tensor([[[[-1e4, 1e4]]]]))
    assert torch.isfinite(q.var).all() and torch.isfinite(q.kl()).all()
    assert q.logvar.flatten().tolist() == [-30.0, 20.0]


# ---------------------------------------------------------------- clear errors

X = torch.zeros(1, 3, 16, 16)
CASES = [  # (call, regex the ValueError must match)
    (lambda v: v.encode(torch.zeros(1, 1, 16, 16)), r"x must have 3 channel\(s\) on axis 1.*\(1, 1, 16, 16\)"),
    (lambda v: v.encode(X[0]), r"x must have 4 dims \(B, C, H, W\).*\(3, 16, 16\).*x\[None\]"),
    (lambda v: v.encode(X[..., :18, :14]), r"x must have height and width divisible by.*factor 4.*\(16, 14\).*pad"),
    (lambda v: v.encode(torch.zeros(1, 3, 18, 16)), r"x must have height and width divisible by.*factor 4.*\(18, 16\)"),
    (lambda v: v.encode(X.to(torch.uint8)), r"x must be a floating-point tensor.*got torch.uint8.*127\.5 - 1"),
    (lambda v: v.encode(X.long()), r"x must be a floating-point tensor.*got torch.int64"),
    (lambda v: v.encode(torch.full((1, 3, 16, 16), float("nan"))), r"x must be finite, got 768 NaN/inf"),
    (lambda v: v.encode(X.numpy()), r"x must be a torch.Tensor.*got ndarray.*torch.as_tensor"),
    (lambda v: v.decode(torch.zeros(1, 3, 4, 4)), r"z must have 4 channel\(s\) on axis 1.*\(1, 3, 4, 4\)"),
    (lambda v: v.decode(torch.zeros(4, 4, 4)), r"z must have 4 dims"),
    (lambda v: v.decode(np.zeros((1, 4, 4, 4), dtype=np.float32)), r"z must be a torch.Tensor.*ndarray"),
    (lambda v: v.decode_latents(torch.full((1, 4, 4, 4), float("inf"))), r"z must be finite"),
    (lambda v: VAEConfig(num_groups=3), r"num_groups must divide every level's channels \[16, 32, 64\], got 3"),
    (lambda v: VAEConfig(base_channels=8, num_groups=16), r"num_groups must divide.*\[8, 16, 32\], got 16"),
    (lambda v: VAEConfig(num_groups=0), r"num_groups must be an int >= 1, got 0"),
    (lambda v: VAEConfig(channel_mults=()), r"channel_mults must be a non-empty tuple of positive ints, got \(\)"),
    (lambda v: VAEConfig(channel_mults=(1, 0)), r"channel_mults must be a non-empty tuple of positive ints"),
    (lambda v: VAEConfig(channel_mults=(1, 1.5)), r"channel_mults must be a non-empty tuple of positive ints"),
    (lambda v: VAEConfig(latent_channels=0), r"latent_channels must be an int >= 1"),
    (lambda v: VAEConfig(base_channels=2.0), r"base_channels must be an int >= 1, got 2\.0"),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_bad_input_gets_a_clear_error(case):
    call, pattern = CASES[case]
    with pytest.raises(ValueError, match=pattern):
        call(_vae())


def test_config_is_keyword_only_and_frozen():
    with pytest.raises(TypeError):
        VAEConfig(3)
    with pytest.raises(AttributeError):
        VAEConfig().latent_channels = 8
    assert VAEConfig(channel_mults=[1, 2]).channel_mults == (1, 2)  # a list from JSON becomes a tuple


# ---------------------------------------------------------------- scaling factor and the latent API

def test_set_scaling_factor_gives_unit_std_latents():
    vae, images = _vae(), _images(32, 16, seed=1)
    s = set_scaling_factor(vae, images, batch_size=10, generator=torch.Generator().manual_seed(0))
    assert float(vae.scaling_factor) == pytest.approx(s, rel=1e-6) and s != 1.0
    assert s == pytest.approx(1 / latent_std(vae, images, generator=torch.Generator().manual_seed(0)), rel=1e-6)
    z = vae.encode_latents(images, generator=torch.Generator().manual_seed(1))  # other noise than the fit
    assert 0.9 <= float(z.std()) <= 1.1
    with torch.no_grad():
        assert torch.equal(vae.encode_latents(images), vae.encode(images).mode() * vae.scaling_factor)


def test_decode_latents_inverts_the_scaling_and_clamps():
    vae, x = _vae(), _images(4, 16)
    with torch.no_grad():
        torch.nn.init.normal_(vae.decoder[-1].weight, std=1.0)  # outputs well outside [-1, 1]
        raw = vae.decode(vae.encode(x).mode())
    assert raw.abs().max() > 1.5
    vae.scaling_factor.fill_(2.0)  # a power of two: z * s / s is exact
    out = vae.decode_latents(vae.encode_latents(x))
    assert torch.equal(out, raw.clamp(-1, 1)) and out.abs().max() == 1.0
    assert torch.equal(reconstruct(vae, x), raw.clamp(-1, 1))
    # other batch sizes: float32 convs round differently per batch size (6e-5 here), float64 agrees to 1e-10
    vae64, x64 = _vae().double(), x.double()
    vae64.load_state_dict(vae.state_dict())
    torch.testing.assert_close(reconstruct(vae64, x64, batch_size=3), reconstruct(vae64, x64), atol=1e-10, rtol=0)
    vae.scaling_factor.fill_(0.37)  # any other value: z * s / s is off by an ulp, which this decoder amplifies to 3e-5
    torch.testing.assert_close(vae.decode_latents(vae.encode_latents(x)), raw.clamp(-1, 1), atol=1e-4, rtol=0)


def test_reconstruct_of_no_images_is_empty():
    assert reconstruct(_vae(), torch.zeros(0, 3, 16, 16)).shape == (0, 3, 16, 16)


# ---------------------------------------------------------------- save_vae / load_vae

def _saved(tmp_path, name="vae.safetensors"):
    vae = _vae()
    with torch.no_grad():
        vae.scaling_factor.fill_(0.8123)
    return vae, save_vae(tmp_path / name, vae, card={"steps": 0})


def test_save_load_round_trip_is_bit_identical(tmp_path):
    vae, path = _saved(tmp_path)
    loaded = load_vae(path)
    assert loaded.config == vae.config and not loaded.training and (tmp_path / "vae.json").is_file()
    assert loaded.scaling_factor.item() == vae.scaling_factor.item()
    sa, sb = vae.state_dict(), loaded.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    x = _images(2, 16)
    assert torch.equal(loaded.decode_latents(loaded.encode_latents(x)), vae.decode_latents(vae.encode_latents(x)))


def _edit_spec(path, spec: str):
    """Rewrite the file's JSON spec (the tensors, and so their SHA-256, are unchanged): a hand-edited file."""
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(path), metadata={**metadata, "spec": spec})


@pytest.mark.parametrize("spec, pattern", [
    ("{not json", r"its spec is not a valid VAEConfig"),
    ('{"vae": {"latent_channels": 4, "widht": 3}}', r"its spec is not a valid VAEConfig.*widht"),
    ('{"autoencoder": {}}', r"its spec is not a valid VAEConfig"),
    ('{"vae": {"num_groups": 5}}', r"its spec is not a valid VAEConfig.*num_groups must divide"),
    ('{"vae": {"base_channels": 16, "channel_mults": [1, 2, 2]}}', r"weights do not fit the architecture"),
])
def test_edited_spec_gives_an_error_naming_the_file(tmp_path, spec, pattern):
    _, path = _saved(tmp_path)
    _edit_spec(path, spec)
    with pytest.raises(CheckpointError, match=pattern) as info:
        load_vae(path)
    assert str(path) in str(info.value) and "re-export" in str(info.value)


def test_flipped_tensor_byte_is_caught(tmp_path):
    _, path = _saved(tmp_path)
    raw = bytearray(path.read_bytes())
    header_len = int.from_bytes(raw[:8], "little")
    raw[8 + header_len + (len(raw) - 8 - header_len) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"vae\.safetensors is corrupted: its tensors do not match"):
        load_vae(path)


def test_model_file_is_not_an_autoencoder(tmp_path):
    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"), metadata={"format": "minidiff-model-v1"})
    with pytest.raises(CheckpointError, match=r"foreign\.safetensors is not a minidiff-vae-v1 file"):
        load_vae(tmp_path / "foreign.safetensors")


def test_pretrained_lists_and_loads_a_saved_autoencoder(tmp_path):
    vae, _ = _saved(tmp_path, "my-vae.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"), metadata={"format": "something-else"})
    assert pretrained.available(weights_dir=tmp_path) == ["my-vae"]
    loaded = pretrained.load("my-vae", weights_dir=tmp_path)
    assert isinstance(loaded, AutoencoderKL) and loaded.scaling_factor.item() == vae.scaling_factor.item()
    for clip in (True, False):
        with pytest.raises(ValueError, match=r"clip_x0 applies to denoisers; 'my-vae' is an autoencoder"):
            pretrained.load("my-vae", weights_dir=tmp_path, clip_x0=clip)


# ---------------------------------------------------------------- feature distance and loss

@pytest.fixture(scope="module")
def distance():
    return FeatureDistance(load_classifier("shapes"))


def test_feature_distance_zero_for_identical_positive_for_different(distance):
    x, y = _images(3, 16, seed=0), _images(3, 16, seed=1)
    d_same, d_diff = distance(x, x.clone()), distance(x, y)
    assert d_same.shape == d_diff.shape == (3,)
    assert torch.allclose(d_same, torch.zeros(3), atol=1e-10) and (d_diff > 1e-3).all()
    assert (distance(x, 0.9 * x) < d_diff).all()  # a small change is closer than an unrelated image


def test_feature_distance_grads_reach_the_reconstruction_only():
    classifier = load_classifier("shapes")
    distance = FeatureDistance(classifier)
    bn = classifier.trunk[1]
    running = bn.running_mean.clone()
    distance.train()  # stays in eval mode: BatchNorm uses (and keeps) its running statistics
    assert not distance.training and not bn.training
    x = _images(2, 16, seed=0).requires_grad_(True)
    y = _images(2, 16, seed=1).requires_grad_(True)
    distance(x, y).sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0 and torch.isfinite(y.grad).all()
    assert x.grad is None  # the target's features are computed without a graph
    assert all(p.grad is None for p in classifier.parameters())
    assert all(not p.requires_grad for p in distance.parameters())  # the frozen trunk
    assert torch.equal(bn.running_mean, running)


def test_vae_loss_terms_are_finite_and_add_up(distance):
    vae, x = _vae().train(), _images(4, 16)
    out = vae_loss(vae, x, feature_distance=distance, perceptual_weight=0.1, kl_weight=1e-3,
                   generator=torch.Generator().manual_seed(0))
    assert set(out) == {"loss", "rec", "perceptual", "kl"}
    assert all(v.shape == () and torch.isfinite(v) for v in out.values())
    assert out["rec"] > 0 and out["perceptual"] > 0 and out["kl"] > 0
    torch.testing.assert_close(out["loss"], out["rec"] + 0.1 * out["perceptual"] + 1e-3 * out["kl"])
    out["loss"].backward()
    assert all(p.grad is not None for p in vae.parameters())
    plain = vae_loss(vae, x, generator=torch.Generator().manual_seed(0))
    assert plain["perceptual"] == 0 and torch.equal(plain["rec"], out["rec"])


# ---------------------------------------------------------------- training config and the resumable loop

@pytest.mark.parametrize("kw, pattern", [
    ({"preset": "f16"}, r"preset must be one of \['f4', 'f4-attn', 'f4-wide', 'f8'\], got 'f16'"),
    ({"n_train": 0}, r"n_train must be an int >= 1, got 0"),
    ({"image_size": 16.0}, r"image_size must be an int >= 1, got 16\.0"),
    ({"batch_size": -1}, r"batch_size must be an int >= 1, got -1"),
    ({"ckpt_every": 0}, r"ckpt_every must be an int >= 1"),
    ({"steps": -1}, r"steps must be an int >= 0, got -1"),
    ({"warmup": -5}, r"warmup must be an int >= 0, got -5"),
    ({"lr": 0.0}, r"need lr > 0.*got lr=0\.0"),
    ({"lr": float("nan")}, r"need lr > 0.*got lr=nan"),
    ({"kl_weight": -1e-5}, r"kl_weight >= 0.*kl_weight=-1e-05"),
    ({"perceptual_weight": -0.1}, r"perceptual_weight >= 0.*perceptual_weight=-0\.1"),
    ({"max_grad_norm": 0.0}, r"max_grad_norm > 0.*max_grad_norm=0\.0"),
])
def test_train_config_rejects_bad_values(kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        VAETrainConfig(**kw)


TRAIN_IMAGES = _images(64, 16, seed=3)


def _config(steps, **kw):
    base = {"n_train": 64, "image_size": 16, "crop": None, "steps": steps, "batch_size": 4, "ckpt_every": 2}
    return VAETrainConfig(**{**base, **kw})


def _train(config, out, **kw):
    return train_vae(config, out, images=TRAIN_IMAGES, device="cpu", progress=False, **kw)


def _assert_same_run(a, b):
    assert a["history"] == b["history"] and a["step"] == b["step"]
    sa, sb = a["vae"].state_dict(), b["vae"].state_dict()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def test_resume_of_a_finished_run_is_a_no_op_and_another_config_is_refused(tmp_path):
    full = _train(_config(6), tmp_path / "full")
    assert len(full["history"]["loss"]) == 6 and all(np.isfinite(full["history"]["loss"]))
    _assert_same_run(full, _train(_config(6), tmp_path / "full", resume=True))
    assert not (tmp_path / "full" / ".lock").exists()
    for field, value in (("n_train", 32), ("lr", 1e-3), ("steps", 8)):
        config = VAETrainConfig(**{**asdict(_config(6)), field: value})
        with pytest.raises(ValueError, match=rf"cannot resume .*checkpoint\.safetensors: config differs.*'{field}'"):
            _train(config, tmp_path / "full", resume=True)


def test_killed_run_resumes_bit_for_bit_during_the_cosine_decay(tmp_path, monkeypatch):
    """warmup=2 < steps: the learning rate decays with the step, so a resume must restore the scheduler exactly."""
    full = _train(_config(6, warmup=2), tmp_path / "full")
    calls, real_loss = [], autoencoder.vae_loss

    def dies_at_step_5(*args, **kw):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt  # killed after the checkpoint at step 4
        return real_loss(*args, **kw)

    monkeypatch.setattr(autoencoder, "vae_loss", dies_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        _train(_config(6, warmup=2), tmp_path / "killed")
    monkeypatch.undo()
    assert not (tmp_path / "killed" / ".lock").exists()
    _assert_same_run(full, _train(_config(6, warmup=2), tmp_path / "killed", resume=True))


def test_extending_steps_is_refused_because_the_cosine_decay_depends_on_them(tmp_path):
    """A 4-step run took other learning rates than the first 4 steps of a 6-step run, so it cannot become one."""
    _train(_config(4, warmup=2), tmp_path / "part")
    with pytest.raises(ValueError, match="config differs.*'steps': \\(4, 6\\)"):
        _train(_config(6, warmup=2), tmp_path / "part", resume=True)


def test_the_same_trainer_takes_greyscale_28x28_images(tmp_path):
    """Fashion-MNIST through the same code: 1 channel, 28 = 4 * 7, the feature distance on the Fashion-MNIST classifier."""
    from minidiff.data import load_dataset
    images = load_dataset("fashion-mnist", "test").images[:32]
    result = train_vae(VAETrainConfig(n_train=32, steps=2, batch_size=4, ckpt_every=2, crop=None), tmp_path,
                       images=images, device="cpu", progress=False)
    vae = result["vae"]
    assert vae.config.in_channels == 1 and vae.encode(images[:2]).mean.shape == (2, 4, 7, 7)
    assert all(np.isfinite(result["history"]["loss"]))
    with pytest.raises(ValueError, match=r"images must be \(N, 1 or 3, H, W\)"):
        train_vae(VAETrainConfig(steps=1), tmp_path / "bad", images=images[:, :, None], device="cpu", progress=False)
