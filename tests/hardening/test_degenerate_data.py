"""Valid but degenerate data is refused in one line naming the data, never an internal error: clips that do not
vary within their classes (identical clips, one clip per class) -- a closed-form model would draw copies of them
-- and finite values too large for float32 arithmetic (their squares overflow)."""

from __future__ import annotations

import pytest
import torch

from feda2v_toolkit.data.writer import write_dataset
from tests.hardening.conftest import run_main

LABELS = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])


def _train(path, tmp_path, capsys, *extra):
    return run_main(["train", "-d", str(path), "-o", str(tmp_path / "m.safetensors"), "--training-length", "2",
                     "--seed", "0", "-q", *extra], capsys)


@pytest.mark.parametrize("name, embeddings, labels", [
    ("identical", torch.full((8, 16, 4), 3.0), LABELS),
    ("one per class", torch.randn(2, 16, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1])),
])
def test_clips_that_do_not_vary_within_their_classes_are_refused_not_copied(name, embeddings, labels, tmp_path,
                                                                           capsys):
    path = tmp_path / "flat.safetensors"
    write_dataset(path, embeddings, labels, class_names=["a", "b"])
    code, _, err = _train(path, tmp_path, capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "flat.safetensors" in err and "do not vary about their class means" in err and "internal" not in err
    assert "learning_rate" not in err  # the closed-form fit has none
    assert not (tmp_path / "m.safetensors").exists()


def test_identical_clips_still_fit_the_lstsq_decoder_of_a_trained_generator(tmp_path, capsys):
    """The decoder of reduced sequences that do not vary is the mean sequence (no singular solve)."""
    path = tmp_path / "flat.safetensors"
    write_dataset(path, torch.full((8, 16, 4), 3.0), LABELS, class_names=["a", "b"])
    code, _, err = _train(path, tmp_path, capsys, "--generator-type", "vae", "--epochs", "1")
    assert code == 0, err


def test_values_too_large_for_float32_sums_are_refused_naming_the_file(tmp_path, capsys):
    path = tmp_path / "huge.safetensors"
    write_dataset(path, torch.randn(8, 16, 4, generator=torch.Generator().manual_seed(0)) * 1e37, LABELS,
                  class_names=["a", "b"], dtype="float32")
    code, _, err = _train(path, tmp_path, capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "huge.safetensors" in err and "too large in magnitude" in err and "internal" not in err
    fine = tmp_path / "fine.safetensors"  # large for audio, fine for float32
    write_dataset(fine, torch.randn(8, 16, 4, generator=torch.Generator().manual_seed(0)) * 1e3, LABELS,
                  class_names=["a", "b"], dtype="float32")
    assert _train(fine, tmp_path, capsys)[0] == 0
