"""The Flower app: a ServerApp and a ClientApp over the Message API (``flwr>=1.42,<1.43``) that run the one
training pipeline (:mod:`feda2v_toolkit.training.pipeline`) with Flower moving its requests and replies.

Every stage of the pipeline's protocol (:data:`feda2v_toolkit.training.site.STAGES`) is one message type,
``query.<stage>`` or ``train.<stage>``. A message carries an ``ArrayRecord`` ``arrays`` (tensors) and a
``ConfigRecord`` ``meta`` (``{"json": ...}``); the reply has the same two records. The ClientApp answers with
:func:`feda2v_toolkit.training.site.handle` -- exactly what ``train`` calls in-process -- and the ServerApp runs
:func:`feda2v_toolkit.federated.run.federate` over the Grid: the built-in FedAvg refuses replies whose keys
differ, and per-class generators are averaged only among their owners, so the pipeline merges itself.

Settings:

* node: ``node_config["data"]`` -- the node's dataset path (``flower-supernode --node-config 'data="..."'``);
* server: ``run_config`` ``config`` (experiment config path), ``out`` (model file), ``seed`` (optional),
  ``timeout`` (seconds per stage, overrides ``federated_round_timeout``), ``nodes`` (how many to wait for),
  ``node-wait`` (seconds), ``overrides`` (JSON object of config keys), ``resume``, ``overwrite``,
  ``keep-checkpoints``, ``checkpoint-dir``,
  ``metrics``; see :data:`feda2v_toolkit.federated.deploy.RUN_CONFIG`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from feda2v_toolkit.training.pipeline import SiteError, resolve_device
from feda2v_toolkit.training.site import STAGES, Arrays, Meta, Site, handle
from feda2v_toolkit.training.spec import RunSpec

#: pipeline stage -> Flower message type
MESSAGE_TYPES = {stage: f"{kind}.{stage}" for stage, kind in STAGES.items()}

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


def site_index(meta: Meta) -> int | None:
    """The site's position in the run, once the pipeline has ordered the sites (``None`` before)."""
    index = int(meta.get("site", -1))
    return index if index >= 0 else None


def node_site(meta: Meta, context: Context) -> Site:
    """The site of a SuperNode: its dataset is ``node_config["data"]`` (and its device ``node_config["device"]``)."""
    data = context.node_config.get("data")
    if not data:
        raise ValueError("this SuperNode has no data: start it with --node-config 'data=\"PATH\"'")
    return Site(str(data), RunSpec.from_section(meta["config"]), site_index(meta),
                device=resolve_device(str(context.node_config.get("device", "cpu"))))


def answer(stage: str, msg: Message, context: Context, make_site: Callable[[Meta, Context], Site] = node_site) -> Message:
    """A ClientApp's reply to one stage's message: the site's release (:func:`~feda2v_toolkit.training.site.handle`)."""
    arrays, meta = decode(msg.content)
    key = (msg.metadata.run_id, context.node_id)
    generation = int(context.state.config_records["feda2v-generation"]["generation"]) if "feda2v-generation" in \
        context.state.config_records else 0
    site = _SITES.get(key)
    if site is None or site.generation != generation:  # new here, or this node's last message went elsewhere
        site = make_site(meta, context)
        stored = context.state.array_records.get("feda2v")
        if stored is not None and len(stored):
            site.store = dict(stored.to_torch_state_dict())
        site.generation = generation
        for old in [k for k in _SITES if k[0] != key[0]]:  # one run at a time per process: drop other runs
            _SITES.pop(old).close()
        _SITES[key] = site
    before = dict(site.store)
    out_arrays, out_meta = handle(site, stage, arrays, meta)
    if site.store.keys() != before.keys() or any(site.store[k] is not before[k] for k in before):
        site.generation = generation + 1  # the node's state changed: a site elsewhere must rebuild from it
        context.state["feda2v"] = ArrayRecord(torch_state_dict=dict(site.store))
        context.state["feda2v-generation"] = ConfigRecord({"generation": site.generation})
    return Message(encode(out_arrays, out_meta), reply_to=msg)


def dp_clipping_mod(msg: Message, context: Context, call_next: Any) -> Message:
    """Flower's ``fixedclipping_mod`` (the node clips its whole update -- every generator it trained, jointly --
    to the clipping norm the server sent) when the server asks for node-level differential privacy; else a no-op."""
    config = msg.content.config_records.get("meta")
    if config is not None and KEY_CLIPPING_NORM in config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


def register_stages(app: ClientApp, make_site: Callable[[Meta, Context], Site] = node_site) -> ClientApp:
    """Register a handler for every stage of the pipeline's protocol on ``app`` (sites made by ``make_site``)."""
    for stage, kind in STAGES.items():
        def handler(msg: Message, context: Context, stage: str = stage) -> Message:
            return answer(stage, msg, context, make_site)

        handler.__name__ = f"_{stage}"
        getattr(app, kind)(stage, mods=[dp_clipping_mod] if stage == "generator_round" else None)(handler)
    return app


register_stages(client_app)


# -- server ---------------------------------------------------------------------------------------

class FlowerTransport:
    """The pipeline's transport over a Flower Grid: one message per site and stage, all replies or a
    :class:`SiteError` naming the site (its dataset) that failed or did not answer within ``timeout``."""

    streams_steps = False

    def __init__(self, grid: Grid, nodes: list[int], timeout: float | None) -> None:
        self.grid, self.nodes, self.timeout = grid, list(nodes), timeout
        self.names: dict[int, str] = {}
        self.count = 0

    def sites(self) -> list[int]:
        return list(self.nodes)

    def _name(self, node: int) -> str:
        if node in self.names:
            return self.names[node]
        where = f"the site at position {self.nodes.index(node)}, " if node in self.nodes else "the site at "
        return f"{where}Flower node {node}"

    def exchange(self, stage: str, requests: Mapping[int, tuple[Arrays, Meta]]) -> dict[int, tuple[Arrays, Meta]]:
        self.count += 1
        wait = self.timeout
        if wait is None:
            first = next(iter(requests.values()))[1]
            wait = float(first["config"].get("federated_round_timeout", 600))
        messages = [Message(encode(a, m), dst_node_id=n, message_type=MESSAGE_TYPES[stage],
                            group_id=f"{stage}.{self.count}") for n, (a, m) in requests.items()]
        replies: Iterable[Message] = self.grid.send_and_receive(messages, timeout=wait)
        out: dict[int, tuple[Arrays, Meta]] = {}
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                raise SiteError(f"{self._name(node)} failed in stage {stage!r}: {reply.error.reason}")
            out[node] = decode(reply.content)
            if stage == "describe":
                self.names[node] = str(out[node][1].get("name", node))
        missing = [n for n in requests if n not in out]
        if missing:
            raise SiteError(f"no reply from {', '.join(self._name(n) for n in missing)} in stage {stage!r} within "
                            f"{wait:g}s (federated_round_timeout); nothing was written")
        return out


server_app = ServerApp()


def wait_for_nodes(grid: Grid, expected: int, wait: float) -> list[int]:
    deadline = time.monotonic() + wait
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= expected or time.monotonic() > deadline:
            return nodes
        time.sleep(0.5)


@server_app.main()
def _main(grid: Grid, context: Context) -> None:
    from feda2v_toolkit.federated.run import federate

    rc = context.run_config
    timeout = float(rc["timeout"]) if rc.get("timeout") else None
    expected = int(rc.get("nodes", 1) or 1)
    nodes = wait_for_nodes(grid, expected, float(rc.get("node-wait", 60)))
    if len(nodes) < expected:
        raise SiteError(f"only {len(nodes)} of {expected} nodes connected within {rc.get('node-wait', 60)}s")
    seed = int(rc["seed"]) if rc.get("seed") not in (None, "") else None
    config = str(rc.get("config") or "") or {}
    out = str(rc.get("out") or "") or None
    overrides = json.loads(str(rc.get("overrides") or "{}"))
    federate(config, FlowerTransport(grid, nodes, timeout), out=out, seed=seed, overrides=overrides,
             engine=str(rc.get("engine", "deployment")), resume=bool(rc.get("resume", False)),
             checkpoint_dir=str(rc.get("checkpoint-dir") or "") or None, metrics_path=str(rc.get("metrics") or "") or None,
             overwrite=bool(rc.get("overwrite", False)), keep_checkpoints=bool(rc.get("keep-checkpoints", False)),
             log=lambda m: print(f"feda2v-tk: {m}", flush=True))
