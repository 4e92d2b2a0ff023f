"""Hook specifications. Every register hook receives a ``register`` callback; the commands hook the CLI group.

Implement them in a module and expose it under the ``feda2v_toolkit.plugins`` entry-point group::

    from feda2v_toolkit import hookimpl
    from feda2v_toolkit.specs import GeneratorSpec

    @hookimpl
    def feda2v_register_generators(register):
        register(GeneratorSpec(name="flow", description="...", factory="my_pkg.flow:FlowGenerator"))

The host validates everything passed to ``register`` (type, name, description, factory string, schema
validity, migration versions) and commits a plugin's registrations all together or not at all: a plugin
whose hook raises or registers something invalid is skipped as a whole and reported by
``feda2v-tk plugins``. Hooks run once per process, when the registry is first needed; keep them cheap
and torch-free (name classes as ``"module:Class"`` strings so they are imported only when used).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

PROJECT_NAME = "feda2v_toolkit"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def feda2v_register_generators(register: Callable[[Any], None]) -> None:
    """Register generator types: ``register(GeneratorSpec(...))`` once per type.

    The factory subclasses :class:`feda2v_toolkit.components.Generator`.
    """


@hookspec
def feda2v_register_reducers(register: Callable[[Any], None]) -> None:
    """Register sequence reducers: ``register(ReducerSpec(...))``; factory subclasses ``components.Reducer``."""


@hookspec
def feda2v_register_upsamplers(register: Callable[[Any], None]) -> None:
    """Register sequence upsamplers: ``register(UpsamplerSpec(...))``; factory subclasses ``components.Upsampler``."""


@hookspec
def feda2v_register_schema_fragments(register: Callable[[Any], None]) -> None:
    """Register the config keys your components read: ``register(SchemaFragment(...))``.

    Use your plugin's own key prefix (``flow_...``); a key another plugin already defines is rejected.
    """


@hookspec
def feda2v_register_migrations(register: Callable[[Any], None]) -> None:
    """Register steps of your own versioned config migration chain: ``register(Migration(...))``."""


@hookspec
def feda2v_register_commands(cli: Any) -> None:
    """Add commands to the ``feda2v-tk`` click group: ``cli.add_command(...)`` or ``@cli.command()``.

    Built-in command names cannot be replaced. Import heavy modules inside the command function, not
    at module level: this hook runs for ``feda2v-tk --help``.
    """
