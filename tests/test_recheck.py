"""The grader's fresh-process re-check keeps a cell's definitions and drops everything that could tamper."""
from minidiff.course.recheck import definitions, suspicious_lines

CELLS = [
    "%matplotlib inline\nimport torch\nfrom minidiff import budget",
    "T = 1000\ndevice = torch.device('cpu')\nx: int = 3",
    "def snr(ab):\n    return ab / (1 - ab)\nprint(snr(torch.tensor(0.5)))",
    "torch.allclose = lambda *a, **k: True\nimport sys\nsys.modules['minidiff.course.checks'] = None",
    "sys.path.insert(0, 'fake')\nfor i in range(3):\n    T = i\nwith open('f', 'w') as f:\n    f.write('x')",
    "class Helper:\n    pass\nopts = {}\nopts['a'] = 1\n!pip install nothing",
    "def broken(:\n    pass",
]


def test_definitions_keep_imports_defs_classes_and_plain_assignments_only():
    kept = definitions(CELLS)
    assert kept[:3] == ["import torch", "from minidiff import budget", "T = 1000"]
    assert "device = torch.device('cpu')" in kept and "x: int = 3" in kept
    assert any(k.startswith("def snr(ab):") for k in kept) and any(k.startswith("class Helper") for k in kept)
    assert "import sys" in kept and "opts = {}" in kept
    text = "\n".join(kept)
    for dropped in ("print(", "torch.allclose", "sys.modules", "sys.path.insert", "for i in", "open(", "opts['a']",
                    "pip", "broken"):
        assert dropped not in text, dropped


def test_suspicious_lines_point_the_teacher_at_tampering():
    flagged = suspicious_lines(CELLS)
    assert "torch.allclose = lambda *a, **k: True" in flagged
    assert "sys.modules['minidiff.course.checks'] = None" in flagged and "sys.path.insert(0, 'fake')" in flagged
    assert not any("def snr" in line or "T = 1000" in line for line in flagged)
