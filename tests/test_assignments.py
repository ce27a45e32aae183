"""minidiff.assignments: exercises/ is generated from solutions/, markers are checked, metadata matches the checks."""
import nbformat
import pytest

from minidiff.course import assignments, checks
from minidiff.course.assignments import ROOT, MarkerError, build, make_exercise, strip_source

SOLUTIONS = sorted((ROOT / "solutions").glob("*.ipynb"))


def test_exercises_are_up_to_date_with_solutions():
    assert build(check=True) == [], "run: python -m minidiff.assignments build"
    assert assignments.main(["build", "--check"]) == 0


def test_solution_region_becomes_a_stub_at_its_indentation():
    src = "def f(x):\n    ### BEGIN SOLUTION\n    return x + 1\n    ### END SOLUTION\n\nprint(f)"
    assert strip_source(src, "code", "nb, cell 0") == (
        "def f(x):\n    # YOUR CODE HERE\n    raise NotImplementedError()\n\nprint(f)")
    hidden = "r = check()\n### BEGIN HIDDEN TESTS\nassert r.passed\n### END HIDDEN TESTS"
    assert strip_source(hidden, "code", "nb, cell 1") == "r = check()"
    answer = "### BEGIN SOLUTION\nThe variance stays 1.\n### END SOLUTION"
    assert strip_source(answer, "markdown", "nb, cell 2") == "YOUR ANSWER HERE"


@pytest.mark.parametrize("source, phrase", [
    ("### BEGIN SOLUTION\nx = 1\n", "never closed"),
    ("x = 1\n### END SOLUTION\n", "without a matching BEGIN"),
    ("### BEGIN SOLUTION\n### BEGIN HIDDEN TESTS\n### END HIDDEN TESTS\n### END SOLUTION\n", "cannot nest"),
    ("### BEGIN HIDDEN TESTS\nx = 1\n### END SOLUTION\n", "without a matching BEGIN"),
])
def test_unpaired_or_nested_markers_name_notebook_and_cell(source, phrase):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("intro"), nbformat.v4.new_code_cell(source)])
    with pytest.raises(MarkerError, match=rf"A9_broken.ipynb, cell 1: .*{phrase}"):
        make_exercise(nb, "A9_broken.ipynb")


def test_build_check_reports_stale_and_extra_exercises(tmp_path):
    sol, ex = tmp_path / "solutions", tmp_path / "exercises"
    sol.mkdir()
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("### BEGIN SOLUTION\nx = 1\n### END SOLUTION")])
    nbformat.write(nb, sol / "A1_x.ipynb")
    assert build(sol, ex, check=True) == [f"{ex / 'A1_x.ipynb'}: missing"]
    assert build(sol, ex) and build(sol, ex, check=True) == []
    (ex / "old.ipynb").write_text("{}")
    assert build(sol, ex, check=True) == [f"{ex / 'old.ipynb'}: has no source in {sol}"]
    assert assignments.main(["build", "--check", "--solutions", str(sol), "--exercises", str(ex)]) == 1


def test_every_assignment_with_checks_has_a_solution_and_an_exercise():
    with_checks = {name.split(".")[0] for name in checks.TASKS}
    notebooks = {nbformat.read(p, as_version=4).metadata["minidiff"]["assignment"]: p.name for p in SOLUTIONS}
    assert set(notebooks) == with_checks == {"A1", "A2", "A3", "A4", "A5", "A6", "A7"}
    assert all((ROOT / "exercises" / name).is_file() for name in notebooks.values())
    assert all(name.startswith(f"{a}_") for a, name in notebooks.items())  # the grader's file-name fallback


@pytest.mark.parametrize("path", SOLUTIONS, ids=[p.stem for p in SOLUTIONS])
def test_solution_notebook_is_clean_and_its_metadata_matches_the_checks(path):
    nb = nbformat.read(path, as_version=4)
    assignment = nb.metadata["minidiff"]["assignment"]
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code), "commit notebooks with outputs cleared"
    assert len({c.id for c in nb.cells}) == len(nb.cells)
    graded = {c.metadata["minidiff"]["task"]: c.metadata["minidiff"]["points"]
              for c in code if "points" in c.metadata.get("minidiff", {})}
    assert graded == {t.name: t.points for t in checks.tasks_for(assignment)}
    questions = [c for c in nb.cells if "question" in c.metadata.get("minidiff", {})]
    assert 2 <= len(questions) <= 3 and all("### BEGIN SOLUTION" in c.source for c in questions)
    exercise = nbformat.read(ROOT / "exercises" / path.name, as_version=4)
    assert [c.id for c in exercise.cells] == [c.id for c in nb.cells]
    assert "BEGIN SOLUTION" not in nbformat.writes(exercise) and "HIDDEN TESTS" not in nbformat.writes(exercise)
