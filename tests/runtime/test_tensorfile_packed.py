"""Tensors packed into safetensors bytes in memory (the ranks' exchange): the file's bytes, rebuilt as views."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load

from feda2v_toolkit.runtime.tensorfile import pack_tensors, unpack_tensors, write_tensor_file

TENSORS = {
    "values": torch.randn(5, 3, 4),
    "sums": torch.randn(3, 4, dtype=torch.float64),
    "half": torch.randn(7).to(torch.float16),
    "count": torch.tensor(12.0, dtype=torch.float64),
    "block": torch.tensor([3, 1536]),
    "digest": torch.arange(13, dtype=torch.uint8),
    "mask": torch.tensor([True, False, True]),
    "empty": torch.zeros(0, 4),
}


def test_packed_bytes_are_the_file_that_write_tensor_file_writes(tmp_path):
    write_tensor_file(tmp_path / "f.safetensors", TENSORS)
    packed = pack_tensors(TENSORS)
    assert packed.dtype == torch.uint8
    assert bytes(packed.numpy().tobytes()) == (tmp_path / "f.safetensors").read_bytes()
    assert set(load(bytes(packed.numpy().tobytes()))) == set(TENSORS)  # the library reads them


def test_unpacked_tensors_are_the_tensors_and_views_of_the_buffer_without_a_copy():
    packed = pack_tensors(TENSORS)
    out = unpack_tensors(packed)
    assert set(out) == set(TENSORS)
    for name, t in TENSORS.items():
        assert out[name].dtype == t.dtype and out[name].shape == t.shape
        assert torch.equal(out[name], t), name
        if t.numel():
            assert out[name].untyped_storage().data_ptr() == packed.untyped_storage().data_ptr(), name


def test_a_tensor_off_its_alignment_is_copied_not_misread():
    packed = pack_tensors({"x": torch.arange(4, dtype=torch.float64)})
    shifted = torch.empty(packed.numel() + 1, dtype=torch.uint8)[1:]  # the same bytes, one byte off
    shifted.copy_(packed)
    assert torch.equal(unpack_tensors(shifted)["x"], torch.arange(4, dtype=torch.float64))


@pytest.mark.parametrize("damage", ["header length", "offsets", "too short"])
def test_damaged_bytes_are_refused_not_read_past_the_buffer(damage):
    packed = pack_tensors({"x": torch.ones(4)})
    if damage == "too short":
        with pytest.raises(ValueError, match="header"):
            unpack_tensors(packed[:5])
    elif damage == "header length":
        packed[:8] = torch.tensor(list((10**6).to_bytes(8, "little")), dtype=torch.uint8)
        with pytest.raises(ValueError, match="header"):
            unpack_tensors(packed)
    else:
        with pytest.raises(ValueError, match="tensor 'x'"):
            unpack_tensors(packed[:-4])
