"""DDP: the global batch's norms from ranks that each see a share of it, the launcher's
checks, and the sharding of batches.

The equivalence and reduction tests run real ``torch.distributed`` with gloo on the CPU
(two spawned processes), the equivalence against one process on the whole batch; the
end-to-end runs through torchrun and ``mlflow run``, and real failures of a rank with the
launcher's report of them, are in tests/test_distributed_runs.py (slow).
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from pipeline import distributed, engine
from pipeline.config import Config, ConfigError
from pipeline.samplers import ShardedBatches, EpochOrder, global_batches, rank_share
from pipeline.models import all_layers, build_model
from pipeline.probes import GradientProbes
from runs_helpers import describe, free_port

from conftest import subprocess_env

BATCH, SIZE, STEPS = 8, 32, 2


def _batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.rand(BATCH, 3, SIZE, SIZE, generator=g), torch.randint(0, 10, (BATCH,), generator=g))
            for _ in range(STEPS)]


def _train_shard(rank: int, world_size: int, port: int, out: str) -> None:
    """STEPS training steps of resnet18 (no skips, every layer probed) on this rank's share
    of each global batch; rank 0 saves the norms, losses and weights."""
    torch.set_num_threads(1)
    if world_size > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    cpu = torch.device("cpu")
    comm = distributed.Comm(distributed.World(rank, world_size, rank, world_size), cpu)
    torch.manual_seed(0)
    model = build_model("resnet18", skip=False)
    layers = all_layers(model, SIZE)
    net = comm.wrap(model, cpu)
    optimizer = engine.make_optimizer("adam", model.parameters(), 1e-3, capturable=False)
    probes = GradientProbes(model, tuple(layers), STEPS + 1, cpu, reduce=comm.reduce_probes,
                            weights=True)  # output and weight gradients (probe=both)
    step = engine.Step(net, optimizer, probes, contextlib.nullcontext, cpu, graph=False)
    for x, y in _batches():
        lo, hi = rank_share(0, BATCH, rank, world_size)
        step(x[lo:hi], y[lo:hi])
        probes.advance()
    values = probes.drain().values()
    if rank == 0:
        torch.save({"values": values, "layers": layers,
                    "weights": {k: v.clone() for k, v in model.state_dict().items()}}, out)
    comm.close()


def test_two_gloo_ranks_on_half_batches_log_the_norms_and_reach_the_weights_of_one_process(tmp_path):
    one, two = str(tmp_path / "one.pt"), str(tmp_path / "two.pt")
    _train_shard(0, 1, 0, one)
    mp.spawn(_train_shard, args=(2, free_port(), two), nprocs=2, join=True)
    a, b = torch.load(one, weights_only=False), torch.load(two, weights_only=False)
    assert a["layers"] == b["layers"] and len(a["layers"]) == 18  # stem, 16 block convs, fc (no downsample: skips off)
    # columns: 18 output-gradient norms, the loss, 18 weight-gradient norms
    assert a["values"].shape == (STEPS, 18 + 1 + 18) and (a["values"] > 0).all()
    np.testing.assert_allclose(b["values"], a["values"], rtol=1e-6)  # every layer, every step
    for name, weight in a["weights"].items():
        torch.testing.assert_close(b["weights"][name], weight, rtol=1e-6, atol=1e-9)
    # The weights did move: the comparison is not of two untouched copies.
    torch.manual_seed(0)
    start = build_model("resnet18", skip=False).state_dict()
    assert not torch.equal(start["conv1.weight"], a["weights"]["conv1.weight"])


def _reduce_on_rank(rank: int, port: int, out: str) -> None:
    """Each rank's local squared norms (two layers) and loss, through Comm.reduce_probes."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))
    comm = distributed.Comm(distributed.World(rank, 2, rank, 2), torch.device("cpu"))
    local = {0: [4.0, 9.0, 3.0], 1: [12.0, 7.0, 1.0]}[rank]
    cur = torch.tensor(local, dtype=torch.float64)
    comm.reduce_probes(cur)
    torch.save(cur, f"{out}.{rank}")
    comm.close()


def test_reduce_probes_gives_every_rank_the_global_squared_norms_and_loss(tmp_path):
    # Two real gloo ranks with different local values. Each rank's gradient carries a 1/W
    # factor relative to the global batch's, so the global squared norm is the sum of the
    # local ones over W^2 = 4, and the global loss the mean of the local ones:
    # (4 + 12) / 4 = 4, (9 + 7) / 4 = 4, (3 + 1) / 2 = 2.
    out = str(tmp_path / "reduced")
    mp.spawn(_reduce_on_rank, args=(free_port(), out), nprocs=2, join=True)
    for rank in (0, 1):
        got = torch.load(f"{out}.{rank}")
        assert got.dtype == torch.float64
        assert got.tolist() == [4.0, 4.0, 2.0], rank


# --- sharding ---------------------------------------------------------------------------------
def test_the_ranks_shares_partition_every_global_batch_in_order():
    # Every rank draws the same seeded epoch order (one EpochOrder each, as each process has).
    one = list(ShardedBatches(EpochOrder(list(range(50)), seed=3), 10))
    halves = [list(ShardedBatches(EpochOrder(list(range(50)), seed=3), 10, rank, 2))
              for rank in (0, 1)]
    assert [a + b for a, b in zip(*halves)] == one
    assert all(len(a) == len(b) == 5 for a, b in zip(*halves))
    assert sorted(i for batch in one for i in batch) == list(range(50))


def test_a_last_batch_that_does_not_split_over_the_ranks_is_dropped_and_one_that_does_is_kept():
    assert list(global_batches(50, 16, 1)) == [(0, 16), (16, 32), (32, 48), (48, 50)]
    assert list(global_batches(50, 16, 2)) == [(0, 16), (16, 32), (32, 48), (48, 50)]  # 2 splits
    assert list(global_batches(51, 16, 2)) == [(0, 16), (16, 32), (32, 48)]            # 3 does not
    assert len(ShardedBatches(EpochOrder(list(range(51)), 0), 16, 0, 2)) == 3
    assert rank_share(48, 50, 1, 2) == (49, 50)


# --- configuration ---------------------------------------------------------------------------
@pytest.mark.parametrize("values, param", [
    ({"nproc_per_node": "2", "batch_size": "15"}, "batch_size"),
    ({"nproc_per_node": "2", "nnodes": "2", "batch_size": "18"}, "batch_size"),
    ({"nproc_per_node": "2", "graph": "on"}, "graph"),
    ({"nproc_per_node": "2", "device": "mps"}, "device"),
    ({"nnodes": "2"}, "rdzv_endpoint"),
    ({"nproc_per_node": "0"}, "nproc_per_node"),
])
def test_ddp_settings_that_cannot_work_are_refused_naming_the_parameter(values, param):
    with pytest.raises(ConfigError) as e:
        Config.from_strings(values)
    assert e.value.param == param


def test_the_global_batch_is_what_each_rank_shares():
    cfg = Config.from_strings({"nproc_per_node": "4", "nnodes": "2", "batch_size": "64",
                               "rdzv_endpoint": "node0:29400"})
    assert cfg.world_size == 8
    assert distributed.torchrun_args(4, 2, "node0:29400", "x")[:3] == [
        "--nnodes=2", "--nproc-per-node=4", "--rdzv-backend=c10d"]
    assert distributed.torchrun_args(2, 1, None, "x") == ["--standalone", "--nproc-per-node=2"]


def test_an_uneven_batch_is_refused_in_one_line_before_any_process_starts(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipeline", "train", "--nproc-per-node", "2",
                           "--batch-size", "15", "--device", "cpu"], cwd=tmp_path,
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, describe(proc)
    lines = proc.stderr.strip().splitlines()
    assert lines == ["error: batch_size: 15 does not split evenly over world_size 2 "
                     "(nproc_per_node x nnodes); allowed: a multiple of 2"], describe(proc)
    # Refused in the launcher's preflight: torchrun never ran, and nothing touched a store
    # (a started rank 0 would have made ./mlflow.db). How long the refusal takes is measured
    # by bench/ddp.py (BENCHMARKS.md), not asserted here.
    assert "torchrun" not in proc.stdout + proc.stderr
    assert not (tmp_path / "mlflow.db").exists()
