"""Submit the Flower app to a running SuperLink (Flower's Deployment engine) and wait for the run.

``feda2v-tk federate --superlink HOST:PORT`` writes the app (a ``pyproject.toml`` naming
:mod:`feda2v_toolkit.federated.app`'s ServerApp and ClientApp) and a Flower home with one SuperLink
connection into a temporary directory, submits the run with ``flwr run``, and polls ``flwr ls`` until the
run has finished (Flower's own CI does the same: ``flwr run``'s exit status does not tell a failed run).
The SuperLink and one SuperNode per site are started by the sites (``docs/federated.md``); the ServerApp
runs next to the SuperLink, so the config path and the model path are paths on that machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from feda2v_toolkit.federated import CONNECT_WAIT
from feda2v_toolkit.training.pipeline import SiteError as FederationError

#: the run config keys of the ServerApp (``feda2v_toolkit.federated.app``) and their defaults
RUN_CONFIG = {"config": "", "out": "", "seed": "", "timeout": 0.0, "nodes": 1, "node-wait": 60.0,
              "overrides": "{}", "engine": "deployment", "resume": False, "overwrite": False, "keep-checkpoints": False,
              "checkpoint-dir": "", "metrics": ""}
CONNECTION = "feda2v"
LICENSE = "Apache-2.0"


class SuperLinkUnavailable(FederationError):
    """``flwr`` could not reach the SuperLink (not started yet, wrong address, network)."""


def app_pyproject() -> str:
    """The Flower app's ``pyproject.toml``: our ServerApp/ClientApp and the run config keys."""
    import tomli_w

    doc = {"build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
           "project": {"name": "feda2v-federated", "version": "1.0.0",
                       "description": "feda2v-tk's federated generator training (ServerApp and ClientApp)",
                       "license": LICENSE, "dependencies": ["feda2v-tk[federated]"]},
           "tool": {"flwr": {"app": {
               "publisher": "feda2v",
               "components": {"serverapp": "feda2v_toolkit.federated.app:server_app",
                              "clientapp": "feda2v_toolkit.federated.app:client_app"},
               "config": dict(RUN_CONFIG)}}}}
    return tomli_w.dumps(doc)


def write_app(directory: Path, superlink: str, *, insecure: bool = True,
              root_certificates: str | None = None) -> tuple[Path, Path]:
    """The app directory and a Flower home whose ``config.toml`` has one connection to ``superlink``."""
    import tomli_w

    app, home = directory / "app", directory / "flwr-home"
    app.mkdir(parents=True, exist_ok=True)
    home.mkdir(parents=True, exist_ok=True)
    (app / "pyproject.toml").write_text(app_pyproject(), encoding="utf-8")
    conn: dict[str, Any] = {"address": superlink, "insecure": insecure}
    if root_certificates:
        conn["root-certificates"] = root_certificates
    (home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: conn}}),
                                      encoding="utf-8")
    return app, home


def flwr_executable() -> str:
    """The ``flwr`` CLI of this environment (next to the interpreter), else the one on PATH."""
    sibling = Path(sys.executable).with_name("flwr")
    if sibling.exists():
        return str(sibling)
    found = shutil.which("flwr")
    if found is None:
        raise FederationError('the Flower CLI "flwr" is not installed: pip install "feda2v-tk[federated]"')
    return found


def _flwr(args: list[str], home: Path, timeout: float) -> dict[str, Any]:
    env = {**os.environ, "FLWR_HOME": str(home)}
    try:
        proc = subprocess.run([flwr_executable(), *args, "--format", "json"], capture_output=True, text=True,
                              env=env, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise FederationError(f"flwr {args[0]}: no answer from the SuperLink within {timeout:g}s") from None
    try:
        doc = json.loads(proc.stdout[proc.stdout.find("{"):]) if "{" in proc.stdout else {}
    except json.JSONDecodeError:
        doc = {}
    if proc.returncode != 0 or not doc.get("success", False):
        lines = [ln.strip() for ln in (str(doc.get("error-message") or "") or proc.stderr + proc.stdout).splitlines()]
        lines = [ln for ln in lines if ln]
        message = f"flwr {args[0]}: {lines[-1] if lines else 'failed'}"
        raise (SuperLinkUnavailable if "superlink is unavailable" in message.lower() else FederationError)(message)
    return doc


def _submit(args: list[str], home: Path, superlink: str, connect_wait: float, say: Callable[[str], None]
            ) -> dict[str, Any]:
    """``flwr run``, tried again every second while the SuperLink does not answer, for up to ``connect_wait``
    seconds (said once it has taken five)."""
    start = time.monotonic()
    said = False
    while True:
        try:
            return _flwr(args, home, 60)
        except SuperLinkUnavailable as e:
            waited = time.monotonic() - start
            if waited + 1.0 > connect_wait:
                raise SuperLinkUnavailable(f"{e} (tried for {waited:.0f}s; --connect-wait)") from None
            if waited >= 5.0 and not said:
                say(f"the SuperLink at {superlink} does not answer yet; trying again for up to "
                    f"{connect_wait:g}s (--connect-wait)")
                said = True
            time.sleep(1.0)


def run_config_string(values: Mapping[str, Any]) -> str:
    """``flwr run --run-config`` text: TOML values, one ``key=value`` per key (strings quoted)."""
    return " ".join(f"{k}={json.dumps(v)}" for k, v in values.items())


def submit_and_wait(superlink: str, run_config: Mapping[str, Any], *, wait: float, poll: float = 2.0,
                    log: Callable[[str], None] | None = None, insecure: bool = True,
                    root_certificates: str | None = None, progress: Callable[[str], None] | None = None,
                    log_every: float = 10.0, connect_wait: float = CONNECT_WAIT) -> dict[str, Any]:
    """Submit the app to ``superlink`` with ``run_config`` (trying again for up to ``connect_wait`` seconds while
    the SuperLink does not answer: it may still be starting); poll until the run finished (at most ``wait``
    seconds). While it runs, every ``log_every`` seconds the ServerApp's new ``feda2v-tk:`` lines (a round's
    line as it ends) go to ``progress``. Returns the run's ``flwr ls`` record and its ``feda2v-tk:`` log lines
    not yet given to ``progress``; raises :class:`FederationError` when the SuperLink cannot be reached, the
    run fails, or time runs out."""
    say = log or (lambda _m: None)
    unknown = set(run_config) - set(RUN_CONFIG)
    if unknown:
        raise ValueError(f"unknown run config keys: {sorted(unknown)}")
    with tempfile.TemporaryDirectory(prefix="feda2v-flwr-") as tmp:
        app, home = write_app(Path(tmp), superlink, insecure=insecure, root_certificates=root_certificates)
        started = _submit(["run", str(app), CONNECTION, "--run-config", run_config_string(run_config)], home,
                          superlink, min(connect_wait, wait), say)
        run_id = str(started["run-id"])
        say(f"submitted run {run_id} to the SuperLink at {superlink}")
        deadline = time.monotonic() + wait
        status = ""
        shown = 0
        next_log = time.monotonic() + log_every
        while True:
            record = _flwr(["ls", CONNECTION, "--run-id", run_id], home, 30)["runs"][0]
            if record["status"] != status:
                status = record["status"]
                say(f"run {run_id}: {status}")
            if status.startswith("finished"):
                break
            if progress is not None and status.startswith("running") and time.monotonic() >= next_log:
                ours = [ln for ln in _log_lines(run_id, home) if ln.startswith("feda2v-tk: ")]
                for line in ours[shown:]:
                    progress(line)
                shown = max(shown, len(ours))
                next_log = time.monotonic() + log_every
            if time.monotonic() > deadline:
                _stop(run_id, home)
                raise FederationError(f"run {run_id} did not finish within {wait:g}s (--wait); stopped it")
            time.sleep(poll)
        lines = _log_lines(run_id, home)
        if status != "finished:completed":
            tail = [ln for ln in lines if ln.strip()][-3:]
            raise FederationError(f"run {run_id} {status}: {record.get('status-details', '')}"
                                  + (f" ({' | '.join(tail)})" if tail else ""))
        return {"run": record, "log": [ln for ln in lines if ln.startswith("feda2v-tk: ")][shown:]}


def _stop(run_id: str, home: Path) -> None:
    with contextlib.suppress(FederationError):
        _flwr(["stop", run_id, CONNECTION], home, 30)


def _log_lines(run_id: str, home: Path) -> list[str]:
    """The run's log as printed by ``flwr log --show`` (the ServerApp's output), best effort."""
    env = {**os.environ, "FLWR_HOME": str(home)}
    try:
        proc = subprocess.run([flwr_executable(), "log", run_id, CONNECTION, "--show"], capture_output=True,
                              text=True, env=env, timeout=30, check=False)
    except subprocess.TimeoutExpired:
        return []
    return [ln.rstrip() for ln in proc.stdout.splitlines()]
