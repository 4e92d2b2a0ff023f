"""``feda2v-tk evaluate``: synthetic samples of a trained model against held-out real data."""

from __future__ import annotations

import pytest
import torch

from feda2v_toolkit.analysis.evaluate import distribution_metrics, evaluate
from feda2v_toolkit.data.demo import write_demo_dataset
from feda2v_toolkit.model.file import load_model
from feda2v_toolkit.model.generate import DEFAULT_BATCH, generate
from feda2v_toolkit.training.pipeline import train

from .helpers import one_line_error, run_json, run_main


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data):
    """A per-class VAE (pca + lstsq) trained briefly on the tiny demo data, plus unseen real data."""
    root = tmp_path_factory.mktemp("eval")
    cfg = {"generator_training_sequence_length": 4, "generator_hidden_dim": 32, "generator_latent_dim": 8,
           "generator_training_epochs": 6, "generator_batch_size": 8, "generator_granularity": "per_class",
           "generator_reducer": "pca", "generator_upsampler": "lstsq", "generator_save_checkpoint": False,
           "generator_checkpoint_dir": str(root / "ck"), "generator_output_sequence_length": 50,
           "generator_validation_split": 0.2}
    model_path = root / "m.safetensors"
    train(cfg, tiny_data, out=model_path, seed=0)
    real = write_demo_dataset(root / "real.safetensors", 8, seq_len=50, dim=16, seed=1)
    return model_path, real


def test_cli_json_has_per_class_metrics_and_downstream_accuracies(capsys, trained):
    model, real = trained
    doc = run_json(capsys, "evaluate", str(model), "--data", str(real), "-q")
    assert doc["classes"] == ["engine", "drum", "whistle", "bird"]
    for name in doc["classes"]:
        m = doc["per_class"][name]
        assert (m["real"], m["synthetic"]) == (8, 8)
        assert m["frechet"] > 0 and m["frechet_real_halves"] > 0
        assert 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1 and 0 <= m["coverage"] <= 1
    assert doc["overall"]["real"] == 32
    d = doc["downstream"]
    assert (d["real_train"], d["real_test"], d["synthetic"]) == (16, 16, 32)
    for key in ("real_only", "tstr", "augmented"):
        assert 0 <= d[key] <= 1
    assert set(d["per_class"]["drum"]) == {"real_only", "tstr", "augmented"}


def test_deterministic_under_seed(capsys, trained):
    model, real = trained
    args = ("evaluate", str(model), "--data", str(real), "-q", "-k", "5")

    def strip(doc):
        doc.pop("seconds")
        return doc

    a, b = strip(run_json(capsys, *args, "--seed", "2")), strip(run_json(capsys, *args, "--seed", "2"))
    assert a == b
    assert strip(run_json(capsys, *args, "--seed", "3")) != a


def test_synthetic_draws_are_those_of_generate(trained, tmp_path, monkeypatch):
    """evaluate --seed S measures the very samples `feda2v-tk generate --seed S` writes."""
    import feda2v_toolkit.analysis.evaluate as evaluate_module
    from feda2v_toolkit.data.open import open_dataset

    model_path, real = trained
    model = load_model(model_path)
    n = DEFAULT_BATCH + 6  # more than one batch
    generate(model, tmp_path / "syn", samples=n, classes=["drum"], seed=5, length=50, dtype="float32")
    written = open_dataset(tmp_path / "syn").read(list(range(n))).embeddings

    seen = []
    stream = evaluate_module.sample_class_reduced

    def recording(model, class_name, n_asked, **kw):
        for reduced, cond in stream(model, class_name, n_asked, **kw):
            if class_name == "drum" and n_asked == n:  # not the usefulness draws (as many as real training clips)
                seen.append(reduced)
            yield reduced, cond

    monkeypatch.setattr(evaluate_module, "sample_class_reduced", recording)
    evaluate(model, real, samples_per_class=n, seed=5)
    scored = torch.cat(seen)
    assert len(seen) == 2 and scored.shape[0] == n
    torch.testing.assert_close(model.upsample(scored, 50), written)


def test_heldout_split_uses_only_what_the_trainer_held_out(trained, tiny_data):
    model, _ = trained
    result = evaluate(model, tiny_data, split="heldout", samples_per_class=4)
    assert result.overall.real == 8  # round(0.2 * 10) = 2 per class, as the trainer held out
    with pytest.raises(Exception, match="needs the dataset the model was trained on"):
        evaluate(model, trained[1], split="heldout")


def test_table_and_plot(capsys, trained, tmp_path):
    pytest.importorskip("matplotlib")
    model, real = trained
    png = tmp_path / "eval.png"
    code, out, err = run_main(capsys, "evaluate", str(model), "--data", str(real), "--plot", str(png))
    assert code == 0, err
    assert "Frechet" in out and "train-on-synthetic" in out and "(all)" in out
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_distribution_metrics_of_real_against_itself():
    x = torch.randn(30, 6, generator=torch.Generator().manual_seed(0))
    m = distribution_metrics(x, x)
    assert m.frechet == pytest.approx(0, abs=1e-8) and m.mean_gap == pytest.approx(0, abs=1e-12)
    assert (m.precision, m.recall, m.coverage, m.diversity_ratio) == (1.0, 1.0, 1.0, 1.0)


@pytest.mark.parametrize(("args", "message"), [
    (("missing.safetensors", "--data", "{real}"), "missing.safetensors: no such file"),
    (("{model}", "--data", "missing.safetensors"), "missing.safetensors: no such file"),
    (("{model}", "--data", "{other}"), "sequences are [40, 16], the model's are [50, 16]"),
    (("{model}", "--data", "{real}", "--test-fraction", "0"), "--test-fraction must be between 0 and 1"),
    (("{real}", "--data", "{real}"), "not a model file"),
])
def test_bad_input_gives_one_line_errors(capsys, trained, tmp_path, args, message):
    model, real = trained
    other = write_demo_dataset(tmp_path / "other.safetensors", 2, seq_len=40, dim=16)
    filled = [a.format(model=model, real=real, other=other) for a in args]
    _, line = one_line_error(capsys, "evaluate", *filled)
    assert message in line


def test_data_of_classes_the_model_cannot_sample_is_refused_naming_both_files(capsys, trained, tmp_path):
    from feda2v_toolkit.data.writer import write_dataset

    model, _ = trained
    strangers = write_dataset(tmp_path / "s.safetensors", torch.randn(4, 50, 16), [0, 0, 1, 1],
                              class_names=["cat", "owl"])
    _, line = one_line_error(capsys, "evaluate", str(model), "--data", str(strangers))
    assert line == (f"feda2v-tk: error: {strangers}: none of its classes (cat, owl) can be sampled by the model "
                    f"{model} (it samples engine, drum, whistle, bird)")


def copying(model, data):
    """Make ``model`` sample (normalised) training sequences of the asked class verbatim: a memoriser."""
    from feda2v_toolkit.data.open import open_dataset

    ds = open_dataset(data)
    reduced = model.normalize(model.reducer(ds.read(torch.arange(len(ds))).embeddings))
    for key, gen in model.generators.items():
        def sample(n, *, labels=None, conditions=None, generator=None, _key=key):
            rows = (ds.labels == ds.class_names.index(_key)).nonzero().flatten()
            pick = rows[torch.randint(rows.numel(), (n,), generator=generator)]
            return reduced[pick]
        gen.sample = sample
    return model


def test_privacy_flags_a_generator_that_copies_its_training_data(trained, tiny_data):
    model_path, real = trained
    honest = evaluate(model_path, real, train_data=tiny_data, samples_per_class=8)
    assert set(honest.privacy) == {"engine", "drum", "whistle", "bird", "(all)"}
    for name, m in honest.privacy.items():  # the trainer's train split: 2 of each class's 10 were validation
        assert m.synthetic_dcr > 0 and m.real_dcr > 0 and m.training == (32 if name == "(all)" else 8)
    copier = evaluate(copying(load_model(model_path), tiny_data), real, train_data=tiny_data, samples_per_class=8)
    for m in copier.privacy.values():
        assert m.synthetic_dcr == pytest.approx(0.0, abs=1e-4) and m.ratio < 0.01 and m.memorising
        assert m.close_share == 1.0
    assert any("MEMORISATION" in n for n in copier.notes)
    assert copier.privacy["(all)"].ratio < honest.privacy["(all)"].ratio


def test_privacy_needs_the_training_data(capsys, trained, tiny_data, tmp_path):
    pytest.importorskip("matplotlib")
    model, real = trained
    doc = run_json(capsys, "evaluate", str(model), "--data", str(real), "-q")
    assert doc["privacy"] == {} and any("--train-data" in n for n in doc["notes"])
    doc = run_json(capsys, "evaluate", str(model), "--data", str(tiny_data), "--split", "heldout", "-q")
    assert doc["privacy"]["(all)"]["training"] == 32  # 40 sequences, 2 per class held out by the trainer
    png = tmp_path / "audit.png"  # with the ROC panel of the membership audit
    code, out, _ = run_main(capsys, "evaluate", str(model), "--data", str(real), "--train-data", str(tiny_data),
                            "-q", "--plot", str(png))
    assert code == 0 and "distance to the closest training sequence" in out and "membership inference" in out
    assert "TPR at FPR 0.1%" in out and png.read_bytes()[:4] == b"\x89PNG"
