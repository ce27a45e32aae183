"""Distillation (minidiff.training.distill): progressive distillation's target is exact on a Gaussian, both methods
measurably shrink the student's few-step error on a 2-D toy, consistency sampling is Song et al.'s Alg. 1, bad
arguments are named, and an interrupted run resumes bit for bit."""
import math

import pytest
import torch
from torch import nn

from minidiff import schedules as S
from minidiff.denoiser import Denoiser, NFECounter
from minidiff.guidance import CFGDenoiser
from minidiff.samplers import sample_ddim
from minidiff.toy import GaussianMixture, ToyMLP, fit_toy, ring_mixture, sliced_wasserstein
from minidiff.training import distill as D
from minidiff.training.checkpoint import CheckpointError, save_checkpoint

F64 = torch.float64


def _table(name):
    return S.alphas_cumprod_from_betas(S.make_betas(name, 1000))


@pytest.fixture(scope="module")
def toy():
    """A flow-matching ToyMLP teacher on the ring, trained briefly (distillation matches the teacher, not the data)."""
    gm, ab, g = ring_mixture(), _table("straight"), torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = fit_toy(ToyMLP(hidden=64), gm, ab, "flow", steps=150, batch_size=128, lr=3e-3, generator=g)
    teacher = Denoiser(net, ab, "flow").eval()
    return {"teacher": teacher, "ab": ab, "data": gm.sample(2048, generator=g),
            "z": torch.randn(512, 2, generator=torch.Generator().manual_seed(1))}


# ----------------------------------------------------------------------------- (a) the target is exact
@pytest.mark.parametrize("schedule", ["straight", "cosine"])
def test_one_step_to_x0_tilde_is_two_teacher_steps(schedule):
    """With the exact denoiser of a 2-D Gaussian as teacher, one DDIM step toward x0_tilde lands where the teacher's
    two DDIM steps (sample_ddim, an independent implementation) land, at every student step i; on the straight
    table i = 0 is sigma = inf (z = eps), and the last step ends at sigma = 0 (b'' = 0)."""
    ab, N = _table(schedule), 4
    teacher = GaussianMixture.gaussian([0.5, -1.0], [0.3, 0.8]).denoiser
    sig_t, sig_s = D.progressive_sigmas(ab, N)
    assert math.isinf(sig_s[0]) == (schedule == "straight") and sig_s[-1] == 0
    z = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    for i in range(N):
        s, s_mid, s_next = (sig_t[2 * i + k].expand(5) for k in range(3))
        x0_tilde = D.progressive_target(teacher, z, s, s_mid, s_next)
        infos = []
        ref = sample_ddim(teacher, z, sig_t[2 * i:], callback=infos.append)
        two_steps = infos[2]["x"] if 2 * i + 2 < 2 * N else ref  # the state before step 2 = after two steps
        torch.testing.assert_close(D.ddim_update(z, x0_tilde, s, s_next), two_steps, rtol=1e-10, atol=1e-12)
        assert torch.isfinite(x0_tilde).all()


@pytest.mark.parametrize("schedule", ["straight", "cosine"])
def test_student_grid_is_every_other_teacher_level(schedule):
    ab = _table(schedule)
    for n in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        teacher, student = D.progressive_sigmas(ab, n)
        assert len(teacher) == 2 * n + 1 and torch.equal(student, teacher[::2])


# ----------------------------------------------------------------------------- (b) progressive distillation works
def _discrepancy(toy, student, n_student, n_teacher):
    """Mean squared distance between the student's n-step and the teacher's m-step DDIM samples from the same noise."""
    ab, z = toy["ab"], toy["z"]
    out = sample_ddim(student, z, S.sampling_sigmas(ab, n_student))
    ref = sample_ddim(toy["teacher"], z, S.sampling_sigmas(ab, n_teacher))
    return float(((out - ref) ** 2).sum(1).mean())


def test_progressive_round_matches_two_teacher_steps_with_one(toy):
    teacher = toy["teacher"]
    before_weights = {k: v.clone() for k, v in teacher.net.state_dict().items()}
    config = D.DistillConfig(method="progressive", n_steps=2, steps=40, batch_size=64, lr=3e-3)
    student = D.distill(teacher, toy["data"], config)
    before = _discrepancy(toy, teacher, 2, 4)  # the un-distilled student is the teacher itself
    after = _discrepancy(toy, student, 2, 4)
    print(f"progressive N=2 vs teacher 4 steps: discrepancy {before:.4g} -> {after:.4g} ({before / after:.0f}x)")
    assert after < before / 2, (before, after)  # measured 0.048 -> 0.0012 (40x)
    assert student.net is not teacher.net and student.prediction == "flow"
    assert all(torch.equal(v, before_weights[k]) for k, v in teacher.net.state_dict().items())


def test_two_rounds_make_two_student_steps_match_eight_teacher_steps(toy):
    config = D.DistillConfig(method="progressive", n_steps=4, rounds=2, steps=30, batch_size=64, lr=3e-3)
    rounds = set()
    student = D.distill(toy["teacher"], toy["data"], config, callback=lambda info: rounds.add(
        (info["round"], info["n_steps"])))
    assert rounds == {(0, 4), (1, 2)}  # N: 4 then 2, the student of round 0 the teacher of round 1
    before, after = _discrepancy(toy, toy["teacher"], 2, 8), _discrepancy(toy, student, 2, 8)
    print(f"progressive 8 -> 4 -> 2: 2-step vs teacher 8-step discrepancy {before:.4g} -> {after:.4g}")
    assert after < before / 2, (before, after)  # measured 0.11 -> 0.0021 (53x)


# ----------------------------------------------------------------------------- (c) consistency distillation works
def test_consistency_distillation_gives_a_one_step_sampler(toy):
    teacher, ab, z = toy["teacher"], toy["ab"], toy["z"]
    losses = []
    config = D.DistillConfig(method="consistency", n_steps=8, steps=100, batch_size=64, lr=1e-3)
    student = D.distill(teacher, toy["data"], config, callback=lambda info: losses.append(info["loss"]))
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    ref = sample_ddim(teacher, torch.randn(1024, 2, generator=torch.Generator().manual_seed(2)),
                      S.sampling_sigmas(ab, 64))
    sw = lambda x: float(sliced_wasserstein(x, ref, generator=torch.Generator().manual_seed(0)))
    one = S.sampling_sigmas(ab, 1)
    sw_before, sw_after = sw(D.consistency_sample(teacher, z, one)), sw(D.consistency_sample(student, z, one))
    print(f"consistency N=8: loss {first:.4g} -> {last:.4g}; 1-step SW to the teacher's 64-step samples "
          f"{sw_before:.3f} (un-distilled) -> {sw_after:.3f}")
    assert last < 0.75 * first, (first, last)  # measured 0.047 -> 0.016 (0.036 -> 0.012 .. 0.041 -> 0.024, seeds 1-3)
    assert sw_after < sw_before / 2, (sw_before, sw_after)  # measured 0.66 -> 0.18 (0.18 .. 0.21, seeds 1-3)


def test_consistency_function_is_the_identity_at_sigma_zero():
    torch.manual_seed(0)
    for prediction in ("x0", "v", "flow"):
        d = Denoiser(ToyMLP(hidden=8), _table("straight"), prediction)
        x, sigma = torch.randn(4, 2), torch.tensor([0.0, 0.5, 0.0, math.inf])
        f = D.consistency_fn(d, x, sigma)
        assert torch.equal(f[[0, 2]], x[[0, 2]])
        torch.testing.assert_close(f[[1, 3]], d(x, sigma)[[1, 3]])
        # the v and flow rows are the identity at sigma = 0 by themselves (c_skip = 1, c_out = 0); x0 is not
        assert torch.allclose(d(x, torch.zeros(4)), x) == (prediction != "x0")


# ----------------------------------------------------------------------------- (d) consistency_sample
def test_consistency_sample_is_alg1_and_uses_the_generator():
    gm, ab = GaussianMixture.gaussian([0.5, -1.0], [0.3, 0.8]), _table("straight")
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(0))
    counter = NFECounter(gm.denoiser)
    one = S.sampling_sigmas(ab, 1)
    out = D.consistency_sample(counter, x, one, generator=torch.Generator().manual_seed(0))
    assert counter.calls == 1 and torch.equal(out, gm.denoiser(x, one[0] * x.new_ones(6)))
    three = S.sampling_sigmas(ab, 3)

    def run(seed, **kw):
        return D.consistency_sample(gm.denoiser, x, three, generator=torch.Generator().manual_seed(seed), **kw)

    assert torch.equal(run(1), run(1)) and not torch.allclose(run(1), run(2))
    infos = []
    zero_noise = run(1, noise_sampler=lambda s, s_next: torch.zeros_like(x), callback=infos.append)
    assert [i["i"] for i in infos] == [0, 1, 2] and infos[-1]["sigma_next"] == 0
    a = S.vp_coefficients(three)[0].float()  # without noise, x re-noised to level i + 1 is a_{i+1} x0_hat
    for k in (0, 1):
        torch.testing.assert_close(infos[k + 1]["x"], a[k + 1] * infos[k]["x0_hat"])
    assert torch.equal(zero_noise, infos[-1]["x0_hat"])
    with pytest.raises(ValueError, match="sigmas must end in 0"):
        D.consistency_sample(gm.denoiser, x, three[:-1])
    with pytest.raises(ValueError, match="generator must be a torch.Generator"):
        D.consistency_sample(gm.denoiser, x, three, generator=0)
    with pytest.raises(ValueError, match="extra_args must be a dict"):
        D.consistency_sample(gm.denoiser, x, three, extra_args=[1])
    with pytest.raises(ValueError, match="x must be a floating-point"):
        D.consistency_sample(gm.denoiser, x.long(), three)


# ----------------------------------------------------------------------------- guidance and conditioning
class _ClassMLP(nn.Module):
    """A tiny class-conditional net(x, t, class_labels) with a null class K (CFG's unconditional branch)."""

    def __init__(self, K=3):
        super().__init__()
        self.embed, self.mlp = nn.Embedding(K + 1, 8), ToyMLP(dim=2 + 8, hidden=16)

    def forward(self, x, t, class_labels):
        e = self.embed(class_labels)
        return self.mlp(torch.cat([x, e], 1), t)[:, :2]


def test_a_guided_teacher_is_distilled_into_a_plain_student():
    """Meng et al. 2023: the teacher is a CFGDenoiser; the student copies its inner net and takes the same cond."""
    torch.manual_seed(0)
    base = Denoiser(_ClassMLP(), _table("straight"), "v").eval()
    teacher = CFGDenoiser(base, 3.0, uncond={"class_labels": torch.tensor([3])})
    g = torch.Generator().manual_seed(0)
    data, labels = torch.randn(32, 2, generator=g), torch.randint(0, 3, (32,), generator=g)
    for method in D.METHODS:
        config = D.DistillConfig(method=method, n_steps=2, steps=3, batch_size=8, lr=1e-3)
        student = D.distill(teacher, data, config, cond={"class_labels": labels})
        assert isinstance(student, Denoiser) and student.prediction == "v" and student.net is not base.net
        assert not torch.equal(student.net.embed.weight, base.net.embed.weight)  # it trained
    with pytest.raises(ValueError, match=r"cond\['class_labels'\] must be a tensor with one entry per example"):
        D.distill(teacher, data, config, cond={"class_labels": labels[:5]})


# ----------------------------------------------------------------------------- (e) errors name the argument
@pytest.mark.parametrize("kw, match", [
    ({"n_steps": 6}, "n_steps must be a power of 2"),
    ({"n_steps": 0}, "n_steps must be an int >= 1"),
    ({"n_steps": 2.0}, "n_steps must be an int >= 1"),
    ({"batch_size": 0}, "batch_size must be an int >= 1"),
    ({"steps": -1}, "steps must be an int >= 1"),
    ({"method": "rectified"}, "method must be one of \\['progressive', 'consistency'\\]"),
    ({"n_steps": 4, "rounds": 4}, "rounds must be <= 3 for n_steps=4"),
    ({"method": "consistency", "rounds": 2}, "rounds must be 1 for consistency"),
    ({"lr": 0.0}, "lr and max_grad_norm must be > 0"),
])
def test_config_rejects_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        D.DistillConfig(**kw)
    assert D.DistillConfig(method="consistency", n_steps=18).n_steps == 18  # any N for consistency


def test_bad_arguments_are_named(tmp_path):
    torch.manual_seed(0)
    ab = _table("straight")
    teacher = Denoiser(ToyMLP(hidden=8), ab, "flow")
    x0, sig = torch.randn(4, 2), D.progressive_sigmas(ab, 2)[0]
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="n_steps must be a power of 2"):
        D.progressive_sigmas(ab, 3)
    for loss in (D.progressive_loss, D.consistency_loss):
        with pytest.raises(ValueError, match="student.prediction must equal the teacher's \\('flow'\\), got 'v'"):
            loss(teacher, Denoiser(ToyMLP(hidden=8), ab, "v"), x0, sig, generator=g)
        with pytest.raises(ValueError, match="student.alphas_cumprod must equal the teacher's"):
            loss(teacher, Denoiser(ToyMLP(hidden=8), _table("cosine"), "flow"), x0, sig, generator=g)
        with pytest.raises(ValueError, match="student must be a minidiff Denoiser"):
            loss(teacher, teacher.net, x0, sig, generator=g)
    with pytest.raises(ValueError, match="teacher must be a Denoiser or wrap one"):
        D.make_student(GaussianMixture.gaussian([0.0], [1.0]).denoiser)
    config = D.DistillConfig(steps=1, batch_size=2, n_steps=2)
    with pytest.raises(ValueError, match="data must be a float tensor"):
        D.distill(teacher, torch.zeros(4, 2, dtype=torch.int64), config)
    with pytest.raises(ValueError, match="save_every must be an int >= 1"):
        D.distill(teacher, x0, config, save_every=0)
    with pytest.raises(ValueError, match="resume=True needs path"):
        D.distill(teacher, x0, config, resume=True)
    with pytest.raises(ValueError, match="teacher: its net has no trainable parameter"):
        D.make_student(Denoiser(ToyMLP(hidden=8), ab, "flow").requires_grad_(False))
    save_checkpoint(tmp_path / "train.safetensors", model=teacher.net, step=0, config={"train": {}})
    with pytest.raises(CheckpointError, match="is a training checkpoint, not a distillation one"):
        D.distill(teacher, x0, config, path=tmp_path / "train.safetensors", resume=True)


# ----------------------------------------------------------------------------- (f) resume is bit-exact
@pytest.mark.parametrize("method, n_steps, rounds, stop_at", [("progressive", 4, 2, (1, 4)),
                                                              ("consistency", 8, 1, (0, 5))])
def test_interrupted_run_resumes_bit_for_bit(tmp_path, method, n_steps, rounds, stop_at):
    """Kill a run (a callback raises) after its checkpoint at step 3, resume from the file: the student's weights
    equal those of an uninterrupted run exactly. For progressive the kill is in round 1, so the teacher (round 0's
    student) must come back from the file too."""
    torch.manual_seed(0)
    teacher = Denoiser(ToyMLP(hidden=16), _table("straight"), "flow").eval()
    data = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    config = D.DistillConfig(method=method, n_steps=n_steps, rounds=rounds, steps=5, batch_size=16, lr=1e-2, seed=3)
    straight = D.distill(teacher, data, config)

    def kill(info):
        if (info["round"], info["step"]) == stop_at:
            raise KeyboardInterrupt

    path = tmp_path / "distill.safetensors"
    with pytest.raises(KeyboardInterrupt):
        D.distill(teacher, data, config, path=path, save_every=3, callback=kill)
    steps_seen = []
    resumed = D.distill(teacher, data, config, path=path, resume=True, save_every=3,
                        callback=lambda info: steps_seen.append((info["round"], info["step"])))
    assert steps_seen[0] == (stop_at[0], 4)  # continued after the checkpoint at step 3 of the killed round
    for k, v in straight.net.state_dict().items():
        assert torch.equal(v, resumed.net.state_dict()[k]), k
    with pytest.raises(ValueError, match="config differs from the checkpoint's"):
        D.distill(teacher, data, D.DistillConfig(method=method, n_steps=n_steps, rounds=rounds, steps=5,
                                                 batch_size=16, lr=1e-2, seed=4), path=path, resume=True)


def test_resume_may_change_steps_per_round(tmp_path):
    """Like the trainer's --steps on resume: a run saved at step 3 of round 0 and resumed with more (or fewer, not
    below 3) steps per round equals a run started with that number; below the saved step it is refused."""
    torch.manual_seed(0)
    teacher = Denoiser(ToyMLP(hidden=16), _table("straight"), "flow").eval()
    data = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    config = lambda steps: D.DistillConfig(n_steps=4, rounds=2, steps=steps, batch_size=16, lr=1e-2, seed=3)
    path = tmp_path / "distill.safetensors"

    def kill(info):
        if info["step"] == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        D.distill(teacher, data, config(6), path=path, save_every=3, callback=kill)
    for steps in (4, 8):
        resumed = D.distill(teacher, data, config(steps), path=path, resume=True, save_every=100)
        straight = D.distill(teacher, data, config(steps))
        for k, v in straight.net.state_dict().items():
            assert torch.equal(v, resumed.net.state_dict()[k]), (steps, k)
        with pytest.raises(KeyboardInterrupt):  # a fresh run (no resume) back to its checkpoint at step 3
            D.distill(teacher, data, config(6), path=path, save_every=3, callback=kill)
    with pytest.raises(ValueError, match="already at step 3"):
        D.distill(teacher, data, config(2), path=path, resume=True)
