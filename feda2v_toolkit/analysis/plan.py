"""``feda2v-tk plan``: exact parameter counts and memory for training and generation, per training length.

Nothing real is allocated:

* **parameters** are counted on a model built on the ``meta`` device through the registry, exactly as the
  trainer builds it (``from_config(config, seq_len=l, dim=D, num_classes=..., condition_dim=...)``);
* **training memory** is the simulated peak of two real ``training_step`` calls of that generator on fake
  tensors (:mod:`.memory`): weights, gradients, the optimiser state its own ``configure_optimizers``
  creates, the batch at ``generator_batch_size``, autocast copies and activations at the configured
  dtype, and the temporaries live at the worst moment. With several generators (``per_class`` /
  ``per_group``) all of them keep weights, gradients and optimiser state while one trains. With
  ``--num-samples`` the trainer's reduced-data cache is added (``N * l * D`` float32; past a quarter of the memory
  budget it is on disk, and only the blocks on their way to it count). So are the passes over full sequences,
  but only where they exceed the training steps: they end, their buffers freed and handed back, before any
  generator is built. A pass holds a read chunk (``training.READ_CHUNK_BYTES``; or the held-out pass's chunk
  of a block's held-out rows, its two reconstructions and one difference, whichever is larger), two read
  chunks that the allocator keeps for reuse (:mod:`feda2v_toolkit.runtime.malloc`) and the buffers of the
  chunks read ahead (:mod:`feda2v_toolkit.data.readahead`);
* **generation memory** is the simulated peak of sampling one batch and upsampling it to the output length
  (in pieces when a whole batch's working set exceeds half the memory budget:
  :func:`~feda2v_toolkit.model.generate.upsample_rows`), plus every generator's weights and the shard
  writer's rows in flight (it writes rows to disk as they come: the previous piece, converted, while the next
  is upsampled);
* **runtime** is this process's own resident memory (Python, torch, the registry): the part of a real run
  the tensors do not account for;
* **allocator allowance**: a real process holds more than its live tensors -- the allocator keeps freed
  blocks, math libraries pack weights into scratch buffers. Measured on CPU (``tests/analysis/
  test_plan.py``), the peak resident memory of training steps exceeded the simulated tensor peak by 5-26%;
  totals add ``ALLOCATOR_ALLOWANCE`` (15%) of the simulated peaks.
"""

from __future__ import annotations

import math
import os
import resource
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from feda2v_toolkit.analysis.memory import SavedTensors, fake_tensors, optimizer_state_bytes, tensor_bytes
from feda2v_toolkit.components import TrainContext
from feda2v_toolkit.config import configured_upsampler
from feda2v_toolkit.data.readahead import pass_buffer_bytes
from feda2v_toolkit.errors import UsageError
from feda2v_toolkit.model.generate import DEFAULT_BATCH, upsample_rows
from feda2v_toolkit.runtime.malloc import STREAM_BUFFER_BYTES
from feda2v_toolkit.runtime.ranks import BLOCK_ROWS, block_count, waiting_halves
from feda2v_toolkit.runtime.resources import cache_in_memory
from feda2v_toolkit.runtime.resources import memory_budget as default_budget
from feda2v_toolkit.runtime.sizes import format_bytes
from feda2v_toolkit.training.stages import STREAM_KEEP, GeneratorStatisticsStage, has_statistics
from feda2v_toolkit.training.streams import PENDING_WRITES, chunk_rows

ALLOCATOR_ALLOWANCE = 0.15  # share of the simulated tensor peak added for allocator caching and library buffers


@dataclass
class TrainMemory:
    """Bytes of one training run at one length (see the module docstring)."""

    weights: int
    gradients: int
    optimizer: int
    batch: int
    activations: int | None  # saved for backward in one training step (autocast copies included)
    step_peak: int  # simulated peak of one generator's training step
    generators: int
    other_generators: int  # weights + gradients + optimiser state of the generators not training
    components: int  # reducer and upsampler state
    data: int  # the reduced-data cache (0 without --num-samples)
    passes: int  # the passes over full-length sequences: read chunks and read-ahead buffers (0 without --num-samples)
    allowance: int  # ALLOCATOR_ALLOWANCE of the tensors
    runtime: int
    total: int
    method: str = "simulated"


@dataclass
class GenerateMemory:
    samples: int  # per batch
    length: int
    upsampled: int  # samples of a batch upsampled at a time (within half the memory budget)
    weights: int  # all generators
    batch_peak: int  # simulated peak of sampling + upsampling one batch, beyond the weights
    writer_buffer: int
    allowance: int
    runtime: int
    total: int


@dataclass
class LengthPlan:
    length: int
    parameters: dict[str, int]  # per component of one generator
    parameters_per_generator: int
    parameters_total: int  # all generators
    component_state: dict[str, int]  # elements of reducer / upsampler state (parameters + buffers)
    train: TrainMemory
    generate: GenerateMemory
    fits: bool | None = None


#: classes assumed when neither data nor a class count is given (per-class sizes depend on it)
ASSUMED_CLASSES = 10


@dataclass
class PlanResult:
    generator_type: str
    granularity: str
    generators: int
    reducer: str
    upsampler: str
    dim: int
    full_length: int
    num_classes: int
    condition_dim: int
    num_samples: int
    batch_size: int
    dtype: str
    optimizers: dict[str, str]
    configured_length: int
    output_length: int
    output_length_set: bool
    runtime: int
    rows: list[LengthPlan]
    budget: int | None = None
    largest_length: int | None = None
    largest_length_plan: LengthPlan | None = None
    notes: list[str] = field(default_factory=list)
    classes_assumed: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def resolve_config(config: Any = None, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The resolved generator section (schema defaults filled in) of a path, JSON text or mapping."""
    from feda2v_toolkit.config import load_config

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return dict(load_config(config if config is not None else {}, overrides=overrides))


def runtime_bytes() -> int:
    """Resident memory of this process now (Linux ``/proc``), else its peak (``getrusage``)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)


def _generator_count(cfg: Mapping[str, Any], num_classes: int, class_names: Sequence[str] | None = None) -> int:
    """How many generators training builds (:func:`~feda2v_toolkit.training.spec.generator_groups`): for the
    data's ``class_names`` when known, else for ``num_classes`` classes -- those the groups name, then
    unnamed ones."""
    from feda2v_toolkit.training.spec import generator_groups

    if class_names is None:
        grouped = [c for members in (cfg.get("generator_class_groups") or {}).values() for c in members]
        names = list(dict.fromkeys(grouped))
        class_names = names + [f"(unnamed class {i + 1})" for i in range(max(0, num_classes - len(names)))]
    names = list(class_names)
    return max(1, len(generator_groups(cfg, names, names)))


def _numel(tensors: Any) -> int:
    return sum(t.numel() for t in tensors)


class Planner:
    """Builds components for a config and measures them at any length (``plan`` uses one per call)."""

    def __init__(self, cfg: Mapping[str, Any], *, dim: int, full_length: int, num_classes: int,
                 condition_dim: int, num_samples: int, sample_batch: int | None, output_length: int | None,
                 runtime: int | None = None, class_names: Sequence[str] | None = None,
                 budget: int | None = None, stored_itemsize: int = 4) -> None:
        from feda2v_toolkit.plugins import get_registry

        registry = get_registry()
        self.cfg = dict(cfg)
        self.dim, self.full_length = int(dim), int(full_length)
        self.stored_itemsize = int(stored_itemsize)
        self.num_classes, self.condition_dim, self.num_samples = int(num_classes), int(condition_dim), int(num_samples)
        self.gen_cls = registry.load("generator", self.cfg["generator_type"])
        self.reducer_name = self.cfg["generator_reducer"]
        self.upsampler_name = configured_upsampler(self.cfg)
        self.red_cls = registry.load("reducer", self.reducer_name)
        self.up_cls = registry.load("upsampler", self.upsampler_name)
        self.batch_size = int(self.cfg["generator_batch_size"])
        self.autocast = torch.bfloat16 if self.cfg.get("generator_autocast") == "bfloat16" else None
        self.generators = _generator_count(self.cfg, self.num_classes, class_names)
        per_class = self.cfg["synthetic_samples_per_class"]
        per_class = per_class if isinstance(per_class, int) else DEFAULT_BATCH
        self.samples_per_class = per_class
        self.sample_batch = int(sample_batch or min(per_class, DEFAULT_BATCH))
        self.output_length = int(output_length or self.cfg.get("generator_output_sequence_length") or 0)
        self.runtime = runtime_bytes() if runtime is None else int(runtime)
        self.budget = default_budget() if budget is None else int(budget)
        self.optimizers: dict[str, str] = {}
        self.notes: list[str] = []

    def _build(self, length: int) -> Any:
        return self.gen_cls.from_config(self.cfg, seq_len=length, dim=self.dim, num_classes=self.num_classes,
                                        condition_dim=self.condition_dim)

    def parameters(self, length: int) -> tuple[dict[str, int], int, dict[str, int]]:
        """Per-component parameter counts of one generator, its total, and reducer/upsampler state sizes."""
        with torch.device("meta"):
            gen = self._build(length)
            reducer = self.red_cls.from_config(self.cfg, length=length, full_length=self.full_length, dim=self.dim)
            ups = self.up_cls.from_config(self.cfg, reduced_length=length, full_length=self.full_length,
                                          dim=self.dim)
        fitted = bool(getattr(self.gen_cls, "fitted", False))

        def learned(module: Any, recurse: bool = True) -> int:
            """Parameters; for a closed-form type, the fitted numbers it keeps (its buffers)."""
            n = _numel(module.parameters(recurse=recurse))
            return n + _numel(module.buffers(recurse=recurse)) if fitted else n

        counts = {name: learned(child) for name, child in gen.named_children()}
        direct = learned(gen, recurse=False)
        if direct:
            counts["(own)"] = direct
        counts = {k: v for k, v in counts.items() if v}
        state = {"reducer": _numel(reducer.parameters()) + _numel(reducer.buffers()),
                 "upsampler": _numel(ups.parameters()) + _numel(ups.buffers())}
        return counts, learned(gen), state

    def _inputs(self, n: int, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        x = torch.zeros(n, length, self.dim)
        labels = torch.zeros(n, dtype=torch.long)
        conditions = torch.zeros(n, self.condition_dim) if self.condition_dim else None
        return x, labels, conditions

    def train_memory(self, length: int, component_elements: int) -> TrainMemory:
        b = self.batch_size
        if getattr(self.gen_cls, "fitted", False):
            return self._fit_memory(length, component_elements)
        try:
            with fake_tensors() as tracker:
                gen = self._build(length)
                opts = gen.configure_optimizers(self.cfg)
                x, labels, cond = self._inputs(b, length)
                ctx = TrainContext(epoch=0, total_epochs=1, step=0, progress=0.5, config=self.cfg,
                                   autocast_dtype=self.autocast, device=torch.device("cpu"))
                with SavedTensors(gen.parameters()) as saved:
                    for step in range(2):
                        ctx.step = step
                        gen.training_step(x, labels=labels, conditions=cond, optimizers=opts, ctx=ctx)
                        saved.step()
                weights = tensor_bytes([*gen.parameters(), *gen.buffers()])
                grads = tensor_bytes(p.grad for p in gen.parameters())
                optimizer = optimizer_state_bytes(opts.values())
                batch = tensor_bytes([x, labels, cond])
                peak = tracker.peak
                if not self.optimizers:
                    self.optimizers = _describe_optimizers(opts)
            activations: int | None = saved.peak_step
            method = "simulated"
        except Exception as exc:  # a plugin generator doing something fake tensors cannot follow
            with torch.device("meta"):
                params = _numel(self._build(length).parameters())
            weights = grads = params * 4
            optimizer, batch = 2 * params * 4, b * length * self.dim * 4
            activations, peak = None, weights + grads + optimizer + batch
            method = f"analytic (AdamW assumed, activations not counted): simulation failed: {exc}"
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            note = f"memory simulation failed ({type(exc).__name__}: {first}); estimates are analytic"
            if note not in self.notes:
                self.notes.append(note)
        return self._train_total(length, component_elements, weights, grads, optimizer, batch, activations, peak,
                                 method)

    def _train_total(self, length: int, component_elements: int, weights: int, grads: int, optimizer: int,
                     batch: int, activations: int | None, peak: int, method: str) -> TrainMemory:
        """The reducer/upsampler state and the reduced-data cache, plus the larger of the two phases that do not
        overlap -- the passes over full-length sequences (whose buffers are freed and handed back before any
        generator is built) and one generator's step (or fit) peak with the other generators' state --, the
        allocator allowance and the runtime."""
        others = (self.generators - 1) * (weights + grads + optimizer)
        data = passes = 0
        if self.num_samples:
            rows = min(self.num_samples, chunk_rows(self.full_length, self.dim))
            cache = self.num_samples * length * self.dim * 4
            if not cache_in_memory(cache, self.budget):
                # in a temporary file (training.streams.ReducedCache): only the blocks on their way to it, the
                # ones waiting and the one being written
                cache = (PENDING_WRITES + 1) * min(self.num_samples, BLOCK_ROWS) * length * self.dim * 4
                if "cache on disk" not in " ".join(self.notes):
                    on_disk = format_bytes(self.num_samples * length * self.dim * 4)
                    self.notes.append(f"the reduced-data cache is larger than a quarter of the memory budget "
                                      f"({format_bytes(self.budget)}): training keeps it on disk (cache on disk: "
                                      f"{on_disk} in $TMPDIR at length {length})")
            # the passes over full-length sequences: the reduce pass holds a read chunk; the held-out pass a
            # chunk of a block's held-out rows, its reconstructions by the upsampler and by interpolation and one
            # difference; the freed chunk buffers the CLI's allocator keeps for reuse (runtime.malloc); and the
            # buffers of the chunks read ahead (data.readahead: the data's stored bytes, no more buffers than
            # the pass has chunks)
            row_bytes = self.full_length * self.dim * 4
            chunk = rows * row_bytes
            held = min(rows, math.ceil(float(self.cfg.get("generator_validation_split") or 0.0)
                                       * min(self.num_samples, BLOCK_ROWS)))
            kept = min(2 * STREAM_BUFFER_BYTES, 2 * chunk)
            ahead = pass_buffer_bytes(rows, self.full_length * self.dim * self.stored_itemsize,
                                      chunks=-(-self.num_samples // rows))
            data, passes = cache, max(chunk, 4 * held * row_bytes) + kept + ahead
        components = component_elements * 4
        tensors = max(peak + others, passes) + components + data
        allowance = int(ALLOCATOR_ALLOWANCE * tensors)
        total = tensors + allowance + self.runtime
        return TrainMemory(weights=weights, gradients=grads, optimizer=optimizer, batch=batch,
                           activations=activations, step_peak=peak, generators=self.generators,
                           other_generators=others, components=components, data=data, passes=passes,
                           allowance=allowance, runtime=self.runtime, total=total, method=method)

    def _fit_memory(self, length: int, component_elements: int) -> TrainMemory:
        """A closed-form generator (``fitted = True``): one ``fit`` on a generator's training sequences (the data's
        size per generator, else 256 sequences), simulated with fake tensors -- unless ``train`` fits the type from
        block statistics (``fit_statistics``, whose steps depend on the data's values): then estimated."""
        n = max(2, -(-self.num_samples // self.generators) if self.num_samples else 256)
        streamed, copies = 0, 3
        from_blocks = has_statistics(self.gen_cls) and not self.condition_dim  # embedding conditioning: fit()
        if from_blocks:
            # fitted block by block (training.site), float64: a block's rows and, about merged means, one pooled
            # factor: while nothing is cut, the rows stacked as they are (twice, while a block is stacked under
            # them); once cut (more rows than STREAM_KEEP x rank = k), in STREAM_DTYPE (float32: half a row).
            # The first cut holds the most: up to k float64 rows stacked as they are and a block's, their float32
            # copies and the k rows re-factored to (2 k + 1.5 blocks); later ones k kept rows, fewer than
            # REFACTOR x k under them (or, at ranks beyond a block, their stacked copy), a block and its copy;
            # plus the means. Else per mean row its factor of at most 2 x rank + a block's rows
            rank = int(self.cfg.get("generator_latent_dim") or 0)
            means = max(1, -(-self.num_classes // self.generators))  # mean rows (classes) of one generator
            if GeneratorStatisticsStage.two_exchanges(self.gen_cls):
                from feda2v_toolkit.generators.gaussian import SCATTER_PROBES

                k = STREAM_KEEP * rank
                # cut while streaming (plus the probes and their sums, a few copies), else stacked as they are
                held = int(2 * k + 1.5 * BLOCK_ROWS) + 4 * SCATTER_PROBES if n > k else 2 * n
                halves = waiting_halves(block_count(self.num_samples)) if n > k and self.num_samples else 0
                if halves and "merge tree" not in " ".join(self.notes):  # in temporary files, not in memory
                    half = (4 * max(k, BLOCK_ROWS) + 8 * SCATTER_PROBES) * length * self.dim  # float32 rows, probes
                    self.notes.append(f"the gaussian's merge tree keeps up to {halves} merged factors waiting in "
                                      f"$TMPDIR ({format_bytes(halves * half)} at length {length}; "
                                      "ranks.combine_lanes)")
                streamed = (held + 3 * means) * length * self.dim * 8
                copies = 2  # a block's part: its float64 rows and their deviations (the factor, stacked as they are)
            else:
                per_mean = -(-n // means)
                held = min(per_mean, 2 * rank + -(-BLOCK_ROWS // means))  # factor rows kept per mean row
                streamed = means * held * length * self.dim * 8
            n = min(n, BLOCK_ROWS)
        simulated = None if from_blocks else self._simulated_fit(n, length)
        if isinstance(simulated, tuple):
            weights, batch, peak, activations = simulated
            method = f"simulated fit on {n} sequences"
        else:  # a type train fits from block statistics never calls fit(); else the simulation's failure
            with torch.device("meta"):
                gen = self._build(length)
                weights = tensor_bytes([*gen.parameters(), *gen.buffers()])
            batch = n * length * self.dim * 4
            peak, activations = weights + batch + copies * n * length * self.dim * 8, None
            why = ("train fits it from block statistics, never with fit()" if simulated is None
                   else f"simulation failed: {simulated}")
            method = f"analytic (float64 copies and scatter of {n} sequences): {why}"
            note = (f"the closed-form fit is estimated analytically for {n} sequences per generator (weights, "
                    f"the float32 sequences and {('two', 'three')[copies - 2]} float64 copies)")
            if note not in self.notes:
                self.notes.append(note)
        if not self.optimizers:
            self.optimizers = {"fit": "closed form (no optimiser)"}
        return self._train_total(length, component_elements, weights, 0, 0, batch, activations, peak + streamed,
                                 method)

    def _simulated_fit(self, n: int, length: int) -> tuple[int, int, int, int] | Exception:
        """``(weights, batch, peak, activations)`` of one ``fit`` on ``n`` fake sequences, or why it failed."""
        try:
            with fake_tensors() as tracker:
                gen = self._build(length)
                x, labels, cond = self._inputs(n, length)
                weights = tensor_bytes([*gen.parameters(), *gen.buffers()])
                base = tracker.current
                tracker.reset_peak()
                gen.fit(x, labels=labels if gen.conditioning == "label" else None,
                        conditions=cond if gen.conditioning == "embedding" else None)
                peak = tracker.peak - base + weights
                batch = tensor_bytes([x, labels, cond])
        except Exception as exc:
            return exc
        return weights, batch, peak, peak - weights - batch

    def generate_memory(self, length: int, component_elements: int) -> GenerateMemory:
        n = self.sample_batch
        out_len = self.output_length or length
        piece = upsample_rows(n, out_len, self.dim, self.stored_itemsize, self.budget)  # at the data's dtype
        try:
            with fake_tensors() as tracker:
                gen = self._build(length).eval()
                ups = self.up_cls.from_config(self.cfg, reduced_length=length, full_length=self.full_length,
                                              dim=self.dim).eval()
                weights = tensor_bytes([*gen.parameters(), *gen.buffers()])
                base = tracker.current
                tracker.reset_peak()
                _, labels, cond = self._inputs(n, length)
                mean, std = torch.zeros(length, self.dim), torch.ones(length, self.dim)
                with torch.no_grad():
                    x = gen.sample(n, labels=labels if gen.conditioning == "label" else None,
                                   conditions=cond if gen.conditioning == "embedding" else None)
                    ups(x[:piece] * std + mean, out_len)
                batch_peak = tracker.peak - base
        except Exception:
            with torch.device("meta"):
                weights = _numel(self._build(length).parameters()) * 4
            batch_peak = n * length * self.dim * 4 + 2 * piece * out_len * self.dim * 4 + component_elements * 4
        total_out = self.samples_per_class * max(1, self.num_classes) * out_len * self.dim * 4
        writer = min(total_out, piece * out_len * self.dim * 4)  # the previous rows, on their way to disk
        tensors = self.generators * weights + batch_peak + writer
        allowance = int(ALLOCATOR_ALLOWANCE * tensors)
        return GenerateMemory(n, out_len, piece, self.generators * weights, batch_peak, writer, allowance,
                              self.runtime, tensors + allowance + self.runtime)

    def length_plan(self, length: int, budget: int | None) -> LengthPlan:
        counts, per_gen, state = self.parameters(length)
        elements = sum(state.values())
        train = self.train_memory(length, elements)
        gen = self.generate_memory(length, elements)
        return LengthPlan(length, counts, per_gen, per_gen * self.generators, state, train, gen,
                          None if budget is None else train.total <= budget)


def _describe_optimizers(opts: Mapping[str, torch.optim.Optimizer]) -> dict[str, str]:
    out = {}
    for name, opt in opts.items():
        params = [p for group in opt.param_groups for p in group["params"]]
        pbytes = tensor_bytes(params)
        sbytes = optimizer_state_bytes([opt])
        ratio = sbytes / pbytes if pbytes else 0.0
        out[name] = f"{type(opt).__name__} ({ratio:.3g} state tensors per parameter)"
    return out


def plan(config: Any = None, *, lengths: Sequence[int] | None = None, memory_budget: int | None = None,
         dim: int = 768, full_length: int = 1214, num_classes: int | None = None, condition_dim: int = 0,
         num_samples: int = 0, sample_batch: int | None = None, overrides: Mapping[str, Any] | None = None,
         runtime: int | None = None, class_names: Sequence[str] | None = None,
         stored_itemsize: int = 4) -> PlanResult:
    """Parameters and memory of the configured generator at its training length and at ``lengths``.

    ``memory_budget`` (bytes) adds the largest training length whose training run fits. ``config`` is a
    path, JSON text or mapping (``None`` = schema defaults); ``overrides`` set generator keys on top.
    ``runtime``: bytes of the Python/torch runtime to add (default: this process's resident memory now).
    ``stored_itemsize``: bytes per stored embedding value (the data's dtype; 4, float32, is the most).
    ``class_names``: the data's classes (``per_group`` generator counts use them; default ``num_classes``
    unnamed classes). Without either, :data:`ASSUMED_CLASSES` classes are assumed and the result says so
    (``classes_assumed``).
    """
    cfg = resolve_config(config, overrides)
    assumed = class_names is None and num_classes is None
    if class_names is not None:
        num_classes = len(class_names)
    elif num_classes is None:
        num_classes = ASSUMED_CLASSES
    configured = int(cfg["generator_training_sequence_length"])
    wanted = sorted(set(lengths or []) | {configured})
    for length in wanted:
        if not 1 <= length <= full_length:
            raise UsageError(f"--lengths: {length} is outside 1..{full_length} (the full sequence length)")
    planner = Planner(cfg, dim=dim, full_length=full_length, num_classes=num_classes, condition_dim=condition_dim,
                      num_samples=num_samples, sample_batch=sample_batch, class_names=class_names,
                      output_length=cfg.get("generator_output_sequence_length"), runtime=runtime,
                      budget=memory_budget, stored_itemsize=stored_itemsize)
    from feda2v_toolkit.runtime.progress import activity

    with activity("plan: simulating training steps", unit="length") as simulated:
        rows = []
        for length in wanted:
            rows.append(planner.length_plan(length, memory_budget))
            simulated.update()
        best = (_largest_fitting(planner, memory_budget, full_length, {r.length: r for r in rows}, simulated.update)
                if memory_budget is not None else None)
    result = PlanResult(
        generator_type=cfg["generator_type"], granularity=cfg["generator_granularity"],
        generators=planner.generators, reducer=planner.reducer_name, upsampler=planner.upsampler_name,
        dim=dim, full_length=full_length, num_classes=num_classes, condition_dim=condition_dim,
        num_samples=num_samples, batch_size=planner.batch_size,
        dtype="bfloat16 autocast" if planner.autocast is not None else "float32",
        optimizers=planner.optimizers, configured_length=configured,
        output_length=planner.output_length or configured, output_length_set=bool(planner.output_length),
        runtime=planner.runtime, rows=rows,
        budget=memory_budget, notes=planner.notes, classes_assumed=assumed)
    if memory_budget is not None:
        result.largest_length = best.length if best else None
        result.largest_length_plan = best
    return result


def _largest_fitting(planner: Planner, budget: int, full_length: int, known: dict[int, LengthPlan],
                     done: Any = None) -> LengthPlan | None:
    """Binary search for the largest length whose training total fits (memory grows with length)."""

    def at(length: int) -> LengthPlan:
        if length not in known:
            known[length] = planner.length_plan(length, budget)
            if done is not None:
                done()
        return known[length]

    if not at(1).fits:
        return None
    if at(full_length).fits:
        return at(full_length)
    lo, hi = 1, full_length  # fits(lo), not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if at(mid).fits:
            lo = mid
        else:
            hi = mid
    return at(lo)
