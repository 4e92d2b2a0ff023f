"""Import generator checkpoints of the original FedA2V code into a feda2v-tk model.

The original code (``system/flcore/trainmodel/generators.py`` and the FedA2V client/server) saves
``torch.save`` dicts. What converts is its unconditioned ``VAEGenerator``::

    encoder.0  Linear(l*D, H)   encoder.3  Linear(H, H)   encoder.6  Linear(H, 2Z)   (ReLU, Dropout(0.2) between)
    decoder.0  Linear(Z, H)     decoder.3  Linear(H, H)   decoder.6  Linear(H, l*D)
    upsampler.{0,2,4}  Conv1d stack, only with use_learned_upsampling (never trained: dropped)

found as ``generator_state_dict`` (client or server file, one generator) or ``prompt_generators``
(``{key: state_dict}``, server file). Several client files of one ``per_class`` / ``per_group`` run
become one model. ``H`` and ``Z`` come from the weight shapes; ``l`` from ``sequence_length`` when
the file stores it, else from ``in_features / D``.

The original generators were trained on raw (un-normalised) reduced embeddings, so the converted model
has no normalisation: ``model.sample(n, length=L)`` is the original ``VAEGenerator.sample(n,
target_sequence_length=L)`` (decode ``z ~ N(0, I)``, then linear interpolation).

Every file is read with ``torch.load(..., weights_only=True)``: nothing is unpickled. GAN checkpoints
and the CLIP/T5-conditioned VAEs (``ConditionedVAEGenerator``, ``MultiModalVAEGenerator``) are refused
with one-line errors: they have no sequence-level equivalent here.
"""

from __future__ import annotations

import hashlib
import math
import os
import pickle
import re
import struct
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from feda2v_toolkit.errors import InputError, ToolkitError, UsageError
from feda2v_toolkit.model.bundle import UNIFIED_KEY, GenerativeModel
from feda2v_toolkit.runtime.atomic import check_output as check_output_rule

DEFAULT_DIM = 768
DEFAULT_FULL_LENGTH = 1214
#: dropout of the original VAEGenerator (hard-coded there); only matters if the model is trained further
ORIGINAL_DROPOUT = 0.2

ENCODER = ("encoder.0", "encoder.3", "encoder.6")
DECODER = ("decoder.0", "decoder.3", "decoder.6")
UPSAMPLER = ("upsampler.0", "upsampler.2", "upsampler.4")
#: top-level entries holding weights the conversion does not use (dropped, and said so)
UNUSED_WEIGHT_ENTRIES = ("optimizer_state_dict", "generator_optimizers", "generator_optimizer_state_dict",
                         "discriminator_optimizer_state_dict")
#: top-level entries that may list the classes a single (unified) generator serves, in priority order
CLASS_LIST_KEYS = ("generator_classes", "selected_classes", "federated_classes")
#: original settings copied into the model's config when every file agrees on a valid value
CARRIED_SETTINGS = ("generator_training_epochs", "synthetic_samples_per_class")
_CLASS_FILE = re.compile(r"_class_(.+?)(?:_round_\d+)?\.pt$")
_GROUP_FILE = re.compile(r"_group_([^_.]+?)(?:_round_\d+)?\.pt$")


@dataclass
class ConversionResult:
    """What :func:`convert_checkpoints` built and how.

    Attributes:
        model: the converted model (no normalisation, ``adaptive_avg`` reducer, an interpolating upsampler).
        sources: one record per input file (also stored as ``model.config["converted_from"]``).
        generators: per generator key: file, where in the file, inferred sizes and how ``l``/``D`` were found.
        notes: human-readable lines on what was inferred, assumed or dropped.
    """

    model: GenerativeModel
    sources: list[dict[str, Any]]
    generators: dict[str, dict[str, Any]]
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        m = self.model
        return {"granularity": m.granularity, "class_names": m.class_names,
                "class_to_generator": m.class_to_generator, "training_length": m.training_length,
                "full_length": m.full_length, "output_length": m.output_length, "dim": m.dim,
                "upsampler": m.upsampler_name, "generators": self.generators, "sources": self.sources,
                "notes": self.notes}


@dataclass
class _Found:
    """One generator state dict found in an input file."""

    file: Path
    where: str  # e.g. "generator_state_dict" or "prompt_generators['dog']"
    granularity: str
    key: str  # generator key: UNIFIED_KEY, a class name or a group name
    classes: list[str] | None  # classes it serves, when the file says
    state: dict[str, Tensor]
    seq_len: int | None  # the file's 'sequence_length', if stored


@dataclass
class _Arch:
    hidden: int
    latent: int
    flat: int
    seq_len: int
    dim: int
    how: str
    upsampler: bool


# -- reading ------------------------------------------------------------------------------------------
def _one_line(text: object) -> str:
    s = " ".join(str(text).split())
    return s[:300] + "..." if len(s) > 300 else s


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _looks_like_safetensors(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(9)
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 0 < n < 100_000_000 and head[8:9] == b"{"


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, Any], str]:
    """Read an original checkpoint with ``weights_only=True``; returns ``(dict, sha256)``.

    One-line errors for a missing or unreadable file, a file that needs pickled Python objects, a
    truncated or corrupt file, a safetensors file, and anything that is not a dict.
    """
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{p}: no such file")
    if not p.is_file():
        raise UsageError(f"{p}: not a file")
    try:
        digest = _sha256(p)
        if _looks_like_safetensors(p):
            raise InputError(f"{p}: is a safetensors file (a feda2v-tk model or dataset?), not an original "
                             "FedA2V .pt checkpoint")
    except OSError as exc:
        raise UsageError(f"{p}: cannot read: {exc.strerror or exc}") from None
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols: not the user's concern
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if found or "Weights only load failed" in str(exc):
            what = f" ({found.group(1)})" if found else ""
            raise InputError(f"{p}: the checkpoint holds pickled Python objects{what}, which feda2v-tk never "
                             "unpickles (weights_only=True); re-save it with only tensors, dicts, lists and "
                             "plain values") from None
        raise InputError(f"{p}: not a readable PyTorch checkpoint: {_one_line(exc)}") from None
    except Exception as exc:  # torch raises RuntimeError, OSError, EOFError, KeyError, ... for bad files
        detail = _one_line(exc) or "unexpected end of file"
        raise InputError(f"{p}: not a readable PyTorch checkpoint (truncated or corrupt?): "
                         f"{type(exc).__name__}: {detail}") from None
    if not isinstance(obj, dict):
        raise InputError(f"{p}: holds a {type(obj).__name__}, not a dict: not an original FedA2V checkpoint")
    return obj, digest


def _has_tensor(value: Any, depth: int = 0) -> bool:
    if isinstance(value, Tensor):
        return True
    if depth > 8:
        return False
    if isinstance(value, Mapping):
        return any(_has_tensor(v, depth + 1) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_tensor(v, depth + 1) for v in value)
    return False


def _jsonable(value: Any, depth: int = 0) -> tuple[bool, Any]:
    """``(True, JSON value)`` for plain data (tuples become lists, keys strings), else ``(False, None)``."""
    if value is None or isinstance(value, (bool, str)):
        return True, value
    if isinstance(value, int):
        return True, int(value)
    if isinstance(value, float):
        return (True, value) if math.isfinite(value) else (True, str(value))
    if depth > 8:
        return False, None
    if isinstance(value, (list, tuple)):
        out = []
        for v in value:
            ok, j = _jsonable(v, depth + 1)
            if not ok:
                return False, None
            out.append(j)
        return True, out
    if isinstance(value, Mapping):
        dout: dict[str, Any] = {}
        for k, v in value.items():
            ok, j = _jsonable(v, depth + 1)
            if not ok or not isinstance(k, (str, int, float, bool)):
                return False, None
            dout[str(k)] = j
        return True, dout
    return False, None


def _class_list(value: Any) -> list[str] | None:
    if isinstance(value, (list, tuple)) and value and all(
            isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool)) for v in value):
        return [str(v) for v in value]
    return None


def _state_kind(state: Mapping[str, Any]) -> tuple[str, str] | None:
    """``(original class, evidence)`` for the state dicts of the non-convertible original classes."""
    keys = [str(k) for k in state]

    def having(*prefixes: str) -> list[str]:
        return sorted({k.split(".")[0] + ".*" for k in keys if k.startswith(prefixes)})

    multimodal = having("clip_projection.", "t5_projection.", "fusion.", "single_fusion.")
    if multimodal:
        return "MultiModalVAEGenerator", ", ".join(multimodal)
    heads = having("fc_mu.", "fc_logvar.")
    if heads:
        return "ConditionedVAEGenerator", ", ".join(heads)
    if any(k.startswith("model.") for k in keys):
        return "GANGenerator/GANDiscriminator", "model.*"
    return None


def _refuse_state(path: Path, where: str, state: Mapping[str, Any]) -> None:
    found = _state_kind(state)
    if found is None:
        return
    kind, evidence = found
    if kind.startswith("GAN"):
        raise InputError(f"{path}: {where} is an original FedA2V {kind} ({evidence}): the GAN generates single "
                         "768-d vectors, with no sequence-level equivalent; it cannot be converted")
    raise InputError(f"{path}: {where} is an original {kind} ({evidence}), a VAE conditioned on CLIP/T5 "
                     "embeddings: not convertible (only the unconditioned VAEGenerator is)")


def _check_state(path: Path, where: str, state: Any) -> dict[str, Tensor]:
    if not isinstance(state, Mapping) or not state:
        what = "empty" if isinstance(state, Mapping) else f"a {type(state).__name__}"
        raise InputError(f"{path}: {where} is {what}, not a generator state dict")
    _refuse_state(path, where, state)
    out: dict[str, Tensor] = {}
    for k, v in state.items():
        if not isinstance(v, Tensor):
            raise InputError(f"{path}: {where}[{k!r}] is a {type(v).__name__}, not a tensor")
        out[str(k)] = v
    return out


def _file_granularity(ckpt: Mapping[str, Any], path: Path) -> str:
    g = ckpt.get("generator_granularity")
    if g in ("unified", "per_class", "per_group"):
        return str(g)
    if ckpt.get("class_name") is not None:
        return "per_class"
    if ckpt.get("group_name") is not None:
        return "per_group"
    if ckpt.get("generator_key") is None:
        if _CLASS_FILE.search(path.name):
            return "per_class"
        if _GROUP_FILE.search(path.name):
            return "per_group"
        return "unified"
    return "per_class"


def _seq_len_of(path: Path, ckpt: Mapping[str, Any]) -> int | None:
    value = ckpt.get("sequence_length")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{path}: 'sequence_length' is {value!r}, not a positive integer")
    return int(value)


def _generator_key(ckpt: Mapping[str, Any], path: Path, granularity: str, notes: list[str]) -> str:
    """The original multi-file loader's priority: generator_key > class/group name > a single
    generator_classes entry > the file name."""
    named = "class_name" if granularity == "per_class" else "group_name"
    candidates = [("generator_key", ckpt.get("generator_key")), (named, ckpt.get(named))]
    classes = _class_list(ckpt.get("generator_classes"))
    if granularity == "per_class" and classes and len(classes) == 1:
        candidates.append(("generator_classes", classes[0]))
    for source, value in candidates:
        if value is not None and str(value):
            other = ckpt.get(named)
            if source == "generator_key" and other is not None and str(other) != str(value):
                notes.append(f"{path.name}: generator_key {value!r} differs from {named} {other!r}; "
                             "used generator_key (as the original loader did)")
            return str(value)
    found = (_CLASS_FILE if granularity == "per_class" else _GROUP_FILE).search(path.name)
    if found:
        notes.append(f"{path.name}: {granularity} key {found.group(1)!r} taken from the file name")
        return found.group(1)
    raise InputError(f"{path}: a {granularity} checkpoint without generator_key, {named} or a "
                     f"'_{'class' if granularity == 'per_class' else 'group'}_NAME' file name: "
                     "cannot tell which generator it is")


def _find_generators(path: Path, ckpt: dict[str, Any], notes: list[str]) -> tuple[list[_Found], list[str], str]:
    """The generator state dicts of one file, the top-level entries used, and the file's kind."""
    if "generator_clip_state_dict" in ckpt or "generator_t5_state_dict" in ckpt:
        raise InputError(f"{path}: holds an original FedA2V GAN (generator_clip_state_dict): it generates single "
                         "768-d CLIP-space vectors, with no sequence-level equivalent; GANs cannot be converted")
    kind = "server" if ckpt.get("checkpoint_type") == "server" or "prompt_generators" in ckpt else "client"
    seq_len = _seq_len_of(path, ckpt)
    if "prompt_generators" in ckpt:
        gens = ckpt["prompt_generators"]
        if not isinstance(gens, Mapping) or not gens:
            raise InputError(f"{path}: 'prompt_generators' is "
                             f"{'empty' if isinstance(gens, Mapping) else 'a ' + type(gens).__name__}, "
                             "expected {key: state_dict}")
        order = [str(k) for k in gens]
        listed = _class_list(ckpt.get("generator_keys"))
        if listed and sorted(listed) == sorted(order):
            order = listed
        by_name = {str(k): v for k, v in gens.items()}
        if len(by_name) != len(gens):
            raise InputError(f"{path}: 'prompt_generators' has keys that collide as strings")
        found = [_Found(path, f"prompt_generators[{k!r}]", "per_class", k, [k],
                        _check_state(path, f"prompt_generators[{k!r}]", by_name[k]), seq_len) for k in order]
        if ckpt.get("generator_granularity") == "per_group":
            notes.append(f"{path.name}: says per_group, but server files do not store the groups' classes; "
                         "each prompt_generators key is converted as a class (as the original server used them)")
        return found, ["prompt_generators"], kind
    if "generator_state_dict" not in ckpt:
        if ckpt and all(isinstance(v, Tensor) for v in ckpt.values()):
            state = _check_state(path, "the file", ckpt)
            if not any(k.startswith("encoder.") for k in state):
                raise InputError(f"{path}: a bare state dict without encoder.*/decoder.* weights "
                                 f"(keys: {', '.join(list(state)[:6])}...): not a FedA2V VAEGenerator")
            notes.append(f"{path.name}: a bare state dict (no checkpoint metadata): converted as one unified "
                         "generator")
            return [_Found(path, "the file", "unified", UNIFIED_KEY, None, state, None)], list(ckpt), kind
        keys = ", ".join(sorted(map(str, ckpt))[:12]) or "none"
        raise InputError(f"{path}: no generator weights (expected 'generator_state_dict' or "
                         f"'prompt_generators'; keys found: {keys})")
    state = _check_state(path, "generator_state_dict", ckpt["generator_state_dict"])
    granularity = _file_granularity(ckpt, path)
    if granularity == "unified":
        return [_Found(path, "generator_state_dict", "unified", UNIFIED_KEY, None, state, seq_len)], \
            ["generator_state_dict"], kind
    key = _generator_key(ckpt, path, granularity, notes)
    classes = _class_list(ckpt.get("generator_classes"))
    if granularity == "per_class":
        if classes and classes != [key]:
            notes.append(f"{path.name}: generator_classes {classes} for per_class generator {key!r}; "
                         f"it serves class {key!r} only")
        classes = [key]
    return [_Found(path, "generator_state_dict", granularity, key, classes, state, seq_len)], \
        ["generator_state_dict"], kind


# -- shapes -------------------------------------------------------------------------------------------
def _shape(state: Mapping[str, Tensor], name: str) -> tuple[int, ...]:
    return tuple(state[name].shape)


def infer_architecture(found: _Found, *, dim: int | None = None, training_length: int | None = None) -> _Arch:
    """Hidden, latent, training length and D of one original VAEGenerator state dict, with checks."""
    path, where, st = found.file, found.where, found.state
    linear = [f"{m}.{p}" for m in (*ENCODER, *DECODER) for p in ("weight", "bias")]
    ups = [f"{m}.{p}" for m in UPSAMPLER for p in ("weight", "bias")]
    missing = [k for k in linear if k not in st]
    if missing:
        raise InputError(f"{path}: {where} is not an original VAEGenerator state dict: missing "
                         f"{', '.join(missing[:4])}{'...' if len(missing) > 4 else ''}")
    has_ups = any(k.startswith("upsampler.") for k in st)
    extra = [k for k in st if k not in linear and k not in ups]
    if extra:
        raise InputError(f"{path}: {where} has unexpected entries for a VAEGenerator: "
                         f"{', '.join(sorted(extra)[:4])}{'...' if len(extra) > 4 else ''}")
    if has_ups and any(k not in st for k in ups):
        raise InputError(f"{path}: {where} has an incomplete learned upsampler: missing "
                         f"{', '.join(k for k in ups if k not in st)}")

    def bad(msg: str) -> InputError:
        return InputError(f"{path}: {where}: inconsistent shapes: {msg}")

    for k in (*linear, *(ups if has_ups else ())):
        t = st[k]
        if not t.is_floating_point():
            raise InputError(f"{path}: {where}[{k!r}] has dtype {t.dtype}, not floating point")
        if k in linear and not bool(torch.isfinite(t).all()):
            raise InputError(f"{path}: {where}[{k!r}] contains NaN or Inf: the generator diverged")
    w0 = _shape(st, "encoder.0.weight")
    if len(w0) != 2:
        raise bad(f"encoder.0.weight is {list(w0)}, expected [H, l*D]")
    hidden, flat = w0
    w6 = _shape(st, "encoder.6.weight")
    if len(w6) != 2 or w6[1] != hidden or w6[0] % 2:
        raise bad(f"encoder.6.weight is {list(w6)}, expected [2Z, {hidden}]")
    latent = w6[0] // 2
    expected = {
        "encoder.0.bias": (hidden,), "encoder.3.weight": (hidden, hidden), "encoder.3.bias": (hidden,),
        "encoder.6.bias": (2 * latent,),
        "decoder.0.weight": (hidden, latent), "decoder.0.bias": (hidden,), "decoder.3.weight": (hidden, hidden),
        "decoder.3.bias": (hidden,), "decoder.6.weight": (flat, hidden), "decoder.6.bias": (flat,),
    }
    for k, shape in expected.items():
        if _shape(st, k) != shape:
            raise bad(f"{k} is {list(_shape(st, k))}, expected {list(shape)} "
                      f"(from encoder.0.weight [{hidden}, {flat}] and encoder.6.weight [{2 * latent}, {hidden}])")
    ups_dim = None
    if has_ups:
        u0, u2, u4 = (_shape(st, f"{m}.weight") for m in UPSAMPLER)
        if (len(u0), len(u2), len(u4)) != (3, 3, 3) or u4[0] != u0[1] or u2[:2] != (u0[0], u0[0]) \
                or u4[1] != u0[0]:
            raise bad(f"upsampler weights {list(u0)}, {list(u2)}, {list(u4)} are not the original Conv1d stack")
        ups_dim = u0[1]

    if found.seq_len is not None or training_length is not None:
        if found.seq_len is not None and training_length is not None and found.seq_len != training_length:
            raise UsageError(f"{path}: stores sequence_length {found.seq_len}, but --training-length is "
                             f"{training_length}")
        seq_len = found.seq_len if found.seq_len is not None else int(training_length)  # type: ignore[arg-type]
        source = "'sequence_length' in the file" if found.seq_len is not None else "--training-length"
        if flat % seq_len:
            raise bad(f"encoder.0 takes {flat} inputs, not a multiple of the training length {seq_len} ({source})")
        d = flat // seq_len
        how = f"l = {seq_len} from {source}; D = {flat} / {seq_len} = {d}"
    elif ups_dim is not None:
        d = ups_dim
        if flat % d:
            raise bad(f"encoder.0 takes {flat} inputs, not a multiple of D = {d} (the upsampler's channels)")
        seq_len = flat // d
        how = f"D = {d} from the upsampler's channels; l = {flat} / {d} = {seq_len}"
    else:
        d = dim if dim is not None else DEFAULT_DIM
        if flat % d:
            raise InputError(f"{path}: {where}: encoder.0 takes {flat} inputs (l*D), not a multiple of D = {d}, "
                             "and the file stores no sequence_length: pass --dim D or --training-length l")
        seq_len = flat // d
        how = (f"l = {flat} / {d} = {seq_len} with D = {d} "
               f"({'--dim' if dim is not None else 'the default --dim'}; the file stores no sequence_length)")
    if dim is not None and d != dim:
        raise UsageError(f"{path}: {where} holds D = {d} ({how}), but --dim is {dim}")
    if ups_dim is not None and ups_dim != d:
        raise bad(f"the upsampler has {ups_dim} channels but D = {d} ({how})")
    return _Arch(hidden, latent, flat, seq_len, d, how, has_ups)


def map_state_dict(state: Mapping[str, Tensor], target: torch.nn.Module) -> dict[str, Tensor]:
    """Map an original ``encoder.{0,3,6}`` / ``decoder.{0,3,6}`` state dict onto ``target``'s names.

    The k-th Linear of the original encoder (decoder) goes to the k-th Linear of ``target.encoder``
    (``target.decoder``), in registration order; the learned upsampler is not mapped. Values are cast
    to the target's dtype.
    """
    out: dict[str, Tensor] = {}
    tsd = target.state_dict()
    for part, names in (("encoder", ENCODER), ("decoder", DECODER)):
        module = getattr(target, part)
        slots = [name for name, m in module.named_modules() if isinstance(m, torch.nn.Linear)]
        if len(slots) != len(names):
            raise RuntimeError(f"the target {part} has {len(slots)} Linear layers, expected {len(names)}")
        for src, dst in zip(names, slots, strict=True):
            for p in ("weight", "bias"):
                tkey = f"{part}.{dst}.{p}"
                out[tkey] = state[f"{src}.{p}"].detach().to(tsd[tkey].dtype)  # load_state_dict copies
    left = set(tsd) - set(out)
    if left:
        raise RuntimeError(f"the target generator has parameters the original lacks: {sorted(left)}")
    return out


# -- assembling ---------------------------------------------------------------------------------------
def _parse_classes(classes: Sequence[str] | str | None) -> list[str] | None:
    if classes is None:
        return None
    items = classes.split(",") if isinstance(classes, str) else list(classes)
    names = [str(c).strip() for c in items if str(c).strip()]
    if not names:
        raise UsageError("--classes is empty")
    dup = sorted({c for c in names if names.count(c) > 1})
    if dup:
        raise UsageError(f"--classes names {', '.join(dup)} more than once")
    return names


def _agreed(values: list[Any]) -> Any:
    return values[0] if values and all(v == values[0] for v in values) else None


def convert_checkpoints(paths: Sequence[str | os.PathLike[str]], *, dim: int | None = None,
                        training_length: int | None = None, full_length: int = DEFAULT_FULL_LENGTH,
                        output_length: int | None = None, class_names: Sequence[str] | str | None = None,
                        upsampler: str = "linear") -> ConversionResult:
    """Convert original FedA2V generator checkpoints into one :class:`GenerativeModel`.

    Args:
        paths: one unified checkpoint (client or server), one server file with ``prompt_generators``,
            or several per_class / per_group client files (one generator each) of one run.
        dim: embedding width D; needed only when a file stores no ``sequence_length`` (default 768),
            and checked against the weights otherwise.
        training_length: the reduced length ``l`` the generators were trained at, for files that do not
            store ``sequence_length``.
        full_length: the full sequence length ``L`` (1214 for AST).
        output_length: default length of generated samples (``None`` = the training length, no
            upsampling, as the original default).
        class_names: the model's classes in label order (a list or ``"a,b,c"``). Required for a unified
            checkpoint that lists no classes; for per_class/per_group it orders the classes and may add
            classes without a generator.
        upsampler: a registered, non-trainable upsampler (``linear`` is the original).

    Raises:
        InputError / UsageError with one-line messages naming the file.
    """
    from feda2v_toolkit.plugins import get_registry

    if not paths:
        raise UsageError("no checkpoint given")
    for name, value in (("dim", dim), ("training_length", training_length), ("output_length", output_length)):
        if value is not None and (isinstance(value, bool) or int(value) < 1):
            raise UsageError(f"{name} must be >= 1, got {value}")
    wanted = _parse_classes(class_names)
    notes: list[str] = []
    sources: list[dict[str, Any]] = []
    found: list[_Found] = []
    resolved: dict[Path, Path] = {}
    settings_of: dict[Path, dict[str, Any]] = {}
    for raw in paths:
        path = Path(raw)
        real = path.resolve()
        if real in resolved:
            raise UsageError(f"{path}: given twice (also as {resolved[real]})")
        resolved[real] = path
        ckpt, digest = load_checkpoint(path)
        gens, used, kind = _find_generators(path, ckpt, notes)
        if ckpt.get("generator_type") not in (None, "vae"):
            notes.append(f"{path.name}: generator_type is {ckpt.get('generator_type')!r}, but the weights are a "
                         "VAEGenerator's; converted as a VAE")
        if ckpt.get("use_conditioned_vae") is True:
            notes.append(f"{path.name}: use_conditioned_vae is true, but the weights are an unconditioned "
                         "VAEGenerator's (no fc_mu/fc_logvar); converted as unconditioned")
        settings: dict[str, Any] = {}
        dropped: list[str] = []
        for key, value in ckpt.items():
            k = str(key)
            if k in used:
                continue
            if k in UNUSED_WEIGHT_ENTRIES or _has_tensor(value):
                dropped.append(k)
                continue
            ok, j = _jsonable(value)
            if ok:
                settings[k] = j
            else:
                dropped.append(k)
        for f in gens:
            if any(k.startswith("upsampler.") for k in f.state):
                dropped.append(f"{f.where}: upsampler.* (learned upsampler, never trained)")
        if dropped:
            notes.append(f"{path.name}: dropped {', '.join(dropped)}")
        settings_of[path] = settings
        sources.append({"file": path.name, "sha256": digest, "bytes": path.stat().st_size, "kind": kind,
                        "keys": sorted(map(str, ckpt)), "generators": [f.key for f in gens],
                        "settings": settings, "dropped": dropped})
        found.extend(gens)

    # sizes, and one l and D for the whole model
    archs = [infer_architecture(f, dim=dim, training_length=training_length) for f in found]
    first = archs[0]
    for f, a in zip(found[1:], archs[1:], strict=True):
        if (a.seq_len, a.dim) != (first.seq_len, first.dim):
            raise InputError(f"{f.file}: {f.where} was trained at l = {a.seq_len}, D = {a.dim}, but "
                             f"{found[0].file} {found[0].where} at l = {first.seq_len}, D = {first.dim}: "
                             "one model needs one training length and width")
    seq_len, d = first.seq_len, first.dim
    if full_length < seq_len:
        raise UsageError(f"--full-length {full_length} is shorter than the training length {seq_len}")

    # granularity, generator keys and classes
    grans = sorted({f.granularity for f in found})
    if len(grans) > 1:
        desc = "; ".join(f"{f.file.name} {f.where}: {f.granularity}" for f in found)
        raise InputError(f"cannot mix granularities in one model ({desc})")
    granularity = grans[0]
    if granularity == "unified" and len(found) > 1:
        raise InputError(f"{found[1].file}: a second unified generator (the first is in {found[0].file}); "
                         "a model holds one unified generator: convert the files separately")
    seen: dict[str, _Found] = {}
    for f in found:
        if f.key in seen:
            other = seen[f.key]
            raise InputError(f"{f.file}: generator {f.key!r} ({f.where}) is also in {other.file} ({other.where})")
        seen[f.key] = f

    class_to_generator: dict[str, str] = {}
    if granularity == "unified":
        f = found[0]
        ckpt_classes, source = None, None
        for key in CLASS_LIST_KEYS:
            ckpt_classes = _class_list(settings_of[f.file].get(key))
            if ckpt_classes:
                source = key
                break
        if wanted is not None:
            names = wanted
            notes.append("class names from --classes" + (f" (the file lists {ckpt_classes} in '{source}')"
                                                         if ckpt_classes and ckpt_classes != wanted else ""))
        elif ckpt_classes:
            if len(set(ckpt_classes)) != len(ckpt_classes):
                raise InputError(f"{f.file}: '{source}' names a class more than once: {ckpt_classes}")
            names = ckpt_classes
            notes.append(f"class names from '{source}' in {f.file.name}")
        else:
            raise UsageError(f"{f.file}: a unified checkpoint that lists no classes (no generator_classes, "
                             "selected_classes or federated_classes): pass --classes a,b,c")
        class_to_generator = {c: UNIFIED_KEY for c in names}
    else:
        served: list[str] = []
        for f in found:
            if f.classes is None:
                raise InputError(f"{f.file}: per_group generator {f.key!r} does not store its classes "
                                 "(generator_classes): cannot tell which classes it serves")
            for c in f.classes:
                if c in class_to_generator:
                    raise InputError(f"{f.file}: class {c!r} is served by generator {f.key!r} and by "
                                     f"{class_to_generator[c]!r}")
                class_to_generator[c] = f.key
                served.append(c)
        if wanted is not None:
            missing = [c for c in served if c not in wanted]
            if missing:
                raise UsageError(f"--classes lacks {', '.join(missing)}, which the checkpoints have generators "
                                 "for")
            names = wanted
            extra = [c for c in wanted if c not in class_to_generator]
            if extra:
                notes.append(f"classes without a generator (cannot be sampled): {', '.join(extra)}")
        else:
            names = served

    # build the model
    registry = get_registry()
    gen_cls = registry.load("generator", "vae")
    up_cls = registry.load("upsampler", upsampler)
    if getattr(up_cls, "trainable", False):
        raise UsageError(f"upsampler {upsampler!r} must be trained on data; a converted model can only use an "
                         "interpolating one (linear, as the original, nearest or cubic)")
    hidden = _agreed([a.hidden for a in archs])
    latent = _agreed([a.latent for a in archs])
    config: dict[str, Any] = {
        "generator_type": "vae", "generator_granularity": granularity,
        "generator_training_sequence_length": seq_len, "generator_output_sequence_length": output_length,
        "use_conditioned_vae": False, "generator_dropout": ORIGINAL_DROPOUT,
        "generator_reducer": "adaptive_avg", "generator_upsampler": upsampler, "use_learned_upsampling": False,
        "generator_normalize": False,
    }
    if hidden is not None:
        config["generator_hidden_dim"] = hidden
    if latent is not None:
        config["generator_latent_dim"] = latent
    if granularity == "per_group":
        config["generator_class_groups"] = {f.key: list(f.classes or []) for f in found}
    for key in CARRIED_SETTINGS:
        value = _agreed([s.get(key) for s in settings_of.values()])
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            config[key] = value
    config["converted_from"] = sources
    reducer = registry.load("reducer", "adaptive_avg").from_config(config, length=seq_len, full_length=full_length,
                                                                   dim=d)
    ups = up_cls.from_config(config, reduced_length=seq_len, full_length=full_length, dim=d)
    generators: dict[str, Any] = {}
    gen_info: dict[str, dict[str, Any]] = {}
    order = [f.key for f in found]
    if granularity != "unified":  # generators in class order
        order = sorted(order, key=lambda k: min(names.index(c) for c, g in class_to_generator.items() if g == k))
    by_key = {f.key: (f, a) for f, a in zip(found, archs, strict=True)}
    for key in order:
        f, a = by_key[key]
        gen = gen_cls(seq_len=seq_len, dim=d, hidden_dim=a.hidden, latent_dim=a.latent, dropout=ORIGINAL_DROPOUT)
        try:
            gen.load_state_dict(map_state_dict(f.state, gen), strict=True)
        except RuntimeError as exc:
            raise InputError(f"{f.file}: {f.where}: cannot load into the vae generator: {_one_line(exc)}") from None
        generators[key] = gen.eval()
        dtypes = sorted({str(t.dtype).replace("torch.", "") for t in f.state.values()})
        gen_info[key] = {"file": f.file.name, "where": f.where, "hidden_dim": a.hidden, "latent_dim": a.latent,
                         "training_length": a.seq_len, "dim": a.dim, "inferred": a.how, "original_dtype": dtypes,
                         "learned_upsampler_dropped": a.upsampler}
        if dtypes != ["float32"]:
            notes.append(f"{f.file.name}: {f.where} weights were {', '.join(dtypes)}; stored as float32")
    notes.insert(0, f"{len(generators)} {granularity} VAEGenerator(s), l = {seq_len}, D = {d}; " + first.how)
    if any(a.upsampler for a in archs):
        notes.append(f"the original learned upsampler (upsampler.0/2/4) was never trained (no loss reached it): "
                     f"dropped; the model upsamples with {upsampler!r}")
    notes.append("no normalisation: the original generators were trained on raw reduced embeddings")
    config["conversion"] = {"generators": gen_info, "notes": list(notes)}
    model = GenerativeModel(
        generator_type="vae", generators=generators, granularity=granularity, class_names=list(names),
        class_to_generator={c: class_to_generator[c] for c in names if c in class_to_generator},
        reducer=reducer.eval(), reducer_name="adaptive_avg", upsampler=ups.eval(), upsampler_name=upsampler,
        full_length=int(full_length), training_length=seq_len, output_length=output_length, dim=d,
        normalization={}, condition_dim=0, class_counts={}, config=config, seed=None, metrics={})
    return ConversionResult(model, sources, gen_info, notes)


def check_output(out: str | os.PathLike[str], paths: Sequence[str | os.PathLike[str]], *,
                 overwrite: bool = False) -> Path:
    """The overwrite rule (:func:`~feda2v_toolkit.runtime.atomic.check_output`): ``out`` is not one of the
    checkpoints, nor inside or holding one; an existing ``out`` only with ``overwrite``."""
    return check_output_rule(out, inputs=paths, overwrite=overwrite, role="input checkpoint")


def convert(paths: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str], *, overwrite: bool = False,
            **options: Any) -> ConversionResult:
    """:func:`convert_checkpoints`, then write the model to ``out`` atomically (nothing on failure). An
    existing ``out`` is replaced only with ``overwrite``."""
    from feda2v_toolkit.model.file import save_model

    target = check_output(out, paths, overwrite=overwrite)
    result = convert_checkpoints(paths, **options)
    try:
        save_model(result.model, target)
    except ToolkitError:
        raise
    except OSError as exc:
        raise UsageError(f"{target}: cannot write: {exc.strerror or exc}") from None
    return result
