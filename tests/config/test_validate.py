"""`feda2v-tk validate`: every problem at once, with position, path, expected/found and a suggestion."""

from __future__ import annotations

import json
import os

import pytest

from feda2v_toolkit.config.document import parse_text
from feda2v_toolkit.config.validate import validate_source

from .conftest import EXAMPLES, FIXTURES

INVALID = FIXTURES / "invalid"
UPDATE = os.environ.get("FEDA2V_UPDATE_GOLDEN") == "1"


def findings(text: str, catalog, name: str = "c.json"):
    return validate_source(parse_text(text, name), catalog)


def codes(text: str, catalog) -> list[str]:
    return [f.code for f in findings(text, catalog)]


# -- examples and golden fixtures -----------------------------------------------------------------

@pytest.mark.parametrize("name", ["minimal-memory-training.json", "full-sequence-inference.json",
                                  "balanced-training-length-8.json", "full-experiment.json"])
def test_documented_and_full_examples_are_valid(feda2v, name):
    run = feda2v("validate", EXAMPLES / name)
    assert (run.code, run.stdout) == (0, "")
    assert "1 file checked: 1 valid, 0 invalid (0 errors, 0 warnings)" in run.stderr


def test_legacy_example_fails_only_on_its_deprecated_key_and_says_how_to_fix_it(feda2v, monkeypatch):
    monkeypatch.chdir(EXAMPLES)
    run = feda2v("validate", "legacy-full-length.json")
    assert run.code == 1
    [line] = [v for v in run.lines if ": error: " in v]
    assert [v.rsplit("[", 1)[1] for v in run.lines if ": warning: " in v] == ["changed-defaults]"]
    assert line.startswith("legacy-full-length.json:20:5: error: $.feda2v.generator_target_sequence_length: ")
    assert "use generator_training_sequence_length and generator_output_sequence_length" in line
    assert "run `feda2v-tk migrate --in-place legacy-full-length.json`" in line
    assert "--training-length N" in line and line.endswith("[deprecated-key]")


@pytest.mark.parametrize("name", sorted(p.name for p in INVALID.glob("*.json")))
def test_invalid_fixture_output_matches_golden(feda2v, monkeypatch, name):
    """Regenerate with FEDA2V_UPDATE_GOLDEN=1 after an intended change, and review the diff."""
    monkeypatch.chdir(INVALID)
    run = feda2v("validate", name)
    golden = INVALID / (name[:-5] + ".expected")
    if UPDATE:
        golden.write_text(run.stdout)
    assert run.code == 1
    assert run.stdout == golden.read_text()


# -- each rule, as a specification ------------------------------------------------------------------

def test_all_errors_of_a_file_are_reported_at_once(catalog):
    text = (INVALID / "misspelt-and-mistyped.json").read_text()
    assert codes(text, catalog) == ["unknown-key", "unknown-key", "unknown-component", "invalid-value",
                                    "invalid-value", "invalid-value"]


def test_misspelt_key_suggests_the_closest_known_key(catalog):
    [f] = findings('{"feda2v": {\n  "generator_trainig_sequence_length": 8\n}}', catalog)
    assert (f.line, f.column, f.path, f.code) == (2, 3, "$.feda2v.generator_trainig_sequence_length", "unknown-key")
    assert f.suggestion == "did you mean 'generator_training_sequence_length'?"


def test_wrong_type_says_what_was_expected_and_found(catalog):
    [f] = findings('{"generator_training_sequence_length": "4"}', catalog)
    assert (f.expected, f.found) == ("integer in [1, 65536]", '"4" (string)')
    assert f.suggestion == "write it without quotes: 4"


def test_other_sections_comment_keys_and_foreign_keys_pass_untouched(catalog):
    doc = {
        "experiment": {"name": "x", "generator_whatever": 1},
        "training": {"lr": 1e-4}, "wandb": {"project": "p"}, "model": {}, "dataset": {"name": "esc50"},
        "feda2v": {"_comment_mode": "anything", "_comment": ["x"], "adapter_dim": 512, "diffusion_steps": 50,
                   "use_wandb": True, "num_rounds": 3, "learning_rate": 0.1},
        "nodes": {"0": {"dataset_split": "a", "_comment": 1}},
    }
    assert codes(json.dumps(doc), catalog) == []


@pytest.mark.parametrize("key", ["generator_foo", "use_generater", "synthetic_sample_per_class", "Generator_Type",
                                 "gan_lossy"])
def test_unknown_keys_that_look_like_generator_keys_are_errors(catalog, key):
    assert codes(json.dumps({"feda2v": {key: 1}}), catalog) == ["unknown-key"]


def test_output_length_shorter_than_training_length(catalog):
    [f] = findings((INVALID / "output-shorter-than-training.json").read_text(), catalog)
    assert (f.code, f.path, f.line, f.column) == ("output-shorter-than-training",
                                                 "$.feda2v.generator_output_sequence_length", 5, 41)
    assert f.expected == "integer >= 16 or null"


def test_per_group_granularity_needs_groups(catalog):
    assert codes((INVALID / "per-group-without-groups.json").read_text(), catalog) == ["per-group-without-groups"]


def test_node_class_group_must_exist(catalog):
    [f] = findings((INVALID / "unknown-class-group.json").read_text(), catalog)
    assert (f.code, f.path) == ("unknown-class-group", '$.nodes["1"].generator_class_group')
    assert f.suggestion == "did you mean 'nature'?"
    assert f.expected == 'one of "animals", "nature"'


def test_generator_only_mode_needs_training_or_a_pretrained_generator(catalog):
    assert codes((INVALID / "generator-only-without-source.json").read_text(), catalog) == [
        "generator-only-without-source"]
    assert codes('{"generator_only_mode": true, "generator_training_mode": true}', catalog) == []
    assert codes('{"generator_only_mode": true, "pretrained_generator_path": "g.safetensors"}', catalog) == []


def test_old_key_with_new_keys(catalog):
    assert codes((INVALID / "old-and-new-keys-agree.json").read_text(), catalog) == [
        "changed-defaults", "deprecated-key"]
    [f] = [f for f in findings((INVALID / "old-and-new-keys-disagree.json").read_text(), catalog)
           if f.severity == "error"]
    assert f.code == "deprecated-conflict"
    assert "generator_target_sequence_length (8) and generator_training_sequence_length (4) disagree" in f.message


def test_node_overrides_are_checked_with_the_same_schema_plus_node_only_keys(catalog):
    doc = {"feda2v": {"generator_granularity": "per_group", "generator_class_groups": {"a": ["x"]}},
           "nodes": {"0": {"generator_class_group": "a", "generator_train_classes": ["x"],
                           "generator_training_epochs": 0, "generator_trainig_epochs": 3}}}
    found = findings(json.dumps(doc), catalog)
    assert [(f.path, f.code) for f in found] == [
        ('$.nodes["0"].generator_training_epochs', "invalid-value"),
        ('$.nodes["0"].generator_trainig_epochs', "unknown-key")]


def test_node_only_keys_and_misplaced_keys(catalog):
    found = findings((INVALID / "misplaced-and-node-only.json").read_text(), catalog)
    assert [f.code for f in found] == ["misplaced-key", "node-only-key", "pretrained-without-path", "invalid-value"]


def test_node_repeats_no_section_level_problem(catalog):
    doc = {"feda2v": {"generator_granularity": "per_group"}, "nodes": {"0": {"dataset": "a"}, "1": {}}}
    assert codes(json.dumps(doc), catalog) == ["per-group-without-groups"]


def test_generator_type_reducer_and_upsampler_must_be_registered(catalog):
    assert codes('{"generator_type": "gan", "generator_reducer": "adaptive_avg"}', catalog) == []
    assert codes('{"generator_type": "builtin:vae", "generator_upsampler": "builtin:linear"}', catalog) == []
    assert codes('{"generator_type": "diffusion"}', catalog) == ["unknown-component"]
    assert codes('{"generator_reducer": "max"}', catalog) == ["unknown-component"]


def test_a_non_positional_reducer_with_an_interpolating_upsampler_is_a_warning(catalog):
    """pca outputs components; interpolating them (`linear`) gave R^2 -1.09 on the demo data."""
    [f] = findings('{"generator_reducer": "pca", "generator_upsampler": "linear"}', catalog)
    assert (f.code, f.severity, f.path) == ("non-positional-reducer", "warning", "$.generator_upsampler")
    assert "'pca'" in f.message and "'linear'" in f.message and "lstsq" in f.suggestion and "learned" in f.suggestion
    assert codes('{"generator_reducer": "pca", "generator_upsampler": "cubic"}', catalog) == ["non-positional-reducer"]
    assert codes('{"generator_reducer": "builtin:pca", "generator_upsampler": "nearest"}', catalog) == [
        "non-positional-reducer"]
    for fine in ('{"generator_reducer": "pca", "generator_upsampler": "lstsq"}',
                 '{"generator_reducer": "pca", "generator_upsampler": "learned"}',
                 '{"generator_reducer": "pca", "use_learned_upsampling": true}',
                 '{"generator_reducer": "pca"}',  # the default upsampler is lstsq
                 '{"generator_reducer": "adaptive_avg"}', '{"generator_reducer": "nope"}'):
        assert "non-positional-reducer" not in codes(fine, catalog), fine
    doc = {"feda2v": {"generator_reducer": "pca", "generator_upsampler": "lstsq"},
           "nodes": {"a": {"generator_upsampler": "linear"}, "b": {"generator_batch_size": 8}}}
    [f] = findings(json.dumps(doc), catalog)
    assert (f.code, f.path) == ("non-positional-reducer", "$.nodes.a.generator_upsampler")


def test_plugin_types_and_keys_validate_once_the_plugin_is_loaded(flowgen_registry):
    from feda2v_toolkit.config.catalog import get_catalog

    catalog = get_catalog(flowgen_registry)
    assert codes('{"generator_type": "flow", "flowgen_num_steps": 8, "flowgen_solver": "rk4"}', catalog) == []
    assert codes('{"generator_type": "flowgen:flow", "flowgen_num_steps": 0}', catalog) == ["invalid-value"]
    assert codes('{"generator_type": "flow", "flowgen_nsteps": 8}', catalog) == ["unknown-key"]
    assert codes('{"generator_type": "vae", "flowgen_num_steps": 8}', catalog) == ["other-generator-key"]


def test_versions(catalog):
    assert codes('{"schema_version": 4}', catalog) == ["newer-schema-version"]
    assert codes('{"schema_version": 2, "generator_type": "vae", "generator_upsampler": "linear"}', catalog) == [
        "outdated-schema-version"]
    assert codes('{"schema_version": 3, "schema_versions": {"gone": 1}}', catalog) == ["unknown-chain"]


def test_a_section_older_than_version_3_is_told_which_changed_defaults_it_relies_on(catalog):
    [f] = [f for f in findings('{"schema_version": 2, "generator_type": "vae"}', catalog)
           if f.code == "changed-defaults"]
    assert f.severity == "warning" and f.path == "$"
    assert 'generator_upsampler "linear" -> "lstsq"' in f.message and "generator_type" not in f.message
    assert "--keep-old-defaults" in f.suggestion
    assert "changed-defaults" in codes('{"generator_target_sequence_length": 8}', catalog)  # a v1 section
    for fine in ('{"schema_version": 3}', '{"generator_seed": 1}',  # current (recorded or implied)
                 '{"schema_version": 2, "generator_type": "vae", "use_learned_upsampling": true}'):
        assert "changed-defaults" not in codes(fine, catalog), fine


def test_warnings_do_not_fail_unless_strict(feda2v, tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"generator_training_sequence_length": 256, "generator_output_sequence_length": 1214}')
    run = feda2v("validate", path)
    assert run.code == 0 and "warning: " in run.stdout and "[large-training-length]" in run.stdout
    assert feda2v("validate", "--strict", path).code == 1
    quiet = feda2v("validate", "-q", path)
    assert (quiet.code, quiet.stdout, quiet.stderr) == (0, "", "")


def test_duplicate_keys_are_reported(catalog):
    [f] = findings('{"feda2v": {"generator_seed": 1,\n "generator_seed": 2}}', catalog)
    assert (f.code, f.line, f.column, f.severity) == ("duplicate-key", 2, 2, "error")


def test_json_format_gives_one_record_per_finding_with_every_field(feda2v, monkeypatch):
    monkeypatch.chdir(INVALID)
    run = feda2v("validate", "--format", "json", "misspelt-and-mistyped.json", "per-group-without-groups.json")
    records = [json.loads(line) for line in run.lines]
    assert run.code == 1 and len(records) == 7
    assert all(list(r) == ["file", "line", "column", "path", "code", "severity", "message", "expected", "found",
                           "suggestion"] for r in records)
    assert records[0] == {
        "file": "misspelt-and-mistyped.json", "line": 5, "column": 5,
        "path": "$.feda2v.generator_trainig_sequence_length", "code": "unknown-key", "severity": "error",
        "message": "unknown generator key 'generator_trainig_sequence_length'",
        "expected": "a known generator key", "found": '"generator_trainig_sequence_length"',
        "suggestion": "did you mean 'generator_training_sequence_length'?"}


def test_bad_files_are_json_records_too(feda2v, tmp_path):
    path = tmp_path / "x.json"
    path.write_text("{\n  // hi\n}")
    [record] = [json.loads(line) for line in feda2v("validate", "--format", "json", path).lines]
    assert (record["code"], record["line"], record["column"], record["path"]) == ("json-comments", 2, 3, None)


def test_standard_input(feda2v, monkeypatch):
    import io
    import sys

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b'{"generator_seed": "x"}')))
    run = feda2v("validate", "-")
    assert run.code == 1 and run.lines[0].startswith("<stdin>:1:20: error: $.generator_seed: expected integer in [0, 2147483647] or null")


def test_bare_fragment_feda2v_config_and_feda2v_sections_are_all_found(catalog):
    bad = {"generator_batch_size": 0}
    assert codes(json.dumps(bad), catalog) == ["invalid-value"]
    assert codes(json.dumps({"feda2v_config": bad}), catalog) == ["invalid-value"]
    assert codes(json.dumps({"feda2v": bad, "training": {}}), catalog) == ["invalid-value"]
    assert codes(json.dumps({"feda2v": {}, "feda2v_config": {}}), catalog) == ["ambiguous-section"]
    assert codes(json.dumps({"feda2v": []}), catalog) == ["invalid-section"]


def test_every_reported_code_is_documented(feda2v):
    from feda2v_toolkit.config.validate import CODES

    run = feda2v("validate", "--format", "json", INVALID, FIXTURES / "bad", EXAMPLES)
    reported = {json.loads(line)["code"] for line in run.lines}
    assert len(reported) >= 15 and reported <= set(CODES)


def test_component_names_resolve_exactly_as_the_registry_does():
    import types

    from feda2v_toolkit import hookimpl
    from feda2v_toolkit.config.catalog import Catalog
    from feda2v_toolkit.plugins import load_registry
    from feda2v_toolkit.specs import GeneratorSpec

    def plugin(*names):
        @hookimpl
        def feda2v_register_generators(register):
            for name in names:
                register(GeneratorSpec(name=name, description="d", factory="x:Y"))
        return types.SimpleNamespace(feda2v_register_generators=feda2v_register_generators)

    with pytest.warns(UserWarning):  # the clash itself is reported when the plugins load
        registry = load_registry(autoload=False, extra_plugins=[("one", plugin("flow", "vae")),
                                                                ("two", plugin("flow"))])
    catalog = Catalog.build(registry)
    [f] = findings('{"generator_type": "flow"}', catalog)
    assert f.code == "unknown-component" and "use the qualified name (one:flow, two:flow)" in f.message
    assert codes('{"generator_type": "two:flow"}', catalog) == []
    assert codes('{"generator_type": "vae"}', catalog) == []  # a built-in name keeps meaning the built-in
