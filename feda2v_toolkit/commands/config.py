"""``feda2v-tk validate``, ``migrate`` and ``schema``: the config commands (no torch)."""

from __future__ import annotations

import difflib
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import click

from feda2v_toolkit.config.document import ConfigReadError, Source, read_source, read_stream
from feda2v_toolkit.errors import InputError, UsageError

STDIN = "-"


@dataclass
class _Input:
    """One file to process: its display name, path, and the directory it was found under (if any)."""

    name: str
    path: Path | None
    root: Path | None = None
    error: ConfigReadError | None = None


def iter_inputs(paths: tuple[str, ...]) -> Iterator[_Input]:
    """Files named, and ``*.json`` files under directories named (sorted; hidden paths skipped)."""
    for raw in paths:
        if raw == STDIN:
            yield _Input("<stdin>", None)
            continue
        path = Path(raw)
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*.json")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                yield _Input(raw, path, error=ConfigReadError(raw, "io-error", "directory holds no .json files",
                                                              io=True))
            for p in found:
                yield _Input(str(p), p, root=path)
        else:
            yield _Input(raw, path)


def _read(item: _Input) -> Source:
    if item.error is not None:
        raise item.error
    if item.path is None:
        stdin = sys.stdin.buffer if hasattr(sys.stdin, "buffer") else sys.stdin
        return read_stream(stdin, item.name)
    return read_source(item.path, name=item.name)


def _catalog():  # imported lazily: loading plugins is the slow part
    from feda2v_toolkit.config.catalog import get_catalog

    return get_catalog()


# -- validate ---------------------------------------------------------------------------------------

@click.command("validate")
@click.argument("paths", nargs=-1, required=True, metavar="FILE_OR_DIR...")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON record per finding (file, line, column, path, code, severity, message, "
                   "expected, found, suggestion).")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), hidden=True,
              help="Deprecated: --format json is --json.")
@click.option("--strict", is_flag=True, help="Fail on warnings too.")
@click.option("-q", "--quiet", is_flag=True, help="Print errors only, and no summary.")
def validate_cmd(paths: tuple[str, ...], as_json: bool, fmt: str | None, strict: bool, quiet: bool) -> None:
    """Validate experiment configs (files, or directories of *.json) against the schema.

    Reports every problem at once with file:line:column, JSON path, what was expected and found, and a
    suggestion. Exit status: 0 valid, 1 invalid, 2 usage or I/O error ("-" reads standard input).
    """
    from feda2v_toolkit.config.validate import ERROR, Finding, validate_source

    fmt = "json" if as_json else fmt or "text"

    catalog = None
    io_failed = invalid = False
    counts = {"files": 0, "invalid": 0, "errors": 0, "warnings": 0}
    out = sys.stdout
    for item in iter_inputs(paths):
        counts["files"] += 1
        try:
            source = _read(item)
        except ConfigReadError as exc:
            io_failed |= exc.io
            findings = [Finding(exc.name, exc.line, exc.column, None, exc.code, ERROR, exc.message)]
        else:
            catalog = catalog or _catalog()
            findings = validate_source(source, catalog)
        if quiet:
            findings = [f for f in findings if f.severity == ERROR]
        errors = sum(f.severity == ERROR for f in findings)
        warnings = len(findings) - errors
        counts["errors"] += errors
        counts["warnings"] += warnings
        if errors or (strict and warnings):
            counts["invalid"] += 1
            invalid = True
        for finding in findings:
            if fmt == "json":
                out.write(json.dumps(finding.to_json(), ensure_ascii=False) + "\n")
            else:
                out.write(finding.format() + "\n")
    if not quiet:
        n = counts["files"]
        click.echo(f"{n} file{'s' if n != 1 else ''} checked: {n - counts['invalid']} valid, "
                   f"{counts['invalid']} invalid ({counts['errors']} error{'s' if counts['errors'] != 1 else ''}, "
                   f"{counts['warnings']} warning{'s' if counts['warnings'] != 1 else ''})", err=True)
    out.flush()
    sys.exit(2 if io_failed else 1 if invalid else 0)


# -- migrate ----------------------------------------------------------------------------------------

class _BinaryOut:
    """Exact bytes to stdout (the migrated file as it would be written), whatever stdout's encoding."""

    def write(self, data: bytes) -> None:
        buffer = getattr(sys.stdout, "buffer", None)
        if buffer is not None:
            sys.stdout.flush()
            buffer.write(data)
        else:
            sys.stdout.write(data.decode("utf-8"))

    def flush(self) -> None:
        sys.stdout.flush()
        buffer = getattr(sys.stdout, "buffer", None)
        if buffer is not None:
            buffer.flush()


def _backup_path(path: Path) -> Path:
    candidate = path.with_name(path.name + ".bak")
    n = 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}.bak.{n}")
    return candidate


def _write_backup(path: Path, data: bytes) -> Path:
    """Write ``data`` to a fresh backup next to ``path``; never replaces an existing file."""
    for _ in range(100):
        backup = _backup_path(path)
        try:
            fh = open(backup, "xb")  # noqa: SIM115 - closed below, removed if anything fails
        except FileExistsError:  # pragma: no cover - created between the check and the open
            continue
        except OSError as exc:
            raise UsageError(f"{backup}: cannot write the backup: {exc.strerror or exc}; nothing changed") from None
        try:
            with fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        except BaseException as exc:  # a full disk must not leave a short .bak that looks like a backup
            backup.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise UsageError(f"{backup}: cannot write the backup: {exc.strerror or exc}; "
                                 "nothing changed") from None
            raise
        return backup
    raise UsageError(f"{path}: cannot create a backup file")


def _plan_outputs(items: list[_Input], output: Path, single: bool, overwrite: bool = False) -> dict[str, Path]:
    """Where ``-o OUT`` writes each input: OUT itself for one file, else OUT/<path under its directory>.

    Checked before anything is written: no input is overwritten, no two inputs share a target, and an
    existing target needs ``--overwrite`` (the overwrite rule, ``runtime.atomic.check_output``).
    """
    from feda2v_toolkit.runtime.atomic import check_output

    plan: dict[str, Path] = {}
    owners: dict[Path, str] = {}
    inputs = [item.path for item in items if item.path is not None]
    for item in items:
        if item.path is None or (single and not output.is_dir() and not str(output).endswith(os.sep)):
            target = output
        else:
            rel = item.path.relative_to(item.root) if item.root is not None else Path(item.path.name)
            target = output / rel
        if item.path is not None and target.exists() and target.resolve() == item.path.resolve():
            raise UsageError(f"{item.name}: -o would overwrite the input; use --in-place")
        if target in owners:
            raise UsageError(f"{item.name} and {owners[target]} would both be written to {target}")
        check_output(target, inputs=inputs, overwrite=overwrite, role="config")
        owners[target] = item.name
        plan[item.name] = target
    return plan


def _diff(name: str, old: str, new: str) -> str:
    lines = difflib.unified_diff(old.splitlines(keepends=True), new.splitlines(keepends=True),
                                 fromfile=name, tofile=f"{name} (migrated)")
    text = ""
    for line in lines:
        text += line if line.endswith("\n") else line + "\n\\ No newline at end of file\n"
    return text


@click.command("migrate")
@click.argument("paths", nargs=-1, required=True, metavar="FILE_OR_DIR...")
@click.option("--diff", "show_diff", is_flag=True, help="Print a unified diff instead of the migrated config.")
@click.option("--check", is_flag=True, help="Write nothing; exit 1 if any file would change (for CI).")
@click.option("-i", "--in-place", is_flag=True,
              help="Rewrite the files atomically, keeping the original as FILE.bak (or FILE.bak.N).")
@click.option("-o", "--out", "output", type=click.Path(path_type=Path), metavar="OUT",
              help="Write the migrated file to OUT (a directory for several files).")
@click.option("--output", "output_alias", type=click.Path(path_type=Path), hidden=True,
              help="Deprecated spelling of -o/--out.")
@click.option("--training-length", type=click.IntRange(min=1), metavar="N",
              help="Training length to choose for a deprecated full-length target "
                   "(generator_target_sequence_length above 64); default: the schema default.")
@click.option("--keep-old-defaults", is_flag=True,
              help="Write the old values of defaults changed in schema version 3 (generator_type, "
                   "generator_upsampler) into sections that relied on them: the original behaviour.")
@click.option("--overwrite", is_flag=True, help="With -o: replace files that exist there.")
@click.option("--json", "as_json", is_flag=True,
              help="Report on stdout as JSON (per file: changed, changes, notes, error) instead of the config.")
@click.option("-q", "--quiet", is_flag=True, help="Do not list the changes.")
def migrate_cmd(paths: tuple[str, ...], show_diff: bool, check: bool, in_place: bool, output: Path | None,
                output_alias: Path | None, training_length: int | None, keep_old_defaults: bool, overwrite: bool,
                as_json: bool, quiet: bool) -> None:
    """Migrate configs to the current schema through the versioned migration chains.

    Read-only by default: prints the migrated config (or --diff) on stdout and the list of changes on
    stderr. Keeps key order, indentation and every key it does not own; a current file is untouched.
    """
    from feda2v_toolkit.config.migrate import migrate_source

    output = output if output is not None else output_alias
    if in_place and output is not None:
        raise UsageError("use either --in-place or -o/--out, not both")
    if check and (in_place or output is not None):
        raise UsageError("--check writes nothing; do not combine it with --in-place or -o/--out")
    if as_json and show_diff:
        raise UsageError("--json and --diff both print on stdout; choose one")
    items = list(iter_inputs(paths))
    single = len(items) == 1 and items[0].root is None
    report: list[dict[str, object]] = []
    if not single and not (show_diff or check or in_place or output is not None or as_json):
        raise UsageError("several files: use --diff, --check, --in-place or -o DIR (stdout takes one file)")
    if in_place and any(item.path is None for item in items):
        raise UsageError("--in-place cannot rewrite standard input")
    options = {"training_length": training_length, "keep_old_defaults": keep_old_defaults}
    targets = _plan_outputs(items, output, single, overwrite) if output is not None else {}
    catalog = None
    stdout = _BinaryOut()
    io_failed = failed = False
    changed_names: list[str] = []
    current = 0
    for item in items:
        try:
            source = _read(item)
            catalog = catalog or _catalog()
            result = migrate_source(source, catalog, options=options)
        except ConfigReadError as exc:
            io_failed |= exc.io
            failed = True
            click.echo(f"feda2v-tk: error: {exc}", err=True)
            report.append({"file": item.name, "error": str(exc)})
            continue
        except InputError as exc:
            failed = True
            click.echo(f"feda2v-tk: error: {exc}", err=True)
            report.append({"file": item.name, "error": str(exc)})
            continue
        report.append({"file": item.name, "changed": result.changed, "changes": [str(c) for c in result.changes],
                       "notes": [str(n) for n in result.notes]})
        if not quiet:
            for change in result.changes:
                click.echo(f"{item.name}: {change}", err=True)
            for note in result.notes:
                click.echo(f"{item.name}: note: {note}", err=True)
        if result.changed:
            changed_names.append(item.name)
        else:
            current += 1
        if show_diff and result.changed:
            stdout.write(_diff(item.name, source.text, result.text).encode("utf-8"))
        if check:
            if result.changed:
                click.echo(f"would migrate {item.name}", err=True)
            continue
        if in_place:
            if result.changed:
                assert item.path is not None
                from feda2v_toolkit.runtime.atomic import atomic_open

                real = item.path.resolve()  # write through a symlink, not over it
                backup = _write_backup(real, source.encoded())
                with atomic_open(real, "wb") as fh:
                    fh.write(result.encoded())
                if not quiet:
                    click.echo(f"migrated {item.name} (backup: {backup.name})", err=True)
        elif output is not None:
            from feda2v_toolkit.runtime.atomic import atomic_open

            with atomic_open(targets[item.name], "wb") as fh:
                fh.write(result.encoded())
        elif not show_diff and not as_json:
            stdout.write(result.encoded())
    if as_json:
        stdout.write((json.dumps({"files": report}, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    stdout.flush()
    if not quiet and (not single or check or in_place or output is not None):
        verb = "would migrate" if check else "migrated" if (in_place or output is not None) else "to migrate"
        click.echo(f"{len(items)} file{'s' if len(items) != 1 else ''}: {len(changed_names)} {verb}, "
                   f"{current} already current" + (", some failed" if failed else ""), err=True)
    sys.exit(2 if io_failed else 1 if failed or (check and changed_names) else 0)


# -- schema -----------------------------------------------------------------------------------------

@click.command("schema")
@click.option("--generator", "generator", metavar="TYPE",
              help="Only the keys that apply to this generator type (shared keys plus its own).")
@click.option("--section", is_flag=True,
              help="The schema of a generator section alone (for bare fragments) instead of a whole config.")
@click.option("--indent", type=click.IntRange(min=0), default=2, show_default=True)
@click.option("-o", "--out", "out_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the schema to this file (atomically) instead of stdout.")
@click.option("--overwrite", is_flag=True, help="Replace the -o file if it exists.")
@click.option("-q", "--quiet", is_flag=True, help="Do not report the file written with -o.")
def schema_cmd(generator: str | None, section: bool, indent: int, out_path: Path | None, overwrite: bool,
               quiet: bool) -> None:
    """Print the combined JSON Schema (core plus loaded plugins), for editor autocompletion."""
    if out_path is not None:
        from feda2v_toolkit.runtime.atomic import check_output

        check_output(out_path, overwrite=overwrite)
    catalog = _catalog()
    schema = catalog.section_schema(generator) if section else catalog.document_schema(generator)
    if section:
        from feda2v_toolkit.config.schema import DRAFT

        schema = {"$schema": DRAFT, **schema}
    text = json.dumps(schema, indent=indent or None, ensure_ascii=False)
    if out_path is not None:
        from feda2v_toolkit.runtime.atomic import atomic_write_text

        atomic_write_text(out_path, text + "\n")
        if not quiet:
            click.echo(f"feda2v-tk: wrote {out_path}", err=True)
        return
    click.echo(text)
