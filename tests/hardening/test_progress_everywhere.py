"""Progress for every long phase, also when stderr is not a terminal (CI logs, notebooks, nohup): plain
periodic lines, no ANSI codes, nothing for a short phase, nothing with -q / --no-progress."""

from __future__ import annotations

import time

import pytest
import torch

from feda2v_toolkit.runtime.progress import ENV_INTERVAL, Progress, activity, heartbeat
from tests.hardening.conftest import run_main


@pytest.fixture
def fast_lines(monkeypatch):
    """One progress line every 50 ms instead of every 15 s."""
    monkeypatch.setenv(ENV_INTERVAL, "0.05")


def _plain_lines(err, prefix):
    lines = [line for line in err.splitlines() if line.startswith(f"feda2v-tk: {prefix}")]
    assert "\x1b[" not in err and "\r" not in err, err
    return lines


def test_off_a_terminal_progress_is_plain_periodic_lines(fast_lines, capsys):
    bar = Progress(10, unit="clip", desc="work")
    for _ in range(4):
        time.sleep(0.06)
        bar.update()
    bar.close()
    lines = _plain_lines(capsys.readouterr().err, "work:")
    assert len(lines) >= 3 and "/10 clips (" in lines[0] and any("clips/s, about" in line for line in lines)
    assert lines[-1].startswith("feda2v-tk: work: done, 4 clips in")
    with Progress(10, enabled=False, desc="off") as off:
        time.sleep(0.12)
        off.update()
    with Progress(10, desc="short") as short:  # shorter than one interval: nothing
        short.update()
    assert capsys.readouterr().err == ""


def test_phases_without_a_count_and_library_calls_that_only_log(fast_lines, capsys):
    with activity("fitting something") as phase:
        time.sleep(0.12)
        phase.update()
    assert _plain_lines(capsys.readouterr().err, "fitting something: still running")
    log, stop = heartbeat(lambda m: print(f"feda2v-tk: {m}", file=__import__("sys").stderr))
    log("reduced every sequence")
    time.sleep(0.15)
    stop()
    err = capsys.readouterr().err
    assert "still working" in err and "since: reduced every sequence" in err


def test_generate_reports_progress_off_a_terminal_and_not_with_quiet(fast_lines, model_file, tmp_path, capsys,
                                                                     monkeypatch):
    from feda2v_toolkit.data.writer import DatasetWriter

    real_add = DatasetWriter.add

    def slow_add(self, *args, **kwargs):
        time.sleep(0.06)
        real_add(self, *args, **kwargs)

    monkeypatch.setattr(DatasetWriter, "add", slow_add)
    code, _, err = run_main(["generate", str(model_file), "-o", str(tmp_path / "a"), "-k", "8", "--batch-size", "2"],
                            capsys)
    assert code == 0 and _plain_lines(err, "generate: ") and "/16 samples" in err
    code, _, err = run_main(["generate", str(model_file), "-o", str(tmp_path / "b"), "-k", "8", "--batch-size", "2",
                             "-q"], capsys)
    assert code == 0 and err == ""


def test_the_learned_upsampler_fit_reports_its_passes(fast_lines, capsys):
    from feda2v_toolkit.upsamplers.learned import LearnedUpsampler

    ups = LearnedUpsampler(reduced_length=4, full_length=20, dim=8)
    full = torch.randn(16, 20, 8)
    reduced = torch.nn.functional.adaptive_avg_pool1d(full.transpose(1, 2), 4).transpose(1, 2)

    def pairs():
        time.sleep(0.03)
        yield reduced, full

    ups.fit(pairs, config={"generator_upsampler_epochs": 3, "generator_upsampler_learning_rate": 1e-3,
                           "generator_validation_split": 0.25})
    lines = _plain_lines(capsys.readouterr().err, "fitting the learned upsampler:")
    assert lines and "/5 passes" in lines[0]


def test_analyze_says_it_is_still_working_during_a_long_phase(fast_lines, tiny_data, capsys, monkeypatch):
    import importlib

    analysis = importlib.import_module("feda2v_toolkit.analysis.analyze")

    real = analysis.ReconstructionStats.__init__

    def slow(self, *args, **kwargs):
        time.sleep(0.1)
        real(self, *args, **kwargs)

    monkeypatch.setattr(analysis.ReconstructionStats, "__init__", slow)
    code, _, err = run_main(["analyze", "-d", str(tiny_data), "--lengths", "4", "--reducers", "adaptive_avg",
                             "--upsamplers", "linear"], capsys)
    assert code == 0, err
    assert any("still working" in line for line in _plain_lines(err, "")), err
    code, _, err = run_main(["analyze", "-d", str(tiny_data), "--lengths", "4", "--reducers", "adaptive_avg",
                             "--upsamplers", "linear", "--no-progress"], capsys)
    assert code == 0 and "still working" not in err
