"""Threads and the math libraries: oneMKL's vector math is settled on one thread before any pipeline runs."""

from __future__ import annotations

import pytest
import torch

from feda2v_toolkit.runtime import threads


def test_every_vector_math_op_is_called_once_on_one_thread_in_both_float_dtypes(monkeypatch):
    calls = []
    for name in threads.VML_OPS:
        real = getattr(torch, name)

        def spy(x, *a, real=real, name=name, **k):
            calls.append((name, str(x.dtype), torch.get_num_threads()))
            return real(x, *a, **k)

        monkeypatch.setattr(torch, name, spy)
    monkeypatch.setitem(threads._SETTLED, "done", False)
    before = torch.get_num_threads()
    threads.settle_vector_math()
    threads.settle_vector_math()  # once per process
    assert sorted(calls) == sorted((n, d, 1) for n in threads.VML_OPS for d in ("torch.float32", "torch.float64"))
    assert torch.get_num_threads() == before


def test_the_vector_math_ops_exist_in_torch():
    assert all(callable(getattr(torch, name)) for name in threads.VML_OPS)


@pytest.mark.parametrize("entry", ["training.pipeline:run_pipeline", "training.site:Site", "model.generate:generate",
                                   "analysis.evaluate:evaluate", "analysis.analyze:analyze", "audio.embed:embed"])
def test_every_pipeline_that_promises_the_same_bytes_settles_the_vector_math_first(entry):
    import importlib
    import inspect

    module, name = entry.split(":")
    source = inspect.getsource(getattr(importlib.import_module(f"feda2v_toolkit.{module}"), name))
    assert "settle_vector_math()" in source


def test_training_settles_the_vector_math_before_its_first_op(tiny_data, tmp_path, monkeypatch):
    from feda2v_toolkit.training.pipeline import train

    seen = []
    monkeypatch.setattr(threads, "settle_vector_math", lambda: seen.append(torch.get_num_threads()))
    train({"generator_training_sequence_length": 4}, tiny_data, out=tmp_path / "m.safetensors", seed=0, progress=False)
    assert seen
