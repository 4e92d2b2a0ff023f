"""A symmetric eigendecomposition that does not fail where noise makes ``torch.linalg.eigh`` give up."""

from __future__ import annotations

import pytest
import torch

from feda2v_toolkit.runtime import linalg


def test_it_is_torch_eigh_where_that_converges():
    a = torch.randn(6, 6, dtype=torch.float64)
    m = a @ a.T
    w, v = linalg.eigh(m)
    w0, v0 = torch.linalg.eigh(m)
    assert torch.equal(w, w0) and torch.equal(v, v0)


def test_a_failure_to_converge_is_retried_on_the_scaled_matrix(monkeypatch):
    a = torch.randn(5, 5, dtype=torch.float64)
    m = (a @ a.T) * 1e30
    real = torch.linalg.eigh
    calls = []

    def flaky(x):
        calls.append(float(x.abs().max()))
        if len(calls) == 1:
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
        return real(x)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    w, v = linalg.eigh(m)
    assert calls[1] == pytest.approx(1.0)  # retried on the matrix scaled to unit size
    assert torch.allclose(v @ torch.diag(w) @ v.T, m, rtol=1e-9, atol=1e-9 * float(m.abs().max()))


def test_non_finite_entries_are_a_clear_error(monkeypatch):
    def failing(x):
        raise torch.linalg.LinAlgError("failed to converge")

    monkeypatch.setattr(torch.linalg, "eigh", failing)
    with pytest.raises(ValueError, match="non-finite"):
        linalg.eigh(torch.tensor([[float("nan"), 0.0], [0.0, 1.0]]))
