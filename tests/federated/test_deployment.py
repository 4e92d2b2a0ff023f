"""The real Flower Deployment engine on localhost: a SuperLink, two SuperNodes and ``feda2v-tk federate
--superlink``, run with the commands of docs/federated.md (read from it, so the doc cannot drift)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")

pytestmark = pytest.mark.slow  # a real SuperLink and two SuperNodes

DOC = Path(__file__).resolve().parents[2] / "docs" / "federated.md"
MARKER = "<!-- deployment-commands"
BIN = Path(sys.executable).parent


def documented_commands() -> list[str]:
    """The bash block after the marker in docs/federated.md, one command per line."""
    text = DOC.read_text(encoding="utf-8")
    block = text[text.index(MARKER):].split("```bash", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def stop(proc: subprocess.Popen) -> None:
    """End a process this test started and the children it started (its own session), by PID."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def test_the_documented_commands_train_over_two_supernodes(tiny_data, two_nodes, tmp_path):
    commands = documented_commands()
    assert [c.split()[0] for c in commands] == ["flower-superlink", "flower-supernode", "flower-supernode",
                                                "feda2v-tk"]
    link, node_a, node_b = free_ports(3)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"feda2v_config": {
        "generator_type": "gaussian", "generator_training_sequence_length": 4, "generator_latent_dim": 8,
        "generator_save_checkpoint": False}}))
    out = tmp_path / "fed.safetensors"
    swap = {"9093": str(link), "9094": str(node_a), "9095": str(node_b), "/data/site-a.safetensors": str(two_nodes[0]),
            "/data/site-b.safetensors": str(two_nodes[1]), "config.json": str(config), "fed.safetensors": str(out)}
    argv = []
    for line in commands:
        for old, new in swap.items():
            line = line.replace(old, new)
        args = shlex.split(line)
        argv.append([str(BIN / args[0]), *args[1:]])
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home"), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    procs: list[subprocess.Popen] = []
    logs = []
    try:
        for i, args in enumerate(argv[:3]):
            log = open(tmp_path / f"server{i}.log", "w")  # noqa: SIM115 -- closed below
            logs.append(log)
            procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
                                          start_new_session=True))
        t0 = time.monotonic()
        fed = subprocess.run([*argv[3], "--wait", "150", "--json"], capture_output=True, text=True, env=env,
                             cwd=tmp_path, timeout=200, check=False)
        seconds = time.monotonic() - t0
        assert fed.returncode == 0, fed.stderr + "".join((tmp_path / f"server{i}.log").read_text()[-2000:]
                                                         for i in range(3))
    finally:
        for proc in procs:
            stop(proc)
        for log in logs:
            log.close()
    assert all(p.poll() is not None for p in procs)
    assert json.loads(fed.stdout)["run"]["status"] == "finished:completed"
    assert "fitted 1 generator in closed form from 2 sites' merged statistics" in fed.stderr, fed.stderr
    from feda2v_toolkit.model.file import load_model

    model = load_model(out)
    assert sorted(s["name"] for s in model.metrics["sites"]) == ["node0.safetensors", "node1.safetensors"]
    assert model.sample(2, class_name="bird").shape[0] == 2
    info = subprocess.run([str(BIN / "feda2v-tk"), "inspect", str(out)], capture_output=True, text=True,
                          timeout=120, check=True).stdout
    assert "2 sites (node0.safetensors, node1.safetensors), generators fitted from merged statistics" in info
    assert seconds < 150


def test_an_unreachable_superlink_is_one_line_and_writes_nothing(tmp_path):
    (port,) = free_ports(1)
    out = tmp_path / "fed.safetensors"
    proc = subprocess.run([str(BIN / "feda2v-tk"), "federate", "--superlink", f"127.0.0.1:{port}", "-o", str(out),
                           "--connect-wait", "2"], capture_output=True, text=True,
                          env={**os.environ, "FLWR_HOME": str(tmp_path)}, timeout=120, check=False)
    assert proc.returncode == 1, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "flwr run" in proc.stderr
    assert "SuperLink is unavailable" in proc.stderr and "--connect-wait)" in proc.stderr
    assert not out.exists()


class Clock:
    """time.monotonic / time.sleep for deploy, advancing only when slept on."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def fake_flwr(failures: int, message: str = "flwr run: Connection to the SuperLink is unavailable. Please check"):
    """``_flwr`` whose ``run`` fails ``failures`` times (the SuperLink not up yet), then a run that finishes."""
    from feda2v_toolkit.federated import deploy

    calls = {"run": 0}

    def flwr(args, home, timeout):
        if args[0] == "run":
            calls["run"] += 1
            if calls["run"] <= failures:
                kind = deploy.SuperLinkUnavailable if "unavailable" in message else deploy.FederationError
                raise kind(message)
            return {"success": True, "run-id": 3}
        return {"success": True, "runs": [{"status": "finished:completed"}]}

    return flwr, calls


def test_a_superlink_still_starting_is_tried_again_within_the_connect_wait(monkeypatch):
    from feda2v_toolkit.federated import deploy

    clock = Clock()
    monkeypatch.setattr(deploy.time, "monotonic", clock.monotonic)
    monkeypatch.setattr(deploy.time, "sleep", clock.sleep)
    monkeypatch.setattr(deploy, "_log_lines", lambda run_id, home: [])
    flwr, calls = fake_flwr(8)
    monkeypatch.setattr(deploy, "_flwr", flwr)
    said: list[str] = []
    result = deploy.submit_and_wait("127.0.0.1:1", {}, wait=600, log=said.append, connect_wait=60)
    assert calls["run"] == 9 and result["run"]["status"] == "finished:completed"
    assert said[0] == ("the SuperLink at 127.0.0.1:1 does not answer yet; trying again for up to 60s "
                       "(--connect-wait)") and said[1] == "submitted run 3 to the SuperLink at 127.0.0.1:1"


def test_a_superlink_that_never_answers_fails_after_the_connect_wait_and_other_errors_at_once(monkeypatch):
    from feda2v_toolkit.federated import deploy

    clock = Clock()
    monkeypatch.setattr(deploy.time, "monotonic", clock.monotonic)
    monkeypatch.setattr(deploy.time, "sleep", clock.sleep)
    flwr, calls = fake_flwr(10**6)
    monkeypatch.setattr(deploy, "_flwr", flwr)
    with pytest.raises(deploy.SuperLinkUnavailable, match=r"unavailable.*\(tried for 10s; --connect-wait\)"):
        deploy.submit_and_wait("127.0.0.1:1", {}, wait=600, connect_wait=10)
    assert calls["run"] == 11  # at 0, 1, ..., 10 s
    flwr, calls = fake_flwr(1, "flwr run: the app is not valid")
    monkeypatch.setattr(deploy, "_flwr", flwr)
    with pytest.raises(deploy.FederationError, match="not valid"):
        deploy.submit_and_wait("127.0.0.1:1", {}, wait=600, connect_wait=10)
    assert calls["run"] == 1  # only an unreachable SuperLink is tried again


def test_the_serverapps_lines_are_printed_as_the_rounds_end_not_after_the_run(monkeypatch):
    """federate --superlink polls the run's log while it runs: a round's line reaches the user when it ends."""
    from feda2v_toolkit.federated import deploy

    statuses = iter(["starting", "running", "running", "running", "finished:completed"])
    log = ["feda2v-tk: data: 2 sites"]
    seen: list[tuple[str, str]] = []

    def flwr(args, home, timeout):
        if args[0] == "run":
            return {"success": True, "run-id": 7}
        status = next(statuses)
        if status == "running":
            log.append(f"feda2v-tk: round {len(log)}/3: 2 sites, loss 1.0")
        return {"success": True, "runs": [{"status": status}]}

    monkeypatch.setattr(deploy, "_flwr", flwr)
    monkeypatch.setattr(deploy, "_log_lines", lambda run_id, home: list(log))
    monkeypatch.setattr(deploy.time, "sleep", lambda s: None)
    result = deploy.submit_and_wait("127.0.0.1:1", {}, wait=60, log=lambda m: seen.append(("status", m)),
                                    progress=lambda m: seen.append(("line", m)), log_every=0)
    lines = [m for kind, m in seen if kind == "line"]
    assert lines[:2] == ["feda2v-tk: data: 2 sites", "feda2v-tk: round 1/3: 2 sites, loss 1.0"]
    finished = seen.index(("status", "run 7: finished:completed"))
    assert seen.index(("line", "feda2v-tk: round 1/3: 2 sites, loss 1.0")) < finished
    assert all(line not in result["log"] for line in lines)  # nothing printed twice
