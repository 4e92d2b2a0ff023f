"""The federated server loop and node handler, in-process over Flower messages (no network)."""

from __future__ import annotations

import time

import pytest
import torch

pytest.importorskip("flwr")

from feda2v_toolkit.federated.engine import LocalGrid, federate_local  # noqa: E402
from feda2v_toolkit.federated.node_dp import dp_epsilon  # noqa: E402
from feda2v_toolkit.training.pipeline import SiteError as FederationError  # noqa: E402


def _cfg(tiny_config, **extra):
    return {**tiny_config, "generator_type": "vae", "generator_save_checkpoint": False, "federated_rounds": 2,
            **extra}  # trained in rounds unless a test names another type


def test_exact_stages_equal_centralised_training(tiny_data, two_nodes, tiny_config, tmp_path):
    """pca reducer, lstsq upsampler and normalisation from two nodes' sums = train() on all the data."""
    from feda2v_toolkit.training.pipeline import train

    cfg = _cfg(tiny_config, generator_reducer="pca", generator_upsampler="lstsq", generator_validation_split=0,
               generator_training_epochs=1)
    central = train(cfg, tiny_data)
    fed = federate_local(cfg, two_nodes, seed=0)
    for name in ("reducer", "upsampler"):
        want, got = getattr(central, name).state_dict(), getattr(fed, name).state_dict()
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)
    for k in ("mean", "std"):
        torch.testing.assert_close(fed.normalization[k], central.normalization[k], rtol=1e-5, atol=1e-5)
    assert fed.class_names == central.class_names
    assert fed.class_counts == central.class_counts


@pytest.mark.parametrize("granularity", ["unified", "per_class"])
def test_closed_form_generators_federate_exactly(tiny_data, two_nodes, tiny_config, granularity):
    """gaussian (label-conditioned when unified): the exchanges of statistics (class means, then the deviations
    about them) = train() on all the data."""
    from feda2v_toolkit.training.pipeline import train

    cfg = _cfg(tiny_config, generator_type="gaussian", generator_granularity=granularity,
               generator_validation_split=0, generator_latent_dim=64)  # rank above every node's clip count
    central = train(cfg, tiny_data)
    fed = federate_local(cfg, two_nodes, seed=0)
    assert not fed.metrics["run"]["rounds"] and fed.metrics["generator_fit"]
    assert set(fed.generators) == set(central.generators)
    for key, want in central.generators.items():
        got = fed.generators[key]
        assert got.conditioning == want.conditioning
        for k in ("means", "counts", "residual", "shrinkage", "scale"):
            torch.testing.assert_close(got.state_dict()[k], want.state_dict()[k], rtol=1e-4, atol=1e-5)
        cov = [g.components.double().T @ g.components.double() for g in (got, want)]
        torch.testing.assert_close(cov[0], cov[1], rtol=1e-4, atol=1e-4)
    assert not fed.metrics["run"]["truncated"]
    for c in central.class_names:  # component signs are canonical: the same seed draws the same samples
        draws = [m.sample(3, class_name=c, generator=torch.Generator().manual_seed(0)) for m in (fed, central)]
        torch.testing.assert_close(draws[0], draws[1], rtol=1e-3, atol=1e-3)


def test_a_scatter_with_more_directions_than_the_rank_sends_its_top_directions_and_says_so(two_nodes, tiny_config):
    logs: list[str] = []
    fed = federate_local(_cfg(tiny_config, generator_type="gaussian", generator_latent_dim=2), two_nodes, seed=0,
                         log=logs.append)
    truncated = fed.metrics["run"]["truncated"]["all"]
    assert set(truncated) == {"node0.safetensors", "node1.safetensors"}
    assert all(info["directions"] == 2 and 0 < info["variance_left_out"] < 1 for info in truncated.values())
    assert any("more directions than the rank; kept the top 2" in m for m in logs)


def test_per_class_generators_are_trained_and_averaged_only_by_their_owners(two_nodes, tiny_config, tmp_path):
    out = tmp_path / "fed.safetensors"
    model = federate_local(_cfg(tiny_config, generator_granularity="per_class"), two_nodes, out=out, seed=0)
    nodes = model.metrics["sites"]
    assert nodes[0]["generators"] == ["engine", "drum", "whistle"]
    assert nodes[1]["generators"] == ["whistle", "bird"]
    assert set(model.generators) == {"engine", "drum", "whistle", "bird"}
    from feda2v_toolkit.model.file import load_model

    loaded = load_model(out)
    assert loaded.metrics["epochs"] == 2 and len(model.metrics["run"]["rounds"]) == 2
    assert loaded.sample(2, class_name="bird").shape[0] == 2


def _generator_types():
    from feda2v_toolkit.plugins import list_generators

    return list_generators()


@pytest.mark.parametrize("granularity", ["unified", "per_class"])
@pytest.mark.parametrize("generator_type", _generator_types())
def test_every_registered_generator_type_federates(generator_type, granularity, two_nodes, tiny_config):
    cfg = _cfg(tiny_config, generator_type=generator_type, generator_granularity=granularity, federated_rounds=1)
    model = federate_local(cfg, two_nodes, seed=1)
    assert model.generator_type == generator_type
    for c in model.class_names:
        x = model.sample(1, class_name=c, generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(x).all()


def test_same_seed_gives_the_same_weights(two_nodes, tiny_config):
    a = federate_local(_cfg(tiny_config), two_nodes, seed=5)
    b = federate_local(_cfg(tiny_config), two_nodes, seed=5)
    for k, v in a.generators["all"].state_dict().items():
        torch.testing.assert_close(b.generators["all"].state_dict()[k], v, rtol=0, atol=0)


class _FailingGrid(LocalGrid):
    """Node 3 (the second node) raises, or stalls, in the generator rounds."""

    def __init__(self, *args, stall: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.stall = stall

    def _deliver(self, msg):
        if msg.metadata.dst_node_id == 3 and msg.metadata.message_type == "train.generator_round":
            from flwr.app import Message
            from flwr.app.error import Error

            time.sleep(self.stall)  # a stalled node never answers in time (then it goes away)
            return Message(Error(300, "ConnectionError: node went away"), reply_to=msg)
        return super()._deliver(msg)


def _run(grid, cfg, out, timeout=None):
    from feda2v_toolkit.federated.app import FlowerTransport
    from feda2v_toolkit.federated.run import federate

    return federate(cfg, FlowerTransport(grid, sorted(grid.get_node_ids()), timeout), out=out, seed=0)


def test_a_node_failing_mid_run_fails_the_run_and_writes_nothing(two_nodes, tiny_config, tmp_path):
    out = tmp_path / "fed.safetensors"
    grid = _FailingGrid([{"data": str(p)} for p in two_nodes])
    with pytest.raises(FederationError, match=r"node1.safetensors failed in stage 'generator_round'.*went away"):
        _run(grid, _cfg(tiny_config), out)
    assert not out.exists()


def test_a_node_that_does_not_answer_in_time_fails_the_run(two_nodes, tiny_config, tmp_path):
    out = tmp_path / "fed.safetensors"
    grid = _FailingGrid([{"data": str(p)} for p in two_nodes], stall=8.0)
    t0 = time.monotonic()
    with pytest.raises(FederationError, match=r"no reply from node1.safetensors in stage 'generator_round' within"):
        _run(grid, _cfg(tiny_config), out, timeout=4.0)
    assert time.monotonic() - t0 < 30
    assert not out.exists()


def test_nodes_with_mismatched_shapes_are_refused(two_nodes, tmp_path, tiny_config):
    from feda2v_toolkit.data.demo import write_demo_dataset

    other = write_demo_dataset(tmp_path / "other.safetensors", 2, seq_len=50, dim=8)
    with pytest.raises(FederationError, match=r"other.safetensors has sequences \[50, 8\].*\[50, 16\]"):
        federate_local(_cfg(tiny_config), [two_nodes[0], other], seed=0)


def test_a_node_without_data_config_is_a_clear_error(tiny_config):
    grid = LocalGrid([{}])
    with pytest.raises(FederationError, match="no data.*--node-config"):
        _run(grid, _cfg(tiny_config), None)


def test_differential_privacy_reports_epsilon_and_stores_it(two_nodes, tiny_config, tmp_path):
    out = tmp_path / "dp.safetensors"
    cfg = _cfg(tiny_config, federated_dp_noise_multiplier=1.0, federated_dp_clipping_norm=0.5)
    model = federate_local(cfg, two_nodes, out=out, seed=0)
    assert model.metrics["privacy"]["mechanism"] is None  # node-level DP is no record-level guarantee
    privacy = model.metrics["privacy"]["node_level"]
    assert privacy["epsilon"] == pytest.approx(dp_epsilon(1.0, 2, 1e-5, nodes=2))
    assert privacy["releases"] == 2 and privacy["accountant"].startswith("Flower")
    assert 0 < privacy["epsilon"] < float("inf")
    from feda2v_toolkit.model.file import load_model

    assert load_model(out).metrics["privacy"]["node_level"]["noise_multiplier"] == 1.0


def test_epsilon_falls_with_more_noise_and_rises_with_more_rounds():
    assert dp_epsilon(2.0, 5, 1e-5) < dp_epsilon(1.0, 5, 1e-5) < dp_epsilon(1.0, 20, 1e-5)
    assert dp_epsilon(0.0, 5, 1e-5) == float("inf")


def test_nodes_clip_their_whole_update_with_flowers_fixedclipping_mod():
    """The generators handler runs Flower's fixedclipping_mod when the server sends a clipping norm."""
    from flwr.app import Context, Message, RecordDict
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    from feda2v_toolkit.federated.app import decode, dp_clipping_mod, encode

    sent = {"g0.w": torch.zeros(3), "g1.w": torch.zeros(4)}

    def train(msg, context):  # a node that moves every weight by 1: update norm sqrt(7)
        arrays, _ = decode(msg.content)
        return Message(encode({k: v + 1 for k, v in arrays.items()}, {}), reply_to=msg)

    msg = Message(encode(sent, {"dp_clipping_norm": 0.5}), dst_node_id=1, message_type="train.generator_round")
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    assert KEY_CLIPPING_NORM in msg.content.config_records["meta"]
    out, _ = decode(dp_clipping_mod(msg, context, train).content)
    assert list(out) == list(sent)
    norm = torch.cat([v.flatten() for v in out.values()]).norm()
    assert float(norm) == pytest.approx(0.5, rel=1e-5)
    plain, _ = decode(dp_clipping_mod(Message(encode(sent, {}), dst_node_id=1, message_type="train.generator_round"),
                                      context, train).content)
    assert float(torch.cat([v.flatten() for v in plain.values()]).norm()) == pytest.approx(7 ** 0.5)


def test_node_level_dp_counts_the_rounds_a_resumed_run_already_made():
    from feda2v_toolkit.federated.node_dp import NodeLevelDP

    merger = NodeLevelDP(1.0, 0.5, 1e-5, nodes=2, rounds=5)
    merger.resumed(3)  # a checkpoint after round 3: those releases stay spent
    report = merger.report()
    assert report["rounds"] == 3 and report["epsilon"] == pytest.approx(dp_epsilon(1.0, 3, 1e-5, nodes=2))
    merger.resumed(3)  # idempotent
    assert merger.report()["rounds"] == 3


def test_every_stage_of_the_protocol_is_in_the_documented_list_of_what_a_site_sends():
    """docs/federated.md's table of what leaves a site names every message type of the protocol."""
    import re
    from pathlib import Path

    from feda2v_toolkit.training.site import STAGES

    doc = (Path(__file__).parents[2] / "docs" / "federated.md").read_text()
    table = doc[doc.index("## What the server and the other sites learn"):]
    documented = set(re.findall(r"^\| `([a-z_]+)`", table, flags=re.M))
    one_site_only = {"reducer_fit", "generator_fit"}  # refused with more than one site: nothing leaves a site
    assert set(STAGES) - one_site_only <= documented, set(STAGES) - one_site_only - documented


def test_merged_class_means_go_only_to_the_sites_that_hold_the_generator(two_nodes, tiny_config, monkeypatch):
    from feda2v_toolkit.training.site import Site

    seen: dict[str, list[str]] = {}
    original = Site.generator_statistics

    def spy(self, keys, groups, class_names, means=None):
        seen[self.name] = sorted(means or {})
        return original(self, keys, groups, class_names, means)

    monkeypatch.setattr(Site, "generator_statistics", spy)
    federate_local(_cfg(tiny_config, generator_type="gaussian", generator_granularity="per_class"), two_nodes, seed=0)
    assert seen == {"node0.safetensors": ["drum", "engine", "whistle"], "node1.safetensors": ["bird", "whistle"]}
