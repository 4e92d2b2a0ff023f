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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from feda2v_toolkit import __version__
from feda2v_toolkit.atomic import atomic_path
from feda2v_toolkit.errors import InputError, NewerVersionError, ToolkitError, UsageError
from feda2v_toolkit.model import GenerativeModel

MODEL_FORMAT = "model"
FORMAT_VERSION = 1


def write_safetensors(path: str | os.PathLike[str], tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> Path:
    """Write tensors + string metadata atomically (temp file, fsync, rename)."""
    out = Path(path)
    flat = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    with atomic_path(out) as tmp:
        save_file(flat, str(tmp), metadata=dict(metadata))
    return out


def read_safetensors(path: str | os.PathLike[str], *, expect: str,
                     shapes_only: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a feda2v-tk safetensors file of kind ``expect``: ``(tensors, decoded metadata)``.

    With ``shapes_only`` the first element maps names to shapes and no tensor is read. One-line errors
    for a missing, truncated or corrupt file, a file of another kind, or a newer format version.
    """
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{p}: no such file")
    try:
        with safe_open(str(p), framework="pt") as fh:
            header = _decode_header(p, fh.metadata() or {}, expect)
            names = fh.keys()
            if shapes_only:
                contents = {name: list(fh.get_slice(name).get_shape()) for name in names}
            else:
                contents = {name: fh.get_tensor(name) for name in names}
    except SafetensorError as exc:
        raise InputError(f"{p}: not a valid safetensors file (truncated or corrupt?): {exc}") from None
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
    try:
        return {k: (json.loads(v) if k == expect else v) for k, v in meta.items()}
    except json.JSONDecodeError as exc:
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
        generators.append({"key": key, "init_args": gen.init_args(),
                           "parameters": sum(p.numel() for p in gen.parameters())})
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
        "metrics": model.metrics,
        "config": model.config,
    }
    return tensors, doc


def file_metadata(kind: str, doc: Mapping[str, Any]) -> dict[str, str]:
    return {"feda2v_format": kind, "format_version": str(FORMAT_VERSION), "toolkit_version": __version__,
            kind: json.dumps(doc, sort_keys=False, default=_json_default)}


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Tensor) and obj.numel() == 1:
        return obj.item()
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def save_model(model: GenerativeModel, path: str | os.PathLike[str]) -> Path:
    """Write ``model`` to one safetensors file, atomically."""
    tensors, doc = model_tensors_and_metadata(model)
    return write_safetensors(path, tensors, file_metadata(MODEL_FORMAT, doc))


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


def build_model(tensors: Mapping[str, Tensor], doc: Mapping[str, Any], path: Path) -> GenerativeModel:
    """Rebuild a :class:`GenerativeModel` from its tensors and metadata document."""
    try:
        gen_cls = _load_component("generator", doc["generator_type"], path)
        generators = {}
        for i, entry in enumerate(doc["generators"]):
            gen = gen_cls(**entry["init_args"])
            gen.load_state_dict(unprefixed(tensors, f"generators.{i}"), strict=True)
            generators[entry["key"]] = gen.eval()
        red_cls = _load_component("reducer", doc["reducer"], path)
        reducer = red_cls(**doc["reducer"]["init_args"])
        reducer.load_state_dict(unprefixed(tensors, "reducer"), strict=True)
        up_cls = _load_component("upsampler", doc["upsampler"], path)
        upsampler = up_cls(**doc["upsampler"]["init_args"])
        upsampler.load_state_dict(unprefixed(tensors, "upsampler"), strict=True)
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
