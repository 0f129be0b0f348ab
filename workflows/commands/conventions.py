"""The one CLI convention, applied centrally to every ``xrcam`` command as it is loaded.

:func:`apply` is called by :class:`workflows.cli.LazyGroup` on each command module's ``command`` (and,
for groups such as ``submit``, on each sub-command), so command files stay plain click and need no
boilerplate. Every command then has:

- ``--config FILE``: a TOML file whose keys are named like the options (dashes or underscores).
  Top-level keys are shared by every command that has that option; a ``[<command>]`` table (``[run]``,
  ``[train]``, ``[submit.slurm]``) holds keys for one command only. The environment and the command line
  override the file. A key no command knows, or a value of the wrong type, is a usage error (exit 2)
  naming the file and the key.
- environment variables, shown in ``--help``: ``XRCAM_<COMMAND>_<OPTION>`` (e.g. ``XRCAM_TRAIN_EPOCHS``)
  and, except for the options in :data:`PER_COMMAND_ONLY` whose meaning differs between commands, the
  shared ``XRCAM_<OPTION>`` (e.g. ``XRCAM_DEVICE``). ``XRCAM_ADDRESS`` is the one cluster address of
  every command that joins Ray.
- the exit-code table (:data:`EXIT_CODES`): an :class:`xrcam.errors.XrcamError` escaping a command is
  turned into a one-line ``Error: ...`` (exit 1), never a traceback; so is an ``OSError`` (permission
  denied, read-only or full disk, a path below a file), as :func:`xrcam.errors.storage_error`'s
  sentence naming the path and what to do.

Only click is imported here: ``xrcam --help`` stays free of torch and ray.
"""

from __future__ import annotations

import errno
import functools
import importlib
import tomllib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import click

__all__ = [
    "COMMANDS",
    "EXIT_CODES",
    "PER_COMMAND_ONLY",
    "PREFIX",
    "apply",
    "classes_option",
    "envvars",
    "key",
    "load_command",
]

# sub-command name == module under workflows.commands defining a click command called ``command``
COMMANDS = ("synth", "train", "run", "reduce", "report", "evaluate", "submit", "status", "demo")
PREFIX = "XRCAM"
# options whose meaning or type differs between commands (``run --workers`` = explaining actors,
# ``train --workers`` = data-parallel training; ``synth --classes`` = a count, ``run --classes`` = names;
# ``synth --seed`` draws the archive, ``train --seed`` the split): only the command's own variable, no
# shared XRCAM_<OPTION>. (A config file's top-level keys still apply to every command that has the
# option: a file is written for a purpose, a variable lingers in a shell for a whole session.)
PER_COMMAND_ONLY = frozenset(
    {"out", "workers", "batch_size", "classes", "crop", "frames", "chunk_frames", "seed"}
)
# variables of other tools that the convention replaces: XRCAM_ADDRESS is the one cluster address
_REPLACED = frozenset({"RAY_ADDRESS"})
EXIT_CODES = {
    0: "done",
    1: "finished with failures (some videos or shards failed; see the results folder) or a domain error "
    "(bad input, refused resume, unreadable checkpoint, a path that cannot be written): one line on "
    "stderr saying what to do",
    2: "usage error: unknown option, bad option value, bad --config key or value type",
}
_APPLIED = "__xrcam_conventions__"


def load_command(name: str) -> click.Command | None:
    """The command ``name`` with the convention applied (``None`` if there is no such command)."""
    if name not in COMMANDS:
        return None
    return apply(importlib.import_module(f"workflows.commands.{name}").command, (name,))


def key(param: click.Parameter) -> str:
    """The name of ``param`` in TOML files and environment variables: its long option (``--time`` ->
    ``time``), or an argument's name, with underscores."""
    longs = [opt for opt in getattr(param, "opts", ()) if opt.startswith("--")]
    name = longs[0][2:] if isinstance(param, click.Option) and longs else param.name or ""
    return name.replace("-", "_")


def envvars(path: tuple[str, ...], param: click.Parameter) -> list[str]:
    """The environment variables of option ``param`` of the command at ``path`` (e.g. ``("train",)``)."""
    name = key(param)
    names = ["_".join((PREFIX, *path, name)).upper().replace("-", "_")]
    if name not in PER_COMMAND_ONLY:
        names.append(f"{PREFIX}_{name}".upper())
    declared = (
        param.envvar if isinstance(param.envvar, list | tuple) else [param.envvar] if param.envvar else []
    )
    names += [name for name in declared if name not in names and name not in _REPLACED]
    return names


def apply(command: click.Command, path: tuple[str, ...]) -> click.Command:
    """Give ``command`` (at ``path`` below ``xrcam``) the convention, in place; idempotent."""
    if getattr(command, _APPLIED, False):
        return command
    setattr(command, _APPLIED, True)
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            apply(sub, (*path, name))
        return command
    for param in command.params:
        if isinstance(param, click.Option):
            param.envvar = envvars(path, param)
            param.show_envvar = True
    if not any(param.name == "config" for param in command.params):  # a command's own --config is kept
        command.params.append(_config_option(path))
    if command.callback is not None:
        command.callback = _domain_errors_exit_1(command.callback)
    return command


def classes_option(**overrides: Any) -> Callable[[Callable], Callable]:
    """The shared ``--classes`` option: class names in logit order, comma-separated -> tuple or ``None``.

    The default help is that of a command reading weights (``run``); ``overrides`` go to ``click.option``
    (``train`` defines the order itself, so it says so in its own ``help``).
    """
    settings: dict[str, Any] = {
        "default": None,
        "callback": lambda ctx, param, value: _split_commas(value),
        "help": "Comma-separated class names in the model's logit order. Default: the checkpoint's "
        "sidecar; required for a checkpoint without one (never guessed from folder names). With "
        "--random-init (no checkpoint): the sorted archive labels.",
    }
    settings.update(overrides)
    return click.option("--classes", **settings)


def _split_commas(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    parts = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    return tuple(part.strip() for part in parts if part.strip()) or None


def _domain_errors_exit_1(callback: Callable) -> Callable:
    @functools.wraps(callback)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from xrcam.errors import XrcamError  # light: xrcam's package import pulls in neither torch nor ray

        try:
            return callback(*args, **kwargs)
        except XrcamError as exc:
            raise click.ClickException(_sentence(exc)) from exc
        except OSError as exc:
            if exc.errno == errno.EPIPE:  # output piped into `head`: click's own handling is right
                raise
            from xrcam.errors import storage_error

            raise click.ClickException(_sentence(storage_error(exc))) from exc

    return wrapper


def _sentence(exc: Exception) -> str:
    return " ".join(str(exc).split())


def _config_option(path: tuple[str, ...]) -> click.Option:
    table = ".".join(path)
    return click.Option(
        ["--config"],
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        envvar=[f"{PREFIX}_{'_'.join(path)}_CONFIG".upper(), f"{PREFIX}_CONFIG"],
        show_envvar=True,
        is_eager=True,
        expose_value=False,
        callback=functools.partial(_read_config, table=table),
        help=f"TOML file of option values (keys named like the options; shared top-level keys and a "
        f"[{table}] table); the environment and the command line override it.",
    )


def _read_config(ctx: click.Context, param: click.Parameter, value: Path | None, *, table: str) -> None:
    if value is None:
        return
    try:
        data = tomllib.loads(value.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise click.BadParameter(f"{value}: cannot read it as TOML ({exc}).", ctx, param) from None
    own = _table(data, table.split("."))
    params = {key(p): p for p in ctx.command.params if p.name and p.name != "config"}
    values: dict[str, Any] = {}
    shared_unknown = []
    for text, item in _plain_keys(data, own=table.split(".")[0]):
        name = text.replace("-", "_")
        if name in params:
            values[name] = item
        elif name not in _all_keys():
            shared_unknown.append(text)
    own_unknown = []
    for text, item in _plain_keys(own):
        name = text.replace("-", "_")
        if name in params:
            values[name] = item
        else:
            own_unknown.append(text)
    if own_unknown or shared_unknown:
        unknown = ", ".join(repr(k) for k in own_unknown + shared_unknown)
        raise click.UsageError(
            f"{value}: unknown key(s) {unknown} for `xrcam {' '.join(table.split('.'))}`; "
            f"known: {', '.join(sorted(k.replace('_', '-') for k in params))}.",
            ctx,
        )
    default_map = dict(ctx.default_map or {})
    for name, item in values.items():
        default_map[params[name].name] = _checked(ctx, params[name], name, item, value)
    ctx.default_map = default_map


def _checked(ctx: click.Context, param: click.Parameter, key: str, item: Any, source: Path) -> Any:
    """``item`` converted like a command-line value; a wrong type is one sentence naming the key."""
    if isinstance(param.type, click.Path) and isinstance(item, str):
        item = str((source.parent / Path(item).expanduser()).absolute())  # relative to the config file
    if param.multiple and isinstance(item, str):
        item = [item]
    elif not param.multiple and param.nargs == 1 and isinstance(item, list):
        item = ",".join(str(v) for v in item)  # a TOML array for a comma-separated option (methods, classes)
    try:
        param.type_cast_value(ctx, item)
    except click.BadParameter as exc:
        raise click.UsageError(
            f"{source}: key {key.replace('_', '-')!r} = {item!r} is not valid: {exc.message}", ctx
        ) from None
    return item


def _table(data: Mapping[str, Any], parts: list[str]) -> Mapping[str, Any]:
    for part in parts:
        data = data.get(part) if isinstance(data.get(part), Mapping) else {}
    return data


def _plain_keys(data: Mapping[str, Any], own: str = "") -> Iterator[tuple[str, Any]]:
    """The keys of ``data`` but the command tables (``[run]``, ``[submit.slurm]``, this command's ``own``)."""
    for text, item in data.items():
        if text in COMMANDS or (text == own and isinstance(item, Mapping)):
            continue
        yield text, item


@functools.cache
def _all_keys() -> frozenset[str]:
    """Every parameter key of every command: a shared top-level key must belong to one of them."""
    names: set[str] = set()

    def walk(command: click.Command) -> None:
        names.update(key(p) for p in command.params if p.name)
        if isinstance(command, click.Group):
            for sub in command.commands.values():
                walk(sub)

    for name in COMMANDS:
        walk(importlib.import_module(f"workflows.commands.{name}").command)
    return frozenset(names)
