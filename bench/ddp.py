"""DDP overhead: the training step on 2 ranks (gloo) against 1 process, on the CPU.

    python bench/ddp.py [--quick] [--model resnet18] [--image-size 64] [--batch-size 32]
                        [--steps 20] [--repeats 3] [--out result.json]

All rows train the same global batch with the project's own step (``engine.Step``, the
float64 probes of every default layer, Adam), eagerly, on synthetic tensors:

  1 process      the whole batch, with every core (torch's threads = cores)
  2 ranks        torchrun's layout by hand: 2 processes x (cores / 2) threads, each on half
                 the batch; DDP averages the weight gradients, the probes' one all_reduce
                 per step sums the squared norms, and the ranks agree on the stop flags
  half, alone    1 process, cores / 2 threads, half the batch: exactly one rank's compute,
                 with no communication

It also times how long ``python -m pipeline train --nproc-per-node 2 --batch-size 15`` takes
to refuse the uneven batch (one line, before torchrun starts any process): the interpreter's
start, the imports and the preflight.

"2 ranks" minus "half, alone" is what DDP costs per step (gradient all_reduce, probe
reduction, flag agreement, waiting for the slower rank); "2 ranks" against "1 process" is
what a user gains or loses by asking for nproc_per_node=2 on this machine. Each figure is
the median of ``--repeats`` windows of ``--steps`` steps after warm-up.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline import distributed, engine  # noqa: E402
from pipeline.samplers import rank_share  # noqa: E402
from pipeline.models import build_model, default_layers  # noqa: E402
from pipeline.probes import GradientProbes  # noqa: E402

WARMUP = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, args: dict, batch: int, threads: int, out: str):
    torch.set_num_threads(threads)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    cpu = torch.device("cpu")
    comm = distributed.Comm(distributed.World(rank, world, rank, world), cpu)
    torch.manual_seed(0)
    model = build_model(args["model"], skip=False)
    net = comm.wrap(model, cpu)
    optimizer = engine.make_optimizer("adam", model.parameters(), 1e-3, capturable=False)
    layers = default_layers(args["model"])
    steps = args["steps"]
    probes = GradientProbes(model, layers, steps * args["repeats"] + WARMUP + 1, cpu,
                            reduce=comm.reduce_probes)
    step = engine.Step(net, optimizer, probes, contextlib.nullcontext, cpu, graph=False)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(batch, 3, args["image_size"], args["image_size"], generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    lo, hi = rank_share(0, batch, rank, world)
    x, y = x[lo:hi], y[lo:hi]

    def one() -> None:
        step(x, y)
        probes.advance()
        comm.agree([0, 0])  # the training loop's per-step flag agreement (no-op alone)

    for _ in range(WARMUP):
        one()
    windows = []
    for _ in range(args["repeats"]):
        comm.barrier()
        t0 = time.perf_counter()
        for _ in range(steps):
            one()
        windows.append((time.perf_counter() - t0) / steps)
    if rank == 0:
        Path(out).write_text(json.dumps(windows))
    comm.close()


def measure(world: int, batch: int, threads: int, args: dict) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "w.json")
        if world == 1:
            ctx = mp.get_context("spawn")  # a fresh process, like the ranks
            p = ctx.Process(target=_worker, args=(0, 1, 0, args, batch, threads, out))
            p.start()
            p.join()
            assert p.exitcode == 0, p.exitcode
        else:
            mp.spawn(_worker, args=(world, _free_port(), args, batch, threads, out),
                     nprocs=world, join=True)
        return statistics.median(json.loads(Path(out).read_text()))


def time_refusal() -> float:
    """Seconds until the launcher refuses a batch that does not split over 2 ranks."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PYTHONPATH": str(root), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/m.db"}
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pipeline", "train", "--nproc-per-node", "2",
                               "--batch-size", "15", "--device", "cpu"], cwd=tmp, env=env,
                              capture_output=True, text=True, timeout=300)
        took = time.perf_counter() - t
    assert proc.returncode == 2 and proc.stderr.startswith("error: batch_size:"), proc.stderr
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CI): numbers mean nothing")
    parser.add_argument("--out", help="write the results as JSON here")
    a = parser.parse_args()
    if a.quick:
        a.image_size, a.batch_size, a.steps, a.repeats = 32, 8, 3, 1
    args = vars(a)
    cores = os.cpu_count() or 1
    half = max(1, cores // 2)
    rows = {
        "1 process": measure(1, a.batch_size, cores, args),
        "2 ranks": measure(2, a.batch_size, half, args),
        "half, alone": measure(1, a.batch_size // 2, half, args),
    }
    print(f"{a.model}, {a.image_size} px, global batch {a.batch_size}, {cores} cores, "
          f"torch {torch.__version__}, gloo")
    print(f"| row | ms/step | img/s |\n|---|---:|---:|")
    for name, seconds in rows.items():
        batch = a.batch_size // 2 if name == "half, alone" else a.batch_size
        print(f"| {name} | {seconds * 1e3:.1f} | {batch / seconds:.0f} |")
    ddp_cost = rows["2 ranks"] - rows["half, alone"]
    print(f"DDP cost per step: {ddp_cost * 1e3:.1f} ms ({ddp_cost / rows['half, alone']:+.0%} "
          f"of one rank's compute); 2 ranks vs 1 process: "
          f"{rows['1 process'] / rows['2 ranks']:.2f}x the throughput")
    refusal = time_refusal()
    print(f"an uneven batch refused before any rank starts: {refusal:.1f} s")
    if a.out:
        Path(a.out).write_text(json.dumps({
            "date": datetime.date.today().isoformat(), "machine": platform.processor() or
            platform.machine(), "cores": cores, "torch": torch.__version__, "args": args,
            "seconds_per_step": rows, "uneven_batch_refused_seconds": refusal}, indent=2))


if __name__ == "__main__":
    main()
