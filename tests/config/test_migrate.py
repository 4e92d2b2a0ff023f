"""`feda2v-tk migrate`: versioned chains, minimal text edits, safe writes."""

from __future__ import annotations

import json
import os

import pytest

from feda2v_toolkit.config.document import parse_text
from feda2v_toolkit.config.migrate import build_chains, migrate_source

from .conftest import EXAMPLES, FIXTURES, copy_fixture

REFERENCE = FIXTURES / "reference"
UPDATE = os.environ.get("FEDA2V_UPDATE_GOLDEN") == "1"


def migrate_text(text: str, catalog, **options) -> str:
    return migrate_source(parse_text(text, "c.json"), catalog, options=options).text


def golden(path, text: str) -> str:
    if UPDATE:
        path.write_text(text)
    return path.read_text()


# -- the documented migration -----------------------------------------------------------------------

def test_documented_old_example_becomes_the_documented_new_keys(feda2v):
    run = feda2v("migrate", REFERENCE / "old.json")
    assert run.code == 0
    assert run.stdout == golden(REFERENCE / "old.migrated.json", run.stdout)
    migrated = json.loads(run.stdout)
    assert migrated == {"schema_version": 3, **json.loads((REFERENCE / "new.json").read_text())}
    assert 'replaced "generator_target_sequence_length": 4 with ' in run.stderr


@pytest.mark.parametrize("name", ["new.json", "new-full-length.json"])
def test_documented_new_examples_need_nothing(feda2v, name):
    run = feda2v("migrate", REFERENCE / name)
    assert (run.code, run.stdout.encode()) == (0, (REFERENCE / name).read_bytes())
    assert feda2v("migrate", "--check", REFERENCE / name).code == 0


def test_legacy_example_migrates_to_a_valid_config_keeping_everything_else(feda2v, tmp_path):
    path = copy_fixture(EXAMPLES / "legacy-full-length.json", tmp_path)
    run = feda2v("migrate", path)
    assert run.stdout == golden(REFERENCE / "legacy-full-length.migrated.json", run.stdout)
    out = tmp_path / "migrated.json"
    out.write_text(run.stdout)
    assert feda2v("validate", out).code == 0


def test_full_length_value_gets_the_documented_full_length_form_and_says_why(feda2v, tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"feda2v": {"generator_target_sequence_length": 1214}}\n')
    run = feda2v("migrate", path)
    assert json.loads(run.stdout)["feda2v"] == {
        "schema_version": 3, "generator_training_sequence_length": 4, "generator_output_sequence_length": 1214}
    note = next(line for line in run.stderr.splitlines() if ": note: " in line)
    assert "1214 is a full-length target (above 64)" in note
    assert "about 1.91 B parameters" in note and "about 9.18 M parameters" in note
    assert "--training-length N" in note
    run = feda2v("migrate", "--training-length", "32", path)
    assert json.loads(run.stdout)["feda2v"]["generator_training_sequence_length"] == 32


def test_threshold_between_training_lengths_and_full_length_targets(catalog):
    def migrated(value: int) -> dict:
        return json.loads(migrate_text(json.dumps({"generator_target_sequence_length": value}), catalog))

    assert migrated(64) == {"schema_version": 3, "generator_training_sequence_length": 64,
                            "generator_output_sequence_length": None}
    assert migrated(65) == {"schema_version": 3, "generator_training_sequence_length": 4,
                            "generator_output_sequence_length": 65}


def test_old_and_new_keys_with_equal_values_drop_the_old_key(catalog):
    text = '{\n  "generator_target_sequence_length": 4,\n  "generator_training_sequence_length": 4\n}\n'
    assert migrate_text(text, catalog) == (
        '{\n  "schema_version": 3,\n  "generator_training_sequence_length": 4\n}\n')


def test_old_and_new_keys_that_disagree_are_an_error_and_nothing_is_written(feda2v, tmp_path):
    path = copy_fixture(FIXTURES / "invalid" / "old-and-new-keys-disagree.json", tmp_path)
    before = path.read_bytes()
    run = feda2v("migrate", "--in-place", path)
    assert run.code == 1
    assert "generator_target_sequence_length (8) and generator_training_sequence_length (4) disagree" in run.stderr
    assert path.read_bytes() == before and not (tmp_path / (path.name + ".bak")).exists()


def test_node_overrides_are_migrated_without_recording_a_version(catalog):
    text = (EXAMPLES / "full-experiment.json").read_text().replace(
        '"generator_training_epochs": 150', '"generator_target_sequence_length": 8')
    doc = json.loads(migrate_text(text, catalog))
    assert doc["nodes"]["1"] == {"dataset_split": "train_1", "generator_class_group": "nature",
                                 "generator_training_sequence_length": 8,
                                 "generator_output_sequence_length": None}


# -- versions ---------------------------------------------------------------------------------------

def test_the_core_chain_is_ordered_and_ends_at_the_schema_default(catalog):
    [core] = [c for c in build_chains(catalog.registry) if c.name == "core"]
    assert [(m.from_version, m.to_version) for m in core.steps] == [(1, 2), (2, 3)]
    assert core.current == catalog.defaults()["schema_version"]
    assert core.steps[0].id == "core-0001-split-target-sequence-length" and core.steps[0].description


def test_a_newer_schema_version_is_refused_not_downgraded(feda2v, tmp_path):
    path = copy_fixture(FIXTURES / "invalid" / "newer-schema-version.json", tmp_path)
    before = path.read_bytes()
    run = feda2v("migrate", "--in-place", path)
    assert run.code == 1
    assert "written for core schema version 4, newer than this feda2v-tk supports (3)" in run.stderr
    assert path.read_bytes() == before


def test_an_older_recorded_version_is_brought_up_to_date(catalog):
    assert migrate_text('{"schema_version": 1, "generator_seed": 1}', catalog) == (
        '{"schema_version": 3, "generator_seed": 1}')


def test_a_current_section_with_a_stale_old_key_is_still_migrated(catalog):
    text = '{"schema_version": 3, "generator_target_sequence_length": 8}'
    assert json.loads(migrate_text(text, catalog)) == {
        "schema_version": 3, "generator_training_sequence_length": 8, "generator_output_sequence_length": None}


def test_plugin_chain_is_applied_and_recorded_separately(flowgen_registry, feda2v, tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{\n  "feda2v": {\n    "generator_type": "flow",\n    "flowgen_steps": 8,\n'
                    '    "generator_target_sequence_length": 4\n  }\n}\n')
    run = feda2v("migrate", path)
    assert run.code == 0
    assert run.stdout == (
        '{\n  "feda2v": {\n    "schema_version": 3,\n    "schema_versions": {\n      "flowgen": 2\n    },\n'
        '    "generator_type": "flow",\n    "flowgen_num_steps": 8,\n'
        '    "generator_training_sequence_length": 4,\n    "generator_output_sequence_length": null\n  }\n}\n')
    assert "renamed 'flowgen_steps' to 'flowgen_num_steps' (value 8)" in run.stderr
    again = tmp_path / "again.json"
    again.write_text(run.stdout)
    assert feda2v("migrate", "--check", again).code == 0
    assert feda2v("validate", again).code == 0


def test_plugin_chain_newer_than_the_installed_plugin_is_refused(flowgen_registry, feda2v, tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"schema_versions": {"flowgen": 3}, "flowgen_num_steps": 8}')
    run = feda2v("migrate", path)
    assert run.code == 1 and "flowgen schema version 3, newer than this plugin 'flowgen' supports (2)" in run.stderr


# -- text preservation ------------------------------------------------------------------------------

def test_renamed_key_keeps_its_position_and_everything_else_its_bytes(catalog):
    text = ('{\n    "experiment": {"name": "x",   "seed": 1},\n    "feda2v": {\n'
            '        "_comment": "keep me",\n        "generator_type": "vae",\n'
            '        "generator_target_sequence_length": 8,\n        "adapter_dim":   512\n    }\n}')
    assert migrate_text(text, catalog) == (
        '{\n    "experiment": {"name": "x",   "seed": 1},\n    "feda2v": {\n'
        '        "schema_version": 3,\n        "_comment": "keep me",\n        "generator_type": "vae",\n'
        '        "generator_training_sequence_length": 8,\n        "generator_output_sequence_length": null,\n'
        '        "adapter_dim":   512\n    }\n}')


@pytest.mark.parametrize("text, expected", [
    ('{"generator_target_sequence_length": 8}',
     '{"schema_version": 3, "generator_training_sequence_length": 8, "generator_output_sequence_length": null}'),
    ('{\r\n\t"a": 1,\r\n\t"generator_target_sequence_length": 8\r\n}\r\n',
     '{\r\n\t"schema_version": 3,\r\n\t"a": 1,\r\n\t"generator_training_sequence_length": 8,\r\n'
     '\t"generator_output_sequence_length": null\r\n}\r\n'),
    ('{"feda2v": {}, "nodes": {"0": {"generator_target_sequence_length": 8}}}',
     '{"feda2v": {}, "nodes": {"0": {"generator_training_sequence_length": 8, '
     '"generator_output_sequence_length": null}}}'),
    ('{\n  "feda2v": {\n    "generator_target_sequence_length": 4,\n    "generator_training_sequence_length": 4,\n'
     '    "x": 1\n  }\n}',
     '{\n  "feda2v": {\n    "schema_version": 3,\n    "generator_training_sequence_length": 4,\n    "x": 1\n  }\n}'),
], ids=["one-line", "tabs-crlf", "node-in-compact-file", "old-key-dropped"])
def test_indentation_and_line_endings_of_the_file_are_used(catalog, text, expected):
    assert migrate_text(text, catalog) == expected


def test_byte_order_mark_and_missing_final_newline_are_kept(feda2v, tmp_path):
    path = tmp_path / "c.json"
    path.write_bytes(b'\xef\xbb\xbf{"generator_target_sequence_length": 4}')
    assert feda2v("migrate", "--in-place", path).code == 0
    assert path.read_bytes() == (b'\xef\xbb\xbf{"schema_version": 3, "generator_training_sequence_length": 4, '
                                 b'"generator_output_sequence_length": null}')


def test_a_file_that_needs_nothing_stays_byte_identical(feda2v, tmp_path):
    for src in EXAMPLES.glob("*.json"):
        if "legacy" not in src.name:
            path = copy_fixture(src, tmp_path)
            assert feda2v("migrate", "--in-place", path).code == 0
            assert path.read_bytes() == src.read_bytes()
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json"] * 4  # and no backups


def test_migrating_twice_equals_migrating_once(feda2v, tmp_path):
    path = copy_fixture(EXAMPLES / "legacy-full-length.json", tmp_path)
    assert feda2v("migrate", "--in-place", path).code == 0
    once = path.read_bytes()
    run = feda2v("migrate", "--in-place", path)
    assert run.code == 0 and path.read_bytes() == once
    assert "1 file: 0 migrated, 1 already current" in run.stderr


# -- modes ------------------------------------------------------------------------------------------

def test_read_only_by_default(feda2v, tmp_path):
    path = copy_fixture(REFERENCE / "old.json", tmp_path)
    run = feda2v("migrate", path)
    assert run.code == 0 and run.stdout and path.read_bytes() == (REFERENCE / "old.json").read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["old.json"]


def test_diff_shows_a_unified_diff(feda2v, tmp_path):
    path = copy_fixture(REFERENCE / "old.json", tmp_path)
    run = feda2v("migrate", "--diff", path)
    assert run.code == 0
    assert run.stdout.splitlines() == [
        f"--- {path}", f"+++ {path} (migrated)", "@@ -1,3 +1,5 @@", " {",
        '-  "generator_target_sequence_length": 4', '+  "schema_version": 3,',
        '+  "generator_training_sequence_length": 4,', '+  "generator_output_sequence_length": null', " }"]


def test_in_place_keeps_a_backup_and_never_overwrites_one(feda2v, tmp_path):
    original = (REFERENCE / "old.json").read_bytes()
    path = copy_fixture(REFERENCE / "old.json", tmp_path)
    (tmp_path / "old.json.bak").write_bytes(b"an older backup")
    run = feda2v("migrate", "--in-place", path)
    assert run.code == 0 and "backup: old.json.bak.1" in run.stderr
    assert (tmp_path / "old.json.bak").read_bytes() == b"an older backup"
    assert (tmp_path / "old.json.bak.1").read_bytes() == original
    assert json.loads(path.read_text())["generator_training_sequence_length"] == 4


def test_output_to_a_file_or_a_directory(feda2v, tmp_path):
    out = tmp_path / "out.json"
    assert feda2v("migrate", "-o", out, REFERENCE / "old.json").code == 0
    assert out.read_text() == (REFERENCE / "old.migrated.json").read_text()
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    copy_fixture(REFERENCE / "old.json", src / "sub")
    copy_fixture(REFERENCE / "new.json", src)
    run = feda2v("migrate", "-o", tmp_path / "dst", src)
    assert run.code == 0 and "2 files: 1 migrated, 1 already current" in run.stderr
    assert (tmp_path / "dst" / "new.json").read_bytes() == (REFERENCE / "new.json").read_bytes()
    assert (tmp_path / "dst" / "sub" / "old.json").read_text() == (REFERENCE / "old.migrated.json").read_text()


def test_check_writes_nothing_and_fails_when_something_would_change(feda2v, tmp_path):
    copy_fixture(REFERENCE / "old.json", tmp_path)
    copy_fixture(REFERENCE / "new.json", tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    run = feda2v("migrate", "--check", tmp_path)
    assert run.code == 1 and run.stdout == ""
    assert f"would migrate {tmp_path / 'old.json'}" in run.stderr
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    (tmp_path / "old.json").unlink()
    assert feda2v("migrate", "--check", tmp_path).code == 0


def test_usage_errors(feda2v, tmp_path):
    a = copy_fixture(REFERENCE / "old.json", tmp_path, "a.json")
    b = copy_fixture(REFERENCE / "old.json", tmp_path, "b.json")
    assert feda2v("migrate", a, b).code == 2  # stdout takes one file
    assert feda2v("migrate", "--in-place", "-o", tmp_path / "x.json", a).code == 2
    assert feda2v("migrate", "--check", "--in-place", a).code == 2
    assert feda2v("migrate", "--training-length", "0", a).code == 2


def test_in_place_writes_through_a_symlink(feda2v, tmp_path):
    real = copy_fixture(REFERENCE / "old.json", tmp_path, "real.json")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    assert feda2v("migrate", "--in-place", link).code == 0
    assert link.is_symlink() and real.read_text() == (REFERENCE / "old.migrated.json").read_text()
    assert (tmp_path / "real.json.bak").read_bytes() == (REFERENCE / "old.json").read_bytes()


def test_output_directory_refuses_two_inputs_with_one_name(feda2v, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = copy_fixture(REFERENCE / "old.json", tmp_path / "a")
    b = copy_fixture(REFERENCE / "new.json", tmp_path / "b", "old.json")
    run = feda2v("migrate", "-o", tmp_path / "out", a, b)
    assert run.code == 2 and "would both be written to" in run.stderr


def test_output_problems_are_found_before_anything_is_written(feda2v, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = copy_fixture(REFERENCE / "old.json", tmp_path / "a")
    b = copy_fixture(REFERENCE / "old.json", tmp_path / "b")
    assert feda2v("migrate", "-o", tmp_path / "out", a, b).code == 2
    assert not (tmp_path / "out").exists()


def test_full_length_target_in_a_node_keeps_the_sections_training_length(catalog):
    text = json.dumps({"feda2v": {"generator_training_sequence_length": 16},
                       "nodes": {"0": {"generator_target_sequence_length": 1214}}})
    doc = json.loads(migrate_text(text, catalog))
    assert doc["nodes"]["0"] == {"generator_output_sequence_length": 1214}
    doc = json.loads(migrate_text(text, catalog, training_length=8))
    assert doc["nodes"]["0"] == {"generator_training_sequence_length": 8, "generator_output_sequence_length": 1214}


@pytest.mark.parametrize("length", [1, 4, 16, 1214])
@pytest.mark.parametrize(("hidden", "latent"), [(1024, 256), (256, 64)])
def test_the_parameter_estimate_in_migration_notes_is_the_vae_s_exact_count(length, hidden, latent):
    """The closed form quoted by `migrate` and `validate` equals the count of the real (meta-device) VAE."""
    from feda2v_toolkit.analysis.plan import plan
    from feda2v_toolkit.config.migrations import vae_parameters

    result = plan(overrides={"generator_hidden_dim": hidden, "generator_latent_dim": latent,
                             "use_conditioned_vae": False, "generator_type": "vae"},
                  lengths=[length], num_classes=1, runtime=0)
    (row,) = [r for r in result.rows if r.length == length]
    assert vae_parameters(length, hidden, latent) == row.parameters_per_generator


# -- core-0002: defaults measured on real embeddings ---------------------------------------------------

def test_version_2_sections_are_told_which_changed_defaults_they_relied_on(catalog):
    result = migrate_source(parse_text('{"schema_version": 2, "generator_type": "vae"}', "c.json"), catalog,
                            options={})
    assert json.loads(result.text) == {"schema_version": 3, "generator_type": "vae"}  # no key rewritten
    [note] = result.notes
    assert 'generator_upsampler now defaults to "lstsq" (was "linear")' in note and "--keep-old-defaults" in note


def test_keep_old_defaults_writes_the_original_behaviour_into_the_section(catalog):
    text = migrate_text('{"generator_target_sequence_length": 8}', catalog, keep_old_defaults=True)
    assert json.loads(text) == {"schema_version": 3, "generator_training_sequence_length": 8,
                                "generator_output_sequence_length": None, "generator_type": "vae",
                                "generator_upsampler": "linear"}
    flagged = migrate_text('{"schema_version": 2, "use_learned_upsampling": true}', catalog, keep_old_defaults=True)
    assert json.loads(flagged) == {"schema_version": 3, "use_learned_upsampling": True, "generator_type": "vae"}
    current = '{"schema_version": 3, "generator_seed": 1}'
    assert migrate_text(current, catalog, keep_old_defaults=True) == current  # a current section is untouched


def test_keep_old_defaults_on_the_command_line(feda2v, tmp_path):
    path = tmp_path / "old.json"
    path.write_text('{"feda2v": {"schema_version": 2}}')
    run = feda2v("migrate", path, "--keep-old-defaults", "-o", tmp_path / "new.json")
    assert run.code == 0, run.stderr
    assert json.loads((tmp_path / "new.json").read_text())["feda2v"] == {
        "schema_version": 3, "generator_type": "vae", "generator_upsampler": "linear"}
