"""A site: one holder of clips and its part of every stage (no engine here).

A :class:`Site` holds one dataset -- all of it for ``train``, one node's for ``federate``, one rank's slice for
data-parallel runs -- its stratified train / held-out split, the reduced cache and whatever it trains. Every
request of the pipeline names a stage (:data:`STAGES`) and carries tensors (``arrays``) and JSON (``meta``);
:func:`handle` answers it with the site's release for that stage. Only releases leave a site: sums,
statistics, weights and optimiser state, never clips.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from feda2v_toolkit.components import TrainContext
from feda2v_toolkit.data.dataset import Dataset, contiguous_runs
from feda2v_toolkit.data.split import stratified_split
from feda2v_toolkit.errors import InputError, short_list
from feda2v_toolkit.privacy.spec import PrivacyError, dp_requested
from feda2v_toolkit.runtime.ranks import (
    Ranks,
    add_parts,
    block_count,
    block_range,
    data_parallel_step,
    in_block,
)
from feda2v_toolkit.runtime.seeds import derive_seed
from feda2v_toolkit.training.loop import EpochData, mean_terms, train_epochs, validate
from feda2v_toolkit.training.spec import RunSpec
from feda2v_toolkit.training.stages import (
    ClassesStage,
    FittedStatisticsStage,
    GeneratorStatisticsStage,
    NormalizationStage,
    WeightsPart,
    fitted_while_reducing,
    heldout_from_sums,
)
from feda2v_toolkit.training.streams import (
    ReducedCache,
    block_digest,
    cache_fingerprint,
    full_batches,
    heldout_reconstruction,
    read_chunk_rows,
    upsampler_pairs,
)

Arrays = dict[str, Tensor]
Meta = dict[str, Any]

#: the stages of the protocol between the pipeline and the sites: name -> "query" (statistics, one exchange)
#: or "train" (a round of local training); engines name their messages after these (one place)
STAGES: dict[str, str] = {
    "describe": "query", "reducer": "query", "reducer_fit": "query", "reduce": "query", "upsampler": "query",
    "upsampler_round": "train", "upsampler_heldout": "query", "generator_means": "query", "generator_statistics": "query",
    "generator_fit": "query", "generator_heldout": "query", "generator_round": "train", "private": "query",
}


def pack(prefix: str, state: Mapping[str, Tensor]) -> Arrays:
    return {f"{prefix}{k}": v.detach().to("cpu") for k, v in state.items()}


def unpack(prefix: str, arrays: Mapping[str, Tensor]) -> Arrays:
    return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}


def flatten_optimizers(optimizers: Mapping[str, torch.optim.Optimizer]) -> tuple[Arrays, Meta]:
    """Named optimisers -> tensors ``<name>.<param id>.<state key>`` (CPU) and a JSON document."""
    from feda2v_toolkit.training.checkpoint import flatten_optimizer

    tensors: Arrays = {}
    docs: Meta = {}
    for name, opt in optimizers.items():
        t, doc = flatten_optimizer(name, opt.state_dict())
        tensors.update({k: v.detach().to("cpu") for k, v in t.items()})
        docs[name] = doc
    return tensors, docs


def restore_optimizers(optimizers: Mapping[str, torch.optim.Optimizer], tensors: Mapping[str, Tensor],
                       docs: Mapping[str, Any]) -> None:
    from feda2v_toolkit.training.checkpoint import unflatten_optimizer

    for name, opt in optimizers.items():
        if name in docs:
            opt.load_state_dict(unflatten_optimizer(name, tensors, docs[name]))


#: the largest magnitude of a reduced value the float32 passes accept: its square summed over a million clips of
#: 16 x 768 values stays far below float32's largest number (3.4e38)
MAX_MAGNITUDE = 1e15


class Site:
    """One site's data and training state (module docstring).

    ``index`` is the site's position in the run (0 for ``train``; the pipeline orders sites by name): it enters
    every seed the site derives, so the same data at the same position trains the same way on any engine. A
    site made before the pipeline has ordered the sites (``index=None``) gets its position with the next
    request.
    """

    def __init__(self, data: str | os.PathLike[str] | Dataset, spec: RunSpec, index: int | None = 0, *,
                 name: str | None = None, device: str | torch.device = "cpu", ranks: Ranks | None = None) -> None:
        from feda2v_toolkit.data.open import open_dataset
        from feda2v_toolkit.runtime.threads import settle_vector_math

        settle_vector_math()  # the same bytes on every run (runtime.threads)
        self.ds = data if isinstance(data, Dataset) else open_dataset(data)
        if spec.classes is not None:  # generator_classes: this run trains on these classes' clips only
            keep = torch.tensor([self.ds.class_names.index(c) for c in spec.classes if c in self.ds.class_names])
            missing = [c for c in spec.classes if c not in self.ds.class_names]
            if missing:
                raise InputError(f"{self.ds.path}: generator_classes names {short_list(map(repr, missing))}, which "
                                 f"the data does not have (classes: {short_list(self.ds.class_names, 10)})")
            self.ds = self.ds.subset(torch.isin(self.ds.labels, keep).nonzero().flatten(), classes=spec.classes)
        self.spec = spec
        self.index = index
        self.name = name or Path(self.ds.path).name
        self.device = torch.device(device)
        self._split: tuple[Tensor, Tensor] | None = None
        self.cache: ReducedCache | None = None
        self.store: Arrays = {}  # what must survive the site being rebuilt (reducer state, normalisation)
        self.on_step: Callable[[int], None] | None = None  # progress of in-process engines
        self.generation = 0  # how many times an engine saved ``store`` for this site (see federated.app)
        self.private = dp_requested(spec.config)  # record-level DP (training.private)
        self.privacy: Any = None  # its SitePrivacy, made with the first private request
        self.ranks = ranks or Ranks()  # data-parallel ranks sharing this site's blocks (runtime.ranks)
        self._upsampler_sums: Arrays | None = None  # a closed-form upsampler's statistics, taken while reducing
        self._heldout_sums: Arrays | None = None  # held-out sums for the upsampler's error, taken while reducing

    def close(self) -> None:
        """Release the reduced cache (its temporary file when on disk); the site can reduce again later."""
        if self.cache is not None:
            self.cache.close()
            self.cache = None

    @property
    def cfg(self) -> dict[str, Any]:
        return self.spec.config

    def set_index(self, index: int) -> None:
        if index != self.index:
            if self._split is not None:
                raise InputError(f"{self.name}: the pipeline moved this site from position {self.index} to {index} "
                                 f"after its split was drawn")
            self.index = index

    def _split_rows(self) -> tuple[Tensor, Tensor]:
        if self._split is None:
            if self.index is None:
                raise RuntimeError("the site's position in the run is not known yet")
            self._split = stratified_split(self.ds.labels, self.spec.validation_split,
                                           derive_seed(self.spec.seed, "split", self.index))
        return self._split

    @property
    def train_idx(self) -> Tensor:
        return self._split_rows()[0]

    @property
    def val_idx(self) -> Tensor:
        return self._split_rows()[1]

    # -- components built from the run's config ----------------------------------------------------
    def _reducer(self) -> Any:
        from feda2v_toolkit.plugins import get_registry

        return get_registry().load("reducer", self.spec.reducer).from_config(
            self.cfg, length=self.spec.training_length, full_length=self.ds.seq_len, dim=self.ds.dim)

    def _upsampler(self) -> Any:
        from feda2v_toolkit.plugins import get_registry

        return get_registry().load("upsampler", self.spec.upsampler).from_config(
            self.cfg, reduced_length=self.spec.training_length, full_length=self.ds.seq_len, dim=self.ds.dim)

    def _generator(self, class_names: list[str]) -> Any:
        from feda2v_toolkit.plugins import get_registry

        gen_cls = get_registry().load("generator", self.spec.generator_type)
        return gen_cls.from_config(self.cfg, seq_len=self.spec.training_length, dim=self.ds.dim,
                                   num_classes=len(class_names), condition_dim=self.ds.condition_dim)

    # -- stages --------------------------------------------------------------------------------------
    def describe(self) -> Meta:
        summary = ClassesStage().local(self.ds)
        if self.private:  # the counts leave only noised (the "private" stage); the class names are public
            summary.class_counts = dict.fromkeys(summary.class_counts, 0)
        return {"summary": summary.to_json(), "name": self.name, "private": self.private,
                "dtype": str(self.ds.storage_dtype).replace("torch.", "")}

    def split_counts(self) -> Meta:
        """How many clips the site trains on and holds out, per class (after its split)."""
        if self.private:  # withheld: the pipeline works from the noisy class counts
            return {"train": 0, "heldout": 0, "train_counts": {}}
        counts = torch.bincount(self.ds.labels[self.train_idx], minlength=self.ds.num_classes).tolist()
        return {"train": int(self.train_idx.numel()), "heldout": int(self.val_idx.numel()),
                "train_counts": {c: int(k) for c, k in zip(self.ds.class_names, counts, strict=True) if k}}

    def reducer_statistics(self) -> Arrays:
        reducer = self._reducer()
        return FittedStatisticsStage().local(reducer, full_batches(self.ds, self.train_idx))

    def reducer_fit(self) -> Arrays:
        """A fitted reducer without mergeable statistics, fitted here (one site only)."""
        reducer = self._reducer().to(self.device)
        reducer.fit(full_batches(self.ds, self.train_idx))
        return dict(reducer.state_dict())

    def reduce(self, state: Mapping[str, Tensor], class_names: list[str]) -> tuple[Arrays, Meta]:
        """Load the run's reducer, reduce every local sequence once (raw cache); release the normalisation sums.

        One read of the data, block by block (:mod:`feda2v_toolkit.runtime.ranks`): each block's sequences are
        reduced into the cache, and the block's normalisation sums and -- for a closed-form upsampler such as
        ``lstsq`` -- its (reduced, full) statistics are taken from the same read; the blocks' parts add up in
        block order (on every rank, whatever the number of ranks)."""
        from feda2v_toolkit.runtime.resources import cache_in_memory

        reducer = self._reducer()
        reducer.load_state_dict(dict(state))
        reducer.to(self.device).eval()
        to_global = torch.tensor([class_names.index(c) for c in self.ds.class_names], dtype=torch.long)
        conditions = self.ds.read_conditions(range(len(self.ds))) if self.ds.condition_dim else None
        n, length, dim = len(self.ds), self.spec.training_length, self.ds.dim
        self.close()
        self.cache = ReducedCache(n, length, dim, to_global[self.ds.labels], conditions,
                                  in_memory=cache_in_memory(n * length * dim * 4))
        ups = self._upsampler()
        fuse = fitted_while_reducing(ups) and not self.private
        held_sums = fuse and heldout_from_sums(ups) and self.val_idx.numel() > 0
        is_train = torch.zeros(n, dtype=torch.bool)
        is_train[self.train_idx] = True
        chunk = read_chunk_rows(self.ds)
        check_reduced = reducer.propagates_non_finite
        digests: list[bytes] = []

        def block(b: int) -> Arrays:
            lo, hi = block_range(b, n)
            values = torch.empty(hi - lo, length, dim)
            part: Arrays = {}
            held = ups.heldout_sums() if held_sums else None

            def chunks() -> Any:  # each chunk read and reduced once; its training rows paired with their reductions
                for batch in self.ds.stream([torch.arange(s, min(s + chunk, hi)) for s in range(lo, hi, chunk)],
                                            check_finite=not check_reduced):
                    s, full = int(batch.indices[0]), batch.embeddings
                    r = reducer(full.to(self.device)).to("cpu", torch.float32)
                    if check_reduced:  # NaN / inf in the clips show in their reductions: no extra pass over them
                        self.ds.check_finite(full, batch.indices, summary=r)
                    values[s - lo:s - lo + r.shape[0]] = r
                    trained = is_train[s:s + r.shape[0]]
                    for a, z in contiguous_runs(trained.nonzero().flatten().tolist()):  # views, never copies
                        yield r[a:z], full[a:z]
                    if held is not None:  # the held-out rows' sums for the upsampler's held-out error, same read
                        for a, z in contiguous_runs((~trained).nonzero().flatten().tolist()):
                            held.add(r[a:z], full[a:z])

            with torch.no_grad():
                if fuse and bool(is_train[lo:hi].any()):  # the block's statistics from the same read, in one call
                    part = pack("ups.", ups.fit_statistics(chunks))
                else:
                    for _ in chunks():
                        pass
            if held is not None:
                part.update(pack("held.", held.state()))
            part.update(pack("norm.", NormalizationStage().local(values, is_train[lo:hi].nonzero().flatten())))
            self._check_magnitude(values, part, lo, hi)
            part["block"] = torch.tensor([b, lo])
            part["digest"] = torch.frombuffer(bytearray(block_digest(values)), dtype=torch.uint8)
            part["values"] = values
            return part

        def merge(acc: Arrays | None, part: Arrays) -> Arrays:
            assert self.cache is not None
            self.cache.write(int(part["block"][1]), part.pop("values"))
            digests.append(bytes(part.pop("digest").numpy().tobytes()))
            part.pop("block")
            return add_parts(acc, part)

        t0 = time.perf_counter()
        sums = self.ranks.combine(block_count(n), block, merge) or {}
        seconds = time.perf_counter() - t0
        self._upsampler_sums = unpack("ups.", sums) or None  # none unless fused and the site has training clips
        self._heldout_sums = unpack("held.", sums) or None  # none unless the upsampler computes from sums
        self.store.update(pack("reducer.", state))
        self.store["reduced"] = torch.ones(())  # marks a reducer as set (a reducer may have no state at all)
        self.store["classes"] = torch.tensor([ord(ch) for ch in json.dumps(class_names)], dtype=torch.int32)
        part = unpack("norm.", sums) if self.spec.normalize and not self.private else {}
        return part, {"fingerprint": cache_fingerprint(self.ds.labels, digests), "seconds": seconds,
                      **self.split_counts()}

    def _check_magnitude(self, values: Tensor, sums: Arrays, lo: int, hi: int) -> None:
        """Refuse (:class:`InputError`, naming the data) clips whose values are finite but too large for the
        float32 arithmetic of the pass (their squares overflow): a reduced value beyond :data:`MAX_MAGNITUDE`, or
        a non-finite sum of the block. Audio embeddings are of order 1-100."""
        largest = max(float(values.max()), -float(values.min())) if values.numel() else 0.0  # no |values| copy
        if largest <= MAX_MAGNITUDE and all(bool(torch.isfinite(v).all()) for v in sums.values()):
            return
        found = f"a reduced value of {largest:.3g}" if math.isfinite(largest) else "their averages overflow"
        raise InputError(f"{self.ds.path}: samples {lo}..{hi - 1} hold values too large in magnitude for float32 "
                         f"arithmetic ({found}; at most {MAX_MAGNITUDE:.0e}): rescale the embeddings")

    def _raw(self) -> Any:
        assert self.cache is not None, "the site has not reduced its data"
        return self.cache.raw

    def _pairs(self, *ids: Any) -> Any:
        rows = max(1, min(self.spec.batch_size, read_chunk_rows(self.ds)))
        return upsampler_pairs(self.ds, self.train_idx, self._raw(), rows, self.spec.seed, self.index, *ids)

    def upsampler_statistics(self) -> Arrays:
        if self._upsampler_sums is not None:  # taken while reducing (the same sums, one read of the data)
            return dict(self._upsampler_sums)
        return FittedStatisticsStage().local(self._upsampler(), self._pairs())

    def upsampler_round(self, state: Mapping[str, Tensor], round_index: int) -> tuple[Arrays, int, Meta]:
        ups = self._upsampler().to(self.device)
        ups.load_state_dict(dict(state))
        ups.train()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.spec.seed, "upsampler", self.index, round_index))
            metrics = ups.fit(self._pairs(round_index), config=self.cfg) or {}
        return {k: v.detach().cpu() for k, v in ups.state_dict().items()}, int(self.train_idx.numel()), metrics

    def upsampler_heldout(self, state: Mapping[str, Tensor]) -> Arrays:
        ups = self._upsampler().to(self.device)
        ups.load_state_dict(dict(state))
        if self._heldout_sums is not None:  # taken while reducing: no second read of the held-out clips
            return ups.heldout_errors(self._heldout_sums)
        n = len(self.ds)
        return self.ranks.combine(block_count(n), lambda b: heldout_reconstruction(
            self.ds, in_block(self.val_idx, b, n), self._raw(), ups, self.device), add_parts) or {}

    def set_normalization(self, norm: Mapping[str, Tensor]) -> None:
        assert self.cache is not None
        if not self.cache.standardized:
            self.cache.standardize({k: v.to(torch.float32) for k, v in norm.items()})
            self.store.update(pack("norm.", norm))
            self.store["standardized"] = torch.ones(())

    def restore(self) -> None:
        """Rebuild the reduced (and standardised) cache from what an earlier message left in ``store``."""
        if "reduced" in self.store and self.cache is None:
            classes = json.loads("".join(chr(int(c)) for c in self.store["classes"].tolist()))
            self.reduce(unpack("reducer.", self.store), classes)
            if "standardized" in self.store:
                self.set_normalization(unpack("norm.", self.store))

    # -- record-level differential privacy (training.private) ----------------------------------------------
    def private_release(self, arrays: Mapping[str, Tensor], meta: Mapping[str, Any]) -> Arrays:
        """One noisy release of a private run (:class:`feda2v_toolkit.training.private.SitePrivacy`)."""
        from feda2v_toolkit.training.private import SitePrivacy, make_plan, settings_of

        if not self.private:
            raise InputError(f"{self.name}: a private release was asked of a site whose config sets no "
                             "generator_dp_epsilon")
        if self.privacy is None:
            p = meta["plan"]
            settings = settings_of(self.spec)
            assert settings is not None
            plan = make_plan(self.spec, settings, full_length=self.ds.seq_len, dim=self.ds.dim,
                             class_names=list(p["class_names"]), groups=p["groups"],
                             condition_dim=self.ds.condition_dim, epochs=int(p["epochs"]),
                             n_records=int(self.train_idx.numel()))
            rng = None
            if self.ranks.distributed:  # one site's ranks noise each release once, alike: rank 0's secret seed
                import secrets

                rng = torch.Generator().manual_seed(int(self.ranks.all_strings(str(secrets.randbits(63)))[0]))
            self.privacy = SitePrivacy(plan, int(self.train_idx.numel()), str(self.ds.path), rng=rng)
            self.privacy.load_store(self.store)
        step = str(meta["step"])
        if step == "ledger":
            return {}
        norm = unpack("norm.", arrays)
        if norm and self.cache is not None and not self.cache.standardized:
            self.set_normalization(norm)  # the gaussian's statistics are taken in the normalised space
        if step == "counts":
            out = self.privacy.answer(step, None, self._private_labels(self.train_idx, meta), arrays, meta)
        else:
            out = self.privacy.release_step(step, self._private_part(step, arrays, meta), meta)
        self.store.update(self.privacy.to_store())
        return out

    def _private_labels(self, rows: Tensor, meta: Mapping[str, Any]) -> Tensor:
        if self.cache is not None:  # reduced: the cache holds the run's class indices
            return self.cache.labels[rows]
        names = list(meta["plan"]["class_names"])
        to_global = torch.tensor([names.index(c) for c in self.ds.class_names], dtype=torch.long)
        return to_global[self.ds.labels[rows]]

    def _private_part(self, step: str, arrays: Mapping[str, Tensor], meta: Mapping[str, Any]) -> Arrays:
        """The exact part of private ``step`` over the site's training clips, one block of rows at a time
        (:mod:`feda2v_toolkit.runtime.ranks`: in block order, shared out over the ranks), so that memory does
        not grow with the clips; noised once, after the blocks are summed."""
        n, chunk = len(self.ds), read_chunk_rows(self.ds)

        def block(b: int) -> Arrays:
            rows = in_block(self.train_idx, b, n)
            if rows.numel() == 0:
                return {}
            cache = self.cache
            x = cache.read(rows) if cache is not None and not step.startswith(("lstsq.", "pca.")) else None
            pairs = upsampler_pairs(self.ds, rows, cache.raw, chunk, self.spec.seed, self.index, "private", b) \
                if cache is not None else None
            return self.privacy.local(step, x, self._private_labels(rows, meta), arrays, meta,
                                      full=full_batches(self.ds, rows, chunk), pairs=pairs)

        part = self.ranks.combine(block_count(n), block, add_parts)
        if not part:
            raise InputError(f"{self.name}: a private release needs training clips, and this site has none")
        return part

    def _rows_of(self, members: list[str], class_names: list[str], rows: Tensor) -> Tensor:
        assert self.cache is not None
        ids = torch.tensor([class_names.index(c) for c in members], dtype=torch.long)
        return rows[torch.isin(self.cache.labels[rows], ids)]

    def generator_means(self, keys: list[str], groups: Mapping[str, list[str]], class_names: list[str]) -> Arrays:
        """Closed-form generators fitted from two exchanges (:meth:`GeneratorStatisticsStage.two_exchanges`): each
        held key's per class count and sum of its training sequences here, as ``g{i}.``-prefixed arrays (block
        by block in order over the ranks, summed)."""
        assert self.cache is not None and self.cache.standardized
        out: Arrays = {}
        stage = GeneratorStatisticsStage()
        for i, key in enumerate(keys):
            idx = self._rows_of(groups[key], class_names, self.train_idx)
            if idx.numel() == 0:
                continue
            gen = self._generator(class_names)
            out.update(pack(f"g{i}.", self._over_blocks(
                idx, lambda x, labels, _, gen=gen: stage.means_local(gen, x, labels), add_parts)))
        return out

    def generator_statistics(self, keys: list[str], groups: Mapping[str, list[str]], class_names: list[str],
                             means: Mapping[str, Tensor] | None = None) -> tuple[Arrays, Meta]:
        """Closed-form generators: each held key's statistics of its training sequences here (about the merged
        ``means`` of that key, when its type takes them), as ``g{i}.``-prefixed arrays; the meta says which
        directions of the within-class scatter were left out (a factor keeps at most the generator's rank)."""
        assert self.cache is not None and self.cache.standardized
        out: Arrays = {}
        examples: dict[str, int] = {}
        truncated: dict[str, dict[str, Any]] = {}
        for i, key in enumerate(keys):
            idx = self._rows_of(groups[key], class_names, self.train_idx)
            if idx.numel() == 0:
                continue
            gen = self._generator(class_names)
            stats = self._block_statistics(gen, idx, None if means is None else means.get(key))
            counts = stats["counts"]
            kept = float(stats["factors"].square().sum())
            left_out = 1.0 - kept / max(float(stats["square"].sum()), 1e-300)
            if "factor_rows" in stats:  # per class: a class with more sequences than the rank keeps its top ones
                rows = stats["factor_rows"]
                short = (rows < (counts - 1).clamp(min=0)).nonzero().flatten().tolist()
                if short:
                    truncated[key] = {"classes": [class_names[c] if gen.conditioning == "label" else key
                                                  for c in short], "variance_left_out": left_out}
            elif left_out > 1e-9:  # pooled about the merged means: its top directions were kept
                truncated[key] = {"directions": int(stats["factors"].shape[0]), "variance_left_out": left_out}
            out.update(pack(f"g{i}.", stats))
            examples[key] = int(idx.numel())
        return out, {"examples": examples, "truncated": truncated}

    def _block_statistics(self, gen: Any, idx: Tensor, means: Tensor | None = None) -> Arrays:
        """``gen``'s statistics of the rows ``idx`` (about ``means`` if given), block by block in the ranks' fixed
        lanes, merged up their fixed tree (:class:`GeneratorStatisticsStage`: exact per block, streamed, cut to the
        generator's rank at the end; the re-factoring at each merge is most of the cost, so the ranks share the
        merges out too: :meth:`~feda2v_toolkit.runtime.ranks.Ranks.combine_lanes`)."""
        stage = GeneratorStatisticsStage()
        return stage.compact(gen, self._over_blocks(idx, lambda x, labels, conditions: stage.local(
            gen, x, labels, conditions, means=means), lambda acc, part: stage.accumulate(gen, acc, part),
            combine=self.ranks.combine_lanes))

    def _over_blocks(self, idx: Tensor, local: Any, merge: Any, combine: Any = None) -> Arrays:
        """``local(x, labels, conditions)`` of the reduced cache's rows ``idx`` block by block, merged by
        ``combine`` (default: in block order over the ranks, :meth:`~feda2v_toolkit.runtime.ranks.Ranks.combine`;
        ``Ranks.combine_lanes`` for a costly merge); ``{}`` when there are none."""
        assert self.cache is not None
        read, n = self.cache.reader(torch.device("cpu")), len(self.ds)

        def block(b: int) -> Arrays:
            rows = in_block(idx, b, n)
            return local(*read(rows)) if rows.numel() else {}

        return (combine or self.ranks.combine)(block_count(n), block, merge) or {}

    def generator_fit(self, keys: list[str], groups: Mapping[str, list[str]],
                      class_names: list[str]) -> tuple[Arrays, Meta]:
        """Closed-form generators without mergeable statistics (e.g. conditioned on condition embeddings),
        fitted here on all of each key's training sequences (one site only)."""
        assert self.cache is not None and self.cache.standardized
        out: Arrays = {}
        fits: dict[str, dict[str, float]] = {}
        for i, key in enumerate(keys):
            idx = self._rows_of(groups[key], class_names, self.train_idx)
            if idx.numel() == 0:
                continue
            gen = self._generator(class_names).to(self.device)
            x, labels, conditions = self.cache.reader(self.device)(idx)
            fits[key] = {k: float(v) for k, v in gen.fit(x, labels=labels, conditions=conditions,
                                                         seed=derive_seed(self.spec.seed, "fit", key)).items()}
            out.update(pack(f"g{i}.", gen.state_dict()))
        return out, {"fit": fits}

    def generator_heldout(self, keys: list[str], groups: Mapping[str, list[str]], class_names: list[str],
                          states: Mapping[str, Arrays]) -> tuple[dict[str, float], int]:
        """Held-out loss terms of the given (fitted) generators over this site's held-out rows."""
        assert self.cache is not None and self.cache.standardized
        rows, weights = [], []
        read = self.cache.reader(self.device)
        for key in keys:
            if key not in states:
                continue
            val = self._rows_of(groups[key], class_names, self.val_idx)
            if val.numel() == 0:
                continue
            gen = self._generator(class_names).to(self.device)
            gen.load_state_dict(dict(states[key]))
            ctx = TrainContext(epoch=0, total_epochs=1, step=0, progress=1.0, config=self.cfg,
                               autocast_dtype=self.spec.autocast_dtype, device=self.device)
            terms, count = validate(gen, EpochData(read, val[:0], val), self.spec.batch_size, ctx)
            rows.append(terms)
            weights.append(count)
        return mean_terms(rows, weights), int(sum(weights))

    def generator_round(self, keys: list[str], groups: Mapping[str, list[str]], class_names: list[str],
                        states: Mapping[str, Arrays], optim: Mapping[str, tuple[Arrays, Meta]], epochs: list[int],
                        total_epochs: int) -> tuple[WeightsPart, list[dict[str, Any]], dict[str, Meta]]:
        """Local epochs ``epochs`` of every generator this site holds data for, from ``states`` (and optimiser
        state ``optim``). Returns the :class:`WeightsPart` (weights and optimiser tensors per key), the
        per-epoch records (merged over keys) and the optimisers' JSON documents per key."""
        assert self.cache is not None and self.cache.standardized
        spec = self.spec
        weights: dict[str, Arrays] = {}
        optimizers: dict[str, Arrays] = {}
        docs: dict[str, Meta] = {}
        examples: dict[str, int] = {}
        per_epoch: dict[int, list[tuple[dict[str, Any], str]]] = {}
        read = self.cache.reader(self.device)
        for key in keys:
            if key not in states:
                continue
            data = EpochData(read, self._rows_of(groups[key], class_names, self.train_idx),
                             self._rows_of(groups[key], class_names, self.val_idx))
            if data.train.numel() == 0:
                continue
            gen = self._generator(class_names).to(self.device)
            gen.load_state_dict(dict(states[key]))
            opts = gen.configure_optimizers(self.cfg)
            if key in optim:
                restore_optimizers(opts, *optim[key])
            per = math.ceil(data.train.numel() / spec.batch_size)
            if self.private:
                if not self.privacy.trains(key):  # post-processing of its own noisy counts: nothing to train
                    continue
                with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                    records = self._private_epochs(key, gen, opts, data, epochs, total_epochs)
                weights[key] = {k: v.detach().to("cpu") for k, v in gen.state_dict().items()}
                optimizers[key], docs[key] = flatten_optimizers(opts)
                examples[key] = max(1, round(self.privacy.key_records()[key]))  # noisy: FedAvg weights
                for r in records:
                    per_epoch.setdefault(r["epoch"], []).append((r, key))
                continue
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                records = train_epochs(
                    gen, opts, data, epochs=epochs, total_epochs=total_epochs, batch_size=spec.batch_size,
                    epoch_seed=lambda e, key=key: derive_seed(spec.seed, "epoch", self.index, key, e),
                    step=epochs[0] * per if epochs else 0, config=self.cfg,
                    validation_frequency=spec.validation_frequency, autocast_dtype=spec.autocast_dtype,
                    device=self.device, where=f", generator {key!r}" + (f", {self.name}" if self.index else ""),
                    on_step=(lambda _t, _n: self.on_step(1)) if self.on_step else None,  # one tick a step
                    step_fn=data_parallel_step(gen, opts, self.ranks) if self.ranks.distributed else None)
            weights[key] = {k: v.detach().to("cpu") for k, v in gen.state_dict().items()}
            optimizers[key], docs[key] = flatten_optimizers(opts)
            examples[key] = int(data.train.numel())
            for r in records:
                per_epoch.setdefault(r["epoch"], []).append((r, key))
            del gen, opts
        merged = [merge_epoch_records([r for r, _ in rows]) for _, rows in sorted(per_epoch.items())]
        return WeightsPart(weights, examples, {}, optimizers), merged, docs


    def _private_epochs(self, key: str, gen: Any, opts: Mapping[str, torch.optim.Optimizer], data: EpochData,
                        epochs: list[int], total_epochs: int) -> list[dict[str, Any]]:
        """DP-SGD epochs of generator ``key`` (docs/privacy.md): Poisson batches at the planned rate from secret
        randomness, per-clip gradients clipped and noised, each step recorded in the site's ledger. Records
        carry no loss terms (functions of the clips) and no held-out loss."""
        from feda2v_toolkit.privacy.sgd import make_private

        pv, spec = self.privacy, self.spec
        if pv is None:
            raise InputError(f"{self.name}: DP-SGD before the run's private releases")
        steps_per_batch = int(gen.private_steps_per_batch(self.cfg))
        plan = pv.sgd(total_epochs, spec.batch_size, steps_per_batch)
        planned = plan[f"generator.{key}.sgd"]
        q = float(planned.spec.sampling_rate)
        per_epoch = planned.spec.compositions // max(total_epochs, 1)
        entry = pv.ledger.entries.get(planned.spec.name)
        done = entry.compositions if entry is not None else 0
        if done + per_epoch * len(epochs) > planned.spec.compositions:
            raise PrivacyError(f"{self.name}: generator {key!r}: {len(epochs)} more epochs of DP-SGD would exceed the "
                               f"planned {planned.spec.compositions} steps (the privacy budget); refusing")
        ranks = self.ranks
        pt = make_private(gen, opts, planned.noise_multiplier, pv.plan.settings.max_grad_norm, spec.batch_size,
                          config=self.cfg, rng=pv.rng,
                          sum_over_ranks=ranks.sum_tensors if ranks.distributed else None)

        def poisson(rows: Tensor, _g: torch.Generator) -> list[Tensor]:
            return [rows[torch.rand(rows.numel(), generator=pv.rng) < q] for _ in range(per_epoch)]

        def step(x: Tensor, labels: Tensor | None, conditions: Tensor | None, ctx: TrainContext) -> dict[str, float]:
            if not ranks.distributed:
                return pt.step(x, labels=labels, conditions=conditions, ctx=ctx, ledger=pv.ledger,
                               release=planned.spec.name, sampling_rate=q, group=planned.spec.group)
            # data-parallel: every rank drew the same Poisson batch (the site's shared secret generator) and
            # computes its share rows[rank::world] (possibly none: a noise-only step) with its own noise; the
            # private optimisers sum the ranks' clipped gradients before the one draw of noise
            sl = slice(ranks.rank, None, ranks.world)
            step_seed = int(torch.randint(0, 2**62, (1,)))
            torch.manual_seed(derive_seed(step_seed, "rank", ranks.rank))
            terms = pt.step(x[sl], labels=labels[sl] if labels is not None else None,
                            conditions=conditions[sl] if conditions is not None else None, ctx=ctx,
                            ledger=pv.ledger, release=planned.spec.name, sampling_rate=q, group=planned.spec.group)
            torch.manual_seed(derive_seed(step_seed, "after"))  # the run's stream again, alike on every rank
            diverged = torch.tensor([0.0 if all(math.isfinite(v) for v in terms.values()) else 1.0])
            ranks.sum_tensors([diverged])  # one rank's NaN stops every rank (none waits for the others)
            return {"loss": math.nan} if float(diverged) else terms

        try:
            records = train_epochs(
                gen, pt.optimizers, EpochData(data.read, data.train, data.train[:0]), epochs=epochs,
                total_epochs=total_epochs, batch_size=spec.batch_size,
                epoch_seed=lambda e: derive_seed(spec.seed, "epoch", self.index, key, e), step=0, config=self.cfg,
                validation_frequency=spec.validation_frequency, autocast_dtype=spec.autocast_dtype,
                device=self.device, where=f", generator {key!r}", batch_rows=poisson, step_fn=step,
                on_step=(lambda _t, n: self.on_step(1)) if self.on_step else None)
        finally:
            pt.close()
            self.store.update(pv.to_store())
        return [{**r, "train": {}, "examples": 0} for r in records]


def merge_epoch_records(records: list[dict[str, Any]]) -> dict[str, Any]:
    """One epoch's records of several generators (or sites) as one: terms weighted by examples."""
    out: dict[str, Any] = {"epoch": records[0]["epoch"],
                           "train": mean_terms([r["train"] for r in records], [r["examples"] for r in records]),
                           "examples": sum(r["examples"] for r in records),
                           "steps": sum(r["steps"] for r in records),
                           "seconds": sum(r.get("seconds", 0.0) for r in records)}
    vals = [r for r in records if r.get("val")]
    if vals:
        out["val"] = mean_terms([r["val"] for r in vals], [r["val_examples"] for r in vals])
        out["val_examples"] = sum(r["val_examples"] for r in vals)
    return out


def handle(site: Site, stage: str, arrays: Mapping[str, Tensor], meta: Mapping[str, Any]) -> tuple[Arrays, Meta]:
    """Answer one request of the pipeline: the site's release for ``stage``."""
    if stage == "describe":
        return {}, site.describe()
    if int(meta.get("site", -1)) >= 0:
        site.set_index(int(meta["site"]))
    site.restore()
    t0 = time.perf_counter()
    if stage == "reducer":
        return site.reducer_statistics(), {}
    if stage == "reducer_fit":
        return pack("reducer.", site.reducer_fit()), {}
    if stage == "reduce":
        return site.reduce(unpack("reducer.", arrays), list(meta["class_names"]))
    if stage == "upsampler":
        return site.upsampler_statistics(), {}
    if stage == "upsampler_round":
        state, n, metrics = site.upsampler_round(unpack("upsampler.", arrays), int(meta["round"]))
        return pack("upsampler.", state), {"examples": n, "metrics": _jsonable(metrics)}
    if stage == "upsampler_heldout":
        return site.upsampler_heldout(unpack("upsampler.", arrays)), {}
    if stage == "private":
        out = site.private_release(arrays, meta)
        return out, {"ledger": site.privacy.ledger.to_json() if site.privacy is not None else None}
    norm = unpack("norm.", arrays)
    if site.cache is not None and not site.cache.standardized:
        site.set_normalization(norm)
    keys, groups, classes = list(meta["keys"]), meta["groups"], list(meta["class_names"])
    if stage == "generator_means":
        return site.generator_means(keys, groups, classes), {"seconds": time.perf_counter() - t0}
    if stage == "generator_statistics":
        means = {key: m["means"] for key, m in ((key, unpack(f"m{i}.", arrays)) for i, key in enumerate(keys)) if m}
        out, info = site.generator_statistics(keys, groups, classes, means or None)
        return out, {**info, "seconds": time.perf_counter() - t0}
    if stage == "generator_fit":
        out, info = site.generator_fit(keys, groups, classes)
        return out, {**info, "seconds": time.perf_counter() - t0}
    if stage == "generator_heldout":
        states = {key: unpack(f"g{i}.", arrays) for i, key in enumerate(keys)}
        val, count = site.generator_heldout(keys, groups, classes, {k: v for k, v in states.items() if v})
        return {}, {"val": val, "count": count}
    if stage == "generator_round":
        states = {key: unpack(f"g{i}.", arrays) for i, key in enumerate(keys)}
        optim = {key: (unpack(f"o{i}.", arrays), meta["optimizers"][key])
                 for i, key in enumerate(keys) if key in meta.get("optimizers", {})}
        part, records, docs = site.generator_round(keys, groups, classes, {k: v for k, v in states.items() if v},
                                                   optim, list(meta["epochs"]), int(meta["total_epochs"]))
        send_optimizers = bool(meta.get("return_optimizers", True))
        # the reply carries every array of the request, in its order (what it did not train unchanged), as
        # Flower's fixedclipping_mod requires: the update it clips is reply minus request
        out: Arrays = dict(arrays)
        for i, key in enumerate(keys):
            if key in part.weights:
                out.update(pack(f"g{i}.", part.weights[key]))
                if send_optimizers:
                    out.update(pack(f"o{i}.", part.optimizers[key]))
        return out, {"examples": part.examples, "records": _jsonable(records),
                     "optimizers": docs if send_optimizers else {},
                     "seconds": time.perf_counter() - t0}
    raise ValueError(f"unknown stage {stage!r}")


def _jsonable(metrics: Any) -> Any:
    return json.loads(json.dumps(metrics, default=float))


def refuse_multi_site(what: str, sites: int) -> None:
    if sites > 1:
        raise InputError(f"{what} cannot be trained over {sites} sites (it has no mergeable statistics); "
                         f"use one site or another component")
