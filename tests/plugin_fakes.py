"""Helpers for the plugin tests: fake plugin modules, fake installed distributions, running the CLI."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from feda2v_toolkit import hookimpl
from feda2v_toolkit.specs import GeneratorSpec, ReducerSpec, SchemaFragment, UpsamplerSpec

REPO = Path(__file__).resolve().parents[1]
AVG = "feda2v_toolkit.reducers.adaptive_avg:AdaptiveAvgReducer"
LINEAR = "feda2v_toolkit.upsamplers.interpolate:LinearUpsampler"
VAE = "feda2v_toolkit.generators.vae:VAEGenerator"

#: Entry-point plugins installed where the tests run (e.g. feda2v-tk-flow after ``pip install
#: plugins/feda2v-tk-flow``). Tests that list every plugin leave these out, so the suite passes in any
#: environment, not only in a bare one.
AMBIENT_PLUGINS = frozenset(ep.name for ep in importlib.metadata.entry_points(group="feda2v_toolkit.plugins"))


def statuses(plugins: list[Any]) -> dict[str, str]:
    """``{name: status}`` of a ``plugins --json`` list or of ``Registry.plugins``, ambient plugins left out."""
    rows = [p if isinstance(p, dict) else {"name": p.name, "status": p.status} for p in plugins]
    return {p["name"]: p["status"] for p in rows if p["name"] not in AMBIENT_PLUGINS}


def make_plugin(name: str = "fake", *, min_api: Any = None, **hooks: Callable[..., None]) -> ModuleType:
    """A plugin module whose hooks are the given functions: ``generators=lambda register: ...`` becomes
    ``feda2v_register_generators``; a key already starting with ``feda2v_`` is used as is."""
    module = ModuleType(f"fake_plugin_{name}")
    for key, fn in hooks.items():
        hook = key if key.startswith("feda2v_") else f"feda2v_register_{key}"
        setattr(module, hook, hookimpl(fn))
    if min_api is not None:
        module.feda2v_min_api_version = min_api
    return module


def reducer(name: str = "fake_reducer", **kw: Any) -> ReducerSpec:
    return ReducerSpec(name=name, description=kw.pop("description", "A fake reducer."), factory=kw.pop("factory", AVG),
                       **kw)


def upsampler(name: str = "fake_upsampler", **kw: Any) -> UpsamplerSpec:
    return UpsamplerSpec(name=name, description="A fake upsampler.", factory=kw.pop("factory", LINEAR), **kw)


def generator(name: str = "fake_gen", **kw: Any) -> GeneratorSpec:
    return GeneratorSpec(name=name, description="A fake generator.", factory=kw.pop("factory", VAE), **kw)


def fragment(name: str = "fake", properties: Mapping[str, Any] | None = None, **kw: Any) -> SchemaFragment:
    props = properties if properties is not None else {
        "fake_depth": {"description": "How deep.", "type": "integer", "minimum": 1, "default": 2}}
    return SchemaFragment(name=name, schema={"type": "object", "properties": dict(props)}, **kw)


def fake_distribution(site: Path, dist: str, version: str, entry_points: Mapping[str, str],
                      modules: Mapping[str, str] | None = None) -> Path:
    """Install a distribution the cheap way: a ``*.dist-info`` with ``entry_points.txt`` in ``site``
    (a directory on ``sys.path`` / ``PYTHONPATH``), plus module files."""
    site.mkdir(parents=True, exist_ok=True)
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n", "utf-8")
    lines = ["[feda2v_toolkit.plugins]", *(f"{k} = {v}" for k, v in entry_points.items())]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n", "utf-8")
    for module, source in (modules or {}).items():
        (site / f"{module}.py").write_text(textwrap.dedent(source), "utf-8")
    return info


#: A torch-free plugin with a reducer, a schema fragment and a command (module ``hello_plugin``).
HELLO_PLUGIN = '''
    import click

    from feda2v_toolkit import hookimpl
    from feda2v_toolkit.specs import ReducerSpec, SchemaFragment

    feda2v_min_api_version = 1


    @hookimpl
    def feda2v_register_reducers(register):
        register(ReducerSpec(name="hello_avg", description="Average pooling, said hello.",
                             factory="feda2v_toolkit.reducers.adaptive_avg:AdaptiveAvgReducer",
                             settings=("hello_greeting",)))


    @hookimpl
    def feda2v_register_schema_fragments(register):
        register(SchemaFragment(name="hello", description="Greeting keys.", schema={
            "type": "object", "properties": {
                "hello_greeting": {"description": "What to say.", "type": "string", "default": "hi"}}}))


    @hookimpl
    def feda2v_register_commands(cli):
        @cli.command("hello")
        def hello():
            """Say hello from a plugin."""
            click.echo("hello from a plugin")
'''

#: A plugin that fails to import (module ``boom_plugin``).
BOOM_PLUGIN = '''
    raise ImportError("boom: a dependency is missing")
'''


def run_cli(*args: str, site: Path | None = None, env: Mapping[str, str] | None = None,
            check_torch: bool = False, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``feda2v-tk ARGS`` in a fresh interpreter (``site`` prepended to ``PYTHONPATH``).

    With ``check_torch`` the process prints ``TORCH-IMPORTED`` to stderr if torch got imported.
    """
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FEDA2V_")}
    full_env["COLUMNS"] = "200"
    if site is not None:
        full_env["PYTHONPATH"] = os.pathsep.join([str(site), full_env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    full_env.update(env or {})
    code = textwrap.dedent(f"""
        import atexit, sys
        if {check_torch!r}:
            atexit.register(lambda: print("TORCH-IMPORTED" if "torch" in sys.modules else "TORCH-FREE",
                                          file=sys.stderr))
        from feda2v_toolkit.cli import main
        main({list(args)!r})
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env,
                          timeout=timeout, cwd=str(REPO))
