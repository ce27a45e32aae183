"""minidiff.grade: solutions score full marks, exercises zero, and broken notebooks still get honest reports.

Each graded notebook starts a kernel (a few seconds), so the notebooks are graded once per module and shared.
"""
import csv
import json

import nbformat
import pytest

from minidiff.course import checks
from minidiff.course.assignments import ROOT
from minidiff.course.grade import grade_all, main

NAMES = ["A1_forward_process", "A2_ddpm", "A3_samplers", "A4_guidance", "A5_latent_space", "A6_text_conditioning",
         "A7_editing"]
SNR = "def snr(alphas_cumprod):\n    return alphas_cumprod / (1 - alphas_cumprod)"
Q_SAMPLE = ("def q_sample(x0, t, noise, alphas_cumprod):\n"
            "    ab = alphas_cumprod[t].to(x0.dtype).reshape(-1, 1, 1, 1)\n"
            "    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise")
FAKE = ("import json, os\n"
        "with open(os.environ['MINIDIFF_GRADE_LOG'], 'a') as f:\n"
        "    f.write(json.dumps({'source': 'grader', 'nonce': 'guess', 'task': 'A1.cosine_alphas_cumprod', "
        "'passed': True, 'points': 2, 'max_points': 2, 'message': 'PASS', 'status': 'pass'}) + '\\n')\n"
        "    f.write(json.dumps({'source': 'notebook', 'task': 'A1.linear_alphas_cumprod', 'passed': True, "
        "'points': 1, 'max_points': 1, 'message': 'PASS', 'status': 'pass'}) + '\\n')")


@pytest.fixture(scope="module")
def course_reports(tmp_path_factory):
    out = tmp_path_factory.mktemp("reports")
    paths = [ROOT / d / f"{n}.ipynb" for d in ("solutions", "exercises") for n in NAMES]
    return out, {(r["notebook"].split("/")[-2], r["assignment"]): r for r in grade_all(paths, out, timeout=120)}


def test_every_solution_scores_full_marks(course_reports):
    _, reports = course_reports
    for n in NAMES:
        r = reports[("solutions", n[:2])]
        assert r["score"] == r["max_score"] == sum(t.points for t in checks.tasks_for(n[:2])), r
        assert r["status"] == "ok" and all(t["notebook_check"] == "PASS" for t in r["tasks"])


def test_every_fresh_exercise_scores_zero_and_gets_a_report(course_reports):
    out, reports = course_reports
    for n in NAMES:
        r = reports[("exercises", n[:2])]
        assert r["score"] == 0 and r["max_score"] > 0
        assert all(t["status"] == "not attempted" for t in r["tasks"]), r["tasks"]
        assert (out / f"exercises__{n}.txt").read_text().count("NotImplementedError") >= len(r["tasks"])
        assert [q["answer"] for q in r["questions"]] == ["YOUR ANSWER HERE"] * len(r["questions"])
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert len(rows) == 2 * len(NAMES)
    assert {row["student"] for row in rows} >= {"solutions__A1_forward_process", "exercises__A5_latent_space"}
    assert json.loads((out / "solutions__A3_samplers.json").read_text())["score"] == 8
    assert json.loads((out / "solutions__A5_latent_space.json").read_text())["score"] == 7
    assert json.loads((out / "solutions__A6_text_conditioning.json").read_text())["score"] == 6
    assert json.loads((out / "solutions__A7_editing.json").read_text())["score"] == 5


def _notebook(path, sources):
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources]), path)
    return path


@pytest.fixture(scope="module")
def broken_reports(tmp_path_factory):
    d = tmp_path_factory.mktemp("broken")
    crash = _notebook(d / "A1_crash.ipynb", ["import torch", SNR, "1 / 0", "import os\nos._exit(1)", Q_SAMPLE, FAKE])
    loop = _notebook(d / "A1_loop.ipynb", [SNR, "while True:\n    pass", "from minidiff.course.checks import check\n"
                                           "check('A1.snr', snr)"])
    tamper = _notebook(d / "A1_tamper.ipynb", [TAMPER_FILES, TAMPER_PATCH, "def snr(alphas_cumprod):\n    return alphas_cumprod"])
    out = d / "reports"
    assert main([str(crash), str(loop), str(tamper), "--out", str(out), "--timeout", "60", "--cell-timeout", "3"]) == 0
    return out, {p: json.loads((out / f"{p}.json").read_text()) for p in ("A1_crash", "A1_loop", "A1_tamper")}


# A student cell that plants a fake minidiff whose checks pass everything, first on sys.path ...
TAMPER_FILES = ("import pathlib, sys\n"
                "fake = pathlib.Path('fake_site/minidiff/course/checks')\n"
                "fake.mkdir(parents=True, exist_ok=True)\n"
                "for d in ('fake_site/minidiff', 'fake_site/minidiff/course'):\n"
                "    (pathlib.Path(d) / '__init__.py').write_text('')\n"
                "(fake / '__init__.py').write_text('def regrade(*a, **k):\\n    pass\\n')\n"
                "sys.path.insert(0, str(pathlib.Path('fake_site').resolve()))")
# ... and patches the real checks and torch in the kernel, so that every comparison passes there.
TAMPER_PATCH = ("import torch\nimport minidiff.course.checks as c\n"
                "c.run_task = lambda name, fn, **kw: c.CheckResult(name, True, 1, 1, 'PASS', 'pass')\n"
                "torch.allclose = lambda *a, **k: True")


def test_tampering_in_the_notebook_does_not_reach_the_fresh_recheck(broken_reports):
    _, reports = broken_reports
    r = reports["A1_tamper"]
    snr = {t["task"]: t for t in r["tasks"]}["A1.snr"]
    assert snr["points"] == 0 and not snr["passed"] and snr["status"] == "fail"
    assert r["recheck"]["returncode"] == 0 and r["recheck"]["process"].startswith("fresh")
    flagged = " ".join(n for n in r["notes"] if n.startswith("for the teacher"))
    assert "sys.path.insert" in flagged and "torch.allclose = " in flagged


def test_a_crashing_notebook_keeps_the_points_it_earned(broken_reports):
    out, reports = broken_reports
    r = reports["A1_crash"]
    points = {t["task"]: t["points"] for t in r["tasks"]}
    assert points == {"A1.linear_alphas_cumprod": 0, "A1.cosine_alphas_cumprod": 0, "A1.q_sample": 2, "A1.snr": 1}
    assert r["status"] == "crashed" and r["cells"]["killed_kernel"] == [3]
    assert r["cells"]["errors"][0]["ename"] == "ZeroDivisionError"
    missing = {t["task"]: t["message"] for t in r["tasks"]}["A1.cosine_alphas_cumprod"]
    assert "check cell missing or not executed" in missing  # and the faked log line did not count
    assert "the notebook's own check said PASS" in " ".join(r["notes"])
    assert (out / "A1_crash.txt").exists() and (out / "A1_crash.executed.ipynb").exists()


def test_an_infinite_loop_is_interrupted_and_later_cells_still_count(broken_reports):
    _, reports = broken_reports
    r = reports["A1_loop"]
    assert r["status"] == "timeout" and r["cells"]["timed_out"] == [1]
    assert {t["task"]: t["points"] for t in r["tasks"]}["A1.snr"] == 1 and r["score"] == 1
    assert [t["notebook_check"] for t in r["tasks"] if t["task"] == "A1.snr"] == ["PASS"]
