"""Record-level differential privacy in the one pipeline (feda2v_toolkit/training/private.py, docs/privacy.md):
one switch on train and federate; every release clipped and noised at its site; the spend recorded per
release; nothing exact leaves a site; impossible or unprotectable runs refused before anything is written."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from feda2v_toolkit.cli import cli
from feda2v_toolkit.privacy.spec import PrivacyError
from feda2v_toolkit.training.pipeline import LocalTransport, run_pipeline, train
from feda2v_toolkit.training.site import Site
from feda2v_toolkit.training.spec import RunSpec

#: 4 classes x 60 clips of [12, 8]: enough clips for the noisy histograms at epsilon 8
SHAPE = {"seq_len": 12, "dim": 8}
GAUSSIAN = {"generator_type": "gaussian", "generator_training_sequence_length": 4,
            "generator_save_checkpoint": False}


@pytest.fixture(scope="module")
def dp_data(tmp_path_factory):
    from feda2v_toolkit.data.demo import write_demo_dataset

    return write_demo_dataset(tmp_path_factory.mktemp("dp") / "dp.safetensors", 60, **SHAPE)


def dp(epsilon: float, delta: float = 1e-3, **extra):
    return {**GAUSSIAN, "generator_dp_epsilon": epsilon, "generator_dp_delta": delta, **extra}


class Recording(LocalTransport):
    """Sites in this process; keeps every stage asked and every reply that left a site."""

    def __init__(self, sites):
        super().__init__(sites)
        self.log = []

    def exchange(self, stage, requests):
        replies = super().exchange(stage, requests)
        self.log.append((stage, requests, replies))
        return replies


def test_the_spend_meets_the_target_and_is_recorded_per_release(dp_data):
    model = train(dp(8.0), dp_data, seed=0)
    p = model.metrics["privacy"]
    assert p["unit"] == "one clip (record-level)" and p["target_epsilon"] == 8.0 and p["delta"] == 1e-3
    assert p["epsilon"] <= 8.0 * (1 + 1e-9) and p["epsilon"] > 7.9  # calibrated to spend the budget, not more
    spent = {n: r for n, r in p["releases"].items() if r["data_dependent"]}
    assert {"classes.counts", "normalization.sum", "lstsq.sxr", "gaussian.basis", "gaussian.sums",
            "gaussian.scatter"} <= set(spent)
    assert all(0 < r["epsilon"] < 8.0 for r in spent.values())  # each release alone spends less than the total
    free = {n for n, r in p["releases"].items() if not r["data_dependent"]}
    assert "reducer.AdaptiveAvgReducer" in free  # adaptive_avg is chosen without the clips: it spends nothing


def test_a_private_model_records_no_exact_counts_or_losses(dp_data):
    model = train(dp(8.0), dp_data, seed=0)
    assert all(s["classes"] == {} for s in model.metrics["sites"])
    assert model.metrics["val"] is None and model.metrics["upsampler"].get("heldout_mse") is None
    assert set(model.metrics["privacy"]["noisy_class_counts"]) == set(model.class_names)


def test_nothing_exact_leaves_a_site(dp_data, tmp_path):
    from feda2v_toolkit.data.split import split_dataset

    nodes = [n["path"] for n in split_dataset(dp_data, tmp_path / "nodes", 2, how="class", seed=0)["nodes"]]
    spec = RunSpec.resolve(dp(8.0), seed=0)
    transport = Recording([Site(path, spec, None) for path in nodes])
    model = run_pipeline(spec, transport, schedule=spec.federated_schedule(), engine="local")
    stages = [s for s, _, _ in transport.log]
    assert "upsampler_heldout" not in stages and "generator_heldout" not in stages
    assert "generator_statistics" not in stages and "upsampler" not in stages  # the exact statistics
    for stage, _, replies in transport.log:
        for arrays, meta in replies.values():
            if stage == "describe":
                assert set(meta["summary"]["class_counts"].values()) == {0}  # withheld
            if stage == "reduce":
                assert arrays == {} and meta["train"] == 0 and meta["train_counts"] == {}
    p = model.metrics["privacy"]
    assert set(p["sites"]) == {"node0.safetensors", "node1.safetensors"}
    assert max(s["epsilon"] for s in p["sites"].values()) == pytest.approx(p["epsilon"])


def test_dp_sgd_trains_a_vae_and_accounts_every_step(dp_data):
    cfg = dp(8.0, generator_type="vae", generator_training_epochs=2, generator_hidden_dim=16,
             generator_latent_dim=4, generator_batch_size=32, generator_upsampler="linear")
    model = train(cfg, dp_data, seed=0)
    p = model.metrics["privacy"]
    sgd = p["releases"]["generator.all.sgd"]
    assert sgd["compositions"] >= 2 and 0 < sgd["events"][0][2] < 1  # Poisson-sampled steps, each accounted
    assert p["epsilon"] <= 8.0 * (1 + 1e-6)
    assert model.metrics["train"] == {}  # losses are functions of the clips: not released
    assert model.sample(3, class_name=model.sampleable_classes[0]).isfinite().all()


@pytest.mark.parametrize("extra, message", [
    ({"generator_upsampler": "learned"}, "no differentially private version"),
    ({"generator_type": "gan"}, "R1 penalty"),
    ({"generator_dp_clip": -1.0}, None),  # the schema refuses it
])
def test_unprotectable_runs_are_refused_before_anything_is_written(dp_data, tmp_path, extra, message):
    out = tmp_path / "m.safetensors"
    from feda2v_toolkit.errors import ToolkitError

    with pytest.raises(ToolkitError) as err:
        train(dp(1.0, **extra), dp_data, out=out, seed=0)
    if message:
        assert isinstance(err.value, PrivacyError) and message in str(err.value)
    assert not out.exists()


def test_the_cli_refuses_bad_targets_with_one_line(dp_data, tmp_path, capsys):
    from feda2v_toolkit.cli import main

    out = tmp_path / "m.safetensors"
    for args, needle in ([["--dp-epsilon", "0"], "--dp-epsilon"], [["--dp-epsilon", "-1"], "--dp-epsilon"],
                         [["--dp-epsilon", "1", "--dp-delta", "0.5"], "1/N"],
                         [["--dp-epsilon", "1", "--dp-delta", "1"], "--dp-delta"]):
        with pytest.raises(SystemExit) as done:
            main(["train", "-d", str(dp_data), "-o", str(out), "--generator-type", "gaussian", "--seed", "0", *args])
        err = capsys.readouterr().err
        assert done.value.code == 2, err
        assert needle in err and "Traceback" not in err
        assert not out.exists()


def test_a_private_run_does_not_resume(dp_data, tmp_path):
    cfg = dp(8.0, generator_type="vae", generator_training_epochs=1, generator_hidden_dim=16,
             generator_latent_dim=4, generator_upsampler="linear", generator_save_checkpoint=True)
    out = tmp_path / "m.safetensors"
    train(cfg, dp_data, out=out, seed=0, keep_checkpoints=True)
    with pytest.raises(PrivacyError, match="spend the budget twice"):
        train(cfg, dp_data, out=out, seed=0, resume=True, overwrite=True)


def test_inspect_shows_the_spend(dp_data, tmp_path):
    out = tmp_path / "m.safetensors"
    train(dp(8.0), dp_data, out=out, seed=0)
    r = CliRunner().invoke(cli, ["inspect", str(out)])
    assert r.exit_code == 0 and "record-level DP: epsilon 8 at delta 0.001 spent" in r.output


def test_at_a_weak_epsilon_the_private_gaussian_matches_the_data(dp_data):
    """The gaussian's private statistics are taken in the normalised space (the sites standardise first):
    with little noise its samples sit where the clips are."""
    from feda2v_toolkit.data import open_dataset
    from feda2v_toolkit.training.streams import reduce_dataset

    model = train(dp(1e4, generator_granularity="per_class", generator_upsampler="linear"), dp_data, seed=0)
    ds = open_dataset(dp_data)
    reduced = reduce_dataset(ds, model.reducer).double()
    for c in model.sampleable_classes:
        real = reduced[ds.labels == ds.class_names.index(c)]
        syn = model.sample_reduced(400, class_name=c).double()
        spread = float(real.std(0).norm())
        assert float((syn.mean(0) - real.mean(0)).norm()) < 0.5 * spread
        assert 0.3 < float(syn.std(0).norm()) / spread < 3


def test_public_data_fits_what_needs_no_privacy_and_spends_nothing(dp_data, tmp_path):
    from feda2v_toolkit.data.demo import write_demo_dataset

    public = write_demo_dataset(tmp_path / "public.safetensors", 8, **SHAPE, seed=7)
    model = train(dp(8.0, generator_dp_public_data=str(public)), dp_data, seed=0)
    releases = model.metrics["privacy"]["releases"]
    for name in ("normalization.public_data", "upsampler.LeastSquaresUpsampler.public_data",
                 "gaussian.basis.public_data"):
        assert releases[name]["data_dependent"] is False and releases[name]["epsilon"] == 0.0
    assert "normalization.sum" not in releases and "lstsq.sxr" not in releases and "gaussian.basis" not in releases
    assert {"classes.counts", "gaussian.sums", "gaussian.scatter"} <= set(releases)  # the budget goes here
    assert model.metrics["privacy"]["epsilon"] <= 8.0 * (1 + 1e-9)


def test_public_data_of_another_shape_is_refused(dp_data, tmp_path):
    from feda2v_toolkit.data.demo import write_demo_dataset
    from feda2v_toolkit.errors import InputError

    public = write_demo_dataset(tmp_path / "public.safetensors", 4, seq_len=10, dim=8)
    with pytest.raises(InputError, match="generator_dp_public_data has sequences"):
        train(dp(8.0, generator_dp_public_data=str(public)), dp_data, seed=0)


def test_private_releases_are_summed_block_by_block_without_reading_all_clips_at_once(dp_data, monkeypatch):
    """Clipping only (epsilon inf): statistics summed over blocks of 50 clips give the model of one block of all
    240, and no read of the reduced cache holds more than a block (memory does not grow with the clips)."""
    import torch

    import feda2v_toolkit.runtime.ranks as ranks
    from feda2v_toolkit.training.streams import ReducedCache

    clipping_only = {"generator_dp_epsilon": float("inf")}  # (an override: JSON has no inf)
    whole = train(dp(1.0), dp_data, seed=0, overrides=clipping_only)
    largest = [0]
    read = ReducedCache.read

    def recording(self, rows):
        largest[0] = max(largest[0], int(rows.numel()))
        return read(self, rows)

    monkeypatch.setattr(ranks, "BLOCK_ROWS", 50)
    monkeypatch.setattr(ReducedCache, "read", recording)
    blocks = train(dp(1.0), dp_data, seed=0, overrides=clipping_only)
    assert 0 < largest[0] <= 50
    a, b = whole.generators["all"].state_dict(), blocks.generators["all"].state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].double(), b[k].double(), rtol=1e-5, atol=1e-6), k  # float32 rounding


def test_each_release_is_noised_once_however_many_blocks_its_clips_are_summed_in(dp_data, monkeypatch):
    """Blocks of 50 clips: every data-dependent release still appears once in the ledger and the spend stays
    the target (noise per block would compose and overspend)."""
    import feda2v_toolkit.runtime.ranks as ranks

    monkeypatch.setattr(ranks, "BLOCK_ROWS", 50)
    p = train(dp(8.0), dp_data, seed=0).metrics["privacy"]
    spent = {n: r for n, r in p["releases"].items() if r["data_dependent"]}
    assert spent and all(r["compositions"] == 1 for r in spent.values())
    assert p["epsilon"] <= 8.0 * (1 + 1e-9)
