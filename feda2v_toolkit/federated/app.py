"""The Flower app: a ServerApp and a ClientApp over the Message API (``flwr>=1.42,<1.43``).

Every stage is one message type: ``query.describe|reducer|normalization|upsampler|generator_statistics``
(exact statistics) and ``train.upsampler_round|generators`` (rounds). A message carries an ``ArrayRecord`` ``arrays`` (tensors)
and a ``ConfigRecord`` ``meta`` (``{"json": ...}``); the reply has the same two records. The server loop is
a hand-written loop over the Grid (:func:`feda2v_toolkit.training.federation.run_federation`): the built-in
FedAvg refuses replies whose keys differ, and per-class generators are averaged only among their owners.

Settings:

* node: ``node_config["data"]`` -- the node's dataset path (``flower-supernode --node-config 'data="..."'``);
* server: ``run_config`` ``config`` (experiment config path), ``out`` (model file), ``seed`` (optional),
  ``timeout`` (seconds per stage, overrides ``federated_round_timeout``), ``nodes`` (how many to wait for),
  ``node-wait`` (seconds), ``overrides`` (JSON object of config keys); see
  :data:`feda2v_toolkit.federated.deploy.RUN_CONFIG`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from feda2v_toolkit.training.federation import FederationError, run_federation
from feda2v_toolkit.training.site import Arrays, Meta, Site, handle

MESSAGE_TYPES = {"describe": "query.describe", "reducer": "query.reducer", "normalization": "query.normalization",
                 "upsampler": "query.upsampler", "upsampler_round": "train.upsampler_round",
                 "generators": "train.generators", "generator_statistics": "query.generator_statistics"}

# -- encoding -------------------------------------------------------------------------------------


def encode(arrays: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> RecordDict:
    """One ArrayRecord and one ConfigRecord (as Flower's ``fixedclipping_mod`` requires); a ``dp_clipping_norm``
    in ``meta`` also goes into the ConfigRecord under Flower's clipping-norm key."""
    record = ArrayRecord(torch_state_dict={k: v.contiguous() for k, v in arrays.items()}) if arrays else ArrayRecord()
    config: dict[str, Any] = {"json": json.dumps(meta)}
    if meta.get("dp_clipping_norm"):
        config[KEY_CLIPPING_NORM] = float(meta["dp_clipping_norm"])
    return RecordDict({"arrays": record, "meta": ConfigRecord(config)})


def decode(content: RecordDict) -> tuple[Arrays, Meta]:
    record = content.array_records.get("arrays")
    arrays = dict(record.to_torch_state_dict()) if record is not None and len(record) else {}
    meta_record = content.config_records.get("meta")
    meta = json.loads(str(meta_record["json"])) if meta_record is not None else {}
    return arrays, meta


# -- client ---------------------------------------------------------------------------------------

client_app = ClientApp()

#: (run id, node id) -> Site, so that a node reduces its data once per run (rebuilt from context.state if lost)
_SITES: dict[tuple[int, int], Site] = {}


def _answer(stage: str, msg: Message, context: Context) -> Message:
    arrays, meta = decode(msg.content)
    key = (msg.metadata.run_id, context.node_id)
    site = _SITES.get(key)
    if site is None:
        data = context.node_config.get("data")
        if not data:
            raise ValueError("this SuperNode has no data: start it with --node-config 'data=\"PATH\"'")
        site = Site(str(data), meta["config"])
        stored = context.state.array_records.get("feda2v")
        if stored is not None and len(stored):
            site.store = dict(stored.to_torch_state_dict())
        for old in [k for k in _SITES if k[0] != key[0]]:  # one run at a time per process: drop other runs
            del _SITES[old]
        _SITES[key] = site
    out_arrays, out_meta = handle(site, stage, arrays, meta)
    if site.store:
        context.state["feda2v"] = ArrayRecord(torch_state_dict=dict(site.store))
    return Message(encode(out_arrays, out_meta), reply_to=msg)


@client_app.query("describe")
def _describe(msg: Message, context: Context) -> Message:
    return _answer("describe", msg, context)


@client_app.query("reducer")
def _reducer(msg: Message, context: Context) -> Message:
    return _answer("reducer", msg, context)


@client_app.query("normalization")
def _normalization(msg: Message, context: Context) -> Message:
    return _answer("normalization", msg, context)


@client_app.query("upsampler")
def _upsampler(msg: Message, context: Context) -> Message:
    return _answer("upsampler", msg, context)


@client_app.train("upsampler_round")
def _upsampler_round(msg: Message, context: Context) -> Message:
    return _answer("upsampler_round", msg, context)


def dp_clipping_mod(msg: Message, context: Context, call_next: Any) -> Message:
    """Flower's ``fixedclipping_mod`` (the node clips its whole update -- every generator it trained, jointly --
    to the clipping norm the server sent) when the server asks for differential privacy; else a no-op."""
    config = msg.content.config_records.get("meta")
    if config is not None and KEY_CLIPPING_NORM in config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


@client_app.train("generators", mods=[dp_clipping_mod])
def _generators(msg: Message, context: Context) -> Message:
    return _answer("generators", msg, context)


@client_app.query("generator_statistics")
def _generator_statistics(msg: Message, context: Context) -> Message:
    return _answer("generator_statistics", msg, context)


# -- server ---------------------------------------------------------------------------------------

def grid_exchange(grid: Grid, timeout: float | None, node_names: dict[int, str] | None = None) -> Any:
    """An ``exchange`` for :func:`run_federation` over a Flower Grid: one message per node, all replies or
    a :class:`FederationError` (a node's error reply, or no reply within ``timeout`` seconds)."""
    rounds = {"n": 0}

    def exchange(stage: str, requests: Mapping[int, tuple[Arrays, Meta]]) -> dict[int, tuple[Arrays, Meta]]:
        rounds["n"] += 1
        wait = timeout
        if wait is None:
            first = next(iter(requests.values()))[1]
            wait = float(first["config"].get("federated_round_timeout", 600))
        messages = [Message(encode(a, m), dst_node_id=n, message_type=MESSAGE_TYPES[stage],
                            group_id=f"{stage}.{rounds['n']}") for n, (a, m) in requests.items()]
        replies: Iterable[Message] = grid.send_and_receive(messages, timeout=wait)
        out: dict[int, tuple[Arrays, Meta]] = {}
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                name = (node_names or {}).get(node, f"node {node}")
                raise FederationError(f"{name} failed in stage {stage!r}: {reply.error.reason}")
            out[node] = decode(reply.content)
            if stage == "describe" and node_names is not None:
                node_names[node] = f"node {out[node][1].get('name', node)}"
        missing = [n for n in requests if n not in out]
        if missing:
            names = ", ".join((node_names or {}).get(n, f"node {n}") for n in missing)
            raise FederationError(f"no reply from {names} in stage {stage!r} within {wait:g}s "
                                  f"(federated_round_timeout); nothing was written")
        return out

    return exchange


server_app = ServerApp()


def _wait_for_nodes(grid: Grid, expected: int, wait: float) -> list[int]:
    deadline = time.monotonic() + wait
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= expected or time.monotonic() > deadline:
            return nodes
        time.sleep(0.5)


@server_app.main()
def _main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    timeout = float(rc["timeout"]) if rc.get("timeout") else None
    expected = int(rc.get("nodes", 1) or 1)
    nodes = _wait_for_nodes(grid, expected, float(rc.get("node-wait", 60)))
    if len(nodes) < expected:
        raise FederationError(f"only {len(nodes)} of {expected} nodes connected within {rc.get('node-wait', 60)}s")
    seed = int(rc["seed"]) if rc.get("seed") not in (None, "") else None
    config = str(rc.get("config") or "") or {}
    out = str(rc.get("out") or "") or None
    overrides = json.loads(str(rc.get("overrides") or "{}"))
    names: dict[int, str] = {}
    run_federation(grid_exchange(grid, timeout, names), nodes, config, out=out, seed=seed, overrides=overrides,
                   log=lambda m: print(f"feda2v-tk: {m}", flush=True), engine=str(rc.get("engine", "deployment")))
