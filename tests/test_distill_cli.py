"""`python -m minidiff.distill`: a run folder that resumes, refuses a changed config, and exports a student that
loads like any model and carries its teacher, method, final N and wall time in its card."""
import json

import pytest
import torch

from minidiff import schedules as S
from minidiff.denoiser import Denoiser
from minidiff.models.unet import UNet, UNetConfig
from minidiff.training.checkpoint import load_model, save_model
from minidiff.training.distill_cli import main


@pytest.fixture
def teacher(tmp_path):
    """A small class-conditional flow U-Net exported like a shipped model, with a card naming its dataset."""
    torch.manual_seed(0)
    net = UNet(UNetConfig(base_channels=8, channel_mults=(1, 2), attn_levels=(), mid_attention=False, num_groups=4,
                          num_classes=10, zero_init=False))
    ab = S.alphas_cumprod_from_betas(S.make_betas("straight", 1000))
    path = tmp_path / "teacher.safetensors"
    save_model(path, Denoiser(net, ab, "flow", image_shape=(1, 28, 28)), schedule="straight",
               card={"data": {"dataset": "fashion-mnist", "split": "train"}, "class_names": list("abcdefghij")})
    return path


def _run(tmp_path, teacher, *extra):
    return main(["--teacher", str(teacher), "--out", str(tmp_path / "run"), "--n-steps", "4", "--rounds", "2",
                 "--steps", "2", "--batch-size", "4", "--save-every", "1", "--no-progress", *extra])


def test_distill_resume_and_export(tmp_path, teacher, capsys):
    _run(tmp_path, teacher)
    run = tmp_path / "run"
    info = json.loads((run / "run.json").read_text())
    assert info["teacher"] == str(teacher) and info["dataset"] == "fashion-mnist"
    assert info["sessions"][0]["end"] == {"round": 1, "step": 2} and info["sessions"][0]["wall_s"] > 0
    logged = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert logged == []  # every 10 steps: none in a 2-step round
    main(["--out", str(run), "--resume", "--no-progress"])  # finished: resumes to the end at once
    assert len(json.loads((run / "run.json").read_text())["sessions"]) == 2
    out = tmp_path / "student.safetensors"
    main(["export", str(run), str(out), "--dtype", "float32"])
    student = load_model(out)
    card = json.loads(out.with_suffix(".json").read_text())
    assert student.prediction == "flow" and student.image_shape == (1, 28, 28)
    assert card["steps_per_sample"] == 2 and card["distill_steps"] == 4 and card["sampler"] == "ddim"
    assert card["teacher"] == str(teacher) and card["class_names"] == list("abcdefghij")
    assert len(card["commands"]) == 2 and card["wall_time_s"] > 0
    teacher_net = load_model(teacher).net.state_dict()
    changed = [k for k, v in student.net.state_dict().items() if not torch.equal(v, teacher_net[k])]
    assert changed, "the student's weights equal the teacher's: no distillation step was taken"


def test_distill_refuses_changed_config_and_existing_run(tmp_path, teacher, capsys):
    _run(tmp_path, teacher)
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / "run"), "--resume", "--lr", "0.5", "--no-progress"])
    assert e.value.code == 2 and "config differs" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # steps may change on resume, but not below where the round already is
        main(["--out", str(tmp_path / "run"), "--resume", "--steps", "1", "--no-progress"])
    assert "already at step 2" in capsys.readouterr().err
    main(["--out", str(tmp_path / "run"), "--resume", "--steps", "3", "--no-progress"])  # a longer last round
    assert json.loads((tmp_path / "run" / "run.json").read_text())["sessions"][-1]["end"] == {"round": 1, "step": 3}
    with pytest.raises(SystemExit):
        _run(tmp_path, teacher)  # the same folder again without --resume
    assert "pass --resume" in capsys.readouterr().err


def test_distill_errors_name_the_argument(tmp_path, teacher, capsys):
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "r"), "--no-progress"])
    assert "--teacher is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _run(tmp_path, teacher, "--n-steps", "3")
    assert "n_steps must be a power of 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", str(tmp_path / "nothing"), str(tmp_path / "s.safetensors")])
    assert "not a distillation run" in capsys.readouterr().err
