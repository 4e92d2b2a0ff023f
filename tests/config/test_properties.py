"""Properties of migration over generated configs: idempotent, order-preserving, result validates."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from feda2v_toolkit.config.document import Obj, parse_text, parse_tree
from feda2v_toolkit.config.migrate import migrate_document, migrate_source
from feda2v_toolkit.config.migrations import FULL_LENGTH_THRESHOLD
from feda2v_toolkit.config.validate import errors_of, validate_source

OLD, TRAIN, OUT = ("generator_target_sequence_length", "generator_training_sequence_length",
                   "generator_output_sequence_length")

VALID_VALUES = {
    "use_generator": st.booleans(),
    "generator_training_mode": st.booleans(),
    "generator_type": st.sampled_from(["vae", "gan", "builtin:vae"]),
    "use_conditioned_vae": st.booleans(),
    "generator_training_epochs": st.integers(1, 500),
    "synthetic_samples_per_class": st.integers(1, 100) | st.just("auto"),
    "generator_granularity": st.sampled_from(["unified", "per_class"]),
    "generator_hidden_dim": st.integers(1, 4096),
    "generator_learning_rate": st.floats(1e-6, 1.0),
    "generator_seed": st.none() | st.integers(0, 2**31 - 1),
    "generator_checkpoint_dir": st.text(max_size=8),
}
FOREIGN_KEYS = st.sampled_from(["adapter_dim", "diffusion_steps", "lr", "_comment", "_comment_mode", "num_rounds",
                                "wandb_project", "ünïcode"])
json_leaf = st.none() | st.booleans() | st.integers(-3, 3) | st.floats(-1, 1) | st.text(max_size=4)
json_value = st.recursive(json_leaf, lambda c: st.lists(c, max_size=2) | st.dictionaries(st.text(max_size=3), c,
                                                                                         max_size=2), max_leaves=4)


@st.composite
def sections(draw, with_old: bool) -> dict:
    """An ordered generator section: valid keys, foreign keys and (maybe) the deprecated key."""
    items = []
    for key in draw(st.lists(st.sampled_from(sorted(VALID_VALUES)), unique=True, max_size=6)):
        items.append((key, draw(VALID_VALUES[key])))
    for key in draw(st.lists(FOREIGN_KEYS, unique=True, max_size=3)):
        items.append((key, draw(json_value)))
    length_items = []
    if with_old:
        old = draw(st.integers(1, 64) | st.integers(65, 2000) | st.just(1214))
        length_items.append((OLD, old))
        form = draw(st.sampled_from(["alone", "with-new"]))
        if form == "with-new" and old <= FULL_LENGTH_THRESHOLD:
            length_items.append((TRAIN, old))
        elif form == "with-new":
            length_items += [(TRAIN, draw(st.integers(1, 64))), (OUT, old)]
    else:
        train = draw(st.integers(1, 64))
        length_items += draw(st.sampled_from([[], [(TRAIN, train)], [(TRAIN, train), (OUT, None)],
                                              [(TRAIN, train), (OUT, 1214)]]))
    for item in length_items:
        items.insert(draw(st.integers(0, len(items))), item)
    return dict(items)


@st.composite
def documents(draw, with_old: bool) -> dict:
    section = draw(sections(with_old))
    layout = draw(st.sampled_from(["bare", "feda2v", "feda2v_config"]))
    if layout == "bare":
        return section
    doc = {"experiment": {"name": draw(st.text(max_size=5))}, layout: section, "training": {"lr": 0.001}}
    if draw(st.booleans()):
        node = {"dataset_split": "a"}
        if with_old and draw(st.booleans()):
            node[OLD] = draw(st.integers(1, 64))
        doc["nodes"] = {"0": node, "1": {}}
    return doc


@st.composite
def texts(draw, with_old: bool) -> str:
    doc = draw(documents(with_old))
    indent = draw(st.sampled_from([None, 1, 2, 4, "\t"]))
    text = json.dumps(doc, indent=indent, ensure_ascii=draw(st.booleans()))
    if draw(st.booleans()):
        text += "\n"
    if indent is not None and draw(st.booleans()):
        text = text.replace("\n", "\r\n")
    return text


def migrate(text: str, catalog) -> str:
    return migrate_source(parse_text(text, "c.json"), catalog).text


def section_of(doc: dict) -> dict:
    for key in ("feda2v", "feda2v_config"):
        if key in doc:
            return doc[key]
    return doc


COMMON = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@COMMON
@given(text=texts(with_old=True))
def test_migrating_twice_equals_migrating_once(catalog, text):
    once = migrate(text, catalog)
    assert migrate(once, catalog) == once


@COMMON
@given(text=texts(with_old=True))
def test_migrated_old_configs_validate(catalog, text):
    migrated = migrate(text, catalog)
    assert errors_of(validate_source(parse_text(migrated, "c.json"), catalog)) == []


@COMMON
@given(text=texts(with_old=False))
def test_current_configs_stay_byte_identical(catalog, text):
    assert migrate(text, catalog) == text


@COMMON
@given(text=texts(with_old=True))
def test_text_and_in_memory_migration_agree(catalog, text):
    assert json.loads(migrate(text, catalog)) == migrate_document(json.loads(text), catalog).document


@COMMON
@given(text=texts(with_old=True))
def test_key_order_is_kept_and_replacements_take_the_old_keys_place(catalog, text):
    before = section_of(json.loads(text))
    after = list(section_of(json.loads(migrate(text, catalog))))
    assume(OLD in before)
    full = before[OLD] > FULL_LENGTH_THRESHOLD
    expected = []
    for key in before:
        if key != OLD:
            expected.append(key)
            continue
        if TRAIN not in before:
            expected.append(TRAIN)
        if OUT not in before and (full or TRAIN not in before):
            expected.append(OUT)
    if "schema_version" not in before:
        expected.insert(0, "schema_version")
    assert after == expected


@COMMON
@given(text=texts(with_old=True))
def test_everything_outside_the_generator_keys_is_byte_identical(catalog, text):
    migrated = migrate(text, catalog)
    old_root, new_root = parse_tree(text), parse_tree(migrated)
    assume(isinstance(old_root, Obj) and any(m.key in ("feda2v", "feda2v_config") for m in old_root.members))
    for old_member in old_root.members:
        if old_member.key in ("feda2v", "feda2v_config", "nodes"):
            continue
        new_member = new_root.get(old_member.key)
        assert new_member is not None
        assert (migrated[new_member.key_start:new_member.value.end]
                == text[old_member.key_start:old_member.value.end])
    assert migrated[:old_root.members[0].key_start] == text[:old_root.members[0].key_start]
    assert migrated[new_root.end:] == text[old_root.end:]
