"""`load_config`: migrate in memory with warnings, apply overrides, validate, fill in schema defaults."""

from __future__ import annotations

import json
import warnings

import pytest

from feda2v_toolkit.config import load_config, schema_defaults
from feda2v_toolkit.config.loader import ConfigWarning, load_experiment
from feda2v_toolkit.errors import InputError

from .conftest import EXAMPLES, FIXTURES

MINIMAL = EXAMPLES / "minimal-memory-training.json"
LEGACY = EXAMPLES / "legacy-full-length.json"


def test_returns_the_generator_section_with_every_schema_default_filled_in():
    config = load_config(MINIMAL)
    defaults = schema_defaults()
    assert set(defaults) <= set(config)
    assert config["generator_training_mode"] is True and config["generator_training_epochs"] == 50
    assert config["generator_hidden_dim"] == defaults["generator_hidden_dim"]
    assert config["gan_critic_steps"] == defaults["gan_critic_steps"]  # built-in gan fragment


def test_defaults_come_only_from_the_registered_fragments(flowgen_registry):
    fragment_defaults = {key: prop["default"] for frag in flowgen_registry.schema_fragments
                         for key, prop in frag.properties.items() if "default" in prop}
    assert schema_defaults(flowgen_registry) == fragment_defaults
    config = load_config({"generator_type": "flow"}, registry=flowgen_registry)
    assert {k: config[k] for k in fragment_defaults if k != "generator_type"} == {
        k: v for k, v in fragment_defaults.items() if k != "generator_type"}
    assert config["flowgen_num_steps"] == 16


def test_returned_config_is_a_fresh_copy():
    config = load_config({})
    config["gan_adam_betas"].append(0.0)
    config["schema_versions"]["x"] = 1
    assert load_config({})["gan_adam_betas"] == schema_defaults()["gan_adam_betas"]
    assert load_config({})["schema_versions"] == {}


@pytest.mark.parametrize("source", [
    {"feda2v": {"generator_seed": 3}, "training": {"lr": 1}},
    {"feda2v_config": {"generator_seed": 3}},
    {"generator_seed": 3},
    '{"feda2v": {"generator_seed": 3}}',
], ids=["feda2v", "feda2v_config", "bare", "json-text"])
def test_accepts_full_configs_bare_sections_and_json_text(source):
    assert load_config(source)["generator_seed"] == 3


def test_accepts_str_and_path(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"feda2v": {"generator_seed": 7}}')
    assert load_config(path)["generator_seed"] == load_config(str(path))["generator_seed"] == 7


def test_non_generator_keys_of_the_section_are_kept():
    config = load_config({"feda2v": {"_comment": "x", "adapter_dim": 512}, "training": {"lr": 1}})
    assert config["_comment"] == "x" and config["adapter_dim"] == 512 and "training" not in config


def test_deprecated_key_is_migrated_in_memory_with_one_warning_per_key():
    with pytest.warns(DeprecationWarning) as caught:
        config = load_config(LEGACY)
    messages = [str(w.message) for w in caught if w.category is DeprecationWarning]
    assert len(messages) == 1
    [message] = messages
    assert "$.feda2v.generator_target_sequence_length is deprecated" in message
    assert "use generator_training_sequence_length and generator_output_sequence_length" in message
    assert f"feda2v-tk migrate --in-place {LEGACY}" in message
    assert "full-length target" in message
    assert (config["generator_training_sequence_length"], config["generator_output_sequence_length"]) == (4, 1214)


def test_warning_points_at_the_callers_line():
    with pytest.warns(DeprecationWarning) as caught:
        load_config({"generator_target_sequence_length": 4})
    assert caught[0].filename == __file__


def test_each_deprecated_key_warns_including_node_overrides():
    doc = {"feda2v": {"generator_target_sequence_length": 8},
           "nodes": {"0": {"generator_target_sequence_length": 16}}}
    with pytest.warns(DeprecationWarning) as caught:
        loaded = load_experiment(doc)
    assert len([w for w in caught if w.category is DeprecationWarning]) == 2
    assert loaded.nodes["0"]["generator_training_sequence_length"] == 16
    assert loaded.section["generator_training_sequence_length"] == 8


def test_a_current_config_loads_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config(EXAMPLES / "full-experiment.json")


def test_overrides_are_applied_and_validated():
    config = load_config(MINIMAL, {"generator_training_sequence_length": 8, "generator_output_sequence_length": 1214})
    assert (config["generator_training_sequence_length"], config["generator_output_sequence_length"]) == (8, 1214)
    with pytest.raises(InputError,
                       match=r"generator_training_sequence_length: expected integer in \[1, 65536\], found 0"):
        load_config(MINIMAL, {"generator_training_sequence_length": 0})
    with pytest.raises(InputError, match="output-shorter-than-training"):
        load_config(MINIMAL, {"generator_output_sequence_length": 2})
    with pytest.raises(InputError, match="unknown generator key.*'generator_epochs'"):
        load_config(MINIMAL, {"generator_epochs": 3})


def test_invalid_config_raises_one_error_listing_every_problem_first_line_naming_the_file():
    path = FIXTURES / "invalid" / "misspelt-and-mistyped.json"
    with pytest.raises(InputError) as exc:
        load_config(path)
    lines = str(exc.value).splitlines()
    assert lines[0] == f"{path}: invalid generator config (6 problems):"
    assert lines[1].startswith("  line 5, column 5: $.feda2v.generator_trainig_sequence_length: unknown generator key")
    assert len(lines) == 7


@pytest.mark.parametrize("section", [[1, 2], "vae", 3, None])
def test_a_generator_section_that_is_not_an_object_is_an_error_not_the_defaults(tmp_path, section):
    """It used to be replaced by {} before validation: every default, no error."""
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"feda2v": section, "training": {}}))
    for overrides in (None, {"generator_training_epochs": 3}):
        with pytest.raises(InputError) as exc:
            load_config(path, overrides)
        text = str(exc.value)
        assert text.splitlines() == [text]
        assert text.startswith(f"{path}: invalid generator config: line 1, column 12: $.feda2v: ")
        assert text.endswith("the generator section must be an object [invalid-section]")
    with pytest.raises(InputError, match=r"\$\.feda2v_config: .*\[invalid-section\]"):
        load_config({"feda2v_config": [1, 2]})


def test_conflicting_old_and_new_keys_raise():
    with pytest.raises(InputError, match=r"generator_target_sequence_length \(8\) and "
                                         r"generator_training_sequence_length \(4\) disagree"):
        load_config(FIXTURES / "invalid" / "old-and-new-keys-disagree.json")


def test_newer_schema_version_is_refused():
    from feda2v_toolkit.errors import NewerVersionError

    with pytest.raises(NewerVersionError, match="newer than this feda2v-tk supports"):
        load_config({"schema_version": 99})


def test_integral_floats_for_integer_keys_become_ints():
    config = load_config({"generator_training_sequence_length": 8.0, "generator_learning_rate": 1.0})
    assert type(config["generator_training_sequence_length"]) is int
    assert type(config["generator_learning_rate"]) is float


def test_nodes_resolve_to_the_section_plus_their_generator_keys():
    loaded = load_experiment(EXAMPLES / "full-experiment.json")
    assert loaded.nodes["1"]["generator_training_epochs"] == 150
    assert loaded.nodes["1"]["generator_class_group"] == "nature"
    assert loaded.nodes["0"]["generator_training_epochs"] == 100
    assert "dataset_split" not in loaded.nodes["0"]
    assert loaded.nodes["2"]["generator_granularity"] == "per_class"


def test_validation_warnings_are_emitted_as_config_warnings():
    with pytest.warns(ConfigWarning, match="large-training-length|needs about"):
        load_config({"generator_training_sequence_length": 512})


def test_mapping_that_is_not_json_is_refused():
    with pytest.raises(InputError, match="not JSON data"):
        load_config({"generator_seed": object()})


def test_the_json_text_and_the_file_load_the_same():
    text = MINIMAL.read_text()
    assert load_config(text) == load_config(MINIMAL) == load_config(json.loads(text))
