"""The demo dataset: AST layout, determinism, and class structure that reduction partly loses."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from feda2v_toolkit.data.demo import CLASS_NAMES, _Layout, make_demo_dataset, write_demo_dataset
from feda2v_toolkit.data.open import open_dataset


def test_ast_layout_has_two_summary_tokens_then_12_by_101_frequency_major_patches():
    lay = _Layout.of(1214)
    assert (lay.n_freq, lay.n_time) == (12, 101)
    assert lay.freq[:2].tolist() == [-1, -1]
    assert lay.freq[2:103].unique().tolist() == [0]
    assert lay.freq[-1].item() == 11


def test_same_seed_same_data_and_sample_i_does_not_depend_on_n():
    a, la, names = make_demo_dataset(2, seq_len=30, dim=8, seed=3)
    b, lb, _ = make_demo_dataset(2, seq_len=30, dim=8, seed=3)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert names == list(CLASS_NAMES)
    c, _, _ = make_demo_dataset(3, seq_len=30, dim=8, seed=3)
    assert torch.equal(a[0], c[0])  # first clip of the first class is the same clip
    d, _, _ = make_demo_dataset(2, seq_len=30, dim=8, seed=4)
    assert not torch.equal(a, d)


def test_file_and_shard_directory_hold_the_same_clips(tmp_path):
    f = open_dataset(write_demo_dataset(tmp_path / "d.safetensors", 3, seq_len=30, dim=8))
    d = open_dataset(write_demo_dataset(tmp_path / "dir", 3, seq_len=30, dim=8, shard_bytes=30 * 8 * 2 * 5))
    assert len(list((tmp_path / "dir").iterdir())) > 1
    assert torch.equal(f.read(range(12)).embeddings, d.read(range(12)).embeddings)
    assert f.class_names == d.class_names == list(CLASS_NAMES)


def _nearest_centroid_accuracy(x: torch.Tensor, y: torch.Tensor, length: int) -> float:
    r = F.adaptive_avg_pool1d(x.transpose(1, 2), length).flatten(1)
    train = torch.arange(len(x)) % 2 == 0
    centroids = torch.stack([r[train & (y == c)].mean(0) for c in range(4)])
    pred = torch.cdist(r[~train], centroids).argmin(1)
    return float((pred == y[~train]).float().mean())


def test_classes_differ_in_band_and_envelope_so_coarse_pooling_loses_part_of_them():
    x, y, _ = make_demo_dataset(30, seq_len=1214, dim=32, seed=0)
    one_token = _nearest_centroid_accuracy(x, y, 1)
    two_tokens = _nearest_centroid_accuracy(x, y, 2)
    fine = _nearest_centroid_accuracy(x, y, 96)
    assert one_token < 0.6  # one pooled token hides the frequency band and the envelope
    assert two_tokens > one_token + 0.1  # halves of a frequency-major sequence reveal the band
    assert fine > 0.9  # time resolution within frequency rows reveals the envelope


def test_first_clip_draws_new_clips_of_the_same_structure():
    a, _, _ = make_demo_dataset(2, seq_len=30, dim=8, seed=3)
    b, _, _ = make_demo_dataset(2, seq_len=30, dim=8, seed=3, first_clip=1)
    assert torch.equal(a[1], b[0])  # clip 1 of the first draw is clip 0 of the shifted one
    held_out, _, _ = make_demo_dataset(2, seq_len=30, dim=8, seed=3, first_clip=8)
    assert not any(torch.equal(h, x) for h in held_out for x in a)
    # same positional component: the mean over clips agrees far better than with another seed
    other, _, _ = make_demo_dataset(2, seq_len=30, dim=8, seed=4)
    assert (a.mean(0) - held_out.mean(0)).norm() < 0.5 * (a.mean(0) - other.mean(0)).norm()


def test_demo_data_command_reports_what_it_wrote_unless_quiet(tmp_path, capsys):
    from feda2v_toolkit.cli import main

    for args, expect in ((["a.safetensors"], "wrote 8 clips [30, 8] float16"), (["b.safetensors", "-q"], "")):
        try:
            main(["demo-data", str(tmp_path / args[0]), "--per-class", "2", "--seq-len", "30", "--dim", "8", *args[1:]])
        except SystemExit as exc:
            assert not exc.code
        err = capsys.readouterr().err
        assert (expect in err) if expect else err == ""
        assert len(open_dataset(tmp_path / args[0])) == 8
