"""report.html from plain data: the answer it states, the values it holds, what it loads.

Inputs are built here with known numbers (constant norms, so the medians and decades are
known without computing them the way the module does); the diagnosis tags come from the real
``health.diagnose`` and the statuses from the real ``health.status`` rule. The page's
chart data is read back from the Bokeh document embedded in it, the data the browser draws.
tests/test_report_browser.py opens the pages in Chromium.
"""
from __future__ import annotations

import base64
import gzip
import html
import json
import re
import subprocess
import sys
from html.parser import HTMLParser

import numpy as np
import pytest

from pipeline import health, names, report_html, report_page, stats
from pipeline.report_figures import bucket
from runs_helpers import REPO_ROOT

LAYERS = ["conv1", "layer1.0.conv1", "layer2.0.conv1", "layer3.0.conv1", "fc"]
NOSKIP = [1e-21, 1e-17, 1e-13, 1e-8, 1e-3]   # conv1 18 decades below fc
SKIP = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]        # conv1 2 decades below fc
# A full default run: 10 epochs x 3,125 batches.
FULL_STEPS, STEPS_PER_EPOCH = 31_250, 3_125
# Layer names of a ResNet-50 probed with layers=all: the stem, 16 blocks x 3 convs, the 4
# downsample convs and the head.
ALL_LAYERS = (["conv1"] + [x for stage, blocks in zip(range(1, 5), (3, 4, 6, 3))
                           for b in range(blocks)
                           for x in [f"layer{stage}.{b}.conv{k}" for k in (1, 2, 3)]
                           + ([f"layer{stage}.0.downsample.0"] if b == 0 else [])] + ["fc"])


def record(medians, steps=200, noise=0.0, seed=0, layers=LAYERS):
    """A norms.npz dict whose layer i sits at medians[i] (times log-normal noise)."""
    rng = np.random.default_rng(seed)
    norms = np.asarray(medians, dtype=np.float64)[None, :] * 10.0 ** (
        rng.normal(0, noise, (steps, len(layers))) if noise else np.zeros((steps, len(layers))))
    return {"steps": np.arange(steps, dtype=np.int64), "layers": np.array(layers),
            "norms": norms,
            "loss": np.linspace(2.4, 1.5, steps)}


def statuses(rec) -> dict[str, str]:
    """compare.py's rule per layer, as health.diagnose applies it."""
    med, zero = np.median(rec["norms"], axis=0), (rec["norms"] == 0).mean(axis=0)
    return {str(x): health.status(float(m), float(z), float(med[-1]))
            for x, m, z in zip(rec["layers"], med, zero)}


def training_page(rec, run_name="resnet50-noskip", skip=False, **kw):
    tags = health.diagnose(rec["steps"], list(rec["layers"]), rec["norms"], rec["loss"], 10)
    return report_html.training_report(
        rec, tags, run_name=run_name, run_id="0123abcd", model="resnet50", skip=skip,
        params={"lr": "0.001", "batch_size": "16"}, test_accuracy=0.1,
        steps_per_epoch=kw.pop("steps_per_epoch", 100), statuses=statuses(rec), **kw)


def headline(page: str) -> str:
    found = re.search(r'<h1 id="headline">(.*?)</h1>', page, re.S)
    assert found, "the page has no headline"
    return html.unescape(re.sub(r"<[^>]+>", "", found.group(1)))


def table_rows(page: str, table_id: str) -> list[list[str]]:
    found = re.search(rf'<table id="{table_id}">(.*?)</table>', page, re.S)
    assert found, f"no table {table_id}"
    rows = re.findall(r"<tr>(.*?)</tr>", found.group(1), re.S)
    return [[html.unescape(re.sub(r"<[^>]+>", "", c)) for c in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", r, re.S)]
            for r in rows]


def page_sources(page: str) -> list[dict]:
    """Every ColumnDataSource's columns in the page's Bokeh document: what the browser draws.
    Arrays travel as base64 (gzip-compressed when large), lists as JSON."""
    found = re.search(r"const docs_json = '(.*?)';\n", page, re.S)
    assert found, "no Bokeh document in the page"
    doc = json.loads(found.group(1).encode("ascii").decode("unicode_escape"))
    out = []

    def column(value):
        if isinstance(value, dict) and value.get("type") == "ndarray":
            raw = base64.b64decode(value["array"]["data"])
            raw = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
            return np.frombuffer(raw, dtype=value["dtype"])
        return value

    def walk(o):
        if isinstance(o, dict):
            if o.get("name") == "ColumnDataSource":
                out.append({k: column(v) for k, v in o["attributes"]["data"]["entries"]})
            for v in o.values():
                walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)
    walk(doc)
    return out


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.refs = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.refs += [(tag, k, v) for k, v in attrs if k in ("src", "href", "action", "data",
                                                               "poster", "srcset") and v]


def compare_rows():
    """compare.summarize's columns for two layers, with known medians."""
    def row(depth, layer, variant, median, status, ratio):
        return {"depth": depth, "layer": layer, "variant": variant, "run_id": f"{variant}-id",
                "median": median, "min": median / 10, "max": median * 10, "first": median,
                "last": median, "p10": median / 2, "p90": median * 2, "early_median": median,
                "late_median": median, "zero_fraction": 0.0, "status": status,
                "skip_over_noskip": ratio}
    return [row(0, "conv1", "noskip", 2.4e-21, "Vanishing", 4.1e-8 / 2.4e-21),
            row(0, "conv1", "skip", 4.1e-8, "Healthy", 4.1e-8 / 2.4e-21),
            row(1, "fc", "noskip", 1e-3, "Healthy", 2.0),
            row(1, "fc", "skip", 2e-3, "Healthy", 2.0)]


def compare_page(steps=200, parts=None, **kw):
    curves = {v: report_page.curves_from_record(record(NOSKIP if v == "noskip" else SKIP, steps),
                                                layers=["conv1", "fc"])
              for v in ("noskip", "skip")}
    part = parts or report_html.ComparePart(table=compare_rows(), curves=curves,
                                            diagnosis=["- Input-side layer `conv1`: see above."])
    runs = {v: {"run_id": f"{v}-id", "run_name": f"resnet50-{v}",
                "metrics": {names.TEST_ACCURACY: 0.25}} for v in ("noskip", "skip")}
    return report_html.compare_report(part, model="resnet50", runs=runs,
                                      steps_per_epoch=STEPS_PER_EPOCH, **kw)


def sweep_cells():
    depth = {"resnet18": 18, "resnet50": 50, "resnet152": 152}
    cells = []
    for model, d in depth.items():
        for skip in (False, True):
            # without skips: 1e-2 at depth 18 down to 1e-22 at 152; with skips 1e-2 to 1e-3
            median = {18: 1e-2, 50: 1e-9, 152: 1e-22}[d] if not skip else {18: 1e-2, 50: 5e-3, 152: 1e-3}[d]
            cells.append({"cell": f"{model}-{'skip' if skip else 'noskip'}-nobn", "model": model,
                          "depth": d, "skip": skip, "batch_norm": False, "layer": "conv1",
                          "steps": 50, "median": median, "p10": median / 2, "p90": median * 2,
                          "zero_fraction": 0.0, "health": "healthy", "test_accuracy": 0.1,
                          "run_id": f"run-{model}-{skip}", "reused": False})
    return cells


# --- the answer first ------------------------------------------------------------------------
def test_training_headline_says_conv1_vanishes_18_decades_below_fc_without_skips():
    said = headline(training_page(record(NOSKIP)))
    assert said == ("The gradient vanishes: conv1 is Vanishing (median 1e-21), 18.0 decades "
                    "below fc (0.001)."), said


def test_training_headline_says_healthy_with_skips_and_how_far_the_stem_is_below_the_head():
    said = headline(training_page(record(SKIP), run_name="resnet50-skip", skip=True))
    assert said == "Healthy, no layer vanishes: conv1 is Healthy (median 0.0001), 2.0 decades below fc (0.01).", said


def test_training_headline_says_the_network_died_when_every_layer_below_the_head_is_zero():
    rec = record(SKIP)
    rec["norms"][:, :-1] = 0.0
    said = headline(training_page(rec))
    assert said == "The network died: every layer below fc had exactly zero gradient on 100% of the steps.", said


def test_training_headline_names_the_first_nan_step_after_a_blow_up():
    rec = record(SKIP, steps=300)
    rec["norms"][250:, :] = np.nan
    rec["norms"][260, 2] = np.inf
    said = headline(training_page(rec))
    assert said.startswith("The gradient blew up: 250 NaN/Inf norms, the first at step 250."), said


def test_compare_headline_states_each_variants_status_median_and_the_decades_between():
    said = headline(compare_page())
    # log10(4.1e-8 / 2.4e-21) = 13.23
    assert said == ("conv1 is Vanishing without skips (median 2.4e-21) and Healthy with them "
                    "(4.1e-08): 13.2 decades apart."), said


def test_compare_report_takes_compare_layer_stats_frames_and_states_their_statuses():
    """The compare step's own table (a DataFrame from stats.layer_stats) goes in as is."""
    import pandas as pd  # compare's dependency, not report_html's
    frames = []
    for variant, medians in (("noskip", NOSKIP), ("skip", SKIP)):
        rec = record(medians, steps=50)
        history = pd.DataFrame({"step": np.repeat(rec["steps"], len(LAYERS)),
                                "layer": pd.Categorical(np.tile(LAYERS, 50), categories=LAYERS,
                                                        ordered=True),
                                "norm": rec["norms"].ravel()})
        frame = stats.layer_stats(history)
        frame.insert(0, "depth", range(len(frame)))
        frame.insert(2, "variant", variant)
        frames.append(frame)
    table = pd.concat(frames, ignore_index=True)
    table["skip_over_noskip"] = table["layer"].map(
        table.pivot(index="layer", columns="variant", values="median").eval("skip / noskip"))
    table = table.sort_values(["depth", "variant"], kind="stable")
    part = report_html.ComparePart(table=table, curves={
        v: report_page.curves_from_record(record(m, 50)) for v, m in (("noskip", NOSKIP), ("skip", SKIP))})
    said = headline(compare_page(parts=part))
    assert said == ("conv1 is Vanishing without skips (median 1e-21) and Healthy with them "
                    "(0.0001): 17.0 decades apart."), said


def test_sweep_headline_states_how_far_the_first_layer_falls_with_and_without_skips():
    said = headline(report_html.sweep_report(sweep_cells(), description="synthetic, 32 px"))
    assert said == ("From depth 18 to 152 (no BatchNorm), the first-layer gradient falls 20.0 "
                    "decades without skips and falls 1.0 decades with them."), said


# --- the values --------------------------------------------------------------------------------
def test_the_layer_table_shows_each_layers_median_and_status():
    rows = table_rows(training_page(record(NOSKIP)), "layers")
    header, body = rows[0], rows[1:]
    got = {r[header.index("layer")]: (r[header.index("median")], r[header.index("status")]) for r in body}
    assert got == {"conv1": ("1e-21", "Vanishing"), "layer1.0.conv1": ("1e-17", "Tiny"),
                   "layer2.0.conv1": ("1e-13", "Tiny"), "layer3.0.conv1": ("1e-08", "Weak"),
                   "fc": ("0.001", "Healthy")}


def test_the_charts_carry_every_probed_value_of_a_short_run_exactly():
    """Under MAX_POINTS steps nothing is downsampled: each layer's drawn points are its norms."""
    rec = record(NOSKIP, steps=120, noise=0.5)
    drawn = [s["med"] for s in page_sources(training_page(rec)) if "med" in s]
    for i, layer in enumerate(LAYERS):
        assert any(np.array_equal(m, rec["norms"][:, i]) for m in drawn), layer


def test_a_bucket_is_the_median_min_and_max_of_its_steps_and_counts_zeros_and_nan():
    steps = np.arange(10, 20)
    values = np.array([1.0, 3.0, 2.0, 0.0, 5.0, np.nan, 4.0, 6.0, np.inf, 8.0])
    b = bucket(steps, values, max_points=3)  # 4 steps per bucket: 10-13, 14-17, 18-19
    assert b.per == 4
    assert b.lo.tolist() == [10, 14, 18] and b.hi.tolist() == [13, 17, 19]
    assert b.med.tolist() == [2.0, 5.0, 8.0]        # positive finite values only
    assert b.mn.tolist() == [1.0, 4.0, 8.0] and b.mx.tolist() == [3.0, 6.0, 8.0]
    assert b.zeros.tolist() == [1, 0, 0] and b.bad.tolist() == [0, 1, 1]


# --- zeros, NaN and Inf -----------------------------------------------------------------------
def test_every_exact_zero_is_marked_on_the_page_not_dropped():
    rec = record(NOSKIP, steps=FULL_STEPS // 10)
    rec["norms"][100:150, 0] = 0.0          # 50 zeros in conv1
    rec["norms"][2000:2007, 1] = 0.0        # 7 in layer1.0.conv1
    page = training_page(rec)
    marks = [s for s in page_sources(page) if set(s) == {"x", "lo", "hi", "n"}]
    # Zero marks sit in the time chart only; NaN marks (none here) would too.
    assert sorted(int(s["n"].sum()) for s in marks) == [7, 50]
    conv1 = next(s for s in marks if int(s["n"].sum()) == 50)
    assert conv1["lo"].min() <= 100 and conv1["hi"].max() >= 149
    assert "exact zero gradient" in page and "no log axis can show 0" in page
    zero_steps = [r[9] for r in table_rows(page, "layers")[1:3]]
    assert zero_steps == ["2%", "0.2%"]  # 50 and 7 of 3,125 steps: a few zeros never read 0%


def test_nan_and_inf_are_counted_in_the_table_and_marked_at_the_ceiling():
    rec = record(SKIP, steps=400)
    rec["norms"][390:, :] = np.nan                  # 10 rows x 5 layers
    rec["norms"][100, 0] = np.inf
    rec["loss"][395:] = np.nan
    page = training_page(rec)
    header, *body = table_rows(page, "layers")
    assert [int(r[header.index("NaN/Inf")]) for r in body] == [11, 10, 10, 10, 10]
    # the finite values' median is still the layer's
    assert body[0][header.index("median")] == "0.0001"
    marks = [s for s in page_sources(page) if set(s) == {"x", "lo", "hi", "n"}]
    assert sum(int(s["n"].sum()) for s in marks) == 51 + 5   # 51 norms, 5 losses
    assert "NaN/Inf values (a blow-up)" in page
    assert "51 NaN/Inf norms and 5 NaN/Inf losses" in page


def test_a_record_without_steps_or_without_output_norms_still_makes_a_page():
    empty = {"steps": np.zeros(0, np.int64), "layers": np.array(LAYERS),
             "norms": np.zeros((0, 5)), "loss": np.zeros(0)}
    page = report_html.training_report(empty, {names.HEALTH_TAG: "unknown"}, run_name="r",
                                       run_id="i", model="resnet50", skip=False)
    assert "<h1" in page
    weights = record(SKIP, steps=30)
    weights["weight_norms"] = weights.pop("norms")
    page = report_html.training_report(weights, {names.HEALTH_TAG: "unknown"}, run_name="r",
                                       run_id="i", model="resnet50", skip=True)
    assert headline(page).startswith("No diagnosis (the rules read output-gradient norms)")
    assert "dLoss/d(layer weights)" in page


# --- self-contained, safe, small --------------------------------------------------------------
@pytest.mark.parametrize("kind", ["training", "compare", "sweep"])
def test_the_page_loads_nothing_from_outside_itself(kind):
    page = {"training": lambda: training_page(record(NOSKIP)), "compare": compare_page,
            "sweep": lambda: report_html.sweep_report(sweep_cells())}[kind]()
    links = _Links()
    links.feed(page)
    assert not {"link", "img", "iframe", "object", "embed", "base"} & set(links.tags)
    outside = [r for r in links.refs if not r[2].startswith("#")]
    assert not outside, outside
    assert not re.search(r"<script[^>]+src=", page)
    assert not re.search(r"url\(\s*['\"]?(https?:|//)", page)
    assert not re.search(r"@import", page)
    assert "BEGIN bokeh.min.js" in page  # BokehJS itself is inline


def test_run_names_and_params_are_escaped_not_run():
    rec = record(SKIP, steps=20)
    page = report_html.training_report(
        rec, {names.HEALTH_TAG: "healthy"}, run_name='<script>alert("x")</script>', run_id="i",
        model="resnet50", skip=True, params={"note": "<img src=x onerror=alert(1)>"})
    assert '<script>alert("x")</script>' not in page
    assert "<img src=x" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page


def test_a_full_default_run_page_stays_under_2_mb_and_does_not_grow_with_the_steps():
    """10 epochs x 3,125 steps x 5 layers = 156,250 norms: downsampled for display. Bounds,
    not a speed assertion: BokehJS is ~1.27 MB of it."""
    full = training_page(record(NOSKIP, FULL_STEPS, noise=0.3), steps_per_epoch=STEPS_PER_EPOCH)
    tenth = training_page(record(NOSKIP, FULL_STEPS // 10, noise=0.3),
                          steps_per_epoch=STEPS_PER_EPOCH)
    size = len(full.encode())
    assert size < 2_000_000, size
    assert size < len(tenth.encode()) * 1.1, (size, len(tenth.encode()))
    assert "Downsampled for display" in full and "32 consecutive steps" in full


def test_a_layers_all_page_and_a_compare_of_two_full_runs_stay_bounded():
    rec = record(np.logspace(-21, -3, len(ALL_LAYERS)), FULL_STEPS, noise=0.3, layers=ALL_LAYERS)
    page = training_page(rec, steps_per_epoch=STEPS_PER_EPOCH, every_step=LAYERS)
    assert len(page.encode()) < 2_600_000, len(page.encode())
    assert f"5 of the {len(ALL_LAYERS)} probed layers" in page
    full = compare_page(steps=FULL_STEPS)
    assert len(full.encode()) < 2_000_000, len(full.encode())


def test_report_modules_import_neither_mlflow_torch_pandas_nor_click():
    code = ("import sys, pipeline.report_html\n"
            "print(','.join(m for m in ('mlflow', 'torch', 'pandas', 'click') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"report_html imported {out.stdout.strip()}"
