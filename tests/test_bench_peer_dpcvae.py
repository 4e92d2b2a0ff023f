"""bench/peer_dpcvae.py (the peer's DP-CVAE): its model, loss, clipping and accounting, on tiny data.

Needs the ``privacy`` extra (opacus, dp-accounting); skipped without it.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("opacus")
pytest.importorskip("dp_accounting")

_BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def peer():
    spec = importlib.util.spec_from_file_location("bench_peer_dpcvae", _BENCH / "peer_dpcvae.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_peer_dpcvae"] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules["bench_peer_dpcvae"]


def test_model_is_the_peers_cvae(peer):
    model = peer.CVAE(12288, 12)
    linears = [m for m in model.encoder if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(12300, 256), (256, 256), (256, 256)]
    assert (model.fc_mu.out_features, model.fc_logvar.out_features) == (100, 100)
    dec = [m for m in model.decoder if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in dec] == [(112, 256), (256, 256), (256, 256), (256, 12288)]
    assert isinstance(model.decoder[-1], torch.nn.Sigmoid)


def test_per_sample_terms_average_to_the_peers_loss(peer):
    g = torch.Generator().manual_seed(0)
    recon, x = torch.rand(7, 30, generator=g), torch.rand(7, 30, generator=g)
    mu, logvar = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    expected = F.mse_loss(recon, x) - 0.5 * 0.1 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    assert torch.allclose(peer.peer_loss(recon, x, mu, logvar), expected)
    assert torch.allclose(peer.per_sample_loss(recon, x, mu, logvar).mean(), expected)


def test_ghost_clipping_equals_clipping_each_rows_gradient(peer):
    """Noise 0: Opacus' step direction is the sum of each row's gradient clipped to the norm."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    n, d, classes, clip = 24, 40, 3, 0.05
    x, y = torch.rand(n, d), torch.arange(n) % classes
    ref = peer.CVAE(d, classes, hidden=16, latent=5)
    model = peer.CVAE(d, classes, hidden=16, latent=5)
    model.load_state_dict(ref.state_dict())
    m, opt, _, _ = PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=n), noise_multiplier=0.0, max_grad_norm=clip,
        poisson_sampling=False, grad_sample_mode="ghost", criterion=torch.nn.MSELoss())
    onehot = F.one_hot(y, classes).float()
    torch.manual_seed(1)
    recon, mu, logvar = m(x, onehot)
    opt.zero_grad()
    peer.dp_loss(m, opt, recon, x, mu, logvar).backward()
    ghost = [p.grad.clone() for p in m.parameters()]
    torch.manual_seed(1)
    recon, mu, logvar = ref(x, onehot)  # the same reparameterisation noise
    per = peer.per_sample_loss(recon, x, mu, logvar)
    total = [torch.zeros_like(p) for p in ref.parameters()]
    for i in range(n):
        grads = torch.autograd.grad(per[i], list(ref.parameters()), retain_graph=True)
        norm = float(torch.sqrt(sum(g.square().sum() for g in grads)))
        assert norm > clip  # clipping is active for every row
        for t, g in zip(total, grads, strict=True):
            t += min(1.0, clip / (norm + 1e-6)) * g
    for a, b in zip(ghost, total, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7 * float(b.abs().max()))


def test_peer_miscalibration_spends_more_than_its_target(peer):
    m = peer.peer_miscalibration(0.2, 5, 1.0, 1e-5)
    assert m["calibrated_epochs"] == 20 and m["trained_epochs"] == 100
    # calibrated for 20 epochs it spends ~1 there, and far more after 100
    assert peer.prv_epsilon(m["noise_multiplier"], 0.2, 100, 1e-5) == pytest.approx(1.0, abs=0.02)
    assert 2.0 < m["epsilon_spent_prv"] < 3.0 and m["epsilon_spent_rdp"] >= m["epsilon_spent_prv"]


def test_end_to_end_accounts_every_step(peer, tmp_path, capsys):
    from feda2v_toolkit.data import DatasetWriter

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat_interleave(8)
    x = torch.randn(24, 40, 8, generator=g) + labels[:, None, None].float()
    with DatasetWriter(tmp_path / "d", class_names=["a", "b", "c"], dtype=torch.float16) as w:
        w.add(x, labels)
    out = tmp_path / "r.json"
    assert peer.main(["--corpus", str(tmp_path / "d"), "--train-per-class", "4", "--epochs", "2",
                      "--seeds", "0", "--settings", "inf:1e-5,1:1e-4", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["train_clips"] == 12 and res["heldout_clips"] == 12 and res["epochs"] == 2
    no_dp, dp = res["runs"]
    assert no_dp["epsilon_spent"] == "inf" and "noise_multiplier" not in no_dp
    assert dp["steps_accounted"] == dp["steps_expected"] == 2 * dp["steps_per_epoch"]
    assert dp["epsilon_spent"] <= 1.0 + 1e-6 and dp["epsilon_spent_rdp"] >= dp["epsilon_spent"] * 0.9
    assert all(math.isfinite(r["synthetic_accuracy"]) for r in res["runs"])
    assert '"eps=1,delta=0.0001"' in capsys.readouterr().out
