"""mkdocs hook: reference tables generated from the code at build time, never committed.

A page asks for a table with a line of its own:

    <!-- reference: parameters -->      every entry point's parameters (pipeline.config, pipeline.cli)
    <!-- reference: names metric -->    metric keys from pipeline/names.py (also: tag, param, artifact)

The parameters come from the dataclass fields of ``pipeline.config`` (help, default, allowed
values) and the entry points from the click commands of ``pipeline.cli``, which are built
from those same fields. Names come from ``pipeline/names.py``: the constants' values, and
their comments, which ``ast`` drops, read with ``tokenize``. An unknown request, or a
string constant in names.py that no rule below places, stops the build: a new name gets a
home in the docs or the build says why not.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import io
import re
import sys
import tokenize
from pathlib import Path

from mkdocs.exceptions import PluginError

REQUEST = re.compile(r"^<!-- reference: (?P<what>[a-z]+)(?: (?P<arg>[a-z]+))? -->$", re.M)
ROOT = Path(__file__).resolve().parents[2]


def on_config(config, **_):
    # The package is read from this checkout, installed or not (it imports no torch).
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return config


def on_page_markdown(markdown: str, page, config, files, **_) -> str:
    def table(m: re.Match) -> str:
        what, arg = m["what"], m["arg"]
        if what == "parameters" and arg is None:
            return parameters()
        if what == "names" and arg in KINDS:
            return names_table(arg)
        raise PluginError(f"{page.file.src_path}: unknown reference request {m[0]!r}; "
                          f"allowed: parameters, names {'|'.join(KINDS)}")
    return REQUEST.sub(table, markdown)


# --- parameters ------------------------------------------------------------------------------

def _cell(text: str) -> str:
    """Markdown for a table cell, on one line: pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _text(text: str) -> str:
    """Comments and help as literal text: outside their `code spans`, the characters that
    markdown or HTML would read (``<layer>``, ``grad_norm/*``) are escaped."""
    parts = re.split(r"(`+[^`]*`+)", str(text))
    for i in range(0, len(parts), 2):
        parts[i] = (parts[i].replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
                    .replace("*", "\\*").replace("_", "\\_"))
    return _cell("".join(parts))


def _code(value: str) -> str:
    return f"`{value}`" if value != "" else "(empty)"


def allowed(f: dataclasses.Field, config) -> str:
    """The values a field accepts, in words, from the rules ``config.parse_field`` applies."""
    meta = f.metadata
    kind = meta.get("kind")
    if f.type == "bool":
        return "`true`, `false`"
    if f.type == "int":
        return f"an integer >= {meta['min']}" if "min" in meta else "an integer"
    if f.type == "float":
        return "a finite number > 0" if meta.get("positive") else "a finite number"
    if kind == "names":
        return "comma-separated module names, or `auto`, or `all`"
    if kind == "auto_or_bool":
        return "`auto`, `true`, `false`"
    if kind == "auto_or_int":
        return "`auto`, or an integer >= 0"
    if kind == "grid_models":
        return "comma-separated, from " + ", ".join(_code(m) for m in config.MODELS)
    if kind == "grid_bools":
        return "comma-separated `true`/`false`"
    if "choices" in meta:
        return ", ".join(_code(c) for c in meta["choices"])
    return "any text, not empty"


def _sections(cls) -> dict[str, str]:
    """Field name -> the ``# --- section ---`` comment above it in the class body."""
    source = inspect.getsource(cls)
    heads = []  # (line, title)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            m = re.match(r"#\s*---\s*(.*?)\s*-*$", tok.string)
            if m and m[1]:
                heads.append((tok.start[0], m[1]))
    out, body = {}, ast.parse(source).body[0].body
    for node in body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            above = [title for line, title in heads if line < node.lineno]
            out[node.target.id] = above[-1] if above else ""
    return out


def _field_rows(fields, config, defaults: dict | None = None, sections: dict | None = None):
    rows, last = [], None
    for f in fields:
        section = (sections or {}).get(f.name, "")
        if sections is not None and section != last:
            rows.append(f"\n#### {section[:1].upper() + section[1:]}\n" if section else "")
            rows.append("| parameter | default | allowed values | what it does |")
            rows.append("|---|---|---|---|")
            last = section
        default = config.format_value((defaults or {}).get(f.name, f.default))
        rows.append(f"| `{f.name}` | {_cell(_code(default))} | {_cell(allowed(f, config))} | "
                    f"{_text(f.metadata['help'])} |")
    if sections is None:
        rows[:0] = ["| parameter | default | allowed values | what it does |", "|---|---|---|---|"]
    return "\n".join(rows)


def parameters() -> str:
    config = importlib.import_module("pipeline.config")
    cli = importlib.import_module("pipeline.cli")
    commands = cli.cli.commands
    options = {name: [p.name for p in cmd.params if p.param_type_name == "option"]
               for name, cmd in commands.items()}
    train = options["train"]
    by_name = {f.name: f for f in config.fields(config.Config)}
    own = {"compare": config.CompareConfig, "all": config.AllConfig, "sweep": config.SweepConfig}
    out = []

    # train: every Config field, in the order of its sections.
    missing = set(by_name) ^ set(train)
    if missing:
        raise PluginError(f"train's options and Config's fields differ: {sorted(missing)}")
    out += ["### Training: `main`, `with_skip`, `without_skip`, `train`", "",
            "`with_skip` and `without_skip` take the same parameters with `skip` fixed.", "",
            _field_rows(config.fields(config.Config), config, sections=_sections(config.Config)),
            ""]

    for step in ("compare", "all", "sweep"):
        cls = own[step]
        extra = [f for f in config.fields(cls)]
        if set(f.name for f in extra) - set(options[step]):
            raise PluginError(f"{step}: fields of {cls.__name__} without a CLI option")
        shared = [n for n in options[step] if n in by_name]
        out += [f"### `{step}`", ""]
        if shared:
            left_out = [n for n in train if n not in shared]
            defaults = config.SWEEP_TRAIN_DEFAULTS if step == "sweep" else {}
            changed = ", ".join(f"`{n}` defaults to `{config.format_value(v)}`"
                                for n, v in defaults.items())
            out += ["Every training parameter"
                    + (" but " + ", ".join(f"`{n}`" for n in left_out) if left_out else "")
                    + (f" ({changed})" if changed else "") + ", plus:", ""]
        out += [_field_rows(extra, config), ""]
    return "\n".join(out)


# --- names ------------------------------------------------------------------------------------

KINDS = ("metric", "tag", "param", "artifact")
ARTIFACT_FILE = re.compile(r"\.(json|png|npz|md|csv|pt|html)$")
# Constants the suffix and value rules below cannot place: MODEL is the logged model's
# artifact name; EPOCH_SECONDS a metric without a slash; OUTPUT and WEIGHT are the values of
# `probe`, not names a run writes.
SPECIAL = {"MODEL": "artifact", "EPOCH_SECONDS": "metric", "OUTPUT": None, "WEIGHT": None}


def kind_of(name: str, value: str) -> str | None:
    if name in SPECIAL:
        return SPECIAL[name]
    if name.endswith("_TAG"):
        return "tag"
    if name.endswith("_PARAM"):
        return "param"
    if name.endswith("_PREFIX"):
        return "metric"
    if ARTIFACT_FILE.search(value):
        return "artifact"
    if "/" in value:
        return "metric"
    raise PluginError(f"pipeline/names.py: {name} = {value!r} is neither a metric, a tag, a "
                      "param nor an artifact by docs/hooks/reference.py's rules; add a rule")


@dataclasses.dataclass
class Name:
    kind: str
    key: str          # as a run writes it; <layer>, <cell> where the caller fills it in
    constant: str     # how code spells it: names.X or names.f(...)
    what: str         # the trailing comment, or the function's docstring
    group: str        # the comment heading its block (lines between blank lines)
    line: int


def _comments(source: str) -> dict[int, str]:
    return {tok.start[0]: tok.string.lstrip("#").strip()
            for tok in tokenize.generate_tokens(io.StringIO(source).readline)
            if tok.type == tokenize.COMMENT}


def read_names() -> list[Name]:
    names = importlib.import_module("pipeline.names")
    source = Path(names.__file__).read_text()
    lines = source.splitlines()
    comments = _comments(source)

    def group_of(line: int) -> str:
        """The comment lines that open the block holding ``line`` (blocks end at blank lines)."""
        start = line
        while start > 1 and lines[start - 2].strip():
            start -= 1
        head = []
        for n in range(start, line + 1):
            if lines[n - 1].lstrip().startswith("#"):
                head.append(comments[n])
            else:
                break
        text = " ".join(head)
        return "" if text.rstrip(".").lower() in ("tags", "artifacts", "metrics") else text

    def own_comment(node) -> str:
        text = comments.get(node.end_lineno, "")
        return text if not lines[node.end_lineno - 1].lstrip().startswith("#") else ""

    out = []
    for node in ast.parse(source).body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)
                and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
            name, value = node.targets[0].id, node.value.value
            kind = kind_of(name, value)
            if kind is None:
                continue
            key, what = value, own_comment(node)
            if name.endswith("_PREFIX"):  # a family: the builder function says what it is
                builder = getattr(names, name[:-len("_PREFIX")].lower())
                key, what = _call(builder), what or _doc(builder)
            out.append(Name(kind, key, f"names.{name}", what, group_of(node.lineno), node.lineno))
        elif isinstance(node, ast.FunctionDef) and (node.name.endswith("_tag")
                                                     or node.name.startswith("compare_")):
            func = getattr(names, node.name)  # compare_*: the compare run's summary metrics
            kind = "tag" if node.name.endswith("_tag") else "metric"
            out.append(Name(kind, _call(func), f"names.{node.name}(...)", _doc(func),
                            group_of(node.lineno), node.lineno))
    return out


def _call(func) -> str:
    """The key a builder makes, with its argument's name in angle brackets."""
    arg = next(iter(inspect.signature(func).parameters))
    return func(f"<{arg}>")


def _doc(func) -> str:
    """A builder's docstring without its example: '``x.y``: what' -> 'what'."""
    doc = " ".join((inspect.getdoc(func) or "").split())
    return re.sub(r"^``[^`]*``:\s*", "", doc)


def names_table(kind: str) -> str:
    rows, group = [], None
    for n in (n for n in read_names() if n.kind == kind):
        if n.group != group:
            if rows:
                rows.append("")
            if n.group:
                rows += [_text(n.group), ""]
            rows += ["| name | what | in code |", "|---|---|---|"]
            group = n.group
        rows.append(f"| `{n.key}` | {_text(n.what) or '&nbsp;'} | `{n.constant}` |")
    if not rows:
        raise PluginError(f"pipeline/names.py has no {kind} names")
    return "\n".join(rows)
