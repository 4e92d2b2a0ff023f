"""What plugins register: plain, torch-free descriptions of components, schema fragments and migrations.

A plugin hands instances of these classes to the ``register`` callback its hook receives. The host
validates each one (see :mod:`feda2v_toolkit.plugins`) and records which plugin and distribution it
came from. Component classes are referenced by an import string (``"package.module:Class"``) or the
class itself; import strings keep ``feda2v-tk plugins`` / ``list`` / ``validate`` free of torch.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_\-]*$")
#: the toolkit's own migration chain (plugins use chains named after themselves)
CORE_CHAIN = "core"
#: where a schema fragment keeps the keys a node may override: ``$defs.node_overrides``
NODE_OVERRIDES_DEF = "node_overrides"


@dataclass(frozen=True)
class Provenance:
    """Where a registered object came from (filled in by the host, never by the plugin)."""

    plugin: str = ""
    distribution: str | None = None
    version: str | None = None


@dataclass(frozen=True)
class ComponentSpec:
    """Base of the component specs: a named factory plus its documentation.

    Attributes:
        name: short name users put in configs (``[a-z][a-z0-9_-]*``), e.g. ``"vae"``.
        description: one line shown by ``feda2v-tk list``.
        factory: the implementing class, or ``"module:attr"`` to import it lazily.
        settings: config keys the component reads (documented in some schema fragment); ``feda2v-tk
            list`` shows them with their type, default and description.
        test_config: config overrides that make a small, fast instance: the conformance kit
            (:mod:`feda2v_toolkit.testing`) applies them on top of its tiny defaults.
    """

    kind: ClassVar[str] = "component"
    base_class_path: ClassVar[str] = ""

    name: str
    description: str
    factory: str | Callable[..., Any]
    settings: tuple[str, ...] = ()
    test_config: Mapping[str, Any] = field(default_factory=dict, compare=False)
    provenance: Provenance = field(default_factory=Provenance, compare=False)

    @property
    def plugin(self) -> str:
        return self.provenance.plugin

    @property
    def qualified_name(self) -> str:
        """``plugin:name``: always unambiguous, even when two plugins use the same name."""
        return f"{self.provenance.plugin}:{self.name}"

    @property
    def factory_path(self) -> str:
        """The factory as ``module:qualname`` text, without importing it."""
        f = self.factory
        if isinstance(f, str):
            return f
        return f"{getattr(f, '__module__', '?')}:{getattr(f, '__qualname__', type(f).__qualname__)}"

    def load(self) -> Any:
        """Import and return the implementing class (this is where torch may be imported)."""
        factory = self.factory
        if isinstance(factory, str):
            module_name, _, attr = factory.partition(":")
            obj: Any = importlib.import_module(module_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
            return obj
        return factory

    def base_class(self) -> type:
        module_name, _, attr = self.base_class_path.partition(":")
        return getattr(importlib.import_module(module_name), attr)


@dataclass(frozen=True)
class GeneratorSpec(ComponentSpec):
    """A generator type; ``factory`` must be a subclass of :class:`feda2v_toolkit.components.Generator`."""

    kind: ClassVar[str] = "generator"
    base_class_path: ClassVar[str] = "feda2v_toolkit.components:Generator"


@dataclass(frozen=True)
class ReducerSpec(ComponentSpec):
    """A sequence reducer ``[B, L, D] -> [B, l, D]``; factory subclasses ``components.Reducer``.

    ``positional`` repeats the class attribute ``Reducer.positional`` without importing the class (so
    ``validate`` can check pairings torch-free): False when the reduced axis holds components rather than
    stretches of the sequence (``pca``). The conformance kit checks that the two agree.
    """

    kind: ClassVar[str] = "reducer"
    base_class_path: ClassVar[str] = "feda2v_toolkit.components:Reducer"

    positional: bool = True


@dataclass(frozen=True)
class UpsamplerSpec(ComponentSpec):
    """A sequence upsampler ``[B, l, D] -> [B, L, D]``; factory subclasses ``components.Upsampler``.

    ``trainable`` repeats the class attribute ``Upsampler.trainable`` without importing the class: True
    when the upsampler is fitted on (reduced, full) pairs. The conformance kit checks that the two agree.
    """

    kind: ClassVar[str] = "upsampler"
    base_class_path: ClassVar[str] = "feda2v_toolkit.components:Upsampler"

    trainable: bool = False


COMPONENT_SPECS: dict[str, type[ComponentSpec]] = {
    spec.kind: spec for spec in (GeneratorSpec, ReducerSpec, UpsamplerSpec)
}


@dataclass(frozen=True)
class SchemaFragment:
    """A piece of the config schema: JSON Schema ``properties`` for some generator-section keys.

    Attributes:
        name: fragment name, unique per plugin (e.g. ``"core"``).
        schema: a JSON Schema (draft 2020-12) object schema with a ``properties`` mapping; every
            property should carry ``description`` and, where it has one, ``default``.
        description: one line.
        generator_type: if set, these keys only configure that generator type
            (``feda2v-tk schema --generator TYPE`` narrows to them).
    """

    name: str
    schema: Mapping[str, Any]
    description: str = ""
    generator_type: str | None = None
    provenance: Provenance = field(default_factory=Provenance, compare=False)

    @property
    def properties(self) -> Mapping[str, Any]:
        return self.schema.get("properties", {})

    @property
    def node_properties(self) -> Mapping[str, Any]:
        """Keys a node may override (``$defs.node_overrides.properties``)."""
        return (self.schema.get("$defs", {}).get(NODE_OVERRIDES_DEF, {}) or {}).get("properties", {})


@dataclass(frozen=True)
class Migration:
    """One step of a versioned migration chain for the generator section of a config.

    ``apply(section, ctx)`` is a pure function: it receives a copy of one generator section (or one
    per-node override object in ``nodes``) as an ordered ``dict`` and returns the migrated section as a
    new ordered ``dict``; key order is kept in the file, so put a renamed key where the old one was
    (:func:`feda2v_toolkit.config.migrate.rename_key` does). ``ctx``
    (:class:`feda2v_toolkit.config.migrate.MigrationContext`) gives the user's options and a
    ``ctx.note(...)`` for choices worth telling; raise
    :class:`feda2v_toolkit.config.migrate.MigrationConflict` when the section cannot be migrated
    without guessing. The host records the chain's version in the section and works out the textual
    edits and the list of changes itself.

    Attributes:
        id: unique id, e.g. ``"core-0001-split-target-sequence-length"``.
        chain: the chain it belongs to (``"core"`` for the toolkit; a plugin uses its own name).
        from_version / to_version: consecutive integers (``to_version == from_version + 1``).
        description: one line, shown by ``feda2v-tk migrate``.
        apply: the step, ``(section: dict, ctx) -> dict``.
        detect: optional predicate on a section: does it still need this step? Used to infer the
            version of sections that do not record one, and to decide which per-node overrides to
            migrate. Defaults to "one of ``deprecated_keys`` is present".
        deprecated_keys: keys this step retires -> a short text naming the replacement. ``validate``
            reports them, and loading a config warns once per key.
    """

    id: str
    chain: str
    from_version: int
    to_version: int
    description: str
    apply: Callable[..., Any]
    detect: Callable[[Mapping[str, Any]], bool] | None = None
    deprecated_keys: Mapping[str, str] = field(default_factory=dict, compare=False)
    provenance: Provenance = field(default_factory=Provenance, compare=False)

    def needed_by(self, section: Mapping[str, Any]) -> bool:
        """Whether ``section`` still needs this step (``detect``, else a deprecated key is present)."""
        if self.detect is not None:
            return bool(self.detect(section))
        return any(key in section for key in self.deprecated_keys)
