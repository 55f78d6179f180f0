"""Which modules of any network to probe: ``auto``, ``all``, names, globs and ``re:`` regexes
(docs: guide/watch.md, the ``layers`` argument).

``auto`` takes, of the conv and linear layers the forward pass calls, the first, the last and
the three at the quartiles, so it works for any model. Entries are probed in call order, which
is recorded from the loop's own forward passes up to the first optimizer step; a compiled
model cannot carry those hooks, so there a dry run on the meta device gives it
(``call_order``). A name or pattern that matches no module is refused naming the nearest ones.
"""
from __future__ import annotations

import difflib
import fnmatch
import re
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._pytree import tree_map

from .config import ConfigError

AUTO, ALL, REGEX_PREFIX = "auto", "all", "re:"
# What auto and all choose from: the layers with weights that carry most of the compute.
PROBED_TYPES = (nn.modules.conv._ConvNd, nn.Linear)
QUARTILES = (0.0, 0.25, 0.5, 0.75, 1.0)
# nn.Module's hook registries (torch/nn/modules/module.py), emptied for the dry run.
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_backward_pre_hooks", "_backward_hooks")


def _is_glob(entry: str) -> bool:
    return any(c in entry for c in "*?[")


@dataclass(frozen=True)
class Spec:
    """``layers`` as given, checked against the model's module names."""

    entries: tuple[str, ...]

    @classmethod
    def parse(cls, layers, modules: dict[str, nn.Module]) -> "Spec":
        """Refuse what can be refused before any forward pass: an empty list, a name that is
        not a module, a regex that does not compile, a pattern that matches no module."""
        entries = (layers,) if isinstance(layers, str) else tuple(layers)
        if not entries or not all(isinstance(e, str) and e.strip() for e in entries):
            raise ConfigError("layers", f"{layers!r} is empty or not a list of strings; allowed: "
                                        "auto, all, module names, globs (layer*.conv1) or "
                                        "regexes (re:layer\\d\\.0\\..*)")
        for entry in entries:
            if entry in (AUTO, ALL):
                continue
            matched = _matches(entry, modules)
            if matched:
                continue
            close = difflib.get_close_matches(
                entry.removeprefix(REGEX_PREFIX), modules.keys(), n=5, cutoff=0.5)
            hint = (f"closest: {', '.join(close)}" if close
                    else f"first in the model: {', '.join(list(modules)[:5])}")
            what = ("matches no module" if entry.startswith(REGEX_PREFIX) or _is_glob(entry)
                    else "is not a module of this model")
            raise ConfigError("layers", f"{entry!r} {what}; allowed: auto, all, its module "
                                        f"names, globs or re: regexes over them ({hint})")
        return cls(entries)

    def candidates(self, modules: dict[str, nn.Module]) -> set[str]:
        """Every module some entry could choose, before the call order is known."""
        out: set[str] = set()
        for entry in self.entries:
            if entry in (AUTO, ALL):
                out.update(n for n, m in modules.items() if isinstance(m, PROBED_TYPES))
            else:
                out.update(_matches(entry, modules))
        return out


def _matches(entry: str, modules: dict[str, nn.Module]) -> list[str]:
    if entry.startswith(REGEX_PREFIX):
        try:
            pattern = re.compile(entry[len(REGEX_PREFIX):])
        except re.error as e:
            raise ConfigError("layers", f"{entry!r} is not a valid regular expression ({e}); "
                                        "allowed: re: followed by a Python regex") from None
        return [n for n in modules if pattern.fullmatch(n)]
    if _is_glob(entry):
        return [n for n in modules if fnmatch.fnmatchcase(n, entry)]
    return [entry] if entry in modules else []


def call_order(model: nn.Module, args, kwargs) -> list[str] | None:
    """Every module's name in the order the forward pass first calls it, from a dry run on
    the meta device with ``args``/``kwargs`` (the first batch); None if the model cannot
    run there. The model's own parameters, buffers and modes are left as they were."""
    names = {m: n for n, m in model.named_modules()}
    called: dict[str, None] = {}
    # The model's own hooks (the user's, a profiler's) stay out of the dry run: they would
    # see meta tensors, and their side effects would happen once more. Put back below.
    saved = {m: {k: getattr(m, k) for k in _HOOK_DICTS if k in m.__dict__} for m in names}
    for m, dicts in saved.items():
        for k in dicts:
            setattr(m, k, OrderedDict())
    for m in names:
        m.register_forward_pre_hook(lambda mod, _: called.setdefault(names[mod]))
    meta = {k: torch.empty_like(v, device="meta")
            for k, v in [*model.named_parameters(), *model.named_buffers()]}
    to_meta = lambda x: x.to("meta") if torch.is_tensor(x) else x  # noqa: E731
    # Eval mode, as models.all_layers: a training-mode BatchNorm and dropout call the same
    # modules; each module's own flag is restored afterwards.
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            torch.func.functional_call(model, meta, tree_map(to_meta, tuple(args)),
                                       tree_map(to_meta, dict(kwargs)))
    except Exception as e:  # noqa: BLE001 - any failure on meta means: order unknown
        warnings.warn(f"pipeline.watch: the model cannot run on the meta device ({type(e).__name__}: "
                      f"{str(e)[:200]}); layers are taken in definition order and not checked "
                      "for being called", stacklevel=3)
        return None
    finally:
        for m, dicts in saved.items():
            for k, d in dicts.items():
                setattr(m, k, d)
        for m, training in modes.items():
            m.training = training
    called.pop("", None)  # the model itself
    return list(called)


def resolve(spec: Spec, modules: dict[str, nn.Module], order: list[str] | None,
            weights: bool = False) -> tuple[str, ...]:
    """The module names to probe, in call order (``order``; definition order when None).

    ``weights`` (probe=weight|both): patterns keep the modules that own parameters, and a
    named module without any is refused."""
    known = order if order is not None else [n for n in modules if n]
    ran = set(known)
    chosen: set[str] = set()
    for entry in spec.entries:
        if entry in (AUTO, ALL):
            layers = [n for n in known if isinstance(modules[n], PROBED_TYPES)]
            if not layers:
                raise ConfigError("layers", f"{entry}: the forward pass calls no conv or linear "
                                            "layer; allowed: module names, globs or re: regexes")
            if entry == AUTO:
                layers = [layers[int(q * (len(layers) - 1) + 0.5)] for q in QUARTILES]
            chosen.update(layers)
            continue
        matched = _matches(entry, modules)
        pattern = entry.startswith(REGEX_PREFIX) or _is_glob(entry)
        if pattern:
            matched = [n for n in matched if n in ran and n
                       and (not weights or _owns_parameters(modules[n]))]
            if not matched:
                raise ConfigError("layers", f"{entry!r} matches no module that the forward pass "
                                            "calls" + (" and that owns parameters" if weights
                                                       else ""))
        elif entry not in ran:
            raise ConfigError("layers", f"{entry} never runs in this model's forward pass, so "
                                        "it has no gradient; allowed: modules the forward calls")
        elif weights and not _owns_parameters(modules[entry]):
            raise ConfigError("layers", f"{entry} owns no parameters, so probe=weight has no "
                                        "weight gradient to measure there; allowed: modules with "
                                        "parameters (or probe=output)")
        chosen.update(matched)
    return tuple(n for n in known if n in chosen)


def _owns_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def auto_layers(modules: dict[str, nn.Module], order: list[str] | None) -> tuple[str, ...]:
    """What ``auto`` picks (the every-step metrics of ``layers=all``)."""
    return resolve(Spec((AUTO,)), modules, order)
