"""Hook specifications. Every hook takes a ``register`` callback (or the CLI group).

Implement them in a module and expose it under the ``feda2v_toolkit.plugins`` entry-point group::

    from feda2v_toolkit import hookimpl
    from feda2v_toolkit.specs import GeneratorSpec

    @hookimpl
    def feda2v_register_generators(register):
        register(GeneratorSpec(name="flow", description="...", factory="my_pkg.flow:FlowGenerator"))

The host validates everything passed to ``register``; a plugin whose registration fails is skipped
as a whole and reported by ``feda2v-tk plugins``.
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
    """Register generator types: call ``register(GeneratorSpec(...))`` once per type."""


@hookspec
def feda2v_register_reducers(register: Callable[[Any], None]) -> None:
    """Register sequence reducers: ``register(ReducerSpec(...))``."""


@hookspec
def feda2v_register_upsamplers(register: Callable[[Any], None]) -> None:
    """Register sequence upsamplers: ``register(UpsamplerSpec(...))``."""


@hookspec
def feda2v_register_schema_fragments(register: Callable[[Any], None]) -> None:
    """Register config-schema fragments for the keys your components read: ``register(SchemaFragment(...))``."""


@hookspec
def feda2v_register_migrations(register: Callable[[Any], None]) -> None:
    """Register config migrations (your own versioned chain): ``register(Migration(...))``."""


@hookspec
def feda2v_register_commands(cli: Any) -> None:
    """Add commands to the ``feda2v-tk`` click group (``cli.command()`` / ``cli.add_command``)."""
