"""The explorers send their figure to the frontend: a kernel-level test that needs no browser.

A real Jupyter kernel (jupyter_client) builds each explorer and displays it, then a control is changed the way the
frontend changes it (setting the widget's value). Each time, the kernel must publish a PNG on its iopub channel
(a display_data message, routed by the frontend into the explorer's output area), and a changed control must give
a different PNG. This caught the bug that left the explorers blank in JupyterLab: the view functions returned a
figure that ``ipywidgets.interactive`` never displayed. tests/test_explorers_browser.py checks the same in Chromium.
"""
import base64
import os
import queue

import pytest

jupyter_client = pytest.importorskip("jupyter_client")

SETUP = """
import torch
from minidiff.course import widgets
from minidiff.denoiser import Denoiser
from minidiff.models.unet import unet_from_preset
from minidiff.schedules import alphas_cumprod_from_betas, linear_betas
torch.manual_seed(0)
net = unet_from_preset("tiny", num_classes=3, base_channels=8, channel_mults=(1, 2), attn_levels=(), zero_init=False)
torch.nn.init.normal_(net.conv_out.weight, std=0.3)  # an untrained net predicts 0 for every class otherwise
small = Denoiser(net.eval(), alphas_cumprod_from_betas(linear_betas(100)))
images = torch.rand(2, 1, 16, 16) * 2 - 1
"""
# (constructor, control changes as (child index or description, new value))
EXPLORERS = {
    "schedule": ("widgets.schedule_explorer(images)", [("schedule", "'cosine'"), ("t", "100")]),
    "sampler": ("widgets.sampler_explorer(small, n_images=2, image_size=16)", [("sampler", "'euler'"), ("steps", "4")]),
    "guidance": ("widgets.guidance_explorer(small, n_images=2, image_size=16)", [("class", "1"), ("scale", "0.0")]),
}


@pytest.fixture(scope="module")
def kernel():
    km = jupyter_client.KernelManager(kernel_name="python3")
    km.start_kernel(env={**os.environ, "MINIDIFF_SMOKE": "1", "OMP_NUM_THREADS": "1"})
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=120)
    _run(kc, SETUP)
    yield kc
    kc.stop_channels()
    km.shutdown_kernel(now=True)


def _run(kc, code: str, timeout: float = 120) -> list:
    """Execute ``code``; return the PNGs (bytes) it published on iopub, in order. Fail on an error or traceback."""
    msg_id = kc.execute(code)
    pngs = []
    while True:
        try:
            msg = kc.get_iopub_msg(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"kernel went silent while running: {code}")
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        kind, content = msg["msg_type"], msg["content"]
        if kind == "error":
            pytest.fail(f"{content['ename']}: {content['evalue']} while running: {code}")
        if kind == "stream" and "Traceback" in content.get("text", ""):
            pytest.fail(content["text"])
        if kind in ("display_data", "update_display_data") and "image/png" in content.get("data", {}):
            pngs.append(base64.b64decode(content["data"]["image/png"]))
        if kind == "status" and content["execution_state"] == "idle" and msg["parent_header"].get("msg_id") == msg_id:
            return pngs


def _control(name: str) -> str:
    return f"next(c for c in w.children if getattr(c, 'description', None) == {name!r})"


@pytest.mark.parametrize("which", sorted(EXPLORERS))
def test_explorer_displays_a_figure_and_redraws_on_every_change(kernel, which):
    make, changes = EXPLORERS[which]
    first = _run(kernel, f"w = {make}\ndisplay(w)")
    assert len(first) == 1, f"{which} explorer: expected one PNG when created, got {len(first)}"
    seen = [first[0]]
    for name, value in changes:
        pngs = _run(kernel, f"{_control(name)}.value = {value}")
        assert len(pngs) == 1, f"{which}: changing {name!r} published {len(pngs)} PNGs, expected 1"
        assert pngs[0] not in seen, f"{which}: changing {name!r} to {value} did not change the picture"
        seen.append(pngs[0])
