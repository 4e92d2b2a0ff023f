"""Run the Flower app on one machine: ``feda2v-tk federate``.

The engine here is ``inprocess``: a :class:`LocalGrid` -- Flower's ``Grid`` interface implemented in this
process -- delivers each Message to the ClientApp of each node (one ``Context`` per node, with
``node_config["data"]`` its dataset), one node at a time on a worker thread, with the stage timeout. No Ray,
no sockets: fast and robust on two cores; the messages are the real Flower ``Message``/``RecordDict``
objects and the apps are the ones real sites run with a SuperLink and SuperNodes (docs/federated.md).
"""

from __future__ import annotations

import secrets
import threading
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.app.error import Error
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

from feda2v_toolkit.federated.app import client_app as default_client_app
from feda2v_toolkit.federated.app import grid_exchange

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
        """Deliver the messages one after another on a worker thread; return the replies that came back
        within ``timeout`` seconds (a node still working then is left behind, as a dropped node is)."""
        messages = list(messages)
        replies: list[Message] = []
        abandoned = threading.Event()

        def work() -> None:
            for msg in messages:
                if abandoned.is_set():  # the round timed out: deliver nothing more
                    return
                ids = self.push_messages([msg])
                replies.extend(self.pull_messages(ids))

        worker = threading.Thread(target=work, daemon=True, name="feda2v-local-grid")
        worker.start()
        worker.join(timeout)
        abandoned.set()
        return list(replies)


def federate_local(config: Any, data: Sequence[str | Path], *, out: str | Path | None = None, seed: int | None = None,
                   overrides: Mapping[str, Any] | None = None, timeout: float | None = None,
                   log: Any = None) -> Any:
    """Train over ``data`` (one dataset per node) with the Flower app on the in-process engine."""
    from feda2v_toolkit.training.federation import run_federation

    grid = LocalGrid([{"data": str(p)} for p in data])
    names: dict[int, str] = {}
    model = run_federation(grid_exchange(grid, timeout, names), sorted(grid.get_node_ids()), config, out=out,
                           seed=seed, overrides=overrides, log=log, engine="inprocess")
    return model
