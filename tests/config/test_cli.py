"""The installed `feda2v-tk` executable, torch-free config commands, and the pre-commit hooks."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from .conftest import EXAMPLES, FIXTURES, REPO, installed_executable


def _env() -> dict[str, str]:
    return {**os.environ, "FEDA2V_DISABLE_PLUGIN_AUTOLOAD": "1"}


def test_installed_executable_validates_and_migrates(tmp_path):
    exe = installed_executable()
    ok = subprocess.run([exe, "validate", EXAMPLES], capture_output=True, text=True, env=_env())
    assert ok.returncode == 1  # the legacy example is in there
    assert ok.stdout.count("[deprecated-key]") == 1 and "legacy-full-length.json:20:5" in ok.stdout
    assert "5 files checked: 4 valid, 1 invalid (1 error, 1 warning)" in ok.stderr
    assert ok.stdout.count("[changed-defaults]") == 1
    legacy = tmp_path / "legacy.json"
    legacy.write_bytes((EXAMPLES / "legacy-full-length.json").read_bytes())
    migrated = subprocess.run([exe, "migrate", "--in-place", legacy], capture_output=True, text=True, env=_env())
    assert migrated.returncode == 0 and "backup: legacy.json.bak" in migrated.stderr
    assert subprocess.run([exe, "validate", legacy], capture_output=True, env=_env()).returncode == 0
    assert subprocess.run([exe, "migrate", "--check", legacy], capture_output=True, env=_env()).returncode == 0
    missing = subprocess.run([exe, "validate", tmp_path / "missing.json"], capture_output=True, text=True,
                             env=_env())
    assert missing.returncode == 2 and "Traceback" not in missing.stderr + missing.stdout


def test_usage_errors_are_one_line_without_traceback(tmp_path):
    run = subprocess.run([installed_executable(), "migrate", FIXTURES / "reference" / "old.json",
                          FIXTURES / "reference" / "new.json"], capture_output=True, text=True, env=_env())
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "feda2v-tk: error: several files: use --diff, --check, --in-place or -o DIR (stdout takes one file)"]


COMMANDS = [
    ["--help"], ["validate", "--help"], ["validate", str(EXAMPLES)], ["migrate", "--check", str(EXAMPLES)],
    ["migrate", str(EXAMPLES / "legacy-full-length.json")], ["schema"], ["schema", "--generator", "gan"],
]


def test_config_commands_do_not_import_torch():
    """One interpreter runs the commands in turn and reports heavy modules loaded after each one."""
    probe = (
        "import sys\n"
        "from feda2v_toolkit.cli import main\n"
        f"for args in {COMMANDS!r}:\n"
        "    try:\n"
        "        main(args)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "    heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'safetensors'))\n"
        "    sys.stderr.write('\\nHEAVY ' + ' '.join(args) + ': ' + ','.join(heavy[:3]) + '\\n')\n"
    )
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=_env())
    reports = [line for line in run.stderr.splitlines() if line.startswith("HEAVY ")]
    assert len(reports) == len(COMMANDS)
    assert all(line.endswith(": ") for line in reports), reports


def test_the_reducer_upsampler_pairing_is_checked_without_torch(tmp_path):
    path = tmp_path / "pca.json"
    path.write_text('{"feda2v": {"generator_reducer": "pca", "generator_upsampler": "linear"}}')
    probe = ("import sys\nfrom feda2v_toolkit.cli import main\n"
             f"try:\n    main(['validate', {str(path)!r}])\nexcept SystemExit:\n    pass\n"
             "sys.stderr.write('TORCH=' + str('torch' in sys.modules))\n")
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=_env())
    assert "[non-positional-reducer]" in run.stdout
    assert run.stderr.rsplit("TORCH=", 1)[1] == "False"


def test_validate_does_not_import_jsonschema_for_plain_fragments():
    probe = ("import sys\nfrom feda2v_toolkit.cli import main\n"
             f"try:\n    main(['validate', {str(EXAMPLES / 'full-experiment.json')!r}])\nexcept SystemExit:\n    pass\n"
             "sys.stderr.write('JSONSCHEMA=' + str('jsonschema' in sys.modules))\n")
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=_env())
    assert run.stderr.rsplit("JSONSCHEMA=", 1)[1] == "False"


def test_pre_commit_hooks_run_existing_commands():
    text = (REPO / ".pre-commit-hooks.yaml").read_text()
    hooks = re.findall(r"^- id: (\S+)\n(?:  .*\n)*?  entry: (.+)$", text, flags=re.MULTILINE)
    assert dict(hooks) == {"feda2v-validate": "feda2v-tk validate", "feda2v-migrate-check": "feda2v-tk migrate --check"}
    assert text.count("language: python") == 2 and text.count("types: [json]") == 2


def test_json_output_of_the_installed_executable_is_one_record_per_line():
    run = subprocess.run([installed_executable(), "validate", "--format", "json", FIXTURES / "invalid"],
                         capture_output=True, text=True, env=_env())
    records = [json.loads(line) for line in run.stdout.splitlines()]
    assert run.returncode == 1 and len(records) >= 9
    assert {r["code"] for r in records} >= {"output-shorter-than-training", "per-group-without-groups",
                                            "unknown-class-group", "generator-only-without-source",
                                            "deprecated-conflict", "newer-schema-version"}
