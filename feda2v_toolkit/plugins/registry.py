"""The registry: what the loaded plugins registered, looked up by bare or qualified name.

:class:`Registry` holds the components, schema fragments and migrations the plugins registered, the
plugins themselves (:class:`PluginInfo`) and their recorded problems (:class:`PluginFailure`). It is built
by :func:`feda2v_toolkit.plugins.discovery.load_registry`; checking what a plugin registers is
:mod:`feda2v_toolkit.plugins.validation`.
"""

from __future__ import annotations

import contextlib
import difflib
import re
import sys
import traceback
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pluggy

from feda2v_toolkit.errors import ComponentNotFoundError, PluginError, PluginValidationError
from feda2v_toolkit.specs import ComponentSpec, Migration, Provenance, SchemaFragment

BUILTIN_PLUGIN = "builtin"
BUILTIN_DISTRIBUTION = "feda2v-tk"
ENV_STRICT = "FEDA2V_STRICT_PLUGINS"
#: Prefix of every hook name; a plugin function with this prefix that matches no hook is an error.
HOOK_PREFIX = "feda2v_"

REGISTER_HOOKS: dict[str, str] = {
    "generator": "feda2v_register_generators",
    "reducer": "feda2v_register_reducers",
    "upsampler": "feda2v_register_upsamplers",
    "schema_fragment": "feda2v_register_schema_fragments",
    "migration": "feda2v_register_migrations",
}
COMMANDS_HOOK = "feda2v_register_commands"
KINDS = ("generator", "reducer", "upsampler")

#: PluginInfo.status values
LOADED, FAILED, INCOMPATIBLE, BLOCKED, DISABLED = "loaded", "failed", "incompatible", "blocked", "disabled"


class PluginWarning(UserWarning):
    """Emitted when a plugin is skipped, or partly unusable, because of a load problem."""


@dataclass
class PluginInfo:
    """One plugin as ``feda2v-tk plugins`` shows it.

    ``status`` is ``loaded`` (possibly with ``errors``, e.g. a name clash or a failed command),
    ``failed`` (skipped), ``incompatible`` (needs a newer plugin API), ``blocked`` or ``disabled``
    (not loaded on purpose).
    """

    name: str
    distribution: str | None
    version: str | None
    source: str  # "builtin", "entry-point" or "direct"
    status: str = LOADED
    errors: list[str] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)
    hooks: list[str] = field(default_factory=list)
    registered: dict[str, list[str]] = field(default_factory=dict)
    min_api_version: int | None = None

    @property
    def error(self) -> str | None:
        return "; ".join(self.errors) if self.errors else None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "source": self.source,
            "status": self.status,
            "error": self.error,
            "min_api_version": self.min_api_version,
            "modules": self.modules,
            "hooks": sorted(set(self.hooks)),
            "registered": self.registered,
        }


@dataclass(frozen=True)
class PluginFailure:
    """A recorded problem: the plugin it concerns, its distribution and version, and the error."""

    plugin: str
    distribution: str | None
    version: str | None
    error: str
    status: str = FAILED
    traceback: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"plugin": self.plugin, "distribution": self.distribution, "version": self.version,
                "status": self.status, "error": self.error}

    def __str__(self) -> str:
        where = f"{self.distribution} {self.version}" if self.distribution else "not installed"
        return f"plugin {self.plugin!r} ({where}): {self.error}"


def _normalize(name: str) -> str:
    """PEP 503 normalisation, so ``feda2v_tk_flow`` matches ``feda2v-tk-flow``."""
    return re.sub(r"[-_.]+", "-", name).lower()

class Registry:
    """Everything the loaded plugins registered, with lookup by bare or qualified name."""

    def __init__(self, pm: pluggy.PluginManager, *, strict: bool = False) -> None:
        self.pm = pm
        self.strict = strict
        self.plugins: list[PluginInfo] = []
        self.failures: list[PluginFailure] = []
        self.components: dict[str, dict[str, ComponentSpec]] = {kind: {} for kind in KINDS}
        self.schema_fragments: list[SchemaFragment] = []
        self.migrations: list[Migration] = []
        #: pluggy plugin name -> the PluginInfo it belongs to (built-ins have one per module)
        self.pm_names: dict[str, PluginInfo] = {}
        self._commands_added: set[int] = set()

    # -- lookup ---------------------------------------------------------------------------------
    def specs(self, kind: str) -> list[ComponentSpec]:
        """All registered specs of a kind, in registration order."""
        return list(self.components[kind].values())

    def names(self, kind: str) -> list[str]:
        """Names users can write in a config: bare names, qualified names where a bare one is ambiguous."""
        out: list[str] = []
        for spec in self.specs(kind):
            try:
                unique = self.get(kind, spec.name) is spec
            except ComponentNotFoundError:
                unique = False
            out.append(spec.name if unique else spec.qualified_name)
        return out

    def all_names(self, kind: str) -> list[str]:
        """Every accepted spelling: bare names and ``plugin:name`` qualified names."""
        return sorted({s.name for s in self.specs(kind)} | {s.qualified_name for s in self.specs(kind)})

    def _by_bare_name(self, kind: str, name: str) -> list[ComponentSpec]:
        return [spec for spec in self.components[kind].values() if spec.name == name]

    def get(self, kind: str, name: str) -> ComponentSpec:
        """Find a spec by ``name`` or ``plugin:name``.

        A bare name registered by two plugins is ambiguous (an error naming both distributions),
        unless one of them is the built-in plugin, whose names are stable.
        """
        if kind not in self.components:
            raise ComponentNotFoundError(f"unknown component kind {kind!r}; use one of {', '.join(KINDS)}")
        if ":" in name:
            spec = self.components[kind].get(name)
            if spec is None:
                raise ComponentNotFoundError(
                    f"no {kind} {name!r}; registered: {', '.join(self.all_names(kind)) or 'none'}"
                    f"{_hint(name, self.all_names(kind))}")
            return spec
        matches = self._by_bare_name(kind, name)
        if not matches:
            raise ComponentNotFoundError(
                f"no {kind} named {name!r}; registered: {', '.join(self.names(kind)) or 'none'}"
                f"{_hint(name, self.all_names(kind))}")
        if len(matches) > 1:
            builtin = [m for m in matches if m.plugin == BUILTIN_PLUGIN]
            if builtin:
                return builtin[0]
            raise ComponentNotFoundError(
                f"{kind} name {name!r} is registered by {_owners(matches, ' and ')}; "
                f"use the qualified name ({', '.join(m.qualified_name for m in matches)})")
        return matches[0]

    def load(self, kind: str, name: str) -> type:
        """Resolve a component class (importing it, which may import torch) and check its base class."""
        spec = self.get(kind, name)
        try:
            with _guarded(f"import of {spec.factory_path!r}"):
                cls = spec.load()
        except Exception as exc:
            raise PluginError(f"{kind} {spec.qualified_name} ({spec.provenance.distribution or 'not installed'}): "
                              f"cannot import {spec.factory_path!r}: {type(exc).__name__}: {exc}") from exc
        base = spec.base_class()
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise PluginValidationError(
                f"{kind} {spec.qualified_name}: {spec.factory_path} is not a subclass of "
                f"{base.__module__}.{base.__qualname__}")
        return cls

    def plugin(self, name: str) -> PluginInfo | None:
        return next((p for p in self.plugins if p.name == name), None)

    def settings(self, spec: ComponentSpec) -> list[str]:
        """Config keys a component reads: its declared ``settings``, then the keys of schema fragments
        bound to it (``SchemaFragment.generator_type``)."""
        keys = list(spec.settings)
        if spec.kind == "generator":
            for frag in self.schema_fragments:
                if frag.generator_type in (spec.name, spec.qualified_name) and \
                        frag.provenance.plugin == spec.plugin:
                    keys += [k for k in frag.properties if k not in keys]
        return keys

    # -- commands -------------------------------------------------------------------------------
    def add_commands(self, group: Any, reserved: Iterable[str] = ()) -> None:
        """Run every ``feda2v_register_commands`` implementation on a click group, guarded per plugin.

        A plugin whose hook raises, or that tries to replace a ``reserved`` (built-in) command, has
        the offending commands removed and the problem recorded; the other commands keep working.
        """
        if id(group) in self._commands_added:
            return
        self._commands_added.add(id(group))
        reserved = set(reserved)
        for impl in getattr(self.pm.hook, COMMANDS_HOOK).get_hookimpls():
            info = self.pm_names.get(impl.plugin_name)
            if info is None:  # pragma: no cover - every registered plugin has an info
                continue
            before = dict(group.commands)
            try:
                with _guarded(f"{COMMANDS_HOOK} of {info.name!r}"):
                    impl.function(cli=group)
            except Exception as exc:
                group.commands.clear()
                group.commands.update(before)
                self.record_problem(info, f"{COMMANDS_HOOK} failed: {type(exc).__name__}: {exc}",
                                    traceback.format_exc())
                continue
            for name in sorted(set(group.commands) | set(before)):
                old, new = before.get(name), group.commands.get(name)
                if new is old:
                    continue
                if name in reserved or old is not None:
                    if old is None:
                        group.commands.pop(name, None)
                    else:
                        group.commands[name] = old
                    owner = "feda2v-tk" if name in reserved else "another plugin"
                    self.record_problem(info, f"command {name!r} is already provided by {owner}; "
                                              "the plugin's command was not added")
                    continue
                commands = info.registered.setdefault("commands", [])
                if name not in commands:
                    commands.append(name)

    # -- failures -------------------------------------------------------------------------------
    def record_failure(self, info: PluginInfo, error: str, tb: str | None = None, *,
                       status: str = FAILED) -> None:
        """Record a problem with ``info``: fatal in strict mode, else a :class:`PluginWarning`.

        ``status`` becomes the plugin's status (use ``loaded`` for a problem that leaves the
        plugin's other registrations usable, e.g. a name clash).
        """
        if info.source == "builtin" and status != LOADED:  # a broken built-in is a bug, never hidden
            raise PluginError(f"built-in plugin: {error}")
        info.status = status
        info.errors.append(error)
        failure = PluginFailure(info.name, info.distribution, info.version, error, status, tb)
        self.failures.append(failure)
        if self.strict:
            raise PluginError(f"{failure} (strict plugin mode: {ENV_STRICT}=1 or --strict-plugins)")
        action = "skipped" if status in (FAILED, INCOMPATIBLE) else "problem with"
        warnings.warn(f"{action} {failure}", PluginWarning, stacklevel=2)

    def record_problem(self, info: PluginInfo, error: str, tb: str | None = None) -> None:
        """A problem that leaves the plugin loaded (clash, command hook failure)."""
        self.record_failure(info, error, tb, status=info.status if info.status != FAILED else LOADED)


def _hint(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _owners(specs: Iterable[ComponentSpec], sep: str = ", ") -> str:
    return sep.join(f"{s.qualified_name} (from {_dist_text(s.provenance)})" for s in specs)


def _dist_text(p: Provenance) -> str:
    if p.distribution is None:
        return "not installed"
    return f"{p.distribution} {p.version}" if p.version else p.distribution


class PluginAbort(Exception):
    """A plugin called ``sys.exit()`` or raised ``KeyboardInterrupt``, ``GeneratorExit`` or another
    ``BaseException`` while being imported or registered."""


@contextlib.contextmanager
def _guarded(what: str) -> Iterator[None]:
    """Run plugin code so that it cannot take the CLI down: anything it prints goes to stderr (stdout
    carries JSON), and ``sys.exit()``, ``KeyboardInterrupt``, ``GeneratorExit`` or any other
    ``BaseException`` become an ordinary failure (only SIGTERM, :class:`~feda2v_toolkit.errors.Terminated`,
    still stops the process)."""
    from feda2v_toolkit.errors import Terminated

    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    except Terminated:
        raise
    except SystemExit as exc:
        raise PluginAbort(f"{what} called sys.exit({exc.code!r})") from None
    except KeyboardInterrupt:
        raise PluginAbort(f"{what} raised KeyboardInterrupt") from None
    except Exception:
        raise
    except BaseException as exc:
        detail = f": {exc}" if str(exc) else ""
        raise PluginAbort(f"{what} raised {type(exc).__name__}{detail}") from None
