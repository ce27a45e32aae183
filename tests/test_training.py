"""Training engine: EMA math, warmup, one step (clipping, condition dropout, NaN guard), loss goes down on
real Fashion-MNIST, kill-and-resume is bit-for-bit, and the command line runs end to end."""
import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from minidiff.models.unet import unet_from_preset
from minidiff.schedules import alphas_cumprod_from_betas, make_betas
from minidiff.training import EMA, TrainConfig, make_optimizer, train, train_step, validation_loss

SMALL_UNET = dict(base_channels=8, channel_mults=(1, 2), num_groups=4, attn_levels=())
REPO = Path(__file__).resolve().parents[1]


class Scalar(nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(value))
        self.register_buffer("count", torch.tensor(0))


def test_ema_matches_hand_computation_with_warmup():
    m = Scalar(1.0)
    ema = EMA(m, decay=0.9)
    m.p.data.fill_(2.0)
    m.count.fill_(5)
    ema.update(m)  # decay = min(0.9, 1/10) = 0.1: 0.1 * 1 + 0.9 * 2 = 1.9
    assert ema.shadow["p"].item() == pytest.approx(1.9, abs=1e-6)
    assert ema.shadow["count"].item() == 5  # integer buffers are copied, not averaged
    m.p.data.fill_(3.0)
    ema.update(m)  # decay = min(0.9, 2/11): (2/11) * 1.9 + (9/11) * 3 = 2.8
    assert ema.shadow["p"].item() == pytest.approx(2.8, abs=1e-6)
    for _ in range(100):
        ema.update(m)
    assert ema.current_decay() == 0.9  # warmup over: the decay is capped at `decay`
    target = Scalar(0.0)
    ema.copy_to(target)
    assert target.p.item() == pytest.approx(3.0, abs=1e-4)


def test_ema_without_warmup_and_state_round_trip():
    m = Scalar(1.0)
    ema = EMA(m, decay=0.9, warmup=False)
    m.p.data.fill_(2.0)
    ema.update(m)
    m.p.data.fill_(3.0)
    ema.update(m)  # 0.9 * (0.9 * 1 + 0.1 * 2) + 0.1 * 3 = 1.29
    assert ema.shadow["p"].item() == pytest.approx(1.29, abs=1e-6)
    other = EMA(Scalar(0.0), decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.step == 2 and other.decay == 0.9 and other.shadow["p"].item() == pytest.approx(1.29, abs=1e-6)
    with pytest.raises(ValueError, match="decay must be in"):
        EMA(m, decay=1.5)


def test_make_optimizer_warms_up_linearly():
    opt, sched = make_optimizer(Scalar(1.0), lr=1e-2, warmup_steps=4, weight_decay=0.01)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2, 1e-2, 1e-2])
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["weight_decay"] == 0.01
    with pytest.raises(ValueError, match="lr must be > 0, got -1"):
        make_optimizer(Scalar(1.0), lr=-1)


def test_make_optimizer_cosine_decays_to_zero_after_warmup():
    opt, sched = make_optimizer(Scalar(1.0), lr=1e-2, warmup_steps=2, lr_schedule="cosine", total_steps=6)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # warmup 1/2, 2/2, then 0.5 (1 + cos(pi k / 4)) for k = 0..4, held at 0 past total_steps
    assert lrs == pytest.approx([5e-3, 1e-2, 1e-2, 1e-2 * (1 + 2 ** -0.5) / 2, 5e-3, 1e-2 * (1 - 2 ** -0.5) / 2,
                                 0.0, 0.0], abs=1e-12)
    with pytest.raises(ValueError, match="lr_schedule must be one of .*got 'linear'"):
        make_optimizer(Scalar(1.0), lr=1e-2, lr_schedule="linear")
    with pytest.raises(ValueError, match="needs total_steps >= 1"):
        make_optimizer(Scalar(1.0), lr=1e-2, lr_schedule="cosine")
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        TrainConfig(lr_schedule="step")


def test_make_optimizer_lr_scale_gives_a_submodule_its_own_rate_on_the_same_schedule():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    opt, sched = make_optimizer(model, lr=1e-2, warmup_steps=2, lr_scale={"1": 0.1})
    rate = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert len(rate) == 4
    for step in range(3):
        assert [rate[id(p)]["lr"] for p in model[0].parameters()] == pytest.approx([1e-2 * min(1, (step + 1) / 2)] * 2)
        assert [rate[id(p)]["lr"] for p in model[1].parameters()] == pytest.approx([1e-3 * min(1, (step + 1) / 2)] * 2)
        opt.step()
        sched.step()
    assert rate[id(model[0].weight)]["weight_decay"] == rate[id(model[1].weight)]["weight_decay"]
    with pytest.raises(ValueError, match="lr_scale names 'text_encoder', which is not a submodule of the model"):
        make_optimizer(model, lr=1e-2, lr_scale={"text_encoder": 0.1})
    with pytest.raises(ValueError, match="lr_scale\\['1'\\] must be > 0, got 0"):
        make_optimizer(model, lr=1e-2, lr_scale={"1": 0})


class Recorder(nn.Module):
    """A dummy net with the UNet signature that records the labels it was given."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.w = nn.Parameter(torch.full((1,), scale))
        self.seen = []

    def forward(self, x, t, *, class_labels=None):
        self.seen.append(class_labels)
        return self.w * x


AB = alphas_cumprod_from_betas(make_betas("cosine", 100))


def test_train_step_clips_gradients_and_drops_labels(gen):
    net = Recorder(scale=50.0)
    opt, _ = make_optimizer(net, lr=1e-3)
    labels = torch.tensor([1, 2, 3, 4])
    out = train_step(net, torch.randn(4, 1, 4, 4, generator=gen), alphas_cumprod=AB, prediction="eps",
                     optimizer=opt, class_labels=labels, p_uncond=1.0, null_id=10, max_grad_norm=0.5,
                     generator=gen)
    assert out["grad_norm"] > 0.5  # the norm before clipping is reported ...
    assert net.w.grad.norm().item() == pytest.approx(0.5, rel=1e-4)  # ... and the gradient was clipped
    assert torch.equal(net.seen[-1], torch.full((4,), 10))  # p_uncond = 1: every label is the null class
    train_step(net, torch.randn(4, 1, 4, 4, generator=gen), alphas_cumprod=AB, prediction="eps",
               optimizer=opt, class_labels=labels, p_uncond=0.0, generator=gen)
    assert torch.equal(net.seen[-1], labels)


def test_nan_guard_stops_with_a_clear_message(gen):
    net = Recorder(scale=float("nan"))
    opt, _ = make_optimizer(net, lr=3e-2)
    with pytest.raises(FloatingPointError, match=r"loss became nan at step 7: lower the learning rate \(lr=0.03\)"):
        train_step(net, torch.randn(2, 1, 4, 4), alphas_cumprod=AB, prediction="v", optimizer=opt, step=7,
                   generator=gen)
    assert net.w.grad is None  # nothing was applied


def test_loss_drops_on_fashion_mnist():
    """150 steps of the loop a student writes, on real data, with a very small net."""
    from minidiff.data import load_dataset

    data = load_dataset("fashion-mnist")
    torch.manual_seed(0)
    net = unet_from_preset("tiny", **SMALL_UNET, num_classes=10)
    ab = alphas_cumprod_from_betas(make_betas("cosine", 1000))
    opt, sched = make_optimizer(net, lr=3e-3, warmup_steps=20)
    data_gen, noise_gen = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    losses, val = [], []
    val_x, val_y = load_dataset("fashion-mnist", "test").images[:64], load_dataset("fashion-mnist", "test").labels[:64]
    for step in range(150):
        idx = torch.randint(len(data.images), (16,), generator=data_gen)
        out = train_step(net, data.images[idx], alphas_cumprod=ab, prediction="eps", optimizer=opt,
                         scheduler=sched, class_labels=data.labels[idx], p_uncond=0.1, null_id=10,
                         generator=noise_gen, step=step)
        losses.append(out["loss"])
        if step in (0, 149):
            val.append(validation_loss(net, val_x, alphas_cumprod=ab, prediction="eps", class_labels=val_y))
    first, last = sum(losses[:50]) / 50, sum(losses[-50:]) / 50
    assert last < 0.7 * first, (first, last)
    # the validation loss: fixed images, t grid and noise, so it is reproducible and shows the same progress
    assert val[1]["loss"] < 0.7 * val[0]["loss"], val
    again = validation_loss(net, val_x, alphas_cumprod=ab, prediction="eps", class_labels=val_y)
    assert again == val[1] and len(again["t"]) == 10 and again["t"][0] == 0 and again["t"][-1] == 999


@dataclass
class Data:
    images: torch.Tensor
    labels: torch.Tensor
    class_names: tuple


def _small_config(steps, **kw):
    base = dict(batch_size=4, lr=2e-3, warmup=3, ema_decay=0.9, ckpt_every=4, sample_every=1000, sample_steps=2,
                val_every=3, val_size=8, unet={**SMALL_UNET, "dropout": 0.1})
    return TrainConfig(steps=steps, **{**base, **kw})


def test_kill_and_resume_is_bit_for_bit(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = Data(torch.rand(32, 1, 12, 12, generator=g) * 2 - 1, torch.randint(3, (32,), generator=g), ("a", "b", "c"))
    full = train(_small_config(8), tmp_path / "full", data=data, device="cpu", progress=False)
    train(_small_config(4), tmp_path / "killed", data=data, device="cpu", progress=False)
    resumed = train(_small_config(8), tmp_path / "killed", data=data, device="cpu", progress=False, resume=True)
    assert resumed["history"] == full["history"] and len(full["history"]["loss"]) == 8
    assert full["history"]["val_step"] == [3, 6]  # the validation loss survives the kill at step 4 too
    for (name, a), b in zip(full["net"].state_dict().items(), resumed["net"].state_dict().values()):
        assert torch.equal(a, b), name
    assert all(torch.equal(v, resumed["ema"].shadow[k]) for k, v in full["ema"].shadow.items())
    sa, sb = full["optimizer"].state_dict()["state"], resumed["optimizer"].state_dict()["state"]
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    assert (tmp_path / "killed" / "samples" / "step_0000008.png").is_file()
    with pytest.raises(ValueError, match="config differs"):
        train(_small_config(12, lr=1e-2), tmp_path / "killed", data=data, device="cpu", progress=False, resume=True)


def test_resume_accepts_a_checkpoint_from_before_a_config_field_existed(tmp_path):
    """A run saved before ``lr_schedule`` was a field resumes as the default ("constant"), not as a config clash."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    data = Data(torch.rand(16, 1, 12, 12, generator=g) * 2 - 1, torch.randint(3, (16,), generator=g), ("a", "b", "c"))
    train(_small_config(4), tmp_path / "old", data=data, device="cpu", progress=False)
    path = tmp_path / "old" / "checkpoint.safetensors"
    with safe_open(path, "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(meta["config"])
    del config["train"]["lr_schedule"]
    save_file(tensors, path, metadata={**meta, "config": json.dumps(config)})
    resumed = train(_small_config(5), tmp_path / "old", data=data, device="cpu", progress=False, resume=True)
    assert len(resumed["history"]["loss"]) == 5
    with pytest.raises(ValueError, match="config differs.*lr_schedule"):
        train(_small_config(6, lr_schedule="cosine"), tmp_path / "old", data=data, device="cpu", progress=False,
              resume=True)


def _cli(*args, timeout=240):
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "minidiff.train", *args], cwd=REPO, env=env, timeout=timeout,
                          capture_output=True, text=True)


def test_cli_help():
    res = _cli("--help")
    assert res.returncode == 0, res.stderr
    assert "--resume" in res.stdout and "--p-uncond" in res.stdout and "--export" in res.stdout


def test_cli_trains_checkpoints_samples_and_exports(tmp_path):
    from minidiff import pretrained

    out = tmp_path / "run"
    res = _cli("--dataset", "fashion-mnist", "--steps", "5", "--out", str(out), "--batch-size", "8",
               "--sample-steps", "2", "--threads", "1", "--no-progress", "--unet", '{"base_channels": 8, "num_groups": 4}',
               "--export", str(tmp_path / "weights" / "fm.safetensors"))
    assert res.returncode == 0, res.stderr
    assert str(out / "checkpoint.safetensors") in res.stdout and "samples" in res.stdout
    assert (out / "checkpoint.safetensors").is_file() and (out / "samples" / "step_0000005.png").is_file()
    card = pretrained.model_card("fm", weights_dir=tmp_path / "weights")
    assert card["steps"] == 5 and card["config"]["conditional"] and card["wall_time_s"] > 0
    assert "--steps 5" in card["commands"][0] and card["hardware"][0]["torch"] == torch.__version__
    denoiser = pretrained.load("fm", weights_dir=tmp_path / "weights")
    assert denoiser.net.config.num_classes == 10 and denoiser.prediction == "eps"


@pytest.mark.parametrize("bad, match", [(dict(prediction="noise"), "prediction must be one of"),
                                        (dict(batch_size=0), "batch_size must be >= 1, got 0"),
                                        (dict(p_uncond=1.5), r"p_uncond must be in \[0, 1\], got 1.5")])
def test_train_config_rejects_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**bad)


def test_weight_decay_only_on_weight_matrices_and_kernels():
    from minidiff.training import parameter_groups

    net = unet_from_preset("tiny", num_classes=10, base_channels=8, channel_mults=(1, 2), attn_levels=(1,))
    decay, rest = parameter_groups(net, 0.1)
    assert decay["weight_decay"] == 0.1 and rest["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"])
    assert id(net.class_emb.weight) in {id(p) for p in rest["params"]}  # an embedding table, 2-D but no decay
    norms = [m.weight for m in net.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(id(w) in {id(p) for p in rest["params"]} for w in norms)
    assert len(decay["params"]) + len(rest["params"]) == len(list(net.parameters()))
    optimizer, _ = make_optimizer(net, lr=1e-3, weight_decay=0.1)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]


def test_sample_t_uniform_is_the_old_draw_and_logit_normal_has_its_density():
    """``uniform`` is torch.randint on the same generator (old runs resume bit for bit); ``logit_normal`` puts
    P(t < k) = Phi((logit(k / T) - m) / s) (Esser et al. 2024, Eq. 19), checked at several k and two (m, s)."""
    from minidiff.losses import sample_t

    T = 1000
    a, b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(sample_t(64, T, generator=a), torch.randint(0, T, (64,), generator=b))
    normal = torch.distributions.Normal(0.0, 1.0)
    for m, s in ((0.0, 1.0), (0.5, 0.6)):
        t = sample_t(200_000, T, generator=torch.Generator().manual_seed(0), t_sampling="logit_normal", m=m, s=s)
        assert t.dtype == torch.int64 and t.min() >= 0 and t.max() <= T - 1
        for k in (100, 300, 500, 700, 900):
            frac = k / T
            expected = normal.cdf(torch.tensor((math.log(frac / (1 - frac)) - m) / s)).item()
            assert abs((t < k).double().mean().item() - expected) < 0.005, (m, s, k)
    with pytest.raises(ValueError, match="t_sampling must be one of"):
        sample_t(4, T, t_sampling="lognormal")
    with pytest.raises(ValueError, match="scale s must be > 0"):
        sample_t(4, T, t_sampling="logit_normal", s=0.0)


def test_train_draws_t_from_the_configs_density(tmp_path, monkeypatch):
    """train() passes t_sampling, m and s to every step's draw, and a run resumed with another density is refused."""
    from minidiff.training import distributed

    seen, real = [], distributed.sample_t
    monkeypatch.setattr(distributed, "sample_t", lambda *a, **k: seen.append(k) or real(*a, **k))
    g = torch.Generator().manual_seed(0)
    data = Data(torch.rand(16, 1, 12, 12, generator=g) * 2 - 1, torch.randint(3, (16,), generator=g), ("a", "b", "c"))
    config = _small_config(3, t_sampling="logit_normal", logit_normal_m=0.3, logit_normal_s=0.8)
    train(config, tmp_path / "ln", data=data, device="cpu", progress=False)
    assert len(seen) == 3 and all((k["t_sampling"], k["m"], k["s"]) == ("logit_normal", 0.3, 0.8) for k in seen)
    with pytest.raises(ValueError, match="config differs.*t_sampling"):
        train(_small_config(4), tmp_path / "ln", data=data, device="cpu", progress=False, resume=True)


@pytest.mark.parametrize("bad, match", [(dict(t_sampling="beta"), "t_sampling must be one of"),
                                        (dict(logit_normal_s=-1.0), "logit_normal_s must be > 0")])
def test_train_config_rejects_bad_timestep_densities(bad, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**bad)
