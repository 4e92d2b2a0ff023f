"""``feda2v-tk privacy-tradeoff``: one model per target epsilon (and seed) on the user's data, usefulness and
the membership audit's headline side by side."""

from __future__ import annotations

import json
import math

import pytest

from feda2v_toolkit.analysis.membership import dp_auc_bound
from feda2v_toolkit.analysis.tables import tradeoff_text
from feda2v_toolkit.analysis.tradeoff import parse_epsilons, privacy_tradeoff
from feda2v_toolkit.data.demo import write_demo_dataset
from feda2v_toolkit.errors import UsageError
from feda2v_toolkit.training import pipeline

from .helpers import one_line_error, run_main

#: the default closed-form generator at a small length: a model trains and evaluates in a fraction of a second
FAST = {"generator_training_sequence_length": 4}


@pytest.fixture
def trainer_calls(monkeypatch):
    """What every training of the trade-off was asked for: the overrides and the seed of each call."""
    calls = []
    real_train = pipeline.train

    def spy(config, data, **kw):
        calls.append({"overrides": dict(kw["overrides"]), "seed": kw["seed"], "rows": data.rows.tolist()})
        return real_train(config, data, **kw)

    monkeypatch.setattr(pipeline, "train", spy)
    return calls


def test_each_target_epsilon_and_seed_is_one_model_trained_on_the_seeds_split(tiny_data, trainer_calls):
    result = privacy_tradeoff(FAST, tiny_data, "inf,1", seeds=2, usefulness_draws=1, bootstrap=20)

    assert result.epsilons == [1.0, None]  # sorted; inf (no DP) last, as None like the config key
    assert [(c["overrides"]["generator_dp_epsilon"], c["seed"]) for c in trainer_calls] == \
        [(1.0, 0), (1.0, 1), (None, 0), (None, 1)]
    for call in trainer_calls:  # the trade-off holds out its own clips; the trainer holds out nothing more
        assert call["overrides"]["generator_validation_split"] == 0
        assert call["overrides"]["generator_dp_delta"] == 1e-5
        assert len(call["rows"]) == 20  # half of each class's 10 clips
    rows = {(c["overrides"]["generator_dp_epsilon"], c["seed"]): c["rows"] for c in trainer_calls}
    assert rows[(1.0, 0)] == rows[(None, 0)] and rows[(1.0, 1)] == rows[(None, 1)]  # one split per seed ...
    assert rows[(1.0, 0)] != rows[(1.0, 1)]  # ... another seed, another split
    assert result.train_clips == result.heldout_clips == {"engine": 5, "drum": 5, "whistle": 5, "bird": 5}
    assert [(r.epsilon, r.seed) for r in result.runs] == [(1.0, 0), (1.0, 1), (None, 0), (None, 1)]
    for run in result.runs:
        if run.epsilon is not None:  # 5 clips per class rarely meet epsilon 1 (the noise is secret: it varies)
            if run.refused is not None:  # then a row with the reason (the trainer's, or a degenerate model's)
                assert ("clips" in run.refused or "evaluation failed" in run.refused) and run.auc is None
            else:
                assert run.spent_epsilon is not None and run.spent_epsilon <= 1.0 * (1 + 1e-6)
            continue
        assert run.refused is None
        assert run.usefulness is not None and run.usefulness > 0
        assert run.attack is not None and 0 <= run.auc_low <= run.auc <= run.auc_high <= 1
        assert 0 <= run.tpr_at_1pct <= 1 and run.tpr_reliable is False  # 20 non-members: too few for FPR 1%
        assert run.train_seconds > 0
    dp_run, no_dp_run = result.runs[0], result.runs[2]
    assert dp_run.delta == 1e-5
    assert no_dp_run.delta is None and no_dp_run.auc_bound is None and no_dp_run.spent_epsilon is None
    assert result.points[0].runs + result.points[0].refused == 2
    point = result.points[1]
    assert point.runs == 2 and point.auc == pytest.approx((result.runs[2].auc + result.runs[3].auc) / 2)
    assert point.usefulness_low <= point.usefulness <= point.usefulness_high


def test_a_target_the_trainer_refuses_is_a_row_with_the_reason(tiny_data, monkeypatch):
    from feda2v_toolkit.privacy.spec import PrivacyError

    real_train = pipeline.train

    def refusing(config, data, **kw):
        if kw["overrides"]["generator_dp_epsilon"] is not None:
            raise PrivacyError("too few clips per class for epsilon 0.5")
        return real_train(config, data, **kw)

    monkeypatch.setattr(pipeline, "train", refusing)
    result = privacy_tradeoff(FAST, tiny_data, [0.5, None], usefulness_draws=1, bootstrap=20)
    refused, measured = result.runs
    assert refused.refused == "too few clips per class for epsilon 0.5" and refused.auc is None
    assert measured.refused is None and measured.auc is not None
    assert (result.points[0].runs, result.points[0].refused) == (0, 1)
    text = tradeoff_text(result)
    assert "refused: epsilon 0.5, seed 0: too few clips per class for epsilon 0.5" in text


def test_the_spent_epsilon_is_at_most_the_target(tmp_path):
    """With record-level DP wired into training, every model of the trade-off records what it spent, within
    the target. (Fails while the trainer applies no DP: then the model records no spend.)"""
    data = write_demo_dataset(tmp_path / "d.safetensors", 100, seq_len=8, dim=32, num_classes=2)
    result = privacy_tradeoff(FAST, data, [2, 8], delta=1e-4, usefulness_draws=1, bootstrap=20)
    for run in result.runs:
        assert run.refused is None, run.refused
        assert run.spent_epsilon is not None, f"epsilon {run.epsilon}: the model records no DP spend"
        assert run.spent_epsilon <= run.epsilon * (1 + 1e-6)
        assert run.spent_delta is not None and run.spent_delta <= 1e-4 * (1 + 1e-6)
        assert run.auc_bound == pytest.approx(dp_auc_bound(run.epsilon, 1e-4))


def test_epsilon_lists_are_parsed_sorted_and_checked():
    assert parse_epsilons("8, 0.5,inf,1,1") == [0.5, 1.0, 8.0, math.inf]
    assert parse_epsilons([None, 2]) == [2.0, math.inf]
    for bad in ("0", "-1,2", "1,abc", "", "nan", ",,"):
        with pytest.raises(UsageError):
            parse_epsilons(bad)


def test_cli_prints_the_table_and_writes_the_report_and_the_plot(capsys, tiny_data, tmp_path):
    pytest.importorskip("matplotlib")
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"feda2v": FAST}))
    report, png = tmp_path / "out" / "tradeoff.json", tmp_path / "tradeoff.png"
    code, out, err = run_main(capsys, "privacy-tradeoff", str(tiny_data), "-c", str(cfg), "--epsilons", "1,inf",
                              "--delta", "1e-6", "--usefulness-draws", "1", "-o", str(report), "--plot", str(png))
    assert code == 0, err
    assert "epsilon" in out and "usefulness" in out and "membership AUC" in out and "no DP" in out
    assert "feda2v-tk: epsilon 1, seed 0: training on 20 clips" in err  # a progress line per epsilon
    assert "feda2v-tk: no DP, seed 0:" in err
    doc = json.loads(report.read_text())
    assert doc["epsilons"] == [1.0, None] and doc["delta"] == 1e-6
    assert [r["epsilon"] for r in doc["runs"]] == [1.0, None]
    first = doc["runs"][0]  # 5 clips per class rarely meet epsilon 1: a row with the reason, or a measured one
    assert ("clips" in first["refused"] or "evaluation failed" in first["refused"]) if first["refused"] else \
        first["spent_epsilon"] <= 1.0 * (1 + 1e-6)
    assert png.read_bytes()[:4] == b"\x89PNG"
    code, out, err = run_main(capsys, "privacy-tradeoff", str(tiny_data), "-c", str(cfg), "--epsilons", "inf",
                              "--usefulness-draws", "1", "--json", "-q")
    assert code == 0 and err == ""
    assert json.loads(out)["points"][0]["epsilon"] is None


@pytest.mark.parametrize(("args", "message"), [
    (("--epsilons", "0,1"), "--epsilons: every epsilon must be > 0"),
    (("--epsilons", "-2"), "--epsilons: every epsilon must be > 0"),
    (("--epsilons", "1,two"), "--epsilons: expected comma-separated numbers > 0 or 'inf'"),
    (("--epsilons", ","), "--epsilons: give at least one epsilon"),
    (("--delta", "0"), "--delta must be between 0 and 1"),
    (("--delta", "1"), "--delta must be between 0 and 1"),
    (("--delta", "tiny"), "--delta must be a number between 0 and 1"),
    (("--seeds", "0"), "--seeds must be >= 1"),
    (("--test-fraction", "1"), "--test-fraction must be between 0 and 1"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_is_trained_or_written(capsys, tiny_data, tmp_path, monkeypatch,
                                                                         args, message):
    monkeypatch.setattr(pipeline, "train", lambda *a, **k: pytest.fail("trained despite bad input"))
    report, png = tmp_path / "r.json", tmp_path / "p.png"
    code, line = one_line_error(capsys, "privacy-tradeoff", str(tiny_data), *args, "-o", str(report),
                                "--plot", str(png))
    assert code == 2 and message in line
    assert not report.exists() and not png.exists()


def test_an_existing_output_is_refused_before_any_training(capsys, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "train", lambda *a, **k: pytest.fail("trained despite a refused output"))
    report = tmp_path / "r.json"
    report.write_text("{}")
    code, line = one_line_error(capsys, "privacy-tradeoff", str(tiny_data), "-o", str(report))
    assert code == 2 and "exists" in line and "--overwrite" in line
    assert report.read_text() == "{}"
    code, line = one_line_error(capsys, "privacy-tradeoff", str(tiny_data), "-o", str(tiny_data), "--overwrite")
    assert code == 2 and "input" in line


def test_too_few_clips_to_hold_out_is_one_line(capsys, tmp_path):
    data = write_demo_dataset(tmp_path / "small.safetensors", 2, seq_len=50, dim=16)
    code, line = one_line_error(capsys, "privacy-tradeoff", str(data), "--epsilons", "inf")
    assert code == 2 and "fewer than 2 held-out clips" in line


def test_a_model_whose_evaluation_fails_is_a_row_with_the_reason(tiny_data, monkeypatch):
    from feda2v_toolkit.analysis import evaluate as evaluate_module

    def failing(*_a, **_k):
        raise ValueError("the classifier's training features are not finite (NaN or inf samples)")

    monkeypatch.setattr(evaluate_module, "evaluate", failing)
    result = privacy_tradeoff(FAST, tiny_data, [None], usefulness_draws=1, bootstrap=20)
    assert result.runs[0].refused.startswith("evaluation failed: the classifier's training features")
