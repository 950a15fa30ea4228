"""`nsa`: the command line. Subcommands load on first use, so `nsa report ...` does not pay for
importing torch and Ray."""

from __future__ import annotations

import importlib
from importlib import metadata

import click

# name -> "module:attribute" of its click command
COMMANDS = {
    "verify": "cli.verify_cmd:verify",
    "report": "cli.report_cmd:report",
    "bench": "cli.bench_cmd:bench",
    "train": "cli.train_cmd:train",
    "train-join": "cli.train_cmd:train_join",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module, _, attribute = target.partition(":")
        return getattr(importlib.import_module(module), attribute)


def _version() -> str:
    try:
        return metadata.version("nsa")
    except metadata.PackageNotFoundError:
        return "unknown"


@click.group(cls=LazyGroup)
@click.version_option(_version(), prog_name="nsa")
def nsa() -> None:
    """Native Sparse Attention: verification harness, reports and benchmarks."""


def main() -> None:
    nsa(prog_name="nsa")


if __name__ == "__main__":
    main()
