"""Run the Flower app on one machine: ``feda2v-tk federate``.

The engine here is ``inprocess``: a :class:`LocalGrid` -- Flower's ``Grid`` interface implemented in this
process -- delivers each Message to the ClientApp of each node (one ``Context`` per node, with
``node_config["data"]`` its dataset), one node at a time in the calling thread, with the stage timeout. No Ray,
no sockets: fast and robust on two cores; the messages are the real Flower ``Message``/``RecordDict``
objects and the apps are the ones real sites run with a SuperLink and SuperNodes (docs/federated.md).
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.app.error import Error
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

from feda2v_toolkit.federated.app import client_app as default_client_app

#: Flower's error code for an exception in a ClientApp
CLIENT_APP_RAISED_EXCEPTION = 300
#: the SuperLink's node id in Flower; the in-process nodes are numbered after it
SERVER_NODE_ID = 1


class LocalGrid(Grid):
    """Flower's ``Grid`` in one process: node id -> (ClientApp, Context); replies as Flower builds them."""

    def __init__(self, node_configs: Sequence[Mapping[str, Any]], client_app: ClientApp | None = None,
                 run_id: int | None = None) -> None:
        from flwr.supercore.task_identity import TaskIdentity

        self.client_app = client_app or default_client_app
        self.run_id = run_id if run_id is not None else secrets.randbits(62)  # a fresh run: fresh node caches
        # what a ServerApp process is told by its SuperLink: who is sending (node 1 is the SuperLink's id)
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = self.run_id, SERVER_NODE_ID, 0
        self.contexts = {i + SERVER_NODE_ID + 1: Context(run_id=self.run_id, node_id=i + SERVER_NODE_ID + 1,
                                                         node_config=dict(cfg), state=RecordDict(), run_config={})
                         for i, cfg in enumerate(node_configs)}
        self._run: Any = None
        self._replies: dict[str, Message] = {}

    def set_run(self, run: Any) -> None:
        self._run = run

    @property
    def run(self) -> Any:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def _deliver(self, msg: Message) -> Message:
        try:
            return self.client_app(msg, self.contexts[msg.metadata.dst_node_id])
        except Exception as e:  # noqa: BLE001 -- a node's failure becomes an error reply, as in Flower
            return Message(Error(CLIENT_APP_RAISED_EXCEPTION, f"{type(e).__name__}: {e}"), reply_to=msg)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            meta = msg.metadata.__dict__
            meta["_message_id"] = str(uuid.uuid4())
            self._replies[meta["_message_id"]] = self._deliver(msg)
            ids.append(meta["_message_id"])
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Deliver the messages one after another in this thread; return the replies that came back within
        ``timeout`` seconds (a node whose reply comes later is left out, as a dropped node is). Running in the
        caller's thread keeps Ctrl-C and SIGTERM clean: nothing is left running in a thread of its own."""
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        for msg in messages:
            if deadline is not None and time.monotonic() > deadline:
                break  # the stage timed out: deliver nothing more
            ids = self.push_messages([msg])
            if deadline is None or time.monotonic() <= deadline:
                replies.extend(self.pull_messages(ids))
            else:
                self.pull_messages(ids)
        return replies


def federate_local(config: Any, data: Sequence[str | Path], *, out: str | Path | None = None, seed: int | None = None,
                   overrides: Mapping[str, Any] | None = None, timeout: float | None = None, resume: bool = False,
                   checkpoint_dir: str | Path | None = None, metrics_path: str | Path | None = None,
                   progress: bool | None = None, device: str = "cpu", log: Any = None, overwrite: bool = False,
                   keep_checkpoints: bool = False) -> Any:
    """Train over ``data`` (one dataset per node, in this order) with the Flower app on the in-process engine."""
    from feda2v_toolkit.federated.app import FlowerTransport
    from feda2v_toolkit.federated.run import federate
    from feda2v_toolkit.training.pipeline import resolve_device

    device = str(resolve_device(device))
    grid = LocalGrid([{"data": str(p), "device": device} for p in data])
    return federate(config, FlowerTransport(grid, sorted(grid.get_node_ids()), timeout), out=out, seed=seed,
                    overrides=overrides, engine="inprocess", resume=resume, checkpoint_dir=checkpoint_dir,
                    metrics_path=metrics_path, progress=progress, log=log, overwrite=overwrite, inputs=list(data),
                    keep_checkpoints=keep_checkpoints)
