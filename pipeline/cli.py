"""Command line: parse, validate, dispatch. Nothing else lives here.

Every option is generated from a field of a ``config`` dataclass, so names, help and
defaults have one home. Options arrive as strings and are parsed by ``config.parse``: the
same rules, and the same one-line errors, whether a value came from ``mlflow run -P`` or
from a shell. Heavy imports (torch, mlflow) happen only after the input is valid.
"""
from __future__ import annotations

import os
import sys

import click

from . import config, distributed, signals

EXIT_USAGE = 2  # bad input, as click and argparse use


def _options(cls, exclude: tuple[str, ...] = (), defaults: dict | None = None):
    """One ``--dashed-name`` string option per dataclass field; default None = the field's
    (or ``defaults[name]``, which the command then applies: the sweep's one epoch)."""
    def decorate(func):
        for f in reversed(config.fields(cls)):
            if f.name in exclude:
                continue
            default = (defaults or {}).get(f.name, f.default)
            metavar = {"int": "INT", "float": "FLOAT", "bool": "BOOL"}.get(f.type, "TEXT")
            func = click.option(f"--{f.name.replace('_', '-')}", f.name, type=str, default=None,
                                metavar=metavar, help=f"{f.metadata['help']} "
                                f"[default: {config.format_value(default)}]")(func)
        return func
    return decorate


def _refuse(message: str):
    """One line on stderr, the pending MLflow run marked FAILED, exit 2. A DDP rank other
    than 0 says nothing (rank 0 and the launcher speak for the run)."""
    if distributed.follower():
        sys.exit(EXIT_USAGE)
    click.echo(f"error: {message}", err=True)
    if os.environ.get("MLFLOW_RUN_ID"):  # opened for us by `mlflow run`
        from .tracking import fail_pending_run  # mlflow only on this path; no torch
        fail_pending_run(message)
    sys.exit(EXIT_USAGE)


def _dispatch(action):
    """Run ``action``; turn the user's errors into one line and exit code 2."""
    try:
        signals.let_sigterm_in()  # imports are done; the work starts
        return action()
    except config.UserError as e:  # ConfigError, data.DataError, query.QueryError
        _refuse(str(e))
    except distributed.RankFailed as e:  # the DDP launcher: a rank failed or was stopped
        if not e.printed:
            click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt as e:
        _interrupted(e)


def _interrupted(e: KeyboardInterrupt):
    """Ctrl-C or SIGTERM (``signals.Terminated``): the run ended KILLED, one line, exit 130 / 143."""
    if not distributed.follower():
        reason = f"interrupted: {str(e) or 'Ctrl-C'}"  # a bare KeyboardInterrupt says ""
        if os.environ.get("MLFLOW_RUN_ID"):  # `mlflow run`'s run, not taken over yet
            from .tracking import end_if_running  # mlflow only on this path; no torch
            end_if_running(os.environ["MLFLOW_RUN_ID"], "KILLED", reason)
        # It may have come before any run opened (imports, a server still being waited for).
        click.echo(f"{reason}; any run already started was ended as KILLED", err=True)
    sys.exit(128 + getattr(e, "signum", 2))  # the shell's convention: 130 SIGINT, 143 SIGTERM


def _parse(cls, values):
    try:
        return config.parse(cls, values)
    except config.ConfigError as e:
        _refuse(str(e))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Gradient flow in deep networks, tracked in MLflow."""


@cli.command()
@_options(config.Config)
def train(**values: str | None) -> None:
    """Train one variant; log per-batch gradient norms, plots and JSON to MLflow."""
    cfg = _parse(config.Config, values)
    from . import train as train_mod
    run_id = _dispatch(lambda: train_mod.run(cfg))
    # Under DDP rank 0's process says it (the launcher's run returns when the ranks have).
    if run_id and (distributed.launched() or cfg.world_size == 1):
        # A resume trains the run's own model, whatever this launch's model and skip say.
        name = "resumed" if cfg.resume_id else cfg.run_name
        click.echo(f"MLflow run {run_id} ({name}) finished")


@cli.command()
@click.argument("run_id")
def rerun(run_id: str) -> None:
    """Train again exactly what RUN_ID trained, from its config.json artifact."""
    def action():
        from . import names, query
        from . import train as train_mod
        cfg = config.Config.from_strings(query.run_config(run_id))
        return train_mod.run(cfg, tags={names.RERUN_OF_TAG: run_id})
    new_id = _dispatch(action)
    click.echo(f"MLflow run {new_id} reran {run_id}")


@cli.command()
@_options(config.CompareConfig)
def compare(**values: str | None) -> None:
    """Compare two runs (a skip and a no-skip run, or any two with gradient norms): plots,
    summary tables, a diagnosis and report.html."""
    cmp = _parse(config.CompareConfig, values)
    from . import compare as compare_mod
    run_id = _dispatch(lambda: compare_mod.compare(cmp.experiment, cmp.run_ids,
                                                   cmp.layer_list, config.to_params(cmp),
                                                   quantity=cmp.quantity, label=cmp.label))
    click.echo(f"MLflow compare run {run_id} finished; see its report.html and comparison/ "
               "artifacts")


@cli.command(name="all")
@_options(config.Config, exclude=("skip",))
@_options(config.AllConfig)
def all_(force: str | None, **values: str | None) -> None:
    """Train both variants (reusing finished runs), then compare them."""
    cfg = _parse(config.Config, values)
    _parse(config.Config, {**values, "skip": "true"})  # refuses a model without skips (vgg19)
    opts = _parse(config.AllConfig, {"force": force})
    from . import workflow
    run_id = _dispatch(lambda: workflow.run_all(cfg, opts.force))
    click.echo(f"MLflow run {run_id} (all-{cfg.model}) finished")


@cli.command()
@_options(config.Config, exclude=config.SWEEP_GRID_FIELDS, defaults=config.SWEEP_TRAIN_DEFAULTS)
@_options(config.SweepConfig)
def sweep(**values: str | None) -> None:
    """Train a grid of models x skip x batch_norm (reusing finished runs), then plot each
    network's first-layer gradient norm against its depth."""
    opts = _parse(config.SweepConfig, {f.name: values.pop(f.name)
                                       for f in config.fields(config.SweepConfig)})
    for name, default in config.SWEEP_TRAIN_DEFAULTS.items():
        if values[name] is None:
            values[name] = config.format_value(default)
    cfg = _parse(config.Config, values)
    _dispatch(lambda: opts.cells(cfg))  # every cell checked before torch is imported
    from . import sweep as sweep_mod
    run_id = _dispatch(lambda: sweep_mod.run_sweep(cfg, opts))
    click.echo(f"MLflow run {run_id} (sweep) finished; see its sweep/ artifacts")


@cli.command()
@click.argument("spool")
def sync(spool: str) -> None:
    """Deliver what a run kept in SPOOL while its tracking server was unreachable.

    SPOOL is the folder a run named when it ended (<spool root>/<run ID>), or the spool
    root (every run in it). Safe to repeat: nothing already in the store is sent twice.
    """
    from . import tracking
    _dispatch(lambda: tracking.sync(spool, echo=click.echo))


def main() -> None:
    if not distributed.launched():  # in a torchrun rank the agent handles signals
        signals.unwind_on_sigterm()
    # standalone_mode=False lets us turn click's usage errors (an unknown -P name arrives
    # as an unknown --option) into the same one-line message as our own.
    try:
        try:
            cli.main(standalone_mode=False, prog_name="python -m pipeline")
        finally:
            signals.let_sigterm_in()  # a command that ended before its work (bad input, --help)
    except click.exceptions.NoArgsIsHelpError as e:
        click.echo(e.ctx.get_help() if e.ctx else str(e))
    except click.NoSuchOption as e:
        # In the parameters' own spelling (an MLproject -P name), not click's --option.
        name = e.option_name.lstrip("-").replace("-", "_")
        near = sorted(p.lstrip("-").replace("-", "_") for p in e.possibilities or ())
        hint = f"; did you mean {' or '.join(near)}?" if near else ""
        _refuse(f"{name}: not a parameter of this step{hint} (--help lists them)")
    except click.UsageError as e:
        _refuse(e.format_message().replace("\n", " "))
    except KeyboardInterrupt as e:  # a SIGTERM held back until the finally above
        _interrupted(e)
    except Exception as e:  # noqa: BLE001 - re-raised unless an interrupt caused it
        # Ctrl-C outside _dispatch, while a command imports torch or MLflow, comes back as
        # click's Abort, or as a C extension's SystemError ("returned a result with an
        # exception set"); the interrupt is in its chain.
        interrupt = signals.interrupt_behind(e)
        if interrupt is None:
            # click also turns EOFError into Abort: that one is an error, shown as itself.
            raise (e.__cause__ or e) if isinstance(e, click.exceptions.Abort) else e
        _interrupted(interrupt)
