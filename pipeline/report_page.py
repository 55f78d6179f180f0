"""The page of report.html: its layout (headline, diagnosis, figures, tables), BokehJS inline,
and the number and table formatting the three reports share."""
from __future__ import annotations

import functools
import html
import math
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
from bokeh.embed import components
from bokeh.resources import Resources

# Layers drawn over time when the caller does not say which (layers=all probes ~54).
TIME_LAYERS_CAP = 8
STATUS_CLASS = {"Healthy": "ok", "Weak": "weak", "Tiny": "tiny", "Vanishing": "bad",
                "Exploding": "bad", "Dead": "dead"}


# --- numbers -------------------------------------------------------------------------------
def fmt(x) -> str:
    """3 significant digits; NaN/Inf named; None (or anything not a number) as a dash."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return "-"
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Inf" if x > 0 else "-Inf"
    return f"{x:.3g}"


def pct(x) -> str:
    """A share; a few zeros among 31,250 steps must not read as 0%."""
    if x is None or not math.isfinite(float(x)):
        return "-"
    x = float(x)
    return "<0.1%" if 0 < x < 0.001 else f"{x:.1%}" if 0 < x < 0.01 else f"{x:.0%}"


def decades_or_none(a: float, b: float) -> float | None:
    """log10(a / b), or None unless both are positive and finite."""
    if a is None or b is None:
        return None
    a, b = float(a), float(b)
    if not (a > 0 and b > 0 and math.isfinite(a) and math.isfinite(b)):
        return None
    return math.log10(a / b)


def series_stats(values) -> dict:
    """Statistics of one layer's norms over the steps: those of the finite values, plus the
    shares of zeros and the count of NaN/Inf."""
    v = np.asarray(values, dtype=np.float64)
    f = v[np.isfinite(v)]
    k = max(1, len(f) // 10)  # early/late: first and last tenth, as compare.layer_stats
    stat = (lambda fn, a: float(fn(a)) if len(a) else math.nan)  # noqa: E731
    return {"median": stat(np.median, f), "p10": stat(lambda a: np.quantile(a, 0.1), f),
            "p90": stat(lambda a: np.quantile(a, 0.9), f), "min": stat(np.min, f),
            "max": stat(np.max, f), "early_median": stat(np.median, f[:k]),
            "late_median": stat(np.median, f[-k:]),
            "zero_fraction": float((v == 0).mean()) if len(v) else math.nan,
            "nonfinite": int((~np.isfinite(v)).sum())}


def curves_from_record(record: Mapping[str, np.ndarray], key: str = "norms",
                       layers: Sequence[str] | None = None) -> dict[str, tuple]:
    """``{layer: (steps, values)}`` from a norms.npz dict (``key``: norms | weight_norms)."""
    names_ = [str(x) for x in record["layers"]]
    table = np.asarray(record[key], dtype=np.float64).reshape(len(record["steps"]), len(names_))
    return {name: (np.asarray(record["steps"]), table[:, i]) for i, name in enumerate(names_)
            if layers is None or name in layers}


def pick_layers(layers: Sequence[str], cap: int = TIME_LAYERS_CAP) -> list[str]:
    """At most ``cap`` layers, evenly across depth, the first and last always among them."""
    if len(layers) <= cap:
        return list(layers)
    return [layers[i] for i in np.unique(np.round(np.linspace(0, len(layers) - 1, cap)).astype(int))]


# --- the page ------------------------------------------------------------------------------
CSS = """
body{font:14px/1.45 -apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#1d1d1f;
 margin:0 auto;max-width:1160px;padding:20px 24px 40px}
h1{font-size:22px;margin:4px 0 6px} h2{font-size:17px;margin:28px 0 6px;border-bottom:1px solid #ddd}
.kicker{color:#666;font-size:12px;text-transform:uppercase;letter-spacing:.05em;margin:0}
.meta,.note{color:#555;margin:4px 0 10px} .warn{background:#fff4e5;border-left:4px solid #f0a030;
 padding:6px 10px} ul{margin:6px 0;padding-left:22px} code{background:#f3f3f3;padding:0 3px}
table{border-collapse:collapse;margin:8px 0 16px;font-size:12.5px}
th,td{border-bottom:1px solid #e6e6e6;padding:3px 8px;text-align:left;white-space:nowrap}
th{background:#f7f7f7} td.n{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#1a7f37} .weak{color:#9a6700} .tiny{color:#bc4c00} .bad{color:#cf222e;font-weight:600}
.dead{color:#fff;background:#444} .wide{overflow-x:auto} details{margin:8px 0}
footer{margin-top:30px;color:#666;font-size:12px}
"""


@functools.cache
def bokeh_js() -> str:
    """BokehJS core, inline (no widgets, tables, GL or MathJax bundles: nothing here uses
    them). Read from the installed package once: ~1.27 MB."""
    return Resources(mode="inline", components=["bokeh"]).render_js()


def md(text: str) -> str:
    """The compare diagnosis' markdown, as HTML: `code`, **bold**, a leading "- " dropped."""
    out = html.escape(str(text).strip())
    out = re.sub(r"^- ", "", out)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)


def status_cell(s) -> str:
    s = "-" if s is None or s == "" else str(s)
    return f'<td class="{STATUS_CLASS.get(s, "")}">{html.escape(s)}</td>'


def html_table(headers: Sequence[str], rows: Sequence[Sequence], numeric: Sequence[int] = (),
           status: Sequence[int] = (), table_id: str = "") -> str:
    """An HTML table; cells are escaped here (``numeric``: right-aligned; ``status``: coloured)."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            if i in status:
                cells.append(status_cell(cell))
            else:
                cells.append(f'<td{" class=n" if i in numeric else ""}>{html.escape(str(cell))}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    ident = f' id="{table_id}"' if table_id else ""
    return f'<div class="wide"><table{ident}><tr>{head}</tr>{"".join(body)}</table></div>'


@dataclass
class Figure:
    heading: str
    note: str        # HTML, already escaped
    model: object


def page(kind: str, title: str, headline: str, meta: str, points: Sequence[str],
          figures: Sequence[Figure], tables: Sequence[str], warning: str = "") -> str:
    script, divs = components([f.model for f in figures]) if figures else ("", ())
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>", f"<style>{CSS}</style>", bokeh_js(),
        "</head><body>", f'<header><p class="kicker">gradient-flow · {html.escape(kind)}</p>',
        f'<h1 id="headline">{headline}</h1>', f'<p class="meta">{meta}</p>',
        *([f'<p class="warn">{warning}</p>'] if warning else []), "</header>",
        '<section id="diagnosis"><h2>Diagnosis</h2><ul>',
        *(f"<li>{p}</li>" for p in points), "</ul></section>", '<section id="figures">']
    for f, div in zip(figures, divs):
        parts += [f"<h2>{html.escape(f.heading)}</h2>", f'<p class="note">{f.note}</p>', div]
    parts += ["</section>", '<section id="tables">', *tables, "</section>",
              "<footer>Figures: drag to pan, scroll or box to zoom, hover for values, click a "
              "legend entry to hide its series. The figures are downsampled for display; the "
              "tables and the run's metrics and artifacts hold the exact values.</footer>",
              script, "</body></html>"]
    return "\n".join(parts)


def as_rows(table) -> list[dict]:
    """Table rows as dicts: a list of dicts as is, or anything with ``to_dict(orient=
    "records")`` (a DataFrame) converted, so callers need not and this module does not
    import pandas."""
    if table is None:
        return []
    if hasattr(table, "to_dict"):
        return table.to_dict(orient="records")
    return [dict(r) for r in table]


def downsample_note(steps: int, per: int, floor: float | None, ceiling: float | None,
                     zeros: bool, bad: bool) -> str:
    out = (f"{steps:,} steps. " + ("Every step is drawn. " if per == 1 else
           f"Downsampled for display: each point is the median of {per:,} consecutive steps' "
           "positive values, the band their min to max. "))
    if zeros:
        out += (f"▼ marks steps with an exact zero gradient (no log axis can show 0), drawn "
                f"at {floor:.0e}, a decade or more below the smallest value; hover says how "
                "many. ")
    if bad:
        out += (f"× marks NaN/Inf values (a blow-up), drawn at {ceiling:.3g}, above the "
                "largest value. ")
    return out + "Exact values: the run's metrics and <code>gradients/norms.npz</code>."


def marks_note(rows: Sequence[Mapping], floor: float, ceiling: float) -> str:
    """What the edge marks of a figure of medians mean, for those it has."""
    medians = np.array([float(r.get("median", math.nan)) for r in rows], dtype=np.float64)
    out = []
    if (medians == 0).any():
        out.append(f"▼: a median of exactly zero, drawn at {floor:.0e} (no log axis can show 0).")
    if (~np.isfinite(medians)).any():
        out.append(f"×: a NaN/Inf median, drawn at {ceiling:.0e}.")
    return " ".join(out)


def has(curves: Mapping[str, tuple], test) -> bool:
    return any(test(np.asarray(v, dtype=np.float64)).any() for _, v in curves.values())


def is_zero(v):
    return v == 0


def is_bad(v):
    return ~np.isfinite(v)
