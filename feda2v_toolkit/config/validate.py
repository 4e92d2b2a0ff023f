"""Validation of generator sections: schema checks, unknown and deprecated keys, cross-field rules.

Every problem of a document is reported at once as a :class:`Finding` with file, line:column, JSON
path, a stable ``code``, what was expected and found, and a suggestion. Keys that are not generator
keys (other FedA2V settings, ``_comment`` keys) pass untouched; an unknown key that looks like a
generator key (a generator prefix such as ``generator_``, or a near miss of a known key) is an error.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from feda2v_toolkit.config import configured_upsampler
from feda2v_toolkit.config.catalog import Catalog, KeyInfo
from feda2v_toolkit.config.document import (
    EXPERIMENT_KEYS,
    SECTION_KEYS,
    JsonPath,
    Location,
    Source,
    describe_found,
    format_path,
    locate,
)
from feda2v_toolkit.config.migrate import (
    DocumentMigration,
    MigrationConflict,
    fix_command,
    migrate_location,
)
from feda2v_toolkit.config.migrations import (
    CHANGED_DEFAULTS,
    FULL_LENGTH_THRESHOLD,
    OLD_KEY,
    OUTPUT_KEY,
    TRAINING_KEY,
    format_count,
    relied_on_defaults,
    vae_parameters,
)
from feda2v_toolkit.config.schema import PLUGIN_VERSIONS_KEY, VERSION_KEY, Problem
from feda2v_toolkit.errors import InputError
from feda2v_toolkit.specs import CORE_CHAIN

TRAIN, OUTPUT = TRAINING_KEY, OUTPUT_KEY
GRANULARITY = "generator_granularity"
GROUPS = "generator_class_groups"
GROUP = "generator_class_group"
ONLY = "generator_only_mode"
TRAINING_MODE = "generator_training_mode"
USE_PRETRAINED = "use_pretrained_generators"
PRETRAINED_PATH = "pretrained_generator_path"
REDUCER = "generator_reducer"
UPSAMPLER = "generator_upsampler"
LEARNED = "use_learned_upsampling"

ERROR = "error"
WARNING = "warning"

#: Every finding code ``validate`` reports, with its meaning (rendered in docs/configuration.md).
CODES: dict[str, str] = {
    "io-error": "the file or directory cannot be read (exit code 2)",
    "file-too-large": "the file is larger than the config size limit",
    "not-utf8": "the file is not UTF-8 text",
    "empty-file": "the file is empty",
    "json-syntax": "the file is not valid JSON (position given; trailing commas and NaN named as such)",
    "json-comments": "the file has `//` or `/* */` comments, which JSON does not allow",
    "not-object": "the top level is not a JSON object",
    "duplicate-key": "a key appears twice in one object (JSON parsers keep the last)",
    "invalid-section": "`feda2v` / `feda2v_config` is not an object",
    "invalid-node": "`nodes` or one of its entries is not an object",
    "ambiguous-section": "both `feda2v` and `feda2v_config` are present",
    "misplaced-key": "a generator key outside the generator section of a full config (ignored by FedA2V)",
    "unknown-key": "an unknown key that looks like a generator key (prefix, or close to a known key)",
    "node-only-key": "a per-node key (`generator_train_classes`, `generator_class_group`) in the section",
    "other-generator-key": "a key of another generator type than the section's `generator_type` (warning)",
    "invalid-value": "a value of the wrong type or out of range",
    "unknown-component": "`generator_type`, `generator_reducer` or `generator_upsampler` names nothing registered",
    "deprecated-key": "a deprecated key (FedA2V ignores it); `feda2v-tk migrate` replaces it",
    "deprecated-conflict": "a deprecated key and its replacement disagree",
    "newer-schema-version": "the section was written for a newer schema than this installation knows",
    "outdated-schema-version": "the recorded schema version is older than current (warning)",
    "changed-defaults": "a section written before schema version 3 relies on a default that changed "
                        "(warning; `feda2v-tk migrate` says what changed, --keep-old-defaults keeps it)",
    "unknown-chain": "`schema_versions` names a migration chain no installed plugin provides (warning)",
    "output-shorter-than-training": "`generator_output_sequence_length` is below the training length",
    "large-training-length": "a training length above 64 (parameters grow ~1.57 M per token; warning)",
    "per-group-without-groups": "`per_group` granularity without `generator_class_groups`",
    "unused-class-groups": "`generator_class_groups` set but granularity is not `per_group` (warning)",
    "overlapping-class-groups": "a class is in two class groups",
    "unknown-class-group": "a node's `generator_class_group` is not one of `generator_class_groups`",
    "class-group-without-per-group": "a node's class group while granularity is not `per_group` (warning)",
    "generator-only-without-source": "`generator_only_mode` with neither training nor a pretrained generator",
    "pretrained-without-path": "`use_pretrained_generators` without `pretrained_generator_path`",
    "non-positional-reducer": "a reducer whose output is components, not positions (`pca`), with an "
                              "interpolating upsampler: the samples are meaningless (warning)",
}


@dataclass
class Finding:
    """One problem in one file (``line``/``column`` are 1-based; None when there is no text)."""

    file: str
    line: int | None
    column: int | None
    path: str | None
    code: str
    severity: str
    message: str
    expected: str | None = None
    found: str | None = None
    suggestion: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def detail(self) -> str:
        """``$.path: message; suggestion [code]`` (without the path when there is none)."""
        text = (f"{self.path}: " if self.path else "") + self.message
        return text + (f"; {self.suggestion}" if self.suggestion else "") + f" [{self.code}]"

    def format(self) -> str:
        """``file:line:col: error: $.path: message; suggestion [code]`` on one line."""
        where = self.file if self.line is None else f"{self.file}:{self.line}:{self.column}"
        return f"{where}: {self.severity}: {self.detail}"


@dataclass
class _Raw:
    path: JsonPath
    at_key: bool
    code: str
    severity: str
    message: str
    expected: str | None = None
    found: str | None = None
    suggestion: str | None = None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _Checker:
    def __init__(self, doc: Mapping[str, Any], catalog: Catalog, name: str | None) -> None:
        self.doc = doc
        self.catalog = catalog
        self.name = name
        self.fix = fix_command(name)
        self.chains = catalog.chains
        self.defaults = catalog.defaults()
        self.out: list[_Raw] = []

    def add(self, path: JsonPath, code: str, message: str, *, at_key: bool = False, severity: str = ERROR,
            expected: str | None = None, found: str | None = None, suggestion: str | None = None) -> None:
        self.out.append(_Raw(path, at_key, code, severity, message, expected, found, suggestion))

    def run(self) -> list[_Raw]:
        cat = self.catalog
        layout = locate(self.doc, cat.is_generator_key)
        for path, code, message, expected, found in layout.problems:
            self.add(path, code, message, expected=expected, found=found)
        if len(layout.sections) > 1:
            self.add((layout.sections[1].path[0],), "ambiguous-section",
                     f"both {SECTION_KEYS[0]!r} and {SECTION_KEYS[1]!r} are present; the FedA2V runner reads "
                     f"{SECTION_KEYS[0]!r}", at_key=True,
                     suggestion=f"merge them into one {SECTION_KEYS[0]!r} section")
        if layout.full and layout.sections:
            home = layout.sections[0].path[0]
            for key in self.doc:
                if key not in EXPERIMENT_KEYS and cat.is_generator_key(key):
                    self.add((key,), "misplaced-key",
                             f"generator key {key!r} outside the generator section is ignored by FedA2V",
                             at_key=True, found=json.dumps(key), suggestion=f"move it into {home!r}")
        for loc in layout.sections:
            self.check_keys(loc)
            self.check_versions(loc)
            self.check_deprecated(loc)
            self.check_cross({**self.defaults, **loc.data}, loc.data, loc)
        base = {**self.defaults, **(layout.sections[0].data if layout.sections else {})}
        for loc in layout.nodes:
            self.check_keys(loc)
            self.check_deprecated(loc)
            self.check_cross({**base, **loc.data}, loc.data, loc)
        return self.out

    # -- keys
    def check_keys(self, loc: Location) -> None:
        cat = self.catalog
        generator_spec = self._generator_spec(loc)
        for key, value in loc.data.items():
            path = (*loc.path, key)
            if key.startswith("_") or key in cat.deprecated:
                continue
            info = cat.keys.get(key)
            if info is None and loc.kind == "node":
                info = cat.node_keys.get(key)
            if info is not None:
                self.check_value(info, value, path)
                frag_type = info.fragment.generator_type
                if frag_type and generator_spec is not None and frag_type not in (
                        generator_spec.name, generator_spec.qualified_name):
                    self.add(path, "other-generator-key", severity=WARNING, at_key=True,
                             message=f"{key!r} configures generator type {frag_type!r}, but this section uses "
                                     f"{generator_spec.name!r}; it is ignored",
                             suggestion=f"remove it or set generator_type to {frag_type!r}")
            elif key in cat.node_keys:
                self.add(path, "node-only-key", at_key=True,
                         message=f"{key!r} can only be set in a per-node override (nodes.<id>)",
                         found=json.dumps(key), suggestion="move it into the node it applies to")
            elif cat.is_generator_key(key):
                close = cat.closest(key)
                self.add(path, "unknown-key", f"unknown generator key {key!r}", at_key=True,
                         expected="a known generator key", found=json.dumps(key),
                         suggestion=(f"did you mean {close!r}?" if close
                                     else "`feda2v-tk schema` lists the known keys"))

    def _generator_spec(self, loc: Location) -> Any:
        return self._component_spec("generator", loc.data.get("generator_type", self.defaults.get("generator_type")))

    def check_value(self, info: KeyInfo, value: Any, path: JsonPath) -> None:
        for problem in self.catalog.check(info, value):
            self._value_problem(info, value, problem, path)

    def _value_problem(self, info: KeyInfo, value: Any, problem: Problem, path: JsonPath) -> None:
        code = "invalid-value"
        suggestion = None
        if info.component and isinstance(value, str) and not problem.path:
            code = "unknown-component"
            suggestion = self.catalog.component_suggestion(info.component, value)
        elif isinstance(value, str) and not problem.path:
            try:
                parsed = json.loads(value)
            except ValueError:
                parsed = None
            if parsed is not None and not isinstance(parsed, str) and not self.catalog.check(info, parsed):
                suggestion = f"write it without quotes: {json.dumps(parsed)}"
            elif "enum" in info.schema:
                hits = difflib.get_close_matches(value, [str(v) for v in info.schema["enum"]], n=1, cutoff=0.6)
                if hits:
                    suggestion = f"did you mean {hits[0]!r}?"
        elif "default" in info.schema and not problem.path:
            suggestion = f"the default is {json.dumps(info.schema['default'])}"
        self.add((*path, *problem.path), code, problem.message, expected=problem.expected, found=problem.found,
                 suggestion=suggestion)

    # -- versions and deprecations
    def check_versions(self, loc: Location) -> None:
        known = {c.name for c in self.chains}
        for chain in self.chains:
            try:
                recorded = chain.recorded(loc.data, loc.where)
            except InputError:
                continue  # a wrong type is reported by the schema check
            if recorded is None:
                continue
            path = (*loc.path, VERSION_KEY) if chain.name == CORE_CHAIN else (*loc.path, PLUGIN_VERSIONS_KEY, chain.name)
            label = "core schema" if chain.name == CORE_CHAIN else f"plugin {chain.name!r} schema"
            if recorded > chain.current:
                self.add(path, "newer-schema-version",
                         f"written for {label} version {recorded}, newer than this installation supports "
                         f"({chain.current})", expected=f"at most {chain.current}", found=str(recorded),
                         suggestion="upgrade feda2v-tk" + ("" if chain.name == CORE_CHAIN else f" or plugin {chain.name!r}"))
            elif recorded < chain.current:
                self.add(path, "outdated-schema-version", severity=WARNING,
                         message=f"at {label} version {recorded}; the current version is {chain.current}",
                         suggestion=f"run `{self.fix}`")
        self.check_changed_defaults(loc)
        versions = loc.data.get(PLUGIN_VERSIONS_KEY)
        if isinstance(versions, dict):
            for chain_name in versions:
                if chain_name not in known:
                    self.add((*loc.path, PLUGIN_VERSIONS_KEY, chain_name), "unknown-chain", severity=WARNING,
                             at_key=True, message=f"no installed plugin provides migration chain {chain_name!r}",
                             suggestion="install the plugin, or remove the entry if the plugin is gone")

    def check_changed_defaults(self, loc: Location) -> None:
        """A section older than version 3 (recorded, or implied by a deprecated key) that relies on a
        default changed in version 3."""
        core = next((c for c in self.chains if c.name == CORE_CHAIN), None)
        if core is None or core.current < 3:
            return
        try:
            version = core.version_of(loc.data, loc.where)
        except InputError:
            return  # reported by the version checks
        keys = relied_on_defaults(loc.data) if version < 3 else []
        if not keys:
            return
        changes = ", ".join(f"{k} {json.dumps(CHANGED_DEFAULTS[k][0])} -> {json.dumps(self.defaults.get(k))}"
                            for k in keys)
        self.add(loc.path, "changed-defaults", severity=WARNING,
                 message=f"written for core schema version {version}; it relies on defaults that changed in "
                         f"version 3 ({changes}), measured to fail on real embeddings",
                 suggestion=f"run `{self.fix}` to see why, or `{self.fix} --keep-old-defaults` to keep the "
                            "original behaviour")

    def check_deprecated(self, loc: Location) -> None:
        cat = self.catalog
        present = [k for k in loc.data if k in cat.deprecated]
        if not present:
            return
        conflict: MigrationConflict | None = None
        try:
            migrate_location(loc.data, path=loc.path, is_node=loc.kind == "node", chains=self.chains,
                             options={}, defaults=self.defaults, result=DocumentMigration({}))
        except MigrationConflict as exc:
            conflict = exc
        except InputError:
            pass  # newer versions and bad version values are reported elsewhere
        for key in present:
            _mig, replacement = cat.deprecated[key]
            found = describe_found(loc.data[key])
            if conflict is not None:
                problem = conflict.problem.split("): ", 1)[-1]  # drop "<where>: cannot migrate (<id>)"
                self.add((*loc.path, key), "deprecated-conflict", at_key=True, found=found,
                         message=f"deprecated {key!r} conflicts with its replacement: {problem}",
                         expected=replacement,
                         suggestion=f"{conflict.hint or 'fix it by hand'}, then run `{self.fix}` if the old key is kept")
                continue
            note = ""
            value = loc.data[key]
            if key == OLD_KEY and _is_int(value) and value > FULL_LENGTH_THRESHOLD:
                note = (f" (a full-length target: it becomes {OUTPUT} {value}, trained at a small length; "
                        "--training-length N chooses it)")
            self.add((*loc.path, key), "deprecated-key", at_key=True, found=found, expected=replacement,
                     message=f"{key!r} is deprecated and ignored by FedA2V; use {replacement}",
                     suggestion=f"run `{self.fix}`{note}")

    # -- cross-field rules
    def check_cross(self, eff: Mapping[str, Any], explicit: Mapping[str, Any], loc: Location) -> None:
        node = loc.kind == "node"

        def concerns(*keys: str) -> bool:
            return not node or any(k in explicit for k in keys)

        def at(*keys: str) -> JsonPath:
            for key in keys:
                if key in explicit:
                    return (*loc.path, key)
            return loc.path

        train, out = eff.get(TRAIN), eff.get(OUTPUT)
        if _is_int(train) and _is_int(out) and train >= 1 and out < train and concerns(TRAIN, OUTPUT):
            self.add(at(OUTPUT, TRAIN), "output-shorter-than-training",
                     f"{OUTPUT} ({out}) is shorter than {TRAIN} ({train}); the output is upsampled from the "
                     "training length", expected=f"integer >= {train} or null", found=str(out),
                     suggestion=f"use null (= the training length) or at least {train}, e.g. 1214 for full AST length")
        if _is_int(train) and train > FULL_LENGTH_THRESHOLD and concerns(TRAIN):
            self.add(at(TRAIN), "large-training-length", severity=WARNING,
                     message=f"training at {train} tokens needs about {format_count(vae_parameters(train))} "
                             f"parameters (VAE at dimension 768, hidden 1024)",
                     suggestion=f"train at a small length (4-64) and set {OUTPUT}: {train}")
        groups = eff.get(GROUPS)
        granularity = eff.get(GRANULARITY)
        if granularity == "per_group" and not groups and concerns(GRANULARITY, GROUPS):
            self.add(at(GRANULARITY, GROUPS), "per-group-without-groups",
                     f"{GRANULARITY} 'per_group' needs {GROUPS}", expected=f"{GROUPS}: group name -> class names",
                     found=describe_found(groups),
                     suggestion=f'add "{GROUPS}": {{"group_a": ["class1", "class2"], ...}} or use "unified"')
        if isinstance(groups, dict) and groups and granularity != "per_group" and GROUPS in explicit:
            self.add(at(GROUPS), "unused-class-groups", severity=WARNING,
                     message=f"{GROUPS} is ignored unless {GRANULARITY} is 'per_group' (it is {json.dumps(granularity)})",
                     suggestion=f'set "{GRANULARITY}": "per_group" or remove {GROUPS}')
        if isinstance(groups, dict) and concerns(GROUPS):
            owner: dict[str, str] = {}
            for group, classes in groups.items():
                for cls in classes if isinstance(classes, list) else []:
                    if isinstance(cls, str) and cls in owner and owner[cls] != group:
                        self.add((*at(GROUPS), group), "overlapping-class-groups",
                                 f"class {cls!r} is in groups {owner[cls]!r} and {group!r}",
                                 suggestion="put each class in one group")
                    elif isinstance(cls, str):
                        owner[cls] = group
        group = explicit.get(GROUP) if node else None
        if isinstance(group, str):
            names = list(groups) if isinstance(groups, dict) else []
            if group not in names:
                close = difflib.get_close_matches(group, names, n=1, cutoff=0.6)
                self.add((*loc.path, GROUP), "unknown-class-group",
                         f"class group {group!r} is not defined in {GROUPS}",
                         expected=("one of " + ", ".join(json.dumps(n) for n in names)) if names
                         else f"a group of {GROUPS} (none defined)", found=json.dumps(group),
                         suggestion=(f"did you mean {close[0]!r}?" if close else f"define it in {GROUPS}"))
            elif granularity != "per_group":
                self.add((*loc.path, GROUP), "class-group-without-per-group", severity=WARNING,
                         message=f"{GROUP} is ignored unless {GRANULARITY} is 'per_group'",
                         suggestion=f'set "{GRANULARITY}": "per_group"')
        if eff.get(ONLY) is True and eff.get(TRAINING_MODE) is not True and eff.get(USE_PRETRAINED) is not True \
                and not eff.get(PRETRAINED_PATH) and concerns(ONLY, TRAINING_MODE, USE_PRETRAINED, PRETRAINED_PATH):
            self.add(at(ONLY), "generator-only-without-source",
                     f"{ONLY} needs generators: set {TRAINING_MODE}: true or give a pretrained generator",
                     suggestion=f'add "{TRAINING_MODE}": true, or "{PRETRAINED_PATH}": "<model file>"')
        if eff.get(USE_PRETRAINED) is True and not eff.get(PRETRAINED_PATH) and concerns(USE_PRETRAINED, PRETRAINED_PATH):
            self.add(at(USE_PRETRAINED), "pretrained-without-path",
                     f"{USE_PRETRAINED} is true but {PRETRAINED_PATH} is not set",
                     suggestion=f'add "{PRETRAINED_PATH}": "<model file>"')
        upsampler = explicit.get(UPSAMPLER)
        if explicit.get(LEARNED) is True and isinstance(upsampler, str) and upsampler != "learned":
            self.add(at(UPSAMPLER), "conflicting-upsampler-keys", severity=WARNING,
                     message=f"{LEARNED}: true selects the 'learned' upsampler, so {UPSAMPLER} "
                             f"{json.dumps(upsampler)} is ignored",
                     suggestion=f'remove {LEARNED} (or set it to false) to use {json.dumps(upsampler)}')
        if concerns(REDUCER, UPSAMPLER, LEARNED):
            self.check_pairing(eff, at(UPSAMPLER, REDUCER, LEARNED))

    def _component_spec(self, kind: str, name: Any) -> Any:
        if not isinstance(name, str):
            return None
        try:
            return self.catalog.registry.get(kind, name)
        except Exception:
            return None  # an unknown name is reported by the value check

    def check_pairing(self, eff: Mapping[str, Any], path: JsonPath) -> None:
        """A non-positional reducer (``pca``) decoded by a non-trainable (interpolating) upsampler."""
        reducer = self._component_spec("reducer", eff.get(REDUCER))
        upsampler_name = configured_upsampler(eff)
        upsampler = self._component_spec("upsampler", upsampler_name)
        if reducer is None or upsampler is None or reducer.positional or upsampler.trainable:
            return
        self.add(path, "non-positional-reducer", severity=WARNING,
                 message=f"reducer {reducer.name!r} outputs components, not stretches of the sequence, and "
                         f"upsampler {upsampler.name!r} interpolates them: the upsampled samples are meaningless",
                 expected="a trainable upsampler", found=json.dumps(upsampler_name),
                 suggestion=f'use "{UPSAMPLER}": "lstsq" (the exact decoder of pca) or "learned"')


def _severity_for_duplicate(path: JsonPath) -> str:
    return ERROR if (not path or path[0] in SECTION_KEYS or path[0] == "nodes") else WARNING


def check_data(doc: Mapping[str, Any], catalog: Catalog, *, name: str | None = None,
               source: Source | None = None) -> list[Finding]:
    """Every finding for one parsed document (positions when ``source`` holds its text)."""
    raws = _Checker(doc, catalog, name).run()
    display = name or (source.name if source else "<config>")
    findings = []
    for raw in raws:
        line = column = None
        if source is not None:
            pos = source.position(raw.path, key=raw.at_key)
            if pos is not None:
                line, column = pos
        findings.append(Finding(display, line, column, format_path(raw.path), raw.code, raw.severity,
                                raw.message, raw.expected, raw.found, raw.suggestion))
    if source is not None:
        for path, key, offset in source.duplicate_keys():
            line, column = source.line_col(offset)
            findings.append(Finding(display, line, column, format_path((*path, key)), "duplicate-key",
                                    _severity_for_duplicate(path),
                                    f"key {key!r} appears more than once in {format_path(path)}; JSON parsers "
                                    "keep only the last", found=json.dumps(key), suggestion="remove the duplicate"))
    findings.sort(key=lambda f: (f.line or 0, f.column or 0))
    return findings


def validate_source(source: Source, catalog: Catalog) -> list[Finding]:
    """Every finding for one parsed file."""
    return check_data(source.data, catalog, name=source.name, source=source)


def errors_of(findings: Iterable[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity == ERROR]
