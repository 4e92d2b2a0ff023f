"""The schema: the core file, fragment checks, the value evaluator, and `feda2v-tk schema`."""

from __future__ import annotations

import functools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from feda2v_toolkit.config import core_schema
from feda2v_toolkit.config.schema import (
    _plainly_valid,
    check_fragment_schema,
    check_value,
    describe,
    evaluable,
)
from feda2v_toolkit.plugins import load_registry

from .conftest import EXAMPLES, FIXTURES

ISSUE_KEYS = [
    "use_generator", "generator_training_mode", "generator_only_mode", "use_pretrained_generators",
    "generator_type", "use_conditioned_vae", "generator_training_sequence_length",
    "generator_output_sequence_length", "generator_training_epochs", "pretrained_generator_path",
    "synthetic_samples_per_class", "use_learned_upsampling", "generator_augmentation",
    "generator_augmentation_noise", "generator_granularity", "generator_class_groups", "generator_checkpoint_dir",
    "generator_checkpoint_base_name", "generator_save_checkpoint", "generator_load_checkpoint",
    "generator_checkpoint_frequency", "generator_validation_frequency", "generator_hidden_dim",
    "generator_latent_dim", "generator_batch_size", "generator_learning_rate", "generator_reducer",
    "generator_upsampler", "generator_beta_warmup_fraction",
]


# -- the core schema file ---------------------------------------------------------------------------

def test_core_schema_is_valid_draft_2020_12_and_documents_every_key():
    schema = core_schema()
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    for key in ISSUE_KEYS:
        prop = schema["properties"][key]
        assert prop["description"].strip() and "default" in prop, key


def test_sequence_length_keys_follow_the_reference_document():
    props = core_schema()["properties"]
    training, output = props["generator_training_sequence_length"], props["generator_output_sequence_length"]
    assert (training["type"], training["minimum"], training["default"]) == ("integer", 1, 4)
    assert (output["type"], output["minimum"], output["default"]) == (["integer", "null"], 1, None)
    assert props["generator_granularity"]["enum"] == ["unified", "per_class", "per_group"]
    samples = props["synthetic_samples_per_class"]
    assert not check_value(samples, "auto") and not check_value(samples, 5) and check_value(samples, 0)


def test_component_keys_are_not_a_hard_coded_enum():
    props = core_schema()["properties"]
    for key, kind in [("generator_type", "generator"), ("generator_reducer", "reducer"),
                      ("generator_upsampler", "upsampler")]:
        assert "enum" not in props[key] and props[key]["x-feda2v-component"] == kind


def test_the_package_ships_the_schema_and_the_repo_root_links_to_it():
    from importlib import resources

    from .conftest import REPO

    shipped = resources.files("feda2v_toolkit").joinpath("schemas", "feda2v-generator.schema.json")
    assert json.loads(shipped.read_text("utf-8")) == core_schema()
    assert (REPO / "schemas" / "feda2v-generator.schema.json").read_bytes() == shipped.read_bytes()


# -- fragment checks at registration ----------------------------------------------------------------

def test_plain_fragments_are_recognised_without_jsonschema():
    assert _plainly_valid(core_schema())


@pytest.mark.parametrize("schema", [
    {"properties": {"x": {"type": "integr"}}},
    {"properties": {"x": {"minimum": "1"}}},
    {"properties": {"x": {"anyOf": []}}},
    {"properties": {"x": {"required": "a"}}},
])
def test_invalid_fragments_are_rejected(schema):
    with pytest.raises(ValueError):
        check_fragment_schema(schema)


def test_fragments_using_other_keywords_are_checked_by_jsonschema():
    schema = {"$defs": {"pos": {"type": "integer", "minimum": 1}},
              "properties": {"x": {"$ref": "#/$defs/pos", "description": "d"}}}
    assert not _plainly_valid(schema)
    check_fragment_schema(schema)  # valid: no error


def test_a_plugin_with_an_invalid_fragment_is_skipped_with_a_clear_reason():
    import types

    from feda2v_toolkit import hookimpl
    from feda2v_toolkit.plugins import load_registry
    from feda2v_toolkit.specs import SchemaFragment

    @hookimpl
    def feda2v_register_schema_fragments(register):
        register(SchemaFragment(name="bad", schema={"properties": {"bad_x": {"description": "d", "type": "integr"}}}))

    module = types.SimpleNamespace(feda2v_register_schema_fragments=feda2v_register_schema_fragments)
    with pytest.warns(UserWarning, match="not a valid JSON Schema"):
        registry = load_registry(autoload=False, extra_plugins=[("bad", module)])
    assert not any(f.name == "bad" for f in registry.schema_fragments)


# -- the evaluator agrees with jsonschema -----------------------------------------------------------

@functools.cache
def _builtin_properties() -> dict:
    """The built-in keys only: plugins installed where the tests run must not change what is drawn."""
    from feda2v_toolkit.config.catalog import Catalog

    catalog = Catalog.build(load_registry(autoload=False))
    return {k: i.schema for k, i in {**catalog.keys, **catalog.node_keys}.items()}


INTERESTING = [0, 1, -1, 2, 4, 1214, 0.5, 1.0, 1.5, 0.999, 1e-9, True, False, None, "", "auto", "vae", "unified",
               "per_group", "float32", [], [0.5, 0.999], [0.5, 1.0], ["a", "a"], ["a", 1], {}, {"g": ["a"]},
               {"g": []}, {"g": [1]}]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 2000) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6) | st.sampled_from(INTERESTING),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=3), children, max_size=3),
    max_leaves=6)


def test_every_builtin_property_is_handled_by_the_evaluator():
    assert all(evaluable(schema) for schema in _builtin_properties().values())


@settings(max_examples=400, deadline=None)
@given(key=st.sampled_from(sorted(_builtin_properties())), value=json_values)
def test_evaluator_accepts_exactly_what_jsonschema_accepts(key, value):
    schema = _builtin_properties()[key]
    assert (not check_value(schema, value)) == Draft202012Validator(schema).is_valid(value)


@settings(max_examples=200, deadline=None)
@given(value=json_values)
def test_evaluator_agrees_on_combinators_and_nested_objects(value):
    schema = {"anyOf": [{"type": "object", "properties": {"a": {"type": "integer", "maximum": 3}},
                         "required": ["a"], "additionalProperties": {"type": "string"}},
                        {"type": "array", "items": {"oneOf": [{"type": "number"}, {"const": "x"}]},
                         "uniqueItems": True, "maxItems": 2},
                        {"type": "string", "minLength": 2, "pattern": "^[a-z]"}]}
    assert (not check_value(schema, value)) == Draft202012Validator(schema).is_valid(value)


@pytest.mark.parametrize("schema, words", [
    ({"type": "integer", "minimum": 1}, "integer >= 1"),
    ({"type": ["integer", "null"], "minimum": 1}, "integer >= 1 or null"),
    ({"type": "number", "minimum": 0, "exclusiveMaximum": 1}, "number in [0, 1)"),
    ({"anyOf": [{"type": "integer", "minimum": 1}, {"const": "auto"}]}, 'integer >= 1 or "auto"'),
    ({"enum": ["a", "b"]}, 'one of "a", "b"'),
    ({"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2}, "array of 2 numbers"),
    ({"type": ["object", "null"], "additionalProperties": {"type": "array", "items": {"type": "string"}}},
     "object (name -> array of strings) or null"),
])
def test_describe_says_what_a_schema_accepts(schema, words):
    assert describe(schema) == words


def test_keys_with_other_keywords_are_checked_by_jsonschema(flowgen_registry):
    from feda2v_toolkit.config.catalog import Catalog, KeyInfo

    catalog = Catalog.build(flowgen_registry)
    frag = flowgen_registry.schema_fragments[0]
    info = KeyInfo("x", {"allOf": [{"type": "integer"}, {"minimum": 3}]}, frag)
    assert catalog.check(info, 4) == []
    [problem] = catalog.check(info, 2)
    assert "2 is less than the minimum of 3" in problem.message


# -- feda2v-tk schema -------------------------------------------------------------------------------

def _schema(feda2v, *args) -> dict:
    run = feda2v("schema", *args)
    assert run.code == 0, run.stderr
    return json.loads(run.stdout)


def test_printed_schema_is_valid_and_accepts_the_examples(feda2v):
    schema = _schema(feda2v)
    Draft202012Validator.check_schema(schema)
    validator = Draft202012Validator(schema)
    for path in EXAMPLES.glob("*.json"):
        assert validator.is_valid(json.loads(path.read_text())), path.name


def test_printed_schema_rejects_misspelt_generator_keys_and_unknown_types(feda2v):
    validator = Draft202012Validator(_schema(feda2v))
    assert not validator.is_valid({"feda2v": {"generator_trainig_sequence_length": 8}})
    assert not validator.is_valid({"feda2v": {"generator_type": "vea"}})
    assert not validator.is_valid({"nodes": {"0": {"generator_granularity": "per-class"}}})
    assert validator.is_valid({"feda2v": {"adapter_dim": 8, "_comment": 1}})
    doc = json.loads((FIXTURES / "invalid" / "misspelt-and-mistyped.json").read_text())
    assert not validator.is_valid(doc)


def test_printed_schema_includes_plugin_keys_and_types(flowgen_registry, feda2v):
    section = _schema(feda2v)["$defs"]["generator_section"]
    assert "flowgen_num_steps" in section["properties"]
    assert {"flow", "flowgen:flow", "vae", "gan"} <= set(section["properties"]["generator_type"]["enum"])
    assert section["properties"]["flowgen_steps"]["deprecated"] is True


def test_generator_option_narrows_to_one_generator_type(feda2v):
    gan = _schema(feda2v, "--generator", "gan", "--section")["properties"]
    vae = _schema(feda2v, "--generator", "vae", "--section")["properties"]
    assert "gan_loss" in gan and "gan_loss" not in vae
    assert "generator_training_sequence_length" in gan and "generator_training_sequence_length" in vae
    assert vae["generator_type"]["enum"] == ["vae", "builtin:vae"]
    assert feda2v("schema", "--generator", "nope").code == 2


def test_section_option_prints_a_schema_for_bare_fragments(feda2v):
    schema = _schema(feda2v, "--section")
    Draft202012Validator.check_schema(schema)
    assert Draft202012Validator(schema).is_valid(json.loads((FIXTURES / "reference" / "new.json").read_text()))
