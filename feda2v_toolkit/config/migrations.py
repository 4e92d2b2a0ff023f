"""The core migration chain (``schema_version``), registered by the built-in plugin like any plugin's chain.

Version 1 is the original FedA2V generator section, with one ``generator_target_sequence_length``;
version 2 splits it into ``generator_training_sequence_length`` and ``generator_output_sequence_length``,
as the reference document's "Migration from Old Configuration" describes; version 3 (current) changes
defaults that were measured to fail on embeddings of real recorded sound (:data:`CHANGED_DEFAULTS`). That
step rewrites no key -- every key keeps its meaning -- but says which defaults a section relied on, and
``--keep-old-defaults`` writes the old values into the section instead.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from feda2v_toolkit.config.migrate import MigrationConflict, MigrationContext
from feda2v_toolkit.config.schema import json_equal
from feda2v_toolkit.runtime.sizes import format_count
from feda2v_toolkit.specs import CORE_CHAIN, Migration

OLD_KEY = "generator_target_sequence_length"
TRAINING_KEY = "generator_training_sequence_length"
OUTPUT_KEY = "generator_output_sequence_length"
#: Old values above this are full-length *output* targets (1214 = AST length), not training lengths:
#: 64 is the longest training length the reference document recommends ("high quality, high-end GPUs").
FULL_LENGTH_THRESHOLD = 64
HINT = "delete the one that is wrong"
#: Embedding width of AST sequences, for the parameter estimate.
AST_DIM = 768


def _default(ctx: MigrationContext, key: str) -> Any:
    """``key``'s default: the context's (core plus plugins), else the core schema's."""
    if key in ctx.defaults:
        return ctx.defaults[key]
    from feda2v_toolkit.config import core_schema

    return core_schema()["properties"][key]["default"]


def vae_parameters(length: int, hidden: int = 1024, latent: int = 256, dim: int = AST_DIM) -> int:
    """How many parameters the unconditioned FedA2V VAE has when trained at ``length`` tokens (exact;
    conditioning adds a few percent at short lengths, ``feda2v-tk plan`` counts every variant).

    Its first encoder and last decoder layers see the flattened sequence (``length * dim`` wide), so
    each token of training length costs ``2 * dim * hidden + dim`` parameters (~1.57 M at 768 x 1024);
    the rest (two hidden layers, the latent heads and their biases) is ``2 * hidden^2 + 3 * hidden *
    latent + 4 * hidden + 2 * latent``.
    """
    return (length * dim * (2 * hidden + 1) + 2 * hidden * hidden + 3 * hidden * latent
            + 4 * hidden + 2 * latent)


def _positive_int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not value.is_integer():
        return None
    return int(value) if value >= 1 else None


def split_target_sequence_length(section: dict[str, Any], ctx: MigrationContext) -> dict[str, Any]:
    """``generator_target_sequence_length: n`` -> ``generator_training_sequence_length`` + ``..._output_...``.

    * ``n <= 64``: train at ``n``, output ``null`` (= the training length), as documented.
    * ``n > 64`` (a full-length target such as 1214): the documented full-length form, train at a small
      length (``--training-length``, default the schema default 4) and output ``n``. A per-node override
      without its own training length keeps the section's (unless ``--training-length`` is given).
    * New keys already present: kept when they agree with the old key (which is dropped); a
      disagreement raises :class:`MigrationConflict` showing both values.
    """
    if OLD_KEY not in section:
        return section
    raw = section[OLD_KEY]
    old = _positive_int(raw)
    if old is None:
        raise MigrationConflict(f"{OLD_KEY} is {json.dumps(raw)}; expected a positive integer",
                                "fix the value by hand")
    has_train, has_out = TRAINING_KEY in section, OUTPUT_KEY in section
    full = old > FULL_LENGTH_THRESHOLD
    # a node override without its own training length keeps the section's, unless the user chose one
    inherit = full and not has_train and ctx.is_node and ctx.option("training_length") is None
    if full:
        out: int | None = old
        if has_train:
            train = section[TRAINING_KEY]
            chosen = ctx.option("training_length")
            if chosen is not None and not json_equal(chosen, train):
                ctx.note(f"kept the file's {TRAINING_KEY} {json.dumps(train)}; --training-length {chosen} "
                         "applies only where the file sets none")
        else:
            train = ctx.option("training_length", _default(ctx, TRAINING_KEY))
            if train >= old and not inherit:
                raise MigrationConflict(f"training length {train} is not shorter than the output length {old}",
                                        "choose a smaller --training-length")
        if has_out and not json_equal(section[OUTPUT_KEY], old):
            raise MigrationConflict(
                f"{OLD_KEY} ({old}, a full-length output target) and {OUTPUT_KEY} "
                f"({json.dumps(section[OUTPUT_KEY])}) disagree", HINT)
    else:
        train, out = old, None
        if has_train and not json_equal(section[TRAINING_KEY], old):
            raise MigrationConflict(
                f"{OLD_KEY} ({old}) and {TRAINING_KEY} ({json.dumps(section[TRAINING_KEY])}) disagree", HINT)
        if has_out and section[OUTPUT_KEY] is not None and not json_equal(section[OUTPUT_KEY], old):
            raise MigrationConflict(
                f"{OLD_KEY} ({old}, meaning output length {old}) and {OUTPUT_KEY} "
                f"({json.dumps(section[OUTPUT_KEY])}) disagree", HINT)
    new: dict[str, Any] = {}
    for key, value in section.items():
        if key != OLD_KEY:
            new[key] = value
            continue
        if not has_train and not inherit:
            new[TRAINING_KEY] = train
        if not has_out and (full or not has_train):
            new[OUTPUT_KEY] = out
    if inherit:
        ctx.note(f"{OLD_KEY} {old} is a full-length target (above {FULL_LENGTH_THRESHOLD}): it became "
                 f"{OUTPUT_KEY} {old}; the node keeps the section's training length (--training-length N "
                 "sets one)")
    elif full and not has_train:
        hidden = section.get("generator_hidden_dim", _default(ctx, "generator_hidden_dim"))
        latent = section.get("generator_latent_dim", _default(ctx, "generator_latent_dim"))
        hidden = hidden if isinstance(hidden, int) else _default(ctx, "generator_hidden_dim")
        latent = latent if isinstance(latent, int) else _default(ctx, "generator_latent_dim")
        ctx.note(
            f"{OLD_KEY} {old} is a full-length target (above {FULL_LENGTH_THRESHOLD}). Training at {old} "
            f"tokens would need about {format_count(vae_parameters(old, hidden, latent))} parameters "
            f"(~{AST_DIM * (2 * hidden + 1) / 1e6:.2f} M per token at dimension {AST_DIM}, hidden {hidden}), so "
            f"the documented full-length form was chosen: {TRAINING_KEY} {train} (about "
            f"{format_count(vae_parameters(train, hidden, latent))} parameters) with {OUTPUT_KEY} {old} "
            "(upsampled). Choose another training length with --training-length N.")
    return new


#: Defaults changed in core schema version 3 -> (the old default, why; measured in docs/evaluation.md)
CHANGED_DEFAULTS: dict[str, tuple[Any, str]] = {
    "generator_type": ("vae", "on embeddings of real sound the MLP VAE's samples collapse onto the class "
                              "mean; the closed-form gaussian's train-on-synthetic accuracy is far higher"),
    "generator_upsampler": ("linear", "linear interpolation puts every full-length sample out of the real "
                                      "domain; a classifier trained on them fails on real clips"),
}


def relied_on_defaults(section: Mapping[str, Any]) -> list[str]:
    """The keys of :data:`CHANGED_DEFAULTS` that ``section`` leaves to their default."""
    keys = [k for k in CHANGED_DEFAULTS if k not in section]
    if section.get("use_learned_upsampling") is True and "generator_upsampler" in keys:
        keys.remove("generator_upsampler")  # the flag selects `learned` whatever the default
    return keys


def new_defaults(section: dict[str, Any], ctx: MigrationContext) -> dict[str, Any]:
    """Version 2 -> 3: say which changed defaults the section relied on; with ``--keep-old-defaults``
    (option ``keep_old_defaults``) write the old values into it instead."""
    if ctx.is_node:
        return section  # a node override inherits its section's values
    keys = relied_on_defaults(section)
    if not keys:
        return section
    if ctx.option("keep_old_defaults"):
        ctx.note("kept the original behaviour: " + ", ".join(
            f"{k} {json.dumps(CHANGED_DEFAULTS[k][0])}" for k in keys) + " written explicitly")
        return {**section, **{k: CHANGED_DEFAULTS[k][0] for k in keys}}
    for key in keys:
        old, why = CHANGED_DEFAULTS[key]
        ctx.note(f"{key} now defaults to {json.dumps(_default(ctx, key))} (was {json.dumps(old)}): {why}; "
                 f"set \"{key}\": {json.dumps(old)} (or migrate --keep-old-defaults) for the original behaviour")
    return section


CORE_MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        id="core-0001-split-target-sequence-length",
        chain=CORE_CHAIN,
        from_version=1,
        to_version=2,
        description=f"Split {OLD_KEY} into {TRAINING_KEY} and {OUTPUT_KEY}.",
        apply=split_target_sequence_length,
        deprecated_keys={OLD_KEY: f"{TRAINING_KEY} and {OUTPUT_KEY}"},
    ),
    Migration(
        id="core-0002-new-defaults",
        chain=CORE_CHAIN,
        from_version=2,
        to_version=3,
        description="Defaults measured on real embeddings: " + ", ".join(
            f"{k} (was {json.dumps(v[0])})" for k, v in CHANGED_DEFAULTS.items()) + "; no key is rewritten.",
        apply=new_defaults,
        detect=lambda section: False,  # nothing in a section's keys reveals it predates version 3
    ),
)
