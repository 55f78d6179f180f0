"""The MLflow UI, in a real browser: a real `mlflow server` and headless Chromium.

The store holds two short training runs (pipeline.train.run) and the compare run made
from them. Screenshots go to tests/artifacts/ui/ (ignored by git), where a person can look
at them; each path is printed.

Needs Debian's chromium (/usr/bin/chromium) and Playwright's Python package; where either
is missing the tests skip with the reason printed, and fail under CI=true
(``conftest.require``). A Chromium that is there but does not start is a failure everywhere.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import require
from pipeline import compare
from runs_helpers import (REPO_ROOT, VENV_BIN, deactivate_store, free_port, new_store,
                          trained_pair)  # noqa: F401 - trained_pair is a fixture

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
SCREENSHOTS = REPO_ROOT / "tests" / "artifacts" / "ui"
LOAD_MS = 60_000


@pytest.fixture(scope="module")
def sync_playwright():
    if not CHROMIUM.exists():
        require("chromium", f"{CHROMIUM} is not installed (apt-get install -y chromium)")
    try:
        from playwright.sync_api import sync_playwright as sp
    except ImportError as e:
        require("playwright", f"its Python package cannot be imported ({e}); "
                              "make install-test installs it")
    return sp


@pytest.fixture(scope="module")
def store_with_runs(trained_pair, tmp_path_factory):
    """Two training runs and their compare run, in a store of this module's own."""
    directory = tmp_path_factory.mktemp("ui_store")
    with pytest.MonkeyPatch.context() as mp:
        store = new_store(directory, mp, tmp_path_factory, source=trained_pair.dir)
        try:
            compare_id = compare.compare()
            experiment_id = store.client.get_run(compare_id).info.experiment_id
        finally:
            deactivate_store()
    return store, {"noskip": trained_pair.noskip, "skip": trained_pair.skip,
                   "compare": compare_id, "experiment": experiment_id}


@pytest.fixture(scope="module")
def server(sync_playwright, store_with_runs):
    store, ids = store_with_runs
    port = free_port()
    log = open(store.dir / "server.log", "w")
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID",
                        "MLFLOW_EXPERIMENT_NAME")}
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store.uri,
         "--default-artifact-root", str(store.dir / "mlruns"), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        cwd=store.dir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}:\n"
                            + (store.dir / "server.log").read_text()[-3000:])
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("mlflow server did not answer /health within 120 s:\n"
                            + (store.dir / "server.log").read_text()[-3000:])
            time.sleep(0.5)
        yield base, ids
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        try:  # workers it started in its own session, if any outlived it
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        log.close()


@pytest.fixture(scope="module")
def browser(sync_playwright, server):
    with sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        except Exception as e:  # noqa: BLE001 - installed but broken: a failure, not a skip
            pytest.fail(f"chromium: {CHROMIUM} is installed but did not start: "
                        f"{' '.join(str(e).split())[:500]}", pytrace=False)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    pg = context.new_page()
    pg.set_default_timeout(LOAD_MS)
    yield pg
    context.close()


def screenshot(page, name: str, full_page: bool = False) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    ignore = SCREENSHOTS.parent / ".gitignore"
    if not ignore.exists():
        ignore.write_text("# screenshots of the browser tests: look, don't commit\n*\n")
    path = SCREENSHOTS / name
    page.screenshot(path=str(path), full_page=full_page)
    assert path.stat().st_size > 10_000, f"{path} is suspiciously small"
    print(f"screenshot: {path}")
    return path


def test_experiment_page_lists_both_training_runs_and_the_compare_run(server, page):
    base, ids = server
    # "Model training" is the view of a training experiment (the UI opens GenAI by default).
    page.goto(f"{base}/#/experiments/{ids['experiment']}?workflowType=machine_learning")
    for name in ("resnet50-noskip", "resnet50-skip", "compare-resnet50"):
        page.get_by_text(name, exact=True).first.wait_for(state="visible")
    page.wait_for_timeout(1000)
    screenshot(page, "experiment_runs.png")
    # The chart view overlays every run's grad_norm/* series.
    page.locator('label:has(input[name="runs-view-mode"][value="CHART"])').click()
    show_section(page, "grad_norm")  # below the compare run's summary metrics
    page.get_by_text("grad_norm/conv1").first.wait_for(state="visible")
    page.locator(".js-plotly-plot").first.wait_for(state="visible")
    for run in ("resnet50-noskip", "resnet50-skip"):
        page.get_by_text(f"{run} (grad_norm/conv1)").first.wait_for(state="attached")
    page.wait_for_timeout(2000)
    screenshot(page, "experiment_charts.png")


def test_training_run_page_renders_the_grad_norm_conv1_chart(server, page):
    base, ids = server
    page.goto(f"{base}/#/experiments/{ids['experiment']}/runs/{ids['noskip']}/model-metrics")
    page.get_by_text("resnet50-noskip", exact=True).first.wait_for(state="visible")
    page.get_by_text("resnet50-noskip (grad_norm/conv1)").first.wait_for(state="visible")
    plots = page.locator(".js-plotly-plot")
    plots.first.wait_for(state="visible")
    assert plots.count() >= 5, "one chart per probed layer"
    # a drawn line, not an empty frame
    page.locator(".js-plotly-plot svg path.js-line").first.wait_for(state="attached")
    page.wait_for_timeout(1000)
    screenshot(page, "run_model_metrics.png")


def test_compare_run_artifacts_preview_the_summary_and_the_plots(server, page):
    base, ids = server
    run_url = f"{base}/#/experiments/{ids['experiment']}/runs/{ids['compare']}/artifacts"
    page.goto(f"{run_url}/comparison/summary.md")
    page.get_by_text("Gradient norms: skip vs no skip").first.wait_for(state="visible")
    page.get_by_text("Per epoch: median norm (status)").first.wait_for(state="attached")
    page.wait_for_timeout(1000)
    screenshot(page, "compare_summary_md.png")
    for name in ("gradient_norms.png", "depth_profile.png"):
        page.get_by_text(name, exact=True).first.click()  # in the artifact tree, as a user does
        page.get_by_text(f"comparison/{name}").first.wait_for(state="visible")
        page.wait_for_function(
            "() => [...document.images].some(i => i.src.startsWith('blob:') && i.naturalWidth > 300)",
            timeout=LOAD_MS)
        page.wait_for_timeout(1000)
        screenshot(page, f"compare_{name}")


# The y tick labels of the chart whose legend names ``series``, as numbers (the UI writes a
# minus sign as U+2212).
TICKS_OF = """series => {
  const charts = [...document.querySelectorAll('.js-plotly-plot')].filter(plot => {
    let card = plot;
    for (let i = 0; i < 10 && card; i++, card = card.parentElement) {
      if (card.querySelectorAll('.js-plotly-plot').length > 1) return false;
      if (card.innerText && card.innerText.includes(series)) return true;
    }
    return false;
  });
  return charts.map(p => [...p.querySelectorAll('g.ytick text')]
                          .map(t => Number(t.textContent.replace('\\u2212', '-'))));
}"""


def show_section(page, section: str) -> None:
    """Scroll a chart section's heading into view: the UI draws its charts only then."""
    page.get_by_text(section, exact=True).first.scroll_into_view_if_needed()


def _ticks(page, series: str) -> list[float]:
    show_section(page, series.split("(")[1].split("/")[0])
    page.get_by_text(series).first.scroll_into_view_if_needed()
    page.wait_for_function(f"() => ({TICKS_OF})({series!r}).some(t => t.length > 1)",
                           timeout=LOAD_MS)
    charts = page.evaluate(TICKS_OF, series)
    assert len(charts) == 1, f"{len(charts)} charts name {series}"
    return charts[0]


def test_a_runs_model_metrics_page_shows_the_vanishing_stem_in_decades(server, page):
    base, ids = server
    page.goto(f"{base}/#/experiments/{ids['experiment']}/runs/{ids['noskip']}/model-metrics"
              "?workflowType=machine_learning")
    linear = _ticks(page, "resnet50-noskip (grad_norm/conv1)")
    assert set(linear) == {0}  # MLflow's linear axis: a 1e-22 gradient reads 0, 0, 0
    decades = _ticks(page, "resnet50-noskip (grad_norm_log10/conv1)")
    assert len(set(decades)) > 1 and max(decades) < -15, decades  # about 1e-22: -22
    page.wait_for_timeout(1000)
    screenshot(page, "run_model_metrics_log10.png")


def test_the_experiments_chart_view_shows_both_stems_decades_apart(server, page):
    base, ids = server
    page.goto(f"{base}/#/experiments/{ids['experiment']}?workflowType=machine_learning")
    page.get_by_text("resnet50-noskip", exact=True).first.wait_for(state="visible")
    page.locator('label:has(input[name="runs-view-mode"][value="CHART"])').click()
    decades = _ticks(page, "resnet50-skip (grad_norm_log10/conv1)")
    page.get_by_text("resnet50-noskip (grad_norm_log10/conv1)").first.wait_for(state="attached")
    assert max(decades) - min(decades) >= 15, decades  # one axis holds both stems
    page.wait_for_timeout(1500)
    screenshot(page, "experiment_charts_log10.png")
