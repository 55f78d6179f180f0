"""Training-step benchmark: the notebook's loop against this project's, on one device.

    python bench/train_step.py [--quick] [--only=PART,...] [--out result.json]   (or: make bench)

In one process, on the current device (CUDA if visible), it times in turn:

  notebook      the founding notebook as written: DataLoader(shuffle, num_workers=0) with
                PIL Resize+ToTensor, full backward hooks that call .item(), Adam, eager
  eager         this project's reference loop: DataLoader workers, probes + MLflow on, eager
  fast          the default on CUDA: data on the device, one CUDA graph per step,
                channels_last; probes + MLflow logging on
  fast, probes  the same loop with probes on and MLflow logging off (the overhead's split)
  fast, off     the same loop with probes and logging both off
  ... the same three for bf16, variants without channels_last / without the graph / with
  cudnn.benchmark / with PyTorch's default Adam (foreach on CUDA, for-loop on a CPU)
  instead of the fused one / (bf16) with autocast casting each weight per op instead of
  the step's one multi-tensor cast (engine.Bf16Weights),
  and ceilings: batch 256, no probes, eager, per precision.

Each row is the median of ``--repeats`` timed windows of ``--steps`` steps after warm-up
(the first steps pay for cuDNN autotuning and the graph capture). Timing brackets the
window with a device sync, so queued work is counted. Prints one table; ``--out`` writes
JSON. ``--quick`` uses tiny sizes so the whole thing runs on a 2-core CPU in under a
minute (CI runs it so the benchmark never rots); its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline import config, engine, names  # noqa: E402
from pipeline import data as data_mod  # noqa: E402
from pipeline.models import build_model  # noqa: E402
from pipeline.probes import GradientProbes  # noqa: E402
from pipeline.devices import precision_mode  # noqa: E402

LAYERS = config.DEFAULT_LAYERS


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(device, run_window, steps: int, repeats: int) -> float:
    """Median seconds per step over ``repeats`` windows of ``steps`` steps."""
    per_step = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        run_window(steps)
        sync(device)
        per_step.append((time.perf_counter() - t0) / steps)
    return statistics.median(per_step)


def cycle(iterable_factory):
    """Endless batches: a new epoch whenever one ends."""
    while True:
        yield from iterable_factory()


# --- the notebook as written ---------------------------------------------------------------
def notebook_loop(args, device, train_set) -> float:
    """The founding notebook's loop, faithfully: PIL in the main process, .item() hooks."""
    torch.manual_seed(0)
    model = build_model("resnet50", skip=False).to(device)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.001)
    gradients = {name: [] for name in LAYERS}
    for name, module in model.named_modules():
        if name in LAYERS:
            def hook(module, grad_input, grad_output, name=name):
                gradients[name].append(grad_output[0].norm().item())  # a sync per layer
            module.register_full_backward_hook(hook)
    loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True)
    batches = cycle(lambda: loader)

    def window(n):
        for inputs, labels in itertools.islice(batches, n):
            inputs, labels = inputs.to(device), labels.to(device)
            optimizer.zero_grad()
            outputs = model(inputs)
            loss = criterion(outputs, labels)
            loss.backward()
            optimizer.step()

    window(args.warmup)
    return timed(device, window, args.steps, args.repeats)


# --- this project's loop ---------------------------------------------------------------------
def project_loop(args, device, cfg: config.Config, *, probes_on: bool, logging_on: bool,
                 graph: bool, channels_last: bool, benchmark: bool = False,
                 batch_size: int | None = None, fused: bool = True,
                 cast_once: bool | None = None) -> tuple[float, str]:
    """``engine.run_steps`` as ``train.run`` drives it; returns (s/step, engine mode).
    ``cast_once`` None: as train decides (``engine.casts_weights_once``)."""
    batch_size = batch_size or cfg.batch_size
    if cast_once is None:
        cast_once = engine.casts_weights_once(cfg.precision, graph)
    torch.manual_seed(0)
    model = build_model("resnet50", skip=False).to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    data = data_mod.build(dataclasses.replace(cfg, batch_size=batch_size), device)
    with precision_mode(cfg.precision, device) as autocast, tracker_or_none(logging_on) as tracker:
        torch.backends.cudnn.benchmark = benchmark and device.type == "cuda"
        optimizer = engine.make_optimizer("adam", model.parameters(), 0.001, capturable=graph,
                                          fused=fused)
        probes = GradientProbes(model, LAYERS, 100, device) if probes_on else None
        step = engine.Step(model, optimizer, probes, autocast, device, graph=graph,
                           channels_last=channels_last, cast_once=cast_once,
                           graph_batch=batch_size)
        batches = cycle(lambda: data.train)
        submit = tracker.submit if tracker is not None else None
        if tracker is not None:
            tracker.stream([names.grad_norm(layer) for layer in LAYERS] + [names.TRAIN_LOSS])

        def window(n):
            engine.run_steps(step, itertools.islice(batches, n), device, probes, submit)

        window(args.warmup)
        seconds = timed(device, window, args.steps, args.repeats)
        if probes is not None:
            probes.remove()
        mode = step.status.mode
    del model, optimizer, step, data
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return seconds, mode


@contextlib.contextmanager
def tracker_or_none(on: bool):
    """A real MLflow run in a throwaway SQLite store, or None."""
    if not on:
        yield None
        return
    import mlflow

    from pipeline.tracking import Tracker
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
        os.environ.pop("MLFLOW_RUN_ID", None)
        tracker = Tracker.start("bench", {"bench": "train_step"}, {})
        try:
            yield tracker
            tracker.flush()
        finally:
            tracker.end()
            mlflow.set_tracking_uri(None)


def ceiling(args, device, precision: str) -> float:
    """Throughput bound: batch 256 (quick: 32), no probes, eager, channels_last on CUDA."""
    cfg = base_config(args, device, precision=precision)
    # ~10x longer steps: fewer of them give the same confidence.
    short = argparse.Namespace(**{**vars(args), "steps": max(1, args.steps // 5),
                                  "warmup": max(1, args.warmup // 4)})
    seconds, _ = project_loop(short, device, cfg, probes_on=False, logging_on=False, graph=False,
                              channels_last=device.type == "cuda", batch_size=args.ceiling_batch)
    return seconds


def base_config(args, device, **overrides) -> config.Config:
    return config.Config(
        dataset="synthetic", synthetic_size=args.images, synthetic_test_size=16,
        image_size=args.image_size, batch_size=args.batch_size, device=device.type,
        num_workers=str(args.workers), **overrides)


# --- main ---------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes; finishes on a 2-core CPU")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--steps", type=int, help="steps per timed window (default 100; quick: 2)")
    p.add_argument("--repeats", type=int, help="timed windows per row (default 3; quick: 1)")
    p.add_argument("--only", default="", help="comma-separated parts of row names: run only "
                   "the rows whose name holds one (the notebook row always runs: it is every "
                   "ratio's base), e.g. 'eager,probes,not fused' to fit a short device lease")
    args = p.parse_args(argv)
    steps, repeats = args.steps, args.repeats
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    cuda = device.type == "cuda"
    # Full size: the founding experiment's shapes. Quick: 32 px, a few steps.
    args.image_size = 32 if args.quick else 224
    args.batch_size = 16
    args.ceiling_batch = 32 if args.quick else 256
    args.images = 256 if args.quick else 5000        # synthetic CIFAR-shaped training images
    args.steps, args.warmup, args.repeats = (2, 1, 1) if args.quick else (100, 20, 3)
    args.steps, args.repeats = steps or args.steps, repeats or args.repeats
    args.workers = 0 if args.quick else min(8, os.cpu_count() or 1)

    rows: list[dict] = []
    only = [part.strip() for part in args.only.split(",") if part.strip()]
    matched: set[str] = set()

    def wanted(name: str) -> bool:
        hits = {part for part in only if part in name}
        matched.update(hits)
        return not only or bool(hits)

    def add(name, seconds, batch, mode="", pair=None):
        rows.append({"name": name, "ms_per_step": seconds * 1e3,
                     "images_per_second": batch / seconds, "engine": mode, "pair": pair})
        print(f"  {name:<44} {seconds * 1e3:9.2f} ms/step", file=sys.stderr, flush=True)

    print(f"bench: {torch.cuda.get_device_name(device) if cuda else platform.processor() or 'cpu'}"
          f", torch {torch.__version__}", file=sys.stderr)
    notebook_set = data_mod.SyntheticCIFAR(args.images, 0, train=True,
                                           transform=data_mod.notebook_transform(args.image_size))
    add("notebook as written", notebook_loop(args, device, notebook_set), args.batch_size)

    if wanted(name := "eager (dataloader, probes + MLflow on)"):
        ref = base_config(args, device, data_path="dataloader")
        s, mode = project_loop(args, device, ref, probes_on=True, logging_on=True, graph=False,
                               channels_last=False)
        add(name, s, args.batch_size, mode)

    for precision in ("default", "bf16"):
        cfg = base_config(args, device, data_path="device", precision=precision)
        label = "TF32" if precision == "default" and cuda else precision
        # The overhead split in two: the probes' device work (probes on, MLflow off) and
        # the host's logging on top of it.
        trio = (("probes + MLflow on", True, True), ("probes on, MLflow off", True, False),
                ("probes + MLflow off", False, False))
        # Any of the three chosen brings "off" along: it is the others' overhead base.
        picked = [wanted(f"fast {label}, {what}") for what, _, _ in trio]
        for (what, probes_on, logging_on), pick in zip(trio, picked):
            name = f"fast {label}, {what}"
            if not (pick or (what == "probes + MLflow off" and any(picked))):
                continue
            s, mode = project_loop(args, device, cfg, probes_on=probes_on, logging_on=logging_on,
                                   graph=cuda, channels_last=cuda)
            add(name, s, args.batch_size, mode, pair=f"fast {label}")
        # What each piece buys, probes and logging on. The full list needs a GPU; the
        # optimizer's row runs everywhere (default precision): Adam is a large share of a
        # small CPU step.
        pieces = [("default Adam, not fused", dict(fused=False))]
        if cuda and not args.quick:
            pieces = [("no channels_last", dict(channels_last=False)),
                      ("cudnn.benchmark on", dict(benchmark=True)),
                      *pieces,
                      ("no CUDA graph", dict(graph=False))]
            if precision == "bf16":
                pieces.insert(0, ("autocast's per-op weight casts", dict(cast_once=False)))
        elif precision != "default":
            pieces = []
        for what, kw in pieces:
            if not wanted(name := f"fast {label}, {what}"):
                continue
            s, mode = project_loop(args, device, cfg, **{
                "probes_on": True, "logging_on": True, "graph": cuda, "channels_last": cuda,
                **kw})
            add(name, s, args.batch_size, mode)

    # Quick (CPU) keeps one ceiling: bf16 on a CPU is emulated and slow.
    for precision in ("default",) + (("bf16", "fp32") if cuda and not args.quick else ()):
        label = {"default": "TF32" if cuda else "default"}.get(precision, precision)
        if wanted(name := f"ceiling {label}, batch {args.ceiling_batch}"):
            add(name, ceiling(args, device, precision), args.ceiling_batch)

    for part in sorted(set(only) - matched):
        print(f"bench: --only part {part!r} matched no row", file=sys.stderr)
    base = rows[0]["images_per_second"]
    for row in rows:
        row["vs_notebook"] = row["images_per_second"] / base
    for row in rows:  # overhead against the same loop with probes and logging both off
        off = next((r for r in rows if row["pair"] and r["pair"] == row["pair"]
                    and r["name"].endswith("probes + MLflow off")), None)
        if off is not None and off is not row:
            row["overhead_pct"] = (row["ms_per_step"] / off["ms_per_step"] - 1) * 100

    result = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__, "quick": args.quick,
        "image_size": args.image_size, "batch_size": args.batch_size,
        "steps": args.steps, "repeats": args.repeats, "only": only, "rows": rows,
    }
    print(table(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


def table(result: dict) -> str:
    lines = [f"{result['device']}, torch {result['torch']}, {result['image_size']} px, batch "
             f"{result['batch_size']}{' (quick: sizes too small to mean anything)' if result['quick'] else ''}"
             f"{', rows: --only=' + ','.join(result['only']) if result.get('only') else ''}",
             "", "| loop | ms/step | img/s | x notebook | overhead vs. probes + MLflow off |",
             "|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        overhead = f"{r['overhead_pct']:+.1f}%" if "overhead_pct" in r else ""
        lines.append(f"| {r['name']}{' [' + r['engine'] + ']' if r['engine'] else ''} | "
                     f"{r['ms_per_step']:.2f} | {r['images_per_second']:.0f} | "
                     f"{r['vs_notebook']:.1f} | {overhead} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
