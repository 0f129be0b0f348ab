"""The CLI and the library import lazily: help text is instant and the library never needs Ray."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import sys
{code}
heavy = sorted(m for m in ("ray", "torch", "zarr") if m in sys.modules)
print(",".join(heavy))
"""


def _heavy_modules_after(code: str) -> set[str]:
    proc = subprocess.run([sys.executable, "-c", PROBE.format(code=code)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1:] or [""]
    return set(filter(None, last[0].split(",")))


def test_import_xrcam_pulls_in_neither_ray_nor_torch():
    assert _heavy_modules_after("import xrcam") == set()


def test_cli_help_pulls_in_neither_ray_nor_torch():
    code = (
        "from click.testing import CliRunner\n"
        "from workflows.cli import main\n"
        "r = CliRunner().invoke(main, ['--help'])\n"
        "assert r.exit_code == 0, r.output\n"
        "assert 'Commands:' in r.output, r.output\n"
    )
    assert _heavy_modules_after(code) == set()


@pytest.mark.parametrize(
    "command", ["synth", "run", "reduce", "report", "evaluate", "train", "submit", "status", "demo"]
)
def test_every_subcommand_has_real_help(command):
    code = (
        "from click.testing import CliRunner\n"
        "from workflows.cli import main\n"
        f"r = CliRunner().invoke(main, [{command!r}, '--help'])\n"
        "assert r.exit_code == 0, r.output\n"
        "assert len(r.output.splitlines()) > 4, r.output\n"
    )
    assert "ray" not in _heavy_modules_after(code)


def test_library_never_imports_ray():
    code = (
        "import xrcam, pkgutil, importlib\n"
        "for m in pkgutil.walk_packages(xrcam.__path__, 'xrcam.'):\n"
        "    importlib.import_module(m.name)\n"
    )
    assert "ray" not in _heavy_modules_after(code)
