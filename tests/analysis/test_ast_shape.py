"""One end-to-end run at real AST shape ([1214, 768]): analyze on 16 demo clips, two lengths."""

from __future__ import annotations

import time

import pytest

from feda2v_toolkit.analysis.analyze import analyze
from feda2v_toolkit.data.demo import write_demo_dataset


@pytest.mark.slow
def test_analyze_at_ast_shape(tmp_path):
    data = write_demo_dataset(tmp_path / "ast.safetensors", 4)  # 16 clips of [1214, 768], float16
    t0 = time.perf_counter()
    result = analyze(data, [4, 16], reducers=["adaptive_avg", "pca"], upsamplers=["linear", "lstsq"], holdout=0.5)
    seconds = time.perf_counter() - t0
    assert (result.seq_len, result.dim, result.train, result.heldout) == (1214, 768, 8, 8)
    for length in (4, 16):
        assert result.pair("pca", "lstsq", length).r2_vs_optimum >= 0.98
        assert result.pair("adaptive_avg", "lstsq", length).r2 > result.pair("adaptive_avg", "linear", length).r2
    assert seconds < 120
