"""The ``xrcam`` command line.

Each sub-command lives in its own module under :mod:`workflows.commands` and is imported only when
it is used, so ``xrcam --help`` never imports torch or ray. Command modules import only click at
module level; the work they call is imported inside the command function.
"""

from __future__ import annotations

import importlib
import logging

import click

from xrcam import __version__

# name -> module under workflows.commands that defines a click command called ``command``
COMMANDS = {
    "synth": "synth",
    "demo": "demo",
    "run": "run",
    "reduce": "reduce",
    "report": "report",
    "evaluate": "evaluate",
    "train": "train",
    "submit": "submit",
    "status": "status",
}


class LazyGroup(click.Group):
    """A group whose sub-commands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name in COMMANDS if self._module(name) is not None]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        module = self._module(cmd_name)
        return None if module is None else module.command

    @staticmethod
    def _module(name: str):
        if name not in COMMANDS:
            return None
        try:
            return importlib.import_module(f"workflows.commands.{COMMANDS[name]}")
        except ModuleNotFoundError as exc:  # a command not built yet is simply not listed
            if exc.name == f"workflows.commands.{COMMANDS[name]}":
                return None
            raise


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="xrcam")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """Explainable tissue characterisation for pCLE videos at archive scale.

    Typical session: ``xrcam synth`` (or bring an archive) -> ``xrcam train`` -> ``xrcam run`` ->
    ``xrcam reduce`` -> ``xrcam report``. ``xrcam demo`` does all of it on a synthetic archive.
    """
    level = {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


if __name__ == "__main__":
    main()
