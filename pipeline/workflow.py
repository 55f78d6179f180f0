"""The `all` step: train both variants (reusing finished runs), then compare them.

Like MLflow's multistep example, a training run is reused when a FINISHED run of the same
experiment has the same parameters and the same ``code_version``; ``force`` retrains anyway.
The runs are linked both ways: fresh runs are children of the `all` run, and the `all` run's
tags name all three (``all.noskip_run``, ``all.skip_run``, ``all.compare_run``).
"""
from __future__ import annotations

import dataclasses

import click

from . import compare, device_data, names, query, train
from .config import AllConfig, CompareConfig, Config, ConfigError, to_params
from . import tracking
from .tracking import Tracker


def run_all(cfg: Config, force: bool) -> str:
    """Returns the `all` run's ID."""
    if cfg.resume_id:
        raise ConfigError("resume", "continues one training run; use the main entry point "
                                    "(mlflow run . -P resume=ID), not all")
    params = {k: v for k, v in to_params(cfg).items() if k != "skip"}
    params.update(to_params(AllConfig(force=force)))
    experiment_id = tracking.use_experiment(cfg.experiment)
    parent = Tracker.start(f"all-{cfg.model}", params, {names.STEP_TAG: "all"},
                           experiment_id=experiment_id)
    # The variants share the data: prepare it once (a no-op with the CPU's DataLoader).
    with parent.ending(), device_data.keep_prepared():
        ids = {}
        for skip in (False, True):
            variant_cfg = dataclasses.replace(cfg, skip=skip)
            reused = None if force else query.find_reusable(variant_cfg)
            if reused:
                click.echo(f"{variant_cfg.run_name}: reusing FINISHED run {reused} (same parameters "
                           "and code; -P force=true retrains)", err=True)
            ids[variant_cfg.variant] = reused or train.run(variant_cfg)
            parent.set_tags({f"all.{variant_cfg.variant}_run": ids[variant_cfg.variant],
                             f"all.{variant_cfg.variant}_reused": str(bool(reused)).lower()})
        # Compare what was probed: with probe=both, auto would leave the weight norms out.
        cmp = CompareConfig(experiment=experiment_id, runs=f"{ids['noskip']},{ids['skip']}",
                            quantity=cfg.probe)
        compare_id = compare.compare(cmp.experiment, cmp.run_ids, params=to_params(cmp),
                                     quantity=cmp.quantity)
        parent.set_tags({"all.compare_run": compare_id})
        # The answer on the row the runs table shows (it folds the children away): the
        # compare run's summary metrics, so the chart view plots them without a click.
        answer = query.get_run(compare_id).data.metrics
        parent.log_totals({k: v for k, v in answer.items() if k.startswith("compare/")})
        parent.set_note(f"Trained (or reused) `{ids['noskip']}` (noskip) and `{ids['skip']}` "
                        f"(skip), compared in `{compare_id}`; the comparison's summary is on "
                        "that run's page.")
    return parent.run_id


