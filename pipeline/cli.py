"""Command line: parse, validate, dispatch. Nothing else lives here.

Every option is generated from a ``Config`` field, so names, help and defaults have one
home. Options arrive as strings and are parsed by ``Config.from_strings``: the same rules,
and the same one-line errors, whether a value came from ``mlflow run -P`` or from a shell.
"""
from __future__ import annotations

import sys

import click

from . import config

EXIT_USAGE = 2  # bad input, as click and argparse use


def _config_options(func):
    for f in reversed(config.fields()):
        default = config.format_value(f.default)
        func = click.option(f"--{f.name.replace('_', '-')}", f.name, type=str, default=None,
                            metavar=f.type.upper() if f.type in ("int", "float") else "TEXT",
                            help=f"{f.metadata['help']} [default: {default}]")(func)
    return func


def _refuse(message: str) -> "NoReturn":  # noqa: F821
    """One line on stderr, the pending MLflow run marked FAILED, exit 2."""
    click.echo(f"error: {message}", err=True)
    from .tracking import fail_pending_run  # mlflow only on this path; no torch
    fail_pending_run(message)
    sys.exit(EXIT_USAGE)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Gradient flow in deep networks, tracked in MLflow."""


@cli.command()
@_config_options
def train(**values: str | None) -> None:
    """Train one variant; log per-batch gradient norms, plots and JSON to MLflow."""
    try:
        cfg = config.Config.from_strings(values)
    except config.ConfigError as e:
        _refuse(str(e))
    from . import train as train_mod  # torch is imported only once the input is valid
    from .data import DataError
    try:
        run_id = train_mod.run(cfg)
    except (config.ConfigError, DataError) as e:
        _refuse(str(e))
    except KeyboardInterrupt:
        click.echo("interrupted; the MLflow run was ended as KILLED", err=True)
        sys.exit(130)
    click.echo(f"MLflow run {run_id} finished")


def main() -> None:
    # standalone_mode=False lets us turn click's usage errors (an unknown -P name arrives
    # as an unknown --option) into the same one-line message as our own.
    try:
        cli.main(standalone_mode=False, prog_name="python -m pipeline")
    except click.exceptions.NoArgsIsHelpError as e:
        click.echo(e.ctx.get_help() if e.ctx else str(e))
    except click.UsageError as e:
        _refuse(e.format_message().replace("\n", " "))
    except click.exceptions.Abort:
        sys.exit(130)
