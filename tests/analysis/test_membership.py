"""The membership-inference audit of ``evaluate``, its ROC arithmetic, and the standard usefulness protocol."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import torch
from torch import Tensor

from feda2v_toolkit.analysis.evaluate import evaluate
from feda2v_toolkit.analysis.membership import (
    LEAK_AUC,
    dp_auc_bound,
    run_audit,
    score_summary,
    tpr_at_fpr,
)
from feda2v_toolkit.analysis.membership import roc_auc as auc
from feda2v_toolkit.components import Generator, TrainContext
from feda2v_toolkit.data.demo import write_demo_dataset
from feda2v_toolkit.data.open import open_dataset
from feda2v_toolkit.data.split import stratified_split
from feda2v_toolkit.model.file import load_model
from feda2v_toolkit.model.split import model_split
from feda2v_toolkit.runtime.seeds import derive_seed
from feda2v_toolkit.training.pipeline import train

from .helpers import run_json

TINY = {"seq_len": 50, "dim": 16}


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """Three disjoint draws of one demo world (4 classes x 10 clips each): A trains, B never trains, C is held out."""
    root = tmp_path_factory.mktemp("membership")
    return {name: write_demo_dataset(root / f"{name}.safetensors", 10, seed=0, first_clip=first, **TINY)
            for name, first in (("A", 0), ("C", 10), ("B", 20))}


def _train(root, data, **extra):
    cfg = {"generator_type": "gaussian", "generator_granularity": "per_class",
           "generator_training_sequence_length": 4, "generator_output_sequence_length": 50,
           "generator_save_checkpoint": False, "generator_checkpoint_dir": str(root / "ck"),
           "generator_validation_split": 0.1, **extra}
    path = root / f"m{len(list(root.glob('m*.safetensors')))}.safetensors"
    train(cfg, data, out=path, seed=0)
    return path


@pytest.fixture(scope="module")
def gaussian(tmp_path_factory, sets):
    """The default gaussian (rank 256 >= the 9 training clips per class: it memorises), trained on A."""
    return _train(tmp_path_factory.mktemp("g"), sets["A"])


# -- ROC arithmetic on hand-made scores --------------------------------------------------------------


def test_tpr_at_low_fpr_on_hand_made_scores():
    non = torch.arange(1000, dtype=torch.float64)  # 0 .. 999
    mem = torch.tensor([999.5, 998.5, 500.0], dtype=torch.float64)
    # ROC: (0, 1/3) after 999.5; (0.001, 1/3) after 999; (0.001, 2/3) after 998.5; ...
    assert tpr_at_fpr(mem, non, 0.001) == pytest.approx(2 / 3)
    assert tpr_at_fpr(mem, non, 0.0005) == pytest.approx(1 / 3)  # between (0, 1/3) and (0.001, 1/3)
    assert tpr_at_fpr(mem, non, 0.01) == pytest.approx(2 / 3)  # 500 is below the 990 non-members above 9
    assert tpr_at_fpr(mem, non, 0.6) == pytest.approx(1.0)
    # one tie group: the ROC is the diagonal, the interpolation gives TPR = FPR, the AUC counts the tie half
    tie = torch.tensor([5.0])
    assert tpr_at_fpr(tie, tie, 0.25) == pytest.approx(0.25)
    assert auc(tie, tie) == pytest.approx(0.5)
    # interpolation inside a step: (0, 0.5) -> (0.5, 0.5) -> (0.5, 1)
    assert tpr_at_fpr(torch.tensor([10.0, 8.0]), torch.tensor([9.0, 7.0]), 0.25) == pytest.approx(0.5)


def test_auc_is_the_mann_whitney_statistic_with_ties():
    g = torch.Generator().manual_seed(0)
    mem = torch.randint(0, 6, (40,), generator=g).double()
    non = torch.randint(0, 5, (55,), generator=g).double()
    diff = mem[:, None] - non[None, :]
    expected = float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())
    assert auc(mem, non) == pytest.approx(expected)


def test_summary_intervals_and_reliability():
    g = torch.Generator().manual_seed(1)
    mem, non = torch.randn(60, generator=g) + 1, torch.randn(150, generator=g)
    r = score_summary("x", "white-box", "", mem, non, bootstrap=300, seed=3)
    assert r.auc_low < r.auc < r.auc_high
    assert r.auc == pytest.approx(auc(mem, non))
    one, tenth = r.tpr_at
    assert (one.fpr, tenth.fpr) == (0.01, 0.001)
    assert one.reliable and not tenth.reliable  # 150 non-members: enough for 1%, not for 0.1%
    assert one.low <= one.tpr <= one.high
    assert r.roc_fpr[0] == 0 and r.roc_tpr[-1] == 1
    again = score_summary("x", "white-box", "", mem, non, bootstrap=300, seed=3)
    assert (again.auc_low, again.auc_high) == (r.auc_low, r.auc_high)  # seeded


def test_dp_auc_bound():
    assert dp_auc_bound(1.0, 0.0) == pytest.approx(0.7311, abs=1e-4)
    assert dp_auc_bound(0.0, 0.0) == pytest.approx(0.5)


# -- attacks on a model that memorises and on one that never saw the records ---------------------------


def test_every_attack_detects_the_gaussian_that_memorises(gaussian, sets):
    r = evaluate(gaussian, sets["C"], train_data=sets["A"], bootstrap=200, usefulness_seeds=1)
    a = r.membership
    assert a is not None
    names = [x.name for x in a.attacks]
    assert names == ["white-box: log-likelihood", "white-box: span residual", "black-box: nearest sample",
                     "black-box: density ratio"]
    assert a.members == 36 and a.non_members == 40  # members: A's train split (1 clip per class validated)
    assert a.attack("white-box: log-likelihood").auc > 0.98
    assert a.attack("white-box: span residual").auc > 0.98
    for name in ("black-box: nearest sample", "black-box: density ratio"):
        assert a.attack(name).auc_low > 0.5  # weaker, but the samples betray the training clips too
    assert a.leaking and a.headline.startswith("white-box")
    assert any(n.startswith("MEMBERSHIP LEAK") for n in r.notes)
    assert a.attack(a.headline).per_class_auc.keys() == {"engine", "drum", "whistle", "bird"}


def test_no_attack_tells_records_the_model_never_saw(gaussian, sets):
    """'Members' from B (disjoint from A, same class counts, so the trainer's split is recomputed on it)."""
    r = evaluate(gaussian, sets["C"], train_data=sets["B"], bootstrap=300, usefulness_seeds=1)
    a = r.membership
    for x in a.attacks:
        assert x.auc_low < 0.5 < x.auc_high, (x.name, x.auc, x.auc_low, x.auc_high)
        assert abs(x.auc - 0.5) < 0.2
    assert not a.leaking and a.auc <= LEAK_AUC
    assert not any(n.startswith("MEMBERSHIP LEAK") for n in r.notes)


def _replay(model, data, *, shift: int = 0, mean: bool = False):
    """Make every generator of ``model`` sample (normalised) training rows of its class verbatim, in order and
    cycling -- the trainer's train split, so a draw of one per member is exactly the member set -- or the rows of
    the class ``shift`` places on, or (``mean``) the class mean."""
    ds = open_dataset(data)
    train_idx, _ = model_split(model, ds)
    reduced = model.normalize(model.reducer(ds.read(train_idx).embeddings))
    labels = ds.labels[train_idx]
    for key, gen in model.generators.items():
        c = (ds.class_names.index(key) + shift) % ds.num_classes
        rows = reduced[labels == c]

        def sample(n, *, labels=None, conditions=None, generator=None, _rows=rows):
            if mean:
                return _rows.mean(0, keepdim=True).expand(n, -1, -1).clone()
            return _rows[torch.arange(n) % _rows.shape[0]]
        gen.sample = sample
    return model


def test_black_box_attack_detects_a_generator_that_replays_its_training_rows(gaussian, sets):
    model = _replay(load_model(gaussian), sets["A"])
    r = evaluate(model, sets["C"], train_data=sets["A"], samples_per_class=16, bootstrap=100, usefulness_seeds=1)
    nearest = r.membership.attack("black-box: nearest sample")
    assert nearest.auc == pytest.approx(1.0)
    assert nearest.tpr_at[0].tpr == pytest.approx(1.0)


# -- the generator contract --------------------------------------------------------------------------


class _Memoriser(Generator):
    """A plugin-like type that only implements the contract: its loss is the distance to its nearest stored row."""

    fitted: ClassVar[bool] = True

    def __init__(self, *, seq_len: int, dim: int, num_classes: int = 0, condition_dim: int = 0) -> None:
        super().__init__(seq_len=seq_len, dim=dim, num_classes=num_classes, condition_dim=condition_dim)
        self.register_buffer("rows", torch.zeros(0, seq_len * dim))

    @classmethod
    def from_config(cls, config, *, seq_len, dim, num_classes=0, condition_dim=0):
        return cls(seq_len=seq_len, dim=dim)

    def init_args(self) -> dict[str, Any]:
        return {"seq_len": self.seq_len, "dim": self.dim}

    def configure_optimizers(self, config):
        return {}

    def training_step(self, x, *, labels, conditions, optimizers, ctx):
        raise RuntimeError("fitted")

    def fit(self, x, *, labels=None, conditions=None, seed=0):
        self.rows = x.reshape(x.shape[0], -1).clone()
        return {}

    def loss_terms(self, x: Tensor, *, labels, conditions, ctx: TrainContext) -> dict[str, float]:
        torch.rand(1)  # a stochastic loss must not change the scores or the caller's RNG
        d = torch.cdist(x.reshape(x.shape[0], -1), self.rows).min(1).values
        return {"loss": float(d.mean()), "seen": float(ctx.config.get("marker", 0))}

    def sample(self, n: int, *, labels=None, conditions=None, generator=None) -> Tensor:
        pick = torch.randint(self.rows.shape[0], (n,), generator=generator)
        return self.rows[pick].view(n, self.seq_len, self.dim)


def test_default_membership_scores_are_minus_the_per_record_loss():
    gen = _Memoriser(seq_len=2, dim=3)
    train_rows = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(0))
    gen.fit(train_rows)
    x = torch.cat([train_rows[:2], train_rows[:2] + 1])
    state = torch.random.get_rng_state()
    scores = gen.membership_scores(x, config={"marker": 1})
    assert torch.equal(torch.random.get_rng_state(), state)
    ctx = TrainContext(epoch=0, total_epochs=1, step=0, progress=1.0)
    expected = [-gen.loss_terms(x[i:i + 1], labels=None, conditions=None, ctx=ctx)["loss"] for i in range(4)]
    assert scores.tolist() == pytest.approx(expected)
    assert scores[:2].tolist() == pytest.approx([0.0, 0.0]) and bool((scores[2:] < 0).all())
    assert gen.extra_membership_scores(x) == {}


def _with_generators(model, make):
    for key in list(model.generators):
        model.generators[key] = make(key, model.generators[key])
    return model


def test_a_plugin_type_gets_the_white_box_attack_for_free_or_declares_it_cannot(gaussian, sets):
    model = load_model(gaussian)
    ds = open_dataset(sets["A"])
    train_idx, _ = model_split(model, ds)
    normed = model.normalize(model.reducer(ds.read(train_idx).embeddings))
    labels = ds.labels[train_idx]

    def memoriser(key, old):
        gen = _Memoriser(seq_len=old.seq_len, dim=old.dim)
        gen.fit(normed[labels == ds.class_names.index(key)])
        return gen

    _with_generators(model, memoriser)
    held = open_dataset(sets["C"])
    members = normed
    non = model.normalize(model.reducer(held.read(range(len(held))).embeddings))
    names = lambda d: [d.class_names[int(v)] for v in d.labels]  # noqa: E731
    syn = {c: model.generators[c].sample(8, generator=torch.Generator().manual_seed(0)) for c in model.generators}
    audit = run_audit(model, members, [ds.class_names[int(v)] for v in labels], non, names(held), syn,
                      member_source="test", bootstrap=100)
    assert audit.attack("white-box: negative loss").auc == pytest.approx(1.0)
    assert not any(u.startswith("white-box") for u in audit.unavailable)

    class Opaque(_Memoriser):
        membership_scores_available: ClassVar[bool] = False

    _with_generators(model, lambda key, old: Opaque(seq_len=old.seq_len, dim=old.dim))
    audit = run_audit(model, members, [ds.class_names[int(v)] for v in labels], non, names(held), syn,
                      member_source="test", bootstrap=100)
    assert [a.kind for a in audit.attacks] == ["black-box", "black-box"]
    assert any("declares it cannot score records" in u for u in audit.unavailable)


def test_vae_and_gan_scores_are_deterministic_and_leave_the_rng_alone():
    from feda2v_toolkit.generators.gan import GANGenerator
    from feda2v_toolkit.generators.vae import VAEGenerator

    torch.manual_seed(0)
    x = torch.randn(6, 2, 4)
    for gen in (VAEGenerator(seq_len=2, dim=4, hidden_dim=8, latent_dim=3, dropout=0.5),
                GANGenerator(seq_len=2, dim=4, hidden_dim=8, latent_dim=3)):
        state = torch.random.get_rng_state()
        a, b = gen.membership_scores(x), gen.membership_scores(x)
        assert torch.equal(a, b) and a.shape == (6,) and a.dtype == torch.float64
        assert torch.equal(torch.random.get_rng_state(), state)
        assert gen.training  # the mode is restored


# -- evaluate's output: JSON, flags, usefulness ----------------------------------------------------------


def test_json_holds_the_audit_and_the_usefulness(capsys, gaussian, sets):
    doc = run_json(capsys, "evaluate", str(gaussian), "--data", str(sets["C"]), "--train-data", str(sets["A"]),
                   "-q", "--usefulness-draws", "3")
    a = doc["membership"]
    assert a["headline"] == a["attacks"][0]["name"] and a["leaking"] is True and a["threshold"] == LEAK_AUC
    first = a["attacks"][0]
    assert set(first) >= {"name", "kind", "description", "auc", "auc_low", "auc_high", "tpr_at", "per_class_auc",
                          "roc_fpr", "roc_tpr"}
    assert [t["fpr"] for t in first["tpr_at"]] == [0.01, 0.001]
    assert set(first["tpr_at"][0]) == {"fpr", "tpr", "low", "high", "reliable"}
    assert a["members_per_class"] == {"engine": 9, "drum": 9, "whistle": 9, "bird": 9}
    u = doc["usefulness"]
    assert u["protocol"] == "standard" and u["seeds"] == [0, 1, 2] and "RidgeClassifier" in u["classifier"]
    assert len(u["summary"]["ratio"]) == 3 and u["summary"]["ratio_min"] <= u["summary"]["ratio_mean"]
    assert u["summary"]["real_train"] == 36 and u["summary"]["test"] == 40
    assert "summary tokens" in u["summary"]["features"] and u["pooled"]["features"].startswith("pooled")
    assert doc["collapsed"] is False and doc["subsampled"] is False
    doc = run_json(capsys, "evaluate", str(gaussian), "--data", str(sets["C"]), "-q", "--usefulness-draws", "2")
    assert doc["membership"] is None and doc["usefulness"]["protocol"] == "fallback"


def test_standard_usefulness_of_a_generator_replaying_its_training_clips_is_one(tmp_path, sets):
    """At training length = full length the reducer and upsampler are identities: synthetic clips that are the
    members give the classifier exactly the members' features, so every draw's ratio is 1; another class's
    clips give a ratio far below."""
    path = _train(tmp_path, sets["A"], generator_training_sequence_length=50, generator_upsampler="linear")
    exact = evaluate(_replay(load_model(path), sets["A"]), sets["C"], train_data=sets["A"], usefulness_seeds=2,
                     bootstrap=50)
    assert exact.usefulness.protocol == "standard"
    assert exact.usefulness.summary.ratio == pytest.approx([1.0, 1.0])
    wrong = evaluate(_replay(load_model(path), sets["A"], shift=1), sets["C"], train_data=sets["A"],
                     usefulness_seeds=1, bootstrap=50)
    assert wrong.usefulness.pooled.ratio_max < 0.5  # the pooled view: the tiny demo data's summary tokens carry little


def test_collapse_is_flagged(gaussian, sets):
    r = evaluate(_replay(load_model(gaussian), sets["A"], mean=True), sets["C"], usefulness_seeds=1)
    assert r.collapsed and any(n.startswith("COLLAPSE") for n in r.notes)
    honest = evaluate(gaussian, sets["C"], usefulness_seeds=1)
    assert not honest.collapsed


def test_bounded_rows_per_class_are_stated(gaussian, sets):
    r = evaluate(gaussian, sets["C"], train_data=sets["A"], max_per_class=4, usefulness_seeds=1, bootstrap=50)
    assert r.subsampled and r.overall.real == 16 and r.rows_per_class == 4
    assert r.membership.members_per_class == {"engine": 4, "drum": 4, "whistle": 4, "bird": 4}
    assert sum(n.startswith("subsampled") for n in r.notes) == 2  # real rows, training rows


def test_model_split_is_the_trainers_split(gaussian, sets):
    model = load_model(gaussian)
    ds = open_dataset(sets["A"])
    train_idx, val_idx = model_split(model, ds)
    expected = stratified_split(ds.labels, 0.1, derive_seed(0, "split", 0))  # site 0 of seed 0
    assert torch.equal(train_idx, expected[0]) and torch.equal(val_idx, expected[1])
    assert val_idx.numel() == 4
    other = open_dataset(write_demo_dataset(sets["A"].parent / "five.safetensors", 5, seed=0, **TINY))
    with pytest.raises(Exception, match="not the dataset the model was trained on"):
        model_split(model, other)


def test_dp_record_and_bound_note(gaussian, sets):
    model = load_model(gaussian)
    model.metrics = {**model.metrics, "privacy": {"total": {"epsilon": 1.0, "delta": 1e-5}}}
    r = evaluate(model, sets["C"], train_data=sets["A"], usefulness_seeds=1, bootstrap=50)
    assert r.membership.dp["epsilon"] == 1.0 and r.membership.dp["auc_bound"] == pytest.approx(0.731, abs=1e-3)
    assert any("the recorded guarantee does not hold" in n for n in r.membership.notes)


def test_the_memory_budget_bounds_the_rows_kept_and_says_so(gaussian, sets, monkeypatch, capsys):
    from feda2v_toolkit.analysis import evaluate as evaluate_module
    from feda2v_toolkit.analysis.evaluate import MAX_ROWS, budget_rows, row_caps

    # the default budget (2 GiB) keeps the default cap: its three 4,096 x 4,096 float64 Grams fit a quarter
    assert budget_rows(2 * 2**30) >= MAX_ROWS and row_caps(4, budget=2 * 2**30) == row_caps(4)
    assert budget_rows(16 * 16 * 24 * 4) == 16 and row_caps(4, budget=16 * 16 * 24 * 4)[0] == 32  # floor per class
    monkeypatch.setattr(evaluate_module, "MIN_ROWS_PER_CLASS", 2)
    r = evaluate(gaussian, sets["C"], train_data=sets["A"], usefulness_seeds=1, bootstrap=50,
                 memory_budget=16 * 16 * 24 * 4)  # 16 real rows in all: 4 a class
    assert r.subsampled and r.rows_per_class == 4 and r.overall.real == 16
    assert any("memory budget" in n for n in r.notes if n.startswith("subsampled"))
    # an explicit --max-per-class wins over the budget; the command line takes --memory-budget
    assert evaluate(gaussian, sets["C"], max_per_class=6, usefulness_seeds=1, memory_budget=1).rows_per_class == 6
    from feda2v_toolkit.runtime import resources

    from .helpers import run_json

    monkeypatch.setitem(resources._BUDGET, "bytes", resources._BUDGET["bytes"])
    doc = run_json(capsys, "evaluate", str(gaussian), "--data", str(sets["C"]), "--usefulness-draws", "1",
                   "--memory-budget", str(16 * 16 * 24 * 4), "-q")
    assert doc["rows_per_class"] == 4


def test_evaluate_takes_the_members_nearest_samples_with_the_dcr_not_twice(gaussian, sets, monkeypatch):
    """The distances between members and synthetic samples give both the DCR (each sample's nearest member)
    and the nearest-sample attack's member scores (each member's nearest sample): one pass over them; the
    attack computes only the non-members' distances itself, and its figures are those of its own pass."""
    from feda2v_toolkit.analysis import evaluate as evaluate_module
    from feda2v_toolkit.analysis import membership

    calls: list[int] = []
    real = membership.nearest_sample_scores
    monkeypatch.setattr(membership, "nearest_sample_scores", lambda x, s: calls.append(x.shape[0]) or real(x, s))
    scores: list[tuple[Tensor, Tensor]] = []
    summary = membership.score_summary

    def recorded(name, kind, description, sm, sn, **kw):
        if name == "black-box: nearest sample":
            scores.append((sm, sn))
        return summary(name, kind, description, sm, sn, **kw)

    monkeypatch.setattr(membership, "score_summary", recorded)
    shared = evaluate(gaussian, sets["C"], train_data=sets["A"], bootstrap=50, usefulness_seeds=1)
    assert sum(calls) == shared.membership.non_members == 40  # non-members only, one class at a time

    privacy = evaluate_module._privacy
    monkeypatch.setattr(evaluate_module, "_privacy", lambda *a: (privacy(*a)[0], torch.tensor([float("nan")])))
    calls.clear()
    own = evaluate(gaussian, sets["C"], train_data=sets["A"], bootstrap=50, usefulness_seeds=1)
    assert sum(calls) == own.membership.members + own.membership.non_members  # the audit's own pass
    (sm_shared, sn_shared), (sm_own, sn_own) = scores
    assert torch.equal(sm_shared, sm_own) and torch.equal(sn_shared, sn_own)  # bit for bit
    assert shared.membership.attack("black-box: nearest sample") == own.membership.attack("black-box: nearest sample")
    assert shared.privacy == own.privacy


def test_the_audit_refuses_member_distances_of_another_shape(gaussian, sets):
    model = load_model(gaussian)
    x = torch.zeros(4, 4, 16)
    with pytest.raises(ValueError, match="one distance per member"):
        run_audit(model, x, ["drum"] * 4, x, ["drum"] * 4, {"drum": x}, member_source="A",
                  member_nearest=torch.zeros(3))
