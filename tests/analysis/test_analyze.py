"""``feda2v-tk analyze``: information kept by every reducer/upsampler pair, measured on held-out data."""

from __future__ import annotations

import json

import pytest
import torch

from feda2v_toolkit.analysis.analyze import OPTIMUM, analyze
from feda2v_toolkit.data.open import open_dataset
from feda2v_toolkit.data.writer import write_dataset
from feda2v_toolkit.plugins import get_registry

from .helpers import D, L, one_line_error, run_json, run_main, structured

FAST = ("--upsamplers", "linear,lstsq")


def without_timings(doc):
    if isinstance(doc, dict):
        return {k: without_timings(v) for k, v in doc.items() if k not in ("seconds", "fit")}
    if isinstance(doc, list):
        return [without_timings(v) for v in doc]
    return doc


@pytest.fixture(scope="module")
def structured_data(tmp_path_factory):
    """Two classes of structured sequences (rank-4 positional patterns + noise), 30 each."""
    x = torch.cat([structured(30, seed=0, rank=4, noise=0.3), structured(30, seed=1, rank=4, noise=0.3) + 0.2])
    labels = torch.arange(2).repeat_interleave(30)
    return write_dataset(tmp_path_factory.mktemp("s") / "s.safetensors", x, labels, class_names=["a", "b"])


def test_cli_json_covers_every_registered_pair_and_the_optimum(capsys, tiny_data):
    doc = run_json(capsys, "analyze", "--data", str(tiny_data), "--lengths", "2,8", "-q")
    registry = get_registry()
    reducers, upsamplers = registry.names("reducer"), registry.names("upsampler")
    assert doc["reducers"] == reducers and doc["upsamplers"] == upsamplers
    assert (doc["sequences"], doc["train"], doc["heldout"]) == (40, 32, 8)  # round(0.25 * 10) = 2 per class
    assert [(o["reducer"], o["length"]) for o in doc["optimum"]] == [(OPTIMUM, 2), (OPTIMUM, 8)]
    pairs = {(p["reducer"], p["upsampler"], p["length"]) for p in doc["pairs"]}
    for r in reducers:
        for u in upsamplers:
            positional = getattr(registry.load("reducer", r), "positional", True)
            if positional or registry.load("upsampler", u).trainable:
                assert {(r, u, 2), (r, u, 8)} <= pairs
            else:
                assert f"{r} + {u}" in " ".join(doc["notes"])
    row = next(p for p in doc["pairs"] if (p["reducer"], p["upsampler"], p["length"]) == ("adaptive_avg", "linear", 2))
    assert row["compression"] == 25.0
    assert row["r2"] < 1 and -1 <= row["cosine"] <= 1 and 0 <= row["accuracy"] <= 1
    assert 0 <= doc["baseline_accuracy"] <= 1
    assert any("capped" in n or "epochs" in n for n in doc["notes"])  # trainable upsamplers say how they were fitted


def test_the_pca_lstsq_pair_keeps_98_percent_of_the_linear_optimum(structured_data):
    result = analyze(structured_data, [1, 2, 4, 8], reducers=["pca", "adaptive_avg"], upsamplers=["lstsq", "linear"])
    for length in (1, 2, 4, 8):
        pair = result.pair("pca", "lstsq", length)
        assert pair.r2_vs_optimum >= 0.98
        assert result.pair("adaptive_avg", "lstsq", length).r2 > result.pair("adaptive_avg", "linear", length).r2
    optimum = {o.length: o.r2 for o in result.optimum}
    assert optimum[1] < optimum[2] < optimum[4]  # more positions keep more
    assert result.optimum[2].r2 > 0.9  # rank-4 structure: four components keep nearly everything
    assert result.explained_variance[4] > 0.9


def test_deterministic_under_seed_and_streaming_batch_size(capsys, tiny_data):
    args = ("analyze", "--data", str(tiny_data), "--lengths", "4", *FAST, "--seed", "3", "-q")
    first, second = run_json(capsys, *args), run_json(capsys, *args)
    assert without_timings(first) == without_timings(second)
    other = run_json(capsys, "analyze", "--data", str(tiny_data), "--lengths", "4", *FAST, "--seed", "4", "-q")
    assert without_timings(other) != without_timings(first)
    small = analyze(tiny_data, [4], upsamplers=["linear", "lstsq"], seed=3, batch_rows=3)
    for a, b in zip(small.to_json()["pairs"], first["pairs"], strict=True):
        assert a["r2"] == pytest.approx(b["r2"], abs=1e-5) and a["accuracy"] == b["accuracy"]


def test_table_and_plot(capsys, tiny_data, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "analysis.png"
    code, out, err = run_main(capsys, "analyze", "--data", str(tiny_data), "--lengths", "2,4", *FAST,
                              "--plot", str(png))
    assert code == 0, err
    assert "linear optimum" in out and "adaptive_avg" in out and "R^2" in out
    assert "position PCA" in err  # progress on stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_restricting_reducers_and_upsamplers(tiny_data):
    result = analyze(tiny_data, [4], reducers=["adaptive_avg"], upsamplers=["nearest"], optimum=False)
    assert [(p.reducer, p.upsampler) for p in result.pairs] == [("adaptive_avg", "nearest")]
    assert result.optimum == [] and all(p.r2_vs_optimum is None for p in result.pairs)


@pytest.mark.parametrize(("args", "message"), [
    (("--data", "missing.safetensors"), "missing.safetensors: no such file"),
    (("--lengths", "4,51"), "length 51 is outside 1..50"),
    (("--lengths", "0"), "--lengths: lengths must be in [1, 65536]"),
    (("--reducers", "nope"), "no reducer named 'nope'"),
    (("--holdout", "1.5"), "--holdout must be between 0 and 1"),
])
def test_bad_input_gives_one_line_errors(capsys, tiny_data, args, message):
    base = ["analyze", "--data", str(tiny_data), "--lengths", "4"]
    if args[0] == "--data":
        base = ["analyze"]
    code, line = one_line_error(capsys, *base, *args)
    assert message in line


def test_refuses_data_with_a_single_class(tmp_path):
    path = write_dataset(tmp_path / "one.safetensors", structured(8), torch.zeros(8, dtype=torch.long))
    with pytest.raises(Exception, match="at least 2 classes"):
        analyze(path, [4])


def test_json_is_strict(capsys, tmp_path):
    """NaN never reaches the JSON (a reducer that keeps nothing gives R^2 = 0, not NaN; NaN would be null)."""
    x = torch.zeros(12, L, D)
    x[:, :, 0] = torch.arange(float(L))  # every sequence the same: SST about the mean sequence = 0, R^2 undefined
    path = write_dataset(tmp_path / "flat.safetensors", x, torch.arange(2).repeat(6))
    assert open_dataset(path).seq_len == L
    code, out, err = run_main(capsys, "analyze", "--data", str(path), "--lengths", "2", "--upsamplers",
                              "linear", "--reducers", "adaptive_avg", "--json", "-q")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["pairs"][0]["r2"] is None


def test_pairs_are_ranked_and_recommended_by_accuracy_on_real(capsys, structured_data):
    """The recommendation is the pair whose reconstructions train the classifier best for real held-out
    sequences -- not the pair with the best R^2."""
    result = analyze(structured_data, [2, 8], upsamplers=["linear", "lstsq"])
    for length in (2, 8):
        rows = [p for p in result.pairs if p.length == length]
        best = result.recommended[length]
        assert best.accuracy_on_real == max(p.accuracy_on_real for p in rows)
    code, out, _ = run_main(capsys, "analyze", "--data", str(structured_data), "--lengths", "2",
                            "--upsamplers", "linear,lstsq", "-q")
    assert code == 0
    assert "recommended: length 2: " in out and "<- best" in out


def test_more_clips_than_max_clips_are_sampled_per_class_and_the_report_says_so(tiny_data):
    from feda2v_toolkit.analysis.analyze import proportional_sample

    kw = {"reducers": ["adaptive_avg"], "upsamplers": ["linear"], "optimum": False}
    whole = analyze(tiny_data, [4], **kw)
    sampled = analyze(tiny_data, [4], max_clips=20, **kw)
    assert whole.train + whole.heldout == 40 and not any("sample" in n for n in whole.notes)
    assert sampled.sequences == 40 and sampled.train + sampled.heldout == 20
    assert any("seeded sample of 20 of the 40 clips" in n for n in sampled.notes)
    labels = torch.arange(40) % 4
    rows = proportional_sample(labels, 20, 0)
    assert torch.bincount(labels[rows]).tolist() == [5, 5, 5, 5]
    assert torch.equal(rows, proportional_sample(labels, 20, 0)) and not torch.equal(rows, proportional_sample(labels, 20, 1))


def test_the_cli_default_of_max_clips_is_the_api_default():
    from feda2v_toolkit.analysis.analyze import DEFAULT_MAX_CLIPS
    from feda2v_toolkit.commands.analysis import analyze_cmd

    assert next(p for p in analyze_cmd.params if p.name == "max_clips").default == DEFAULT_MAX_CLIPS


def test_a_small_memory_budget_splits_the_shared_reads_keeps_features_on_disk_and_changes_no_figure(capsys, tiny_data, monkeypatch):
    from feda2v_toolkit.analysis import analyze as analyze_module

    groups = []
    real = analyze_module._Run.measure_group

    def spy(self, combos):
        groups.append(len(combos))
        return real(self, combos)

    stores = []

    class Store(analyze_module.ReducedCache):  # the reduced clips and the classifiers' training features
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            stores.append(self.in_memory)

    monkeypatch.setattr(analyze_module._Run, "measure_group", spy)
    monkeypatch.setattr(analyze_module, "ReducedCache", Store)
    monkeypatch.setattr(analyze_module, "CLASSIFIER_BLOCK", 7)  # several blocks of the classifiers' kernel
    ample = analyze(tiny_data, [4], upsamplers=["linear", "nearest", "lstsq"], memory_budget=2**40)
    assert max(groups) == 3  # the three pairs after adaptive_avg share one read
    assert len(stores) > 3 and all(stores)  # in memory
    groups.clear()
    stores.clear()
    tight = analyze(tiny_data, [4], upsamplers=["linear", "nearest", "lstsq"], memory_budget=1)
    assert max(groups) == 1  # one pair per read of the held-out clips
    assert len(stores) > 3 and not any(stores)  # ... and in temporary files
    assert without_timings(tight.to_json()) == without_timings(ample.to_json())
    # the command line takes the budget (and the environment default) like train does; the process-wide
    # budget it sets is put back after the test
    from feda2v_toolkit.runtime import resources

    monkeypatch.setitem(resources._BUDGET, "bytes", resources._BUDGET["bytes"])
    doc = run_json(capsys, "analyze", "--data", str(tiny_data), "--lengths", "4", "--upsamplers", "linear,nearest,lstsq",
                   "--memory-budget", "1KiB", "-q")
    assert without_timings(doc) == without_timings(json.loads(json.dumps(ample.to_json())))
