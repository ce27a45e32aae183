"""The explorers in a real browser: JupyterLab in headless Chromium, driven by selenium.

The test starts JupyterLab itself on 127.0.0.1 (a free port, a random token, smoke mode), opens lectures 01, 03 and
05, runs all their cells, and for each explorer asserts that a figure appears, that changing a dropdown and a slider
changes the figure's pixels, and that the browser console shows no widget errors. On failure it saves a screenshot
and the console log to ``browser-artifacts/`` (or $MINIDIFF_BROWSER_ARTIFACTS). It stops every process it started.

It needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them) and skips, saying so, without.
"""
import base64
import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
selenium = pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[dev]')")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                       reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"),
]
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium import webdriver  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

ARTIFACTS = Path(os.environ.get("MINIDIFF_BROWSER_ARTIFACTS", REPO / "browser-artifacts"))
LECTURES = ["01_forward_process", "03_samplers", "05_guidance"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lab_root(tmp: Path) -> tuple[Path, Path]:
    """A copy of the lectures (so the run can never write outputs into the repository) and JupyterLab settings
    with autosave and the news pop-up off."""
    shutil.copytree(REPO / "notebooks", tmp / "root" / "notebooks")
    settings = tmp / "settings"
    for plugin, value in {"@jupyterlab/docmanager-extension/plugin": '{"autosave": false}',
                          "@jupyterlab/apputils-extension/notification": '{"fetchNews": "false"}'}.items():
        path = settings / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(value)
    return tmp / "root", settings


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server of our own, on a copy of the lectures, stopped at the end."""
    port, token = _free_port(), uuid.uuid4().hex
    root, settings = _lab_root(tmp_path_factory.mktemp("lab"))
    env = {**os.environ, "MINIDIFF_SMOKE": "1", "OMP_NUM_THREADS": "1", "JUPYTER_PLATFORM_DIRS": "1",
           "JUPYTERLAB_SETTINGS_DIR": str(settings)}
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True",
           "--ServerApp.open_browser=False", "--allow-root"]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    log = open(ARTIFACTS / "jupyterlab.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(f"JupyterLab exited with {proc.returncode}; see {log.name}")
                time.sleep(0.5)
        else:
            pytest.fail("JupyterLab did not answer within 60 s")
        yield url, token
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
        log.close()


@pytest.fixture(scope="module")
def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--window-size=1400,1000"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver, condition, timeout, what):
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.25).until(lambda d: condition(d))
    except Exception as err:
        raise AssertionError(f"timed out after {timeout} s waiting for {what}") from err


def _pixels(img_src: str):
    """Decoded RGBA pixels of a data: URL PNG."""
    import matplotlib.image

    assert img_src.startswith("data:image/png;base64,"), img_src[:60]
    return matplotlib.image.imread(io.BytesIO(base64.b64decode(img_src.split(",", 1)[1])), format="png")


def _explorer_image(explorer):
    imgs = explorer.find_elements(By.CSS_SELECTOR, ".widget-output img")
    return imgs[-1].get_attribute("src") if imgs else None


def _changed(driver, explorer, before: str, timeout: float, what: str):
    """Wait for the explorer's figure to differ from ``before`` in pixels; return the new src."""
    import numpy as np

    def new_src(d):
        try:
            src = _explorer_image(explorer)
        except StaleElementReferenceException:  # JupyterLab re-rendered the output: look at the current explorer
            current = d.find_elements(By.CSS_SELECTOR, ".widget-interact")
            src = _explorer_image(current[-1]) if current else None
        return src if src and src != before else None
    src = _wait(driver, new_src, timeout, f"the figure to change after {what}")
    a, b = _pixels(before), _pixels(src)
    assert a.shape != b.shape or not np.array_equal(a, b), f"{what}: new image, same pixels"
    return src


def _save_artifacts(driver, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))
    (ARTIFACTS / f"{name}-console.txt").write_text("\n".join(str(e) for e in driver.get_log("browser")))


def _run_all(driver, url: str, token: str, lecture: str) -> None:
    driver.get(f"{url}/lab/tree/notebooks/{lecture}.ipynb?token={token}&reset")
    _wait(driver, lambda d: d.execute_script(
        "const a = window.jupyterapp; const w = a && a.shell.currentWidget;"
        "return !!(w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel"
        " && w.sessionContext.session.kernel.connectionStatus === 'connected')"), 120, "the notebook's kernel")
    driver.execute_script("window.jupyterapp.commands.execute('notebook:run-all-cells')")
    _wait(driver, lambda d: d.execute_script(
        "const w = window.jupyterapp.shell.currentWidget; const cells = w.content.widgets;"
        "const code = cells.filter(c => c.model.type === 'code');"
        "return w.sessionContext.session.kernel.status === 'idle' && code.length > 0"
        " && code.every(c => c.model.executionCount !== null || c.model.sharedModel.source.trim() === '')"),
        240, f"{lecture} to run to the end")


def _controls(explorer):
    selects = explorer.find_elements(By.CSS_SELECTOR, ".widget-dropdown select")
    sliders = explorer.find_elements(By.CSS_SELECTOR, ".widget-slider .noUi-handle, .widget-hslider .noUi-handle")
    return selects, sliders


@pytest.mark.parametrize("lecture", LECTURES)
def test_explorer_draws_and_redraws_in_jupyterlab(lab, browser, lecture):
    url, token = lab
    browser.get_log("browser")  # drop what earlier pages logged
    try:
        _run_all(browser, url, token, lecture)
        explorers = browser.find_elements(By.CSS_SELECTOR, ".widget-interact")
        assert explorers, f"{lecture}: no explorer widget rendered"
        explorer = explorers[-1]
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", explorer)
        src = _wait(browser, lambda d: _explorer_image(explorer), 60, f"{lecture}'s explorer to show a figure")
        selects, sliders = _controls(explorer)
        assert selects and sliders, f"{lecture}: explorer has {len(selects)} dropdowns and {len(sliders)} sliders"
        dropdown = Select(selects[0])
        options = [o.get_attribute("value") for o in dropdown.options]
        current = dropdown.first_selected_option.get_attribute("value")
        dropdown.select_by_value(next(v for v in options if v != current))
        src = _changed(browser, explorer, src, 60, f"{lecture}: choosing another value in the first dropdown")
        handle = sliders[0]
        handle.click()
        handle.send_keys(Keys.ARROW_RIGHT)
        handle.send_keys(Keys.ARROW_RIGHT)
        _changed(browser, explorer, src, 60, f"{lecture}: moving the first slider")
        errors = [e for e in browser.get_log("browser")
                  if e.get("level") == "SEVERE" and "widget" in e.get("message", "").lower()]
        assert not errors, f"{lecture}: widget errors in the browser console: {errors}"
    except BaseException:
        _save_artifacts(browser, lecture)
        raise
