"""One derivation for every seed a run uses: ``derive_seed(seed, purpose, *ids)``.

A run has one seed (``generator_seed`` / ``--seed``). Everything random in it -- the held-out split of a
site, a generator's initial weights, the order of an epoch's batches, an upsampler's fit, the samples
``generate`` draws -- gets its own stream, seeded by hashing the run seed with what the stream is for
and whom it serves::

    derive_seed(seed, "split", site)                 # a site's train / held-out split
    derive_seed(seed, "init", key)                   # generator ``key``'s initial weights (on the server)
    derive_seed(seed, "epoch", site, key, epoch)     # one epoch of generator ``key`` at ``site``
    derive_seed(seed, "upsampler", site, round)      # a trainable upsampler's fit
    derive_seed(seed, "fit", key)                    # a closed-form generator's randomised fit
    derive_seed(seed, "sample", label)               # the samples of one class (``generate``, ``evaluate``)

The value is the first 8 bytes of ``SHA-256("feda2v-seed/1\\0" + seed + "\\0" + purpose + "\\0" + ids...)``
(decimal text, NUL-separated), as an integer below 2**63. Streams of different purposes or ids are
independent whatever the seed (no ``seed + 17`` arithmetic whose streams collide across seeds), and a
stream depends only on its own ids -- so a site's epoch 7 draws the same batches whether the run was
resumed, split into other rounds or run on another engine.

Model files record the derivation they were made with (``seed_scheme``). Files written before it
(scheme 1) keep theirs: :func:`legacy_seed` reproduces the old arithmetic, so an old model file still
generates the same samples and ``evaluate --split heldout`` still finds its held-out clips.
"""

from __future__ import annotations

import hashlib

#: the derivation model files of this version are made with
SEED_SCHEME = 2
_TAG = b"feda2v-seed/1"


def derive_seed(seed: int, purpose: str, *ids: int | str) -> int:
    """The seed of the stream ``purpose`` for ``ids`` within the run seeded by ``seed`` (module docstring)."""
    h = hashlib.sha256(_TAG)
    for part in (int(seed), purpose, *ids):
        h.update(b"\0" + str(part).encode("utf-8"))
    return int.from_bytes(h.digest()[:8], "little") & (2**63 - 1)


def legacy_seed(seed: int, purpose: str, *ids: int) -> int:
    """The seeds of model files written before :data:`SEED_SCHEME` 2 (``split`` and ``sample`` only)."""
    if purpose == "split":
        return int(seed) + 17
    if purpose == "sample":
        (label,) = ids
        return int(seed) * 1_000_003 + int(label)
    raise ValueError(f"no legacy derivation for {purpose!r}")


def scheme_seed(scheme: int | None, seed: int, purpose: str, *ids: int) -> int:
    """:func:`derive_seed` for files of scheme 2 and later, :func:`legacy_seed` for older ones (``None`` = 1)."""
    if (scheme or 1) >= 2:
        return derive_seed(seed, purpose, *ids)
    return legacy_seed(seed, purpose, *ids)
