"""Hostile inputs shared by the hardening tests: tampered model files, datasets, FIFOs, loops."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from feda2v_toolkit.config import schema_defaults
from feda2v_toolkit.generators.vae import VAEGenerator
from feda2v_toolkit.model.bundle import GenerativeModel
from feda2v_toolkit.model.file import save_model, write_safetensors
from feda2v_toolkit.reducers.adaptive_avg import AdaptiveAvgReducer
from feda2v_toolkit.upsamplers.interpolate import LinearUpsampler


def tiny_model() -> GenerativeModel:
    torch.manual_seed(0)
    cfg = {**schema_defaults(), "generator_hidden_dim": 16, "generator_latent_dim": 4, "use_conditioned_vae": True}
    gen = VAEGenerator.from_config(cfg, seq_len=4, dim=8, num_classes=2)
    return GenerativeModel(
        generator_type="vae", generators={"all": gen}, granularity="unified", class_names=["a", "b"],
        class_to_generator={"a": "all", "b": "all"}, reducer=AdaptiveAvgReducer(length=4),
        reducer_name="adaptive_avg", upsampler=LinearUpsampler(), upsampler_name="linear", full_length=30,
        training_length=4, output_length=30, dim=8, class_counts={"a": 3, "b": 3}, config=cfg, seed=0,
        data_dtype="float16")


def tamper(src: Path, dst: Path, edit_doc: Callable[[dict[str, Any]], None] | None = None,
           edit_tensors: Callable[[dict[str, torch.Tensor]], None] | None = None) -> Path:
    """Copy model file ``src`` to ``dst`` with its metadata document and/or tensors edited."""
    with safe_open(str(src), framework="pt") as fh:
        meta = dict(fh.metadata())
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open is not a dict
    doc = json.loads(meta["model"])
    if edit_doc:
        edit_doc(doc)
    if edit_tensors:
        edit_tensors(tensors)
    meta["model"] = json.dumps(doc)
    write_safetensors(dst, tensors, meta)
    return dst


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        *head, last = path.split(".")
        node: Any = doc
        for part in head:
            node = node[int(part)] if part.isdigit() else node[part]
        node[last] = value
    return edit


def _nan(tensors: dict[str, torch.Tensor]) -> None:
    name = next(k for k in sorted(tensors) if k.startswith("generators."))
    tensors[name] = torch.full_like(tensors[name], float("nan"))


#: tampered model files: name -> (metadata edit, tensor edit)
TAMPERED_MODELS: dict[str, tuple[Any, Any]] = {
    "class-names-string": (_set("class_names", "ab"), None),
    "hidden-dim-huge": (_set("generators.0.init_args.hidden_dim", 10**9), None),
    "hidden-dim-20000": (_set("generators.0.init_args.hidden_dim", 20000), None),
    # hidden_dim * hidden_dim overflows even on the meta device (once fell back to a real 13 GB build)
    "hidden-dim-overflows": (lambda doc: doc["generators"][0]["init_args"].update(
        hidden_dim=1_600_000_000, seq_len=1, dim=1, latent_dim=1, cond_embed_dim=1), None),
    "training-length-wrong": (_set("training_length", 5), None),
    "class-to-generator-empty": (_set("class_to_generator", {}), None),
    "class-counts-strings": (_set("class_counts", {"a": "x", "b": "x"}), None),
    "samples-per-class-list": (_set("config.synthetic_samples_per_class", [1]), None),
    "class-counts-negative": (_set("class_counts", {"a": -5, "b": 3}), None),
    "output-length-huge": (_set("output_length", 10**9), None),
    "dim-wrong": (_set("dim", 9), None),
    "generators-missing": (lambda doc: doc.pop("generators"), None),
    "init-args-not-object": (_set("generators.0.init_args", [1, 2]), None),
    "nan-weights": (None, _nan),
}


@pytest.fixture(scope="session")
def model_file(tmp_path_factory) -> Path:
    return save_model(tiny_model(), tmp_path_factory.mktemp("model") / "model.safetensors")


@pytest.fixture(scope="session")
def tampered(model_file, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tampered")
    return {name: tamper(model_file, root / f"{name}.safetensors", doc_edit, tensor_edit)
            for name, (doc_edit, tensor_edit) in TAMPERED_MODELS.items()}


@pytest.fixture
def fifo(tmp_path) -> Path:
    path = tmp_path / "fifo.json"
    os.mkfifo(path)
    return path


@pytest.fixture
def symlink_loop(tmp_path) -> Path:
    a, b = tmp_path / "loop_a", tmp_path / "loop_b"
    a.symlink_to(b)
    b.symlink_to(a)
    return a


@pytest.fixture
def not_a_dir(tmp_path) -> Path:
    """A regular file standing where a directory is needed: writing under it fails (also as root)."""
    path = tmp_path / "a_file"
    path.write_text("x")
    return path


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run ``feda2v-tk ARGV`` in this process: ``(exit code, stdout, stderr)``."""
    from feda2v_toolkit.cli import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    out, err = capsys.readouterr()
    code = info.value.code
    return (code if isinstance(code, int) else (0 if code is None else 1)), out, err
