"""The benchmark scripts of issue 19 run end to end on tiny budgets: benchmarks/time_to_quality.py (a table row and
JSON evaluations of numbers), benchmarks/gpu_run.sh in its CPU smoke mode (exit 0, every result file written); the
time-to-quality report's arithmetic on made-up summaries; the diffusers adapter against the eps formula; the
GroupNorm-SiLU pairs benchmarks/gn_silu.py finds and times."""
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"


def _env(**extra) -> dict:
    """The test's environment for a subprocess: one CPU thread, smoke mode, the repo importable."""
    threads = os.environ.get("MINIDIFF_TEST_THREADS", "1")
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "OMP_NUM_THREADS": threads, "MINIDIFF_SMOKE": "1", "PYTHONPATH": path, **extra}


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def test_time_to_quality_runs_on_a_tiny_budget(tmp_path):
    out = tmp_path / "ttq.json"
    cmd = [sys.executable, str(BENCH / "time_to_quality.py"), "--minutes", "0.03", "--eval-every-min", "0.03",
           "--n", "20", "--recipes", "flow", "--threads", "1", "--device", "cpu", "--out", str(out)]
    res = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    assert any(line.startswith("| recipe | minutes to >= 90% | steps | img/s |") for line in lines), res.stdout
    assert any(line.startswith("| flow | ") for line in lines), res.stdout
    result = json.loads(out.read_text())
    assert len(result["evaluations"]) >= 1
    for row in result["evaluations"]:
        assert row["recipe"] == "flow"
        for key in ("train_minutes", "step", "accuracy", "fid", "fid_floor", "img_s"):
            assert _is_number(row[key]), (key, row)
        assert row["step"] >= 1 and 0 <= row["accuracy"] <= 1
    assert [json.loads(line) for line in lines if line.startswith("{")] == result["evaluations"]


def test_time_to_quality_table_reports_ratios_and_misses():
    ttq = _load("time_to_quality")
    rows = {"flow": [(5.0, 0.8), (10.0, 0.92)], "eps": [(10.0, 0.7), (20.0, 0.91)], "diffusers": [(30.0, 0.6)]}
    summaries = [ttq.summarize([{"recipe": name, "train_minutes": m, "step": 100 * int(m), "accuracy": a,
                                 "img_s": 50.0} for m, a in evals], 0.9, 30.0) for name, evals in rows.items()]
    text = ttq.table(summaries, 0.9)
    assert "| flow | 10.0 | 1000 | 50.0 |" in text
    assert "| diffusers | not reached in 30 min; best acc 60.0% at 30.0 min | 3000 | 50.0 |" in text
    assert "time to 90%, eps / flow: 2.00x" in text
    assert "time to 90%, diffusers / flow: n/a (diffusers did not reach 90% in 30 min)" in text
    assert "min to >=" not in text  # no lower thresholds asked for: no extra columns
    assert "judge on the same number of real test images" not in text
    text = ttq.table(summaries, 0.9, real_accuracy=0.9267)
    assert text.endswith("the judge on the same number of real test images: 92.7% (threshold 90%: -2.7 points from it)")


def test_time_to_quality_reads_lower_thresholds_off_the_same_evaluations(tmp_path, capsys):
    ttq = _load("time_to_quality")
    rows = {"flow": [(5.0, 0.76), (10.0, 0.85)], "eps": [(5.0, 0.6), (10.0, 0.7), (15.0, 0.8)],
            "diffusers": [(5.0, 0.3), (15.0, 0.5)]}
    evaluations = [{"recipe": name, "train_minutes": m, "step": 100 * int(m), "accuracy": a, "img_s": 50.0}
                   for name, evals in rows.items() for m, a in evals]
    saved = tmp_path / "ttq.json"
    saved.write_text(json.dumps({"settings": {"minutes": 15.0}, "evaluations": evaluations}))
    result = ttq.main(["--from-json", str(saved), "--also", "0.8", "0.75"])
    text = capsys.readouterr().out
    assert text.splitlines()[0] == "| recipe | minutes to >= 90% | steps | img/s | min to >= 80% | min to >= 75% |"
    assert "| flow | not reached in 15 min; best acc 85.0% at 10.0 min | 1000 | 50.0 | 10.0 | <= 5.0 |" in text
    assert "| diffusers | not reached in 15 min; best acc 50.0% at 15.0 min | 1500 | 50.0 | - | - |" in text
    assert "time to 80%, eps / flow: 1.50x\n" in text  # flow's 10.0 is its second evaluation: no caveat
    assert "time to 75%, eps / flow: 3.00x (flow got there by its first evaluation: flow may be faster still)" in text
    assert "time to 90%, eps / flow: n/a (eps and flow did not reach 90% in 15 min)" in text
    assert "time to 80%, diffusers / flow: n/a (diffusers did not reach 80% in 15 min)" in text
    assert [s["minutes_to"] for s in result["summaries"]] == [{"0.8": 10.0, "0.75": 5.0}, {"0.8": 15.0, "0.75": 15.0},
                                                              {"0.8": None, "0.75": None}]


def test_race_evaluates_once_per_interval_when_chunks_stop_short(monkeypatch):
    ttq = _load("time_to_quality")

    class ShortRun:  # every chunk stops 5 s short of the time asked for, as a throughput-planned chunk can
        seconds, step = 0.0, 0

        def train_until(self, seconds):
            if self.seconds < seconds:
                self.seconds, self.step = max(self.seconds + 1, seconds - 5), self.step + 1

        def denoiser(self):
            return None

    monkeypatch.setattr(ttq, "evaluate", lambda *a, **k: {"class_accuracy": 0.5, "fid": 1.0, "fid_floor": 0.5})
    args = SimpleNamespace(minutes=20, eval_every_min=5, n=10, threshold=0.9)
    rows = ttq.race("flow", ShortRun(), args)
    assert [round(r["train_minutes"] * 60) for r in rows] == [295, 595, 895, 1195]


def test_diffusers_adapter_is_the_eps_row_of_the_table(gen):
    pytest.importorskip("diffusers")
    from diffusers import DDPMScheduler

    from minidiff.denoiser import x0_from_eps
    from minidiff.models.unet import PRESETS
    from minidiff.schedules import sigmas_from_alphas_cumprod

    ttq = _load("time_to_quality")
    torch.manual_seed(0)
    unet = ttq.load_diffusers_twin()(PRESETS["tiny"], 28, num_class_embeds=10)
    net = ttq.DiffusersEpsNet(unet, 10).eval()
    alphas_cumprod = DDPMScheduler(beta_schedule="linear").alphas_cumprod.to(torch.float64)
    denoiser = ttq.Denoiser(net, alphas_cumprod, "eps")
    assert denoiser.num_classes == 10
    t = torch.tensor([0, 400, 999])
    sigma = sigmas_from_alphas_cumprod(alphas_cumprod)[t].float()
    x, labels = torch.randn(3, 1, 28, 28, generator=gen), torch.tensor([0, 4, 9])
    with torch.no_grad():
        eps_hat = unet(x, t.float(), class_labels=labels).sample  # diffusers' call at the timestep itself
        torch.testing.assert_close(denoiser(x, sigma, class_labels=labels), x0_from_eps(x, eps_hat, sigma),
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # five Python processes, each importing torch: about 40 s on one loaded CPU thread
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_gpu_run_smoke_mode_writes_its_results(tmp_path):
    out = tmp_path / "gpu"
    env = _env(GPU_RUN_SMOKE="1", GPU_RUN_THREADS=os.environ.get("MINIDIFF_TEST_THREADS", "1"),
               PYTHON=sys.executable)
    res = subprocess.run(["bash", str(BENCH / "gpu_run.sh"), "--out", str(out)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for name in ("env.txt", "timings.txt", "throughput.log", "train.log", "run/checkpoint.safetensors",
                 "model.safetensors", "results/quality.txt", "results/samples.png"):
        assert (out / name).is_file(), name
    throughput = [json.loads(line) for line in (out / "throughput.jsonl").read_text().splitlines()]
    assert {r["setup"] for r in throughput} == {"float32", "float32 + channels_last"}
    assert all(_is_number(v) and v > 0 for r in throughput for v in r["img_s"].values())
    card = json.loads((out / "model.json").read_text())
    assert card["steps"] == 4 and card["config"]["prediction"] == "flow"
    quality = json.loads((out / "results" / "quality.json").read_text())
    assert quality == card["flow_vs_diffusion"]["rows"] and len(quality) == 2
    assert all(_is_number(r[k]) for r in quality for k in ("fid", "fid_floor", "acc"))


def _row(sampler, steps, guidance, fid, acc, saturation=0.01, floor=1.0):
    return {"sampler": sampler, "steps": steps, "spacing": "trailing", "guidance": guidance, "fid": fid,
            "fid_floor": floor, "class_accuracy": acc, "saturation": saturation, "saturation_real": 0.01}


def test_checkpoint_quality_verdict_names_each_part_of_the_guidance_1_bar():
    verdict = _load("checkpoint_quality").verdict
    good = verdict([_row("dpmpp_2m", 20, 1.0, 1.8, 0.86), _row("heun", 10, 1.0, 2.5, 0.85)])
    assert "(>= 85%: True)" in good and "(<= 2x: True)" in good and "(<= 1.5x: True)" in good
    assert "DPM++'s: True" in good and "guidance 3" not in good
    blown = verdict([_row("dpmpp_2m", 20, 1.0, 3.4, 0.72, saturation=0.037), _row("heun", 10, 1.0, 68.4, 0.09)])
    assert "(>= 85%: False)" in blown and "(<= 2x: False)" in blown and "3.70x" in blown
    assert "(<= 1.5x: False)" in blown and "DPM++'s: False" in blown
    assert "bar not evaluated" in verdict([_row("ddim", 50, 1.0, 2.0, 0.9)])


def test_guided_multistep_ablation_is_dpmpp_2m_with_nothing_off_and_ddim_with_everything_off(gen):
    """benchmarks/guided_multistep.py's ablation of DPM-Solver++(2M) is only meaningful if its two ends are the
    library's samplers: nothing switched off = sample_dpmpp_2m, the correction off on every step = sample_ddim."""
    from minidiff.samplers import sample_ddim, sample_dpmpp_2m
    from minidiff.schedules import alphas_cumprod_from_betas, cosine_betas, sampling_sigmas

    ablation = _load("guided_multistep").dpmpp_2m_ablation
    mean = torch.randn(1, 3, 4, 4, generator=gen)

    def denoiser(x, sigma):  # the exact x0_hat of data N(mean, 0.25 I), a nonlinear function of sigma
        a = 1 / torch.sqrt(1 + sigma**2)[:, None, None, None]
        b = sigma[:, None, None, None] * a
        return mean + 0.25 * a * (x - a * mean) / (0.25 * a**2 + b**2)

    sigmas = sampling_sigmas(alphas_cumprod_from_betas(cosine_betas(1000)), 10, "trailing")
    x = torch.randn(2, 3, 4, 4, generator=gen)
    n_corrected = len(sigmas) - 3
    assert torch.equal(ablation(denoiser, x, sigmas), sample_dpmpp_2m(denoiser, x, sigmas))
    ddim_like = ablation(denoiser, x, sigmas, first_order=tuple(range(1, n_corrected + 1)))
    torch.testing.assert_close(ddim_like, sample_ddim(denoiser, x, sigmas), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ddim_like, sample_dpmpp_2m(denoiser, x, sigmas), atol=1e-4)  # the term does something


def test_gn_silu_finds_every_groupnorm_silu_pair_and_times_the_variants(tmp_path):
    from dataclasses import replace

    bench = _load("gn_silu")
    from minidiff.models.layers import ResBlock
    from minidiff.models.unet import PRESETS, UNet

    net = UNet(PRESETS["tiny"])
    shapes = bench.pair_shapes(net, 2, 8)
    n_res = sum(isinstance(m, ResBlock) for m in net.modules())
    assert sum(shapes.values()) == 2 * n_res + 1  # norm1 and norm2 of each ResBlock, and norm_out
    assert all(s[0] == 2 and s[4] == PRESETS["tiny"].num_groups for s in shapes)
    # AdaGN modulates norm2's output before its SiLU: that norm is no pair
    adagn = UNet(replace(PRESETS["tiny"], scale_shift=True))
    assert sum(bench.pair_shapes(adagn, 2, 8).values()) == n_res + 1
    latent = UNet(PRESETS["latent"])  # a cross-attending U-Net gets a context, and its pairs are found the same way
    assert sum(bench.pair_shapes(latent, 1, 8).values()) == 2 * sum(isinstance(m, ResBlock)
                                                                    for m in latent.modules()) + 1
    x = torch.randn(2, 16, 4, 4, requires_grad=True)
    w, b = torch.randn(16, requires_grad=True), torch.randn(16, requires_grad=True)
    want = torch.autograd.grad(bench.separate(x, 8, w, b).square().sum(), (x, w, b))
    got = torch.autograd.grad(bench.recompute(x, 8, w, b).square().sum(), (x, w, b))
    assert all(torch.allclose(a, c, atol=1e-6) for a, c in zip(got, want))

    out = tmp_path / "gn.json"
    run = subprocess.run([sys.executable, str(BENCH / "gn_silu.py"), "--batch", "2", "--size", "8", "--rounds", "1",
                          "--reps", "1", "--variants", "recompute", "--out", str(out)],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    assert sum(r["count"] for r in result["rows"]) == 2 * n_res + 1
    assert set(result["speedup_vs_separate"]) == {"separate", "recompute"}
    assert _is_number(result["share"]) and 0 < result["share"] < 1
    assert all(r["ms"]["separate"] > 0 and r["ms"]["recompute"] > 0 for r in result["rows"])
    assert result["speedup_vs_separate"]["recompute"] == pytest.approx(
        result["sum_ms"]["separate"] / result["sum_ms"]["recompute"])


def test_text_conditioning_merges_runs_of_one_recipe_and_refuses_others(tmp_path, capsys):
    """--merge joins one-arm files into one table only when their recipe matches; a file written before a recipe
    key existed counts as that key's old default."""
    main = _load("text_conditioning").main
    score = {"shape": 1.0, "color": 1.0, "size": 1.0, "relation": 1.0, "all": 1.0}
    base = {"steps": 3, "n_eval": 2, "attn_pos": True, "ceiling": {"1obj": score}, "command": "c"}
    parts = {"joint": {"lr_schedule": "cosine"}, "pooled": {"lr_schedule": "cosine"},
             "clip": {"lr_schedule": "constant"}, "old": {}}  # "old": written before lr_schedule was recorded
    files = {}
    for name, extra in parts.items():
        files[name] = tmp_path / f"{name}.json"
        arm = "clip" if name == "old" else name
        files[name].write_text(json.dumps({**base, **extra, "arms": {arm: {"1obj": score, "wall_s": 1.0}}}))
    out = tmp_path / "merged.json"
    main(["--merge", str(files["joint"]), str(files["pooled"]), "--out", str(out)])
    merged = json.loads(out.read_text())
    assert set(merged["arms"]) == {"joint", "pooled"} and merged["lr_schedule"] == "cosine"
    assert "cosine lr" in capsys.readouterr().out
    main(["--merge", str(files["clip"]), str(files["old"])])  # "constant" written out == the default left out
    with pytest.raises(SystemExit, match="lr_schedule"):
        main(["--merge", str(files["joint"]), str(files["clip"])])


def test_time_to_quality_set_changes_the_recipe_and_names_the_row():
    """``--set`` reads JSON values (else text), changes the card's config, and names the row after the change, so an
    ablation is never mistaken for the course's recipe; a field TrainConfig lacks, or --set with diffusers, is refused
    before any training."""
    ttq = _load("time_to_quality")
    overrides = ttq.parse_set(["t_sampling=logit_normal", "lr=2e-3", 'unet={"scale_shift": true}'])
    assert overrides == {"t_sampling": "logit_normal", "lr": 0.002, "unet": {"scale_shift": True}}
    config = ttq.recipe_config("flow", overrides)
    base = ttq.recipe_config("flow")
    assert (config.t_sampling, config.lr, config.unet) == ("logit_normal", 0.002, {"scale_shift": True})
    assert (base.t_sampling, base.prediction) == ("uniform", "flow") and base.lr != 0.002
    assert ttq.recipe_label("flow", {}) == "flow"
    label = ttq.recipe_label("flow", {"t_sampling": "logit_normal", "lr": 0.002})
    assert label == "flow[t_sampling=logit_normal,lr=0.002]"
    with pytest.raises(ValueError, match="--set takes KEY=VALUE"):
        ttq.parse_set(["t_sampling"])
    with pytest.raises(ValueError, match="not a TrainConfig field"):
        ttq.recipe_config("flow", {"t_sampler": "uniform"})
    with pytest.raises(ValueError, match="t_sampling must be one of"):
        ttq.recipe_config("flow", {"t_sampling": "beta"})
    with pytest.raises(ValueError, match="diffusers"):
        ttq.main(["--recipes", "diffusers", "--set", "lr=1e-3"])


def test_time_to_quality_marks_times_reached_by_the_first_evaluation():
    """A threshold met at a recipe's first evaluation was met sooner by an unknown amount: the table prints "<= 5.0"
    and says so beside the ratio, instead of a ratio that looks exact."""
    ttq = _load("time_to_quality")

    def rows(name, accs):
        return [{"recipe": name, "train_minutes": 5.0 * (i + 1), "step": 10 * (i + 1), "accuracy": a, "img_s": 1.0}
                for i, a in enumerate(accs)]

    summaries = [ttq.summarize(rows("flow", [0.7, 0.85]), 0.9, 10, (0.8, 0.6)),
                 ttq.summarize(rows("eps", [0.5, 0.65]), 0.9, 10, (0.8, 0.6))]
    text = ttq.table(summaries, 0.9)
    assert "| flow | not reached in 10 min; best acc 85.0% at 10.0 min | 20 | 1.0 | 10.0 | <= 5.0 |" in text
    assert "| eps | not reached in 10 min; best acc 65.0% at 10.0 min | 20 | 1.0 | - | 10.0 |" in text
    assert "time to 60%, eps / flow: 2.00x (flow got there by its first evaluation: flow may be faster still)" in text
