"""Loading an Audio Spectrogram Transformer strictly: every weight present, no extras, sizes bounded first.

``transformers``' ``from_pretrained`` completes a checkpoint whose weights do not match its config with
random weights (a missing tensor, an extra layer in ``config.json``) and only logs it; ``embed`` would then
write embeddings that differ run to run. Here

1. the config is read (a regular file, bounded) and its sizes checked: positive, bounded, heads dividing the
   width, patches fitting the spectrogram -- before anything is built;
2. the model is built on the meta device (nothing allocated) to count its parameters; the memory it needs is
   checked (:func:`~feda2v_toolkit.runtime.resources.require_memory`);
3. for a local directory, the weight files are regular files whose headers read (a truncated file is
   refused), loaded ``weights_only`` (a file that needs unpickling is refused in one line) and hold exactly
   as many tensors and elements as the config makes (a classification checkpoint's ``classifier.*`` head
   is the only thing allowed besides);
4. ``from_pretrained(..., output_loading_info=True)``: any missing, unexpected (other than the head) or
   mismatched key, or loading error, is refused.

A hub name is resolved from the local Hugging Face cache when the hub cannot be reached (or
``HF_HUB_OFFLINE=1``); when it is not cached either, the one-line error says to pass ``--model DIR``.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from feda2v_toolkit.errors import InputError, UsageError, spelled

#: the keys a classification checkpoint adds to the encoder (ASTForAudioClassification's head)
HEAD_PREFIXES = ("classifier.",)
#: bounds on the sizes a config may ask for (the largest AST checkpoints are far below them)
LIMITS = {"hidden_size": 16_384, "num_hidden_layers": 256, "num_attention_heads": 1024, "intermediate_size": 131_072,
          "patch_size": 1024, "frequency_stride": 1024, "time_stride": 1024, "num_mel_bins": 1024,
          "max_length": 100_000}
MAX_CONFIG_BYTES = 4 * 2**20
_OFFLINE_VALUES = {"1", "true", "yes", "on"}


def _first_line(exc: BaseException) -> str:
    from feda2v_toolkit.errors import first_line

    return first_line(exc)


def _regular(path: Path, what: str) -> None:
    """Refuse a device, FIFO or socket where a file of the model is expected (never opened)."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the {what}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(mode):
        raise UsageError(f"{path}: the {what} is not a regular file (a device, pipe or socket)")


def check_config(cfg: Any, model: str) -> None:
    """One-line :class:`InputError` unless the AST config's sizes are positive integers within :data:`LIMITS`,
    the heads divide the width and the patches fit the spectrogram."""
    for key, limit in LIMITS.items():
        value = getattr(cfg, key, None)
        if key == "patch_size" and isinstance(value, list | tuple) and len(value) == 2 and value[0] == value[1]:
            value = value[0]
        low = 0 if key == "num_hidden_layers" else 1
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= limit:
            raise InputError(f"{model}: config.json {key} is {value!r}; an AST model needs an integer in "
                             f"{low}..{limit}")
    if cfg.hidden_size % cfg.num_attention_heads:
        raise InputError(f"{model}: config.json hidden_size {cfg.hidden_size} is not a multiple of "
                         f"num_attention_heads {cfg.num_attention_heads}")
    if cfg.patch_size > cfg.num_mel_bins or cfg.patch_size > cfg.max_length:
        raise InputError(f"{model}: config.json patch_size {cfg.patch_size} is larger than the spectrogram "
                         f"({cfg.num_mel_bins} mel x {cfg.max_length} frames)")


def _expected(cfg: Any) -> tuple[int, int]:
    """(tensors, elements) of an ``ASTModel`` with this config, built on the meta device."""
    import torch
    from transformers import ASTModel

    with torch.device("meta"):
        probe = ASTModel(cfg)
    state = probe.state_dict()
    return len(state), sum(t.numel() for t in state.values())


def _weight_files(directory: Path) -> list[Path]:
    """The weight files of a ``save_pretrained`` directory (one file, or the shards an index lists)."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = directory / index_name
        if os.path.lexists(index):
            _regular(index, "weight index")
            if index.stat().st_size > MAX_CONFIG_BYTES:
                raise InputError(f"{index}: larger than {MAX_CONFIG_BYTES} bytes")
            try:
                names = sorted(set(json.loads(index.read_text("utf-8"))["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
                raise InputError(f"{index}: not a weight index: {_first_line(exc)}") from None
            if any("/" in n or n in ("", ".", "..") for n in names):
                raise InputError(f"{index}: names a weight file outside the model directory")
            return [directory / n for n in names]
        if os.path.lexists(directory / single):
            return [directory / single]
    raise UsageError(f"{directory}: holds no model.safetensors or pytorch_model.bin weights")


def _file_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a weight file, reading a safetensors header only, or a ``.bin`` with weights_only."""
    _regular(path, "weight file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}  # noqa: SIM118
        except (SafetensorError, OSError) as exc:
            raise InputError(f"{path}: not a valid safetensors file (truncated or corrupt?): "
                             f"{_first_line(exc)}") from None
    import torch

    from feda2v_toolkit.errors import unpickling_refusal

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "zipfile" not in str(exc):  # torch's legacy (non-zip) format cannot be memory-mapped
                    raise
                from feda2v_toolkit.runtime.resources import require_memory

                require_memory(path.stat().st_size * 2, f"{path}: reading legacy-format weights whole")
                state = torch.load(path, map_location="cpu", weights_only=True)
    except InputError:
        raise
    except Exception as exc:  # torch raises many types for corrupt files and files that need unpickling
        raise InputError(f"{path}: cannot read as PyTorch weights: "
                         f"{unpickling_refusal(exc) or _first_line(exc)}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{path}: not a state dict of tensors")
    return {str(k): tuple(v.shape) for k, v in state.items()}


def check_weights(directory: Path, cfg: Any) -> None:
    """Refuse a local model whose weight files do not hold exactly the tensors its config makes."""
    want_tensors, want_elements = _expected(cfg)
    shapes: dict[str, tuple[int, ...]] = {}
    for path in _weight_files(directory):
        shapes.update(_file_shapes(path))
    body = {k: s for k, s in shapes.items() if not any(k.startswith(p) for p in HEAD_PREFIXES)}
    have_elements = 0
    for s in body.values():
        n = 1
        for d in s:
            n *= int(d)
        have_elements += n
    if (len(body), have_elements) != (want_tensors, want_elements):
        raise InputError(f"{directory}: the weights do not match config.json: {len(body)} tensors with "
                         f"{have_elements:,} values stored, the config makes {want_tensors} with "
                         f"{want_elements:,} (a missing or extra layer, or another model's weights)")


def check_loading_info(info: dict[str, Any], model: str) -> None:
    """Refuse what ``from_pretrained`` completed or dropped: missing, unexpected or mismatched keys."""
    missing = sorted(info.get("missing_keys") or [])
    unexpected = sorted(k for k in info.get("unexpected_keys") or []
                        if not any(k.startswith(p) for p in HEAD_PREFIXES))
    mismatched = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys") or [])
    errors = [str(e) for e in info.get("error_msgs") or []]
    from feda2v_toolkit.errors import short_list

    for what, keys in (("missing (they would be random)", missing), ("of another shape", mismatched),
                       ("unexpected", unexpected)):
        if keys:
            raise InputError(f"{model}: the checkpoint does not match its config: weights {what}: "
                             f"{short_list(keys, 3)}")
    if errors:
        raise InputError(f"{model}: loading the weights failed: {errors[0].splitlines()[0]}")


def hub_offline() -> bool:
    """Whether the Hugging Face hub is to be left alone: ``HF_HUB_OFFLINE`` set, or its host unreachable
    (a 3 s TCP probe; skipped when a proxy is configured)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _OFFLINE_VALUES:
        return True
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=3):
            return False
    except OSError:
        return True


def offline_error(model: str) -> UsageError:
    option = spelled("--model DIR", "model=DIR")
    return UsageError(f"{model}: not in the local Hugging Face cache and the hub cannot be reached (offline, or "
                      f"HF_HUB_OFFLINE=1); pass {option}: a directory saved with save_pretrained, e.g. made "
                      f"where there is network with `hf download {model} --local-dir DIR` (docs/data.md)")


def load_ast(model: str, *, revision: str | None = None) -> tuple[Any, Any]:
    """``(feature extractor, ASTModel)`` loaded strictly (module docstring); one-line errors otherwise."""
    import torch
    from transformers import ASTConfig, ASTFeatureExtractor, ASTModel

    local = Path(model).expanduser()
    is_local = local.is_dir()
    if not is_local and (os.path.lexists(local) or local.is_absolute() or model.startswith((".", "~"))
                         or model.count("/") > 1):
        what = "is not a directory" if os.path.lexists(local) else "no such directory"
        raise UsageError(f"{model}: cannot load an AST model and feature extractor: {what} (a local model is a "
                         "directory saved with save_pretrained; a hub name is ORG/NAME)")
    kwargs: dict[str, Any] = {"revision": revision}
    if is_local:
        for name, what in (("config.json", "model config"), ("preprocessor_config.json", "feature extractor config")):
            path = local / name
            if not os.path.lexists(path):
                raise UsageError(f"{model}: cannot load an AST model and feature extractor: no {name} (a directory "
                                 "saved with save_pretrained holds config.json, preprocessor_config.json and the "
                                 "weights)")
            _regular(path, what)
            if path.stat().st_size > MAX_CONFIG_BYTES:
                raise InputError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes; not a model config")
    elif hub_offline():
        kwargs["local_files_only"] = True
    try:
        cfg = ASTConfig.from_pretrained(model, **kwargs)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*mel filter has all zero values.*")
            extractor = ASTFeatureExtractor.from_pretrained(model, **kwargs)
    except (OSError, ValueError, TypeError, KeyError, RecursionError) as exc:
        if kwargs.get("local_files_only"):
            raise offline_error(model) from None
        raise UsageError(f"{model}: cannot load an AST model and feature extractor: {_first_line(exc)}") from None
    check_config(cfg, model)
    tensors, elements = _expected(cfg)
    from feda2v_toolkit.runtime.resources import require_memory

    require_memory(elements * 4 * 2, f"{model}: an AST of {elements:,} parameters")
    if is_local:
        check_weights(local, cfg)
    try:
        loaded, info = ASTModel.from_pretrained(model, config=cfg, dtype=torch.float32, output_loading_info=True,
                                                **kwargs)
    except Exception as exc:  # noqa: BLE001 - safetensors, torch and transformers raise many types
        if kwargs.get("local_files_only") and isinstance(exc, OSError):
            raise offline_error(model) from None
        raise InputError(f"{model}: cannot load the AST weights: {_first_line(exc)}") from None
    check_loading_info(info, model)
    return extractor, loaded
