"""Model files: one safetensors file holds every weight, plus JSON metadata in string values.

Tensors::

    generators.<i>.<param>       the i-th generator's state (keys listed in metadata)
    reducer.<name>               fitted reducer state (if any)
    upsampler.<name>             trained upsampler state (if any)
    normalization.mean|std       [l, D] statistics of the reduced training sequences

Metadata (all strings): ``feda2v_format = "model"``, ``format_version``, ``toolkit_version``, and
``model``: a JSON document with the generator type (and the plugin that provides it), each
generator's constructor arguments, reducer and upsampler names with their arguments, lengths, D,
class names and counts, granularity, class-to-generator map, condition width, the full migrated config,
the seed and the final metrics. Loading rebuilds every component from the registry with those
arguments and ``load_state_dict(strict=True)``: no pickle, no code from the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from feda2v_toolkit import __version__
from feda2v_toolkit.errors import (
    InputError,
    NewerVersionError,
    ToolkitError,
    UsageError,
    first_line,
    short_list,
    stat_mode,
)
from feda2v_toolkit.model.bundle import GenerativeModel
from feda2v_toolkit.runtime.resources import format_bytes, memory_limit
from feda2v_toolkit.runtime.tensorfile import write_safetensors  # noqa: F401 - re-exported (checkpoints)

MODEL_FORMAT = "model"
FORMAT_VERSION = 1


def read_safetensors(path: str | os.PathLike[str], *, expect: str,
                     shapes_only: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a feda2v-tk safetensors file of kind ``expect``: ``(tensors, decoded metadata)``.

    With ``shapes_only`` the first element maps names to shapes and no tensor is read. One-line errors
    for a missing, truncated or corrupt file, a file of another kind, or a newer format version.
    """
    p = Path(path)
    if not p.is_file():
        if p.exists() and not p.is_dir():
            raise UsageError(f"{p}: not a regular file (a device, pipe or socket); a model is a .safetensors file")
        if p.is_dir():
            raise UsageError(f"{p}: is a directory; give the model file")
        stat_mode(p, missing="no such file")  # a link loop or an unreadable path says so
        raise UsageError(f"{p}: no such file")
    try:
        with safe_open(str(p), framework="pt") as fh:
            header = _decode_header(p, fh.metadata() or {}, expect)
            names = fh.keys()
            if shapes_only:
                contents = {name: list(fh.get_slice(name).get_shape()) for name in names}
            else:
                contents = {name: fh.get_tensor(name) for name in names}
    except (SafetensorError, MemoryError) as exc:
        from feda2v_toolkit.data.dataset import mmap_error

        raise mmap_error(p, exc) or InputError(f"{p}: not a valid safetensors file (truncated or corrupt?): "
                                               f"{exc}") from None
    except OSError as exc:
        raise UsageError(f"{p}: cannot read: {exc.strerror or exc}") from None
    return contents, header


def _decode_header(path: Path, meta: Mapping[str, str], expect: str) -> dict[str, Any]:
    fmt = meta.get("feda2v_format")
    if fmt is None:
        hint = " (an original FedA2V .pt checkpoint? use `feda2v-tk convert`)" if path.suffix == ".pt" else ""
        raise InputError(f"{path}: not a feda2v-tk {expect} file (no 'feda2v_format' metadata){hint}")
    if fmt != expect:
        raise InputError(f"{path}: this is a feda2v-tk {fmt} file, not a {expect} file")
    try:
        version = int(meta.get("format_version", ""))
    except ValueError:
        raise InputError(f"{path}: bad format_version {meta.get('format_version')!r}") from None
    if version > FORMAT_VERSION:
        raise NewerVersionError(
            f"{path}: {expect} format version {version} was written by feda2v-tk "
            f"{meta.get('toolkit_version', '?')}; this feda2v-tk ({__version__}) reads up to version "
            f"{FORMAT_VERSION}: upgrade feda2v-tk")
    if expect not in meta:
        raise InputError(f"{path}: malformed {expect} file: no {expect!r} metadata document (the file was cut "
                         f"down or written by another program)")
    try:
        return {k: (json.loads(v) if k == expect else v) for k, v in meta.items()}
    except (json.JSONDecodeError, RecursionError) as exc:
        raise InputError(f"{path}: metadata {expect!r} is not valid JSON: {exc}") from None


def _prefixed(prefix: str, module: nn.Module) -> dict[str, Tensor]:
    return {f"{prefix}.{k}": v for k, v in module.state_dict().items()}


def unprefixed(tensors: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The tensors named ``<prefix>.<rest>``, keyed by ``<rest>``."""
    start = prefix + "."
    return {k[len(start):]: v for k, v in tensors.items() if k.startswith(start)}


def _component_ref(kind: str, name: str) -> dict[str, Any]:
    """How to find a component again: the name as configured plus its provider."""
    from feda2v_toolkit.plugins import get_registry

    try:
        spec = get_registry().get(kind, name)
    except ToolkitError:
        return {"name": name}
    return {"name": name, "qualified_name": spec.qualified_name, "distribution": spec.provenance.distribution,
            "version": spec.provenance.version}


def model_tensors_and_metadata(model: GenerativeModel) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors and the ``model`` metadata document of a model (shared by model files and checkpoints)."""
    tensors: dict[str, Tensor] = {}
    generators = []
    for i, (key, gen) in enumerate(model.generators.items()):
        tensors.update(_prefixed(f"generators.{i}", gen))
        learned = sum(p.numel() for p in gen.parameters())
        if getattr(type(gen), "fitted", False):  # a closed-form type's fitted numbers live in buffers
            learned += sum(b.numel() for b in gen.buffers())
        generators.append({"key": key, "init_args": gen.init_args(), "parameters": learned})
    tensors.update(_prefixed("reducer", model.reducer))
    tensors.update(_prefixed("upsampler", model.upsampler))
    for name, value in model.normalization.items():
        tensors[f"normalization.{name}"] = value
    doc = {
        "generator_type": _component_ref("generator", model.generator_type),
        "generators": generators,
        "granularity": model.granularity,
        "class_names": model.class_names,
        "class_to_generator": model.class_to_generator,
        "class_counts": model.class_counts,
        "reducer": {**_component_ref("reducer", model.reducer_name), "init_args": model.reducer.init_args()},
        "upsampler": {**_component_ref("upsampler", model.upsampler_name),
                      "init_args": model.upsampler.init_args()},
        "full_length": model.full_length,
        "training_length": model.training_length,
        "output_length": model.output_length,
        "dim": model.dim,
        "condition_dim": model.condition_dim,
        "normalized": bool(model.normalization),
        "seed": model.seed,
        "data_dtype": model.data_dtype,
        **({"seed_scheme": model.seed_scheme} if model.seed_scheme is not None else {}),
        "metrics": model.metrics,
        "config": model.config,
    }
    return tensors, doc


def file_metadata(kind: str, doc: Mapping[str, Any]) -> dict[str, str]:
    return {"feda2v_format": kind, "format_version": str(FORMAT_VERSION), "toolkit_version": __version__,
            kind: json.dumps(doc, sort_keys=True, default=_json_default)}


#: metric keys that hold wall-clock measurements or how a run was executed (``run``: engine, traffic, rounds):
#: kept out of model files, so that the same seed, data and config give byte-identical files on any engine
#: (they stay in the run's metrics JSON lines and in the returned model)
VOLATILE_METRICS = frozenset({"train_seconds", "seconds", "fit_seconds", "samples_per_s", "run"})


def _without_timings(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _without_timings(v) for k, v in obj.items() if k not in VOLATILE_METRICS}
    if isinstance(obj, list):
        return [_without_timings(v) for v in obj]
    return obj


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Tensor) and obj.numel() == 1:
        return obj.item()
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def save_model(model: GenerativeModel, path: str | os.PathLike[str]) -> Path:
    """Write ``model`` to one safetensors file, atomically."""
    tensors, doc = model_tensors_and_metadata(model)
    return write_safetensors(path, tensors, file_metadata(MODEL_FORMAT, _without_timings(doc)))


def _load_component(kind: str, ref: Mapping[str, Any], path: Path) -> type:
    from feda2v_toolkit.plugins import get_registry

    registry = get_registry()
    last_error: ToolkitError | None = None
    for name in (ref.get("qualified_name"), ref.get("name")):
        if not name:
            continue
        try:
            return registry.load(kind, name)
        except ToolkitError as exc:
            last_error = exc
    provider = ref.get("distribution") or "an uninstalled plugin"
    raise InputError(f"{path}: needs {kind} {ref.get('name')!r} from {provider} "
                     f"{ref.get('version') or ''}, which is not available here ({last_error})".replace("  ", " "))


def check_document(doc: Any, path: Path) -> None:
    """One-line :class:`InputError` for a metadata document of the wrong shape or types (tampered,
    truncated or hand-edited), checked before anything is built from it."""
    def bad(what: str) -> InputError:
        return InputError(f"{path}: malformed model metadata: {what}")

    if not isinstance(doc, dict):
        raise bad(f"the 'model' document is {type(doc).__name__}, not an object")
    for key in ("generator_type", "reducer", "upsampler"):
        ref = doc.get(key)
        if not (isinstance(ref, dict) and isinstance(ref.get("name"), str)):
            raise bad(f"{key!r} must be an object with a 'name'")
        if key != "generator_type" and not isinstance(ref.get("init_args"), dict):
            raise bad(f"{key}.init_args must be an object")
    gens = doc.get("generators")
    if not (isinstance(gens, list) and gens and all(
            isinstance(g, dict) and isinstance(g.get("key"), str) and isinstance(g.get("init_args"), dict)
            for g in gens)):
        raise bad("'generators' must be a non-empty list of {key, init_args} objects")
    names = doc.get("class_names")
    if not (isinstance(names, list) and names and all(isinstance(c, str) for c in names)):
        raise bad("'class_names' must be a non-empty list of strings")
    if len(set(names)) != len(names):
        raise bad("'class_names' has duplicates")
    mapping = doc.get("class_to_generator")
    keys = {g["key"] for g in gens}
    if not (isinstance(mapping, dict) and all(isinstance(v, str) and v in keys for v in mapping.values())):
        raise bad("'class_to_generator' must map class names to generator keys")
    known = set(names)
    unknown = [c for c in mapping if c not in known]
    if unknown:
        raise bad(f"'class_to_generator' maps class(es) {short_list(unknown)}, which 'class_names' does not list")
    if not mapping:
        raise bad("'class_to_generator' is empty: the model has no generator for any class")
    for key in ("full_length", "training_length", "dim"):
        value = doc.get(key)
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise bad(f"{key!r} must be a positive integer, found {value!r}")
    out_len = doc.get("output_length")
    if out_len is not None and not (isinstance(out_len, int) and not isinstance(out_len, bool) and out_len >= 1):
        raise bad(f"'output_length' must be a positive integer or null, found {out_len!r}")
    cond = doc.get("condition_dim", 0)
    if not (isinstance(cond, int) and not isinstance(cond, bool) and cond >= 0):
        raise bad(f"'condition_dim' must be a non-negative integer, found {cond!r}")
    for key in ("class_counts", "config", "metrics"):
        if not isinstance(doc.get(key, {}), dict):
            raise bad(f"{key!r} must be an object")
    counts = doc.get("class_counts", {})
    wrong = [c for c, n in counts.items() if not (isinstance(n, int) and not isinstance(n, bool) and n >= 0)]
    if wrong:
        raise bad(f"'class_counts' must hold a non-negative integer per class, found {counts[wrong[0]]!r} for "
                  f"{wrong[0]!r}")
    _check_config(doc.get("config", {}), bad)


#: keys of a model's ``config`` that using the model reads (``generate``'s default sample count, the
#: train/held-out split ``evaluate`` recomputes): checked against their schema when the file is read
MODEL_CONFIG_KEYS = ("synthetic_samples_per_class", "generator_validation_split", "generator_classes")


def _check_config(config: Mapping[str, Any], bad: Callable[[str], InputError]) -> None:
    from feda2v_toolkit.config import get_catalog

    catalog = get_catalog()
    for key in MODEL_CONFIG_KEYS:
        info = catalog.keys.get(key)
        value = config.get(key)
        if info is None or value is None:  # None: the schema default (GenerativeModel.setting)
            continue
        problems = catalog.check(info, value)
        if problems:
            raise bad(f"config {key!r}: {problems[0].message}")


def _probe(cls: type, init_args: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], what: str,
           path: Path) -> nn.Module:
    """``cls(**init_args)`` built on the meta device (nothing allocated), refused unless its state has exactly
    the stored ``shapes`` and the tensors it holds beyond them (non-persistent buffers) fit in memory.

    Any failure to build it there (an overflowing size, a plugin's own check) refuses the file: the real
    build only ever runs with arguments whose every tensor was sized here first.
    """
    try:
        with torch.device("meta"):
            probe = cls(**init_args)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{path}: {what}: bad constructor arguments in the metadata: {first_line(exc)}") from None
    except Exception as exc:  # e.g. RuntimeError "Storage size calculation overflowed"
        raise InputError(f"{path}: inconsistent model file: {what} cannot be built from its metadata "
                         f"({type(exc).__name__}: {first_line(exc)})") from None
    state = probe.state_dict()
    expected = {k: tuple(v.shape) for k, v in state.items()}
    stored = {k: tuple(v) for k, v in shapes.items()}
    if expected != stored:
        missing = sorted(set(expected) - set(stored))
        unexpected = sorted(set(stored) - set(expected))
        wrong = sorted(k for k in set(expected) & set(stored) if expected[k] != stored[k])
        detail = (f"tensor {wrong[0]!r} is stored as {list(stored[wrong[0]])} but the metadata makes it "
                  f"{list(expected[wrong[0]])}" if wrong else
                  f"missing tensor(s) {short_list(missing)}" if missing else
                  f"unexpected tensor(s) {short_list(unexpected)}")
        raise InputError(f"{path}: {what}: metadata and weights disagree: {detail}")
    extra = sum(t.numel() * t.element_size() for name, t in (*probe.named_parameters(), *probe.named_buffers())
                if name not in state)  # non-persistent buffers: sized by the metadata alone
    limit = memory_limit()
    if limit is not None and extra > limit:
        raise InputError(f"{path}: inconsistent model file: {what} would build {format_bytes(extra)} of tensors "
                         f"the file does not hold, more than the {format_bytes(limit)} of memory available")
    return probe


def _component_entries(doc: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any], Mapping[str, Any], str, str]]:
    """Each component of a (checked) document: ``(kind, reference, init_args, tensor prefix, what)``."""
    entries = [("generator", doc["generator_type"], entry["init_args"], f"generators.{i}",
                f"generator {entry['key']!r}") for i, entry in enumerate(doc["generators"])]
    entries += [(kind, doc[kind], doc[kind]["init_args"], kind, kind) for kind in ("reducer", "upsampler")]
    return entries


def check_consistency(doc: Mapping[str, Any], shapes: Mapping[str, Any], path: Path, *,
                      skip_unavailable: bool = False) -> None:
    """One-line :class:`InputError` unless the metadata agrees with the stored tensors' ``shapes``: every
    component built on the meta device (:func:`_probe`) has exactly the stored state, and the document's
    training length and D are those of the generators and of the normalisation statistics. Nothing is
    allocated, so a model is built for real only after this (and ``inspect`` runs it on the header alone).
    ``skip_unavailable``: components whose plugin is not installed are not checked (else refused).
    """
    check_document(doc, path)
    try:
        for kind, ref, init_args, prefix, what in _component_entries(doc):
            try:
                cls = _load_component(kind, ref, path)
            except InputError:
                if skip_unavailable:
                    continue
                raise
            probe = _probe(cls, init_args, {k: tuple(v) for k, v in unprefixed(shapes, prefix).items()}, what, path)
            if kind == "generator":
                for attr, key in (("dim", "dim"), ("seq_len", "training_length")):
                    value = getattr(probe, attr, doc[key])
                    if value != doc[key]:
                        raise InputError(f"{path}: inconsistent model file: {what} has {attr} {value}, but the "
                                         f"metadata says {key} {doc[key]}")
            del probe
        if doc.get("normalized"):
            for k in ("mean", "std"):
                shape = shapes.get(f"normalization.{k}")
                if shape is None or list(shape) != [doc["training_length"], doc["dim"]]:
                    raise InputError(f"{path}: normalization.{k} is {'missing' if shape is None else list(shape)}, "
                                     f"but the metadata says training length {doc['training_length']} and dim "
                                     f"{doc['dim']}")
    except ToolkitError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise InputError(f"{path}: inconsistent model file: {type(exc).__name__}: {first_line(exc)}") from None


def _build_checked(cls: type, init_args: Mapping[str, Any], state: Mapping[str, Tensor]) -> nn.Module:
    """``cls(**init_args)`` with ``state`` loaded (strictly); only after :func:`check_consistency`."""
    module = cls(**init_args)
    module.load_state_dict(state, strict=True)
    return module


def _check_finite_tensors(tensors: Mapping[str, Tensor], path: Path) -> None:
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise InputError(f"{path}: tensor {name!r} contains NaN or inf values (a corrupt or diverged model)")


def build_model(tensors: Mapping[str, Tensor], doc: Mapping[str, Any], path: Path) -> GenerativeModel:
    """Rebuild a :class:`GenerativeModel` from its tensors and metadata document (checked first:
    :func:`check_consistency`, nothing allocated until the metadata agrees with the tensors)."""
    check_consistency(doc, {k: tuple(v.shape) for k, v in tensors.items()}, path)
    _check_finite_tensors(tensors, path)
    try:
        *gens, reducer, upsampler = (_build_checked(_load_component(kind, ref, path), init_args,
                                                    unprefixed(tensors, prefix))
                                     for kind, ref, init_args, prefix, _what in _component_entries(doc))
        generators = {entry["key"]: gen.eval() for entry, gen in zip(doc["generators"], gens, strict=True)}
        return GenerativeModel(
            generator_type=doc["generator_type"]["name"],
            generators=generators,
            granularity=doc["granularity"],
            class_names=list(doc["class_names"]),
            class_to_generator=dict(doc["class_to_generator"]),
            reducer=reducer.eval(),
            reducer_name=doc["reducer"]["name"],
            upsampler=upsampler.eval(),
            upsampler_name=doc["upsampler"]["name"],
            full_length=int(doc["full_length"]),
            training_length=int(doc["training_length"]),
            output_length=doc["output_length"],
            dim=int(doc["dim"]),
            normalization={k: tensors[f"normalization.{k}"] for k in ("mean", "std") if doc.get("normalized")},
            condition_dim=int(doc.get("condition_dim", 0)),
            class_counts=dict(doc.get("class_counts", {})),
            config=dict(doc.get("config", {})),
            seed=doc.get("seed"),
            metrics=dict(doc.get("metrics", {})),
            data_dtype=doc.get("data_dtype") if doc.get("data_dtype") in ("float32", "float16", "bfloat16") else None,
            seed_scheme=doc.get("seed_scheme") if isinstance(doc.get("seed_scheme"), int) else None,
        )
    except ToolkitError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path}: inconsistent model file: {type(exc).__name__}: {first}") from None


def load_model(path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> GenerativeModel:
    """Load a model file written by :func:`save_model` (or by ``feda2v-tk train``/``convert``)."""
    p = Path(path)
    tensors, meta = read_safetensors(p, expect=MODEL_FORMAT)
    return build_model(tensors, meta[MODEL_FORMAT], p).to(device)


def read_model_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The decoded metadata of a model file plus ``tensor_shapes``, without reading its tensors."""
    shapes, header = read_safetensors(path, expect=MODEL_FORMAT, shapes_only=True)
    header["tensor_shapes"] = shapes
    return header
