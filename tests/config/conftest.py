"""Shared fixtures: an isolated registry (no entry-point plugins), fixture paths, and CLI runners."""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).parent
FIXTURES = HERE / "fixtures"
REPO = HERE.parents[1]
EXAMPLES = REPO / "examples" / "configs"


@pytest.fixture(autouse=True)
def _builtin_plugins_only(monkeypatch):
    """Results must not depend on which third-party plugins happen to be installed."""
    from feda2v_toolkit import plugins

    monkeypatch.setenv("FEDA2V_DISABLE_PLUGIN_AUTOLOAD", "1")
    plugins.reset_registry()
    yield
    plugins.reset_registry()


@pytest.fixture
def catalog():
    from feda2v_toolkit.config.catalog import get_catalog

    return get_catalog()


@pytest.fixture
def flowgen_registry():
    """The built-ins plus the test plugin in ``flowgen_plugin.py``."""
    from feda2v_toolkit import plugins

    from . import flowgen_plugin

    plugins.configure(autoload=False, strict=True, extra_plugins=[("flowgen", flowgen_plugin)])
    return plugins.get_registry()  # the process-wide registry: what the CLI commands use


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str

    @property
    def lines(self) -> list[str]:
        return self.stdout.splitlines()


@pytest.fixture
def feda2v(capsysbinary):
    """Run ``feda2v-tk ARGS`` in-process through the real entry point (exit codes included)."""
    from feda2v_toolkit.cli import main

    def run(*args: str) -> Run:
        with pytest.raises(SystemExit) as exc:
            main([str(a) for a in args])
        out, err = capsysbinary.readouterr()
        code = exc.value.code
        return Run(code if isinstance(code, int) else (0 if code is None else 1),
                   out.decode("utf-8"), err.decode("utf-8"))

    return run


def installed_executable() -> str:
    exe = shutil.which("feda2v-tk") or str(Path(sys.executable).parent / "feda2v-tk")
    assert Path(exe).exists(), "feda2v-tk is not installed in this environment"
    return exe


def copy_fixture(src: Path, dst_dir: Path, name: str | None = None) -> Path:
    dst = dst_dir / (name or src.name)
    dst.write_bytes(src.read_bytes())
    return dst
