"""Streamed tensor files: the same bytes as writing the whole tensors, memory bounded by one chunk."""

from __future__ import annotations

import pytest
import torch

from feda2v_toolkit.runtime.tensorfile import StreamedTensor, write_safetensors, write_streamed_file


def test_a_streamed_file_has_the_bytes_of_the_whole_tensors(tmp_path):
    x = torch.randn(10, 3, 4).to(torch.float16)
    y = torch.arange(10)
    write_safetensors(tmp_path / "whole.safetensors", {"embeddings": x, "labels": y}, {"k": "v"})
    write_streamed_file(tmp_path / "streamed.safetensors",
                        {"embeddings": StreamedTensor(torch.float16, (10, 3, 4), lambda: iter(x.split(3))),
                         "labels": StreamedTensor(torch.long, (10,), lambda: iter([y]))}, {"k": "v"})
    assert (tmp_path / "whole.safetensors").read_bytes() == (tmp_path / "streamed.safetensors").read_bytes()


def test_chunks_that_do_not_add_up_leave_nothing(tmp_path):
    out = tmp_path / "bad.safetensors"
    with pytest.raises(ValueError, match="bytes written"):
        write_streamed_file(out, {"x": StreamedTensor(torch.float32, (4, 2), lambda: iter([torch.zeros(3, 2)]))})
    assert not out.exists() and list(tmp_path.iterdir()) == []
