"""The ranks of a data-parallel run (``torchrun``), and the blocks of rows they share out.

A site's rows are cut into fixed **blocks** of :data:`BLOCK_ROWS` consecutive dataset rows (on-disk order). A
block is the unit of work and of summation order: every sum, scatter or hash a site releases is computed block
by block and combined in block order, whatever the number of ranks. With ``W`` ranks, block ``b`` is computed by
rank ``b mod W``; each round, the ``W`` ranks compute one block each and exchange the ``W`` partial results,
which every rank combines in the same order. One process (``W = 1``) does the same arithmetic in the same order,
so the closed-form model is the same to the byte on any number of ranks.

:class:`Ranks` is one process (no engine); :class:`TorchRanks` exchanges through ``torch.distributed`` (gloo
for CPU tensors; the process group is made by :func:`init_from_environment` from what ``torchrun`` sets).
Tensors travel as safetensors bytes, never pickled.
"""

from __future__ import annotations

import datetime
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from feda2v_toolkit.errors import InputError, write_error
from feda2v_toolkit.runtime.launch import (  # noqa: F401  (re-exported: where the ranks' callers look)
    LAUNCH_VARIABLES,
    collective_timeout,
    launched_rank,
    launched_world_size,
    rank_device,
)
from feda2v_toolkit.runtime.scratch import read_at, write_at
from feda2v_toolkit.runtime.seeds import derive_seed

#: consecutive dataset rows per block (fixed: results do not depend on the number of ranks or the memory budget)
BLOCK_ROWS = 512

Part = dict[str, Tensor]

#: lanes a costly merge runs in (:meth:`Ranks.combine_lanes`): block ``b`` in lane ``b mod LANES``, the lanes merged
#: up a fixed tree; fixed, so that the result does not depend on the number of ranks; up to this many ranks merge
#: in parallel
LANES = 8


def block_count(rows: int) -> int:
    return (rows + BLOCK_ROWS - 1) // BLOCK_ROWS


def lane_owners(lanes: int, world: int) -> list[int]:
    """The rank of each lane: contiguous runs of lanes, as even as they come, starting at rank 0 (ranks past the
    number of lanes hold none), so that the merge tree's lower nodes lie within one rank."""
    world = max(1, min(world, lanes))
    return [next(r for r in range(world) if lane < (r + 1) * lanes // world) for lane in range(lanes)]


def waiting_halves(blocks: int, lanes: int = LANES) -> int:
    """The most results of :meth:`Ranks.combine_lanes` that wait at once in one process -- the tree's left halves,
    in temporary files, while the right halves are computed: the tree's depth (at most 3 for 8 lanes)."""
    n = min(lanes, blocks)
    return n.bit_length() - 1 if n >= 2 else 0


def tree_split(a: int, z: int) -> int:
    """Where the fixed merge tree over the lanes ``[a, z)`` (two or more) splits: the left half is the largest
    power of two below ``z - a`` lanes -- the lanes merged pairwise, level by level, an odd one carried up."""
    return a + (1 << ((z - a - 1).bit_length() - 1))


def block_range(b: int, rows: int) -> tuple[int, int]:
    return b * BLOCK_ROWS, min((b + 1) * BLOCK_ROWS, rows)


def in_block(indices: Tensor, b: int, rows: int) -> Tensor:
    """The entries of the sorted row ``indices`` that fall in block ``b``."""
    lo, hi = block_range(b, rows)
    a, z = torch.searchsorted(indices, torch.tensor([lo, hi])).tolist()
    return indices[a:z]


class Ranks:
    """One process: rank 0 of 1. Subclasses exchange between processes."""

    rank = 0
    world = 1
    agreed = False  # set once the ranks agreed on a run's seed and outputs (training.pipeline.train)

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def rounds(self, blocks: int) -> Iterator[tuple[int | None, list[int]]]:
        """Per round: this rank's block (``None`` past the end) and the round's blocks in order."""
        for start in range(0, blocks, self.world):
            mine = start + self.rank
            yield (mine if mine < blocks else None), list(range(start, min(start + self.world, blocks)))

    def exchange(self, part: Part | None, blocks: list[int]) -> Iterable[Part]:
        """Every rank's part of one round, in block order (``part`` is this rank's, ``None`` past the end); the
        collective runs when this is called, the parts may be rebuilt as they are iterated."""
        assert part is not None and len(blocks) == 1
        return [part]

    def combine(self, blocks: int, compute: Callable[[int], Part],
                merge: Callable[[Part | None, Part], Part]) -> Part | None:
        """``merge(... merge(merge(None, p0), p1) ..., p_last)`` over the blocks' parts ``compute(b)``, computed
        round by round across the ranks; every rank returns the same result."""
        acc: Part | None = None
        for mine, order in self.rounds(blocks):
            for p in self.exchange(compute(mine) if mine is not None else None, order):
                acc = merge(acc, p)
                del p  # merged: not held beside the next part
        return acc

    def combine_lanes(self, blocks: int, compute: Callable[[int], Part],
                      merge: Callable[[Part | None, Part], Part], lanes: int = LANES) -> Part | None:
        """Like :meth:`combine`, for a merge that costs more than computing the parts (a factor re-factored at
        every merge): the blocks run in ``lanes`` fixed lanes -- lane ``l`` merges blocks ``l, l + lanes, ...`` in
        order -- and the lanes' results are merged pairwise up a fixed tree (:func:`tree_split`). The ranks share
        out contiguous lanes (:func:`lane_owners`): each merges its lanes and the tree's nodes over them, a node
        whose halves two ranks hold is merged by the left half's rank once the right half's rank sent it, and rank
        0 sends the root to all. The same merges in the same order whatever the number of ranks, so every rank
        returns what one process does; as many merges as :meth:`combine`, of which a rank runs only its share
        (at 32 blocks: 31 in one process; rank 0, which runs the most, 16 of two ranks' and 9 of four's). The
        tree's left halves wait in temporary files while the right halves are computed (:func:`waiting_halves`
        of them at most), so a rank holds no more than the merge it runs, however many blocks there are."""
        n = min(lanes, blocks)
        if n == 0:
            return None
        owner = lane_owners(n, self.world)

        def lane(first: int) -> Part:
            acc: Part | None = None
            for b in range(first, blocks, lanes):
                acc = merge(acc, compute(b))
            return acc or {}

        def node(a: int, z: int) -> Part | None:
            """Lanes ``[a, z)`` merged, on the rank of lane ``a``; ``None`` on the others. Every rank walks the
            whole tree in the same order, so the ranks' sends and receives pair up. A left half waits on disk
            (:class:`SpilledPart`) while its rank computes the right half."""
            if z - a == 1:
                return lane(a) if owner[a] == self.rank else None
            m = tree_split(a, z)
            left: Part | SpilledPart | None = node(a, m)
            if left is not None and owner[m] == self.rank:  # this rank computes the right half: the left waits
                left = SpilledPart(left)
            right = node(m, z)
            if isinstance(left, SpilledPart):
                left = left.load()
            if owner[m] != owner[a]:  # the right half travels to the left half's rank
                if self.rank == owner[m]:
                    assert right is not None
                    self.send_part(right, owner[a])
                    right = None
                elif self.rank == owner[a]:
                    right = self.receive_part(owner[m])
            if self.rank != owner[a]:
                return None
            assert left is not None and right is not None
            return merge(left, right)

        root = node(0, n)
        return self.broadcast_part(root, owner[0]) if self.distributed else root

    def send_part(self, part: Part, dst: int) -> None:
        """Send ``part`` to rank ``dst`` alone (which calls :meth:`receive_part`)."""
        raise RuntimeError("one process has no other rank to send to")

    def receive_part(self, src: int) -> Part:
        """The part rank ``src`` sends this rank (:meth:`send_part`)."""
        raise RuntimeError("one process has no other rank to receive from")

    def broadcast_part(self, part: Part | None, src: int) -> Part:
        """Rank ``src``'s ``part`` on every rank (``part`` is ignored on the others)."""
        assert part is not None
        return part

    def all_strings(self, value: str) -> list[str]:
        return [value]

    def average_gradients(self, params: list[Tensor], weight: float) -> None:
        """Sum ``weight * grad`` over the ranks into every ``grad`` (one process: unchanged)."""

    def all_mean(self, values: Mapping[str, float], weight: float) -> dict[str, float]:
        return dict(values)

    def sum_tensors(self, tensors: list[Tensor]) -> None:
        """Replace each tensor, in place, by its sum over the ranks (one process: unchanged)."""

    def finish(self) -> None:
        """The end of a successful data-parallel command, made by every rank after rank 0 wrote its outputs:
        wait for every rank, then tear the process group down together (one process: nothing to do)."""


def add_parts(acc: Part | None, part: Part) -> Part:
    """Key-wise float64 sum, in the order parts arrive (the ``merge`` of plain sums)."""
    if acc is None:
        return {k: v.to(torch.float64).clone() for k, v in part.items()}
    for k, v in part.items():  # a block without rows of some kind (e.g. no training clip) lacks their keys
        if k in acc:
            acc[k] += v.to(torch.float64)
        else:
            acc[k] = v.to(torch.float64).clone()
    return acc


def _to_bytes(part: Part | None) -> Tensor:
    """A part as safetensors bytes in one ``uint8`` tensor (nothing for ``None``)."""
    from feda2v_toolkit.runtime.tensorfile import pack_tensors

    return torch.zeros(0, dtype=torch.uint8) if part is None else pack_tensors(part)


def _from_bytes(buf: Tensor) -> Part:
    """A part from :func:`_to_bytes`, in name order. Its largest tensor -- most of the bytes -- is a view of
    ``buf`` (no copy); the others are copied, so that none of them keeps the whole buffer alive (a merge may
    keep a part's small tensors, such as its means, long after its large ones are merged)."""
    from feda2v_toolkit.runtime.tensorfile import unpack_tensors

    part = unpack_tensors(buf)
    largest = max(part, key=lambda k: part[k].numel() * part[k].element_size(), default=None)
    return {k: part[k] if k == largest else part[k].clone() for k in sorted(part)}


class SpilledPart:
    """A part waiting in an unlinked temporary file (in ``$TMPDIR``) until :meth:`load`: its safetensors bytes
    (:func:`_to_bytes`, never pickled), read back as :func:`_from_bytes` rebuilds a part another rank sent --
    the same values. The gaussian's merge tree keeps its left halves here while the right halves are computed
    (up to three factors of ``2 x rank`` rows and their probes, ~38 MB each at length 16), so a process's memory stops growing
    with the tree's depth. A write that fails for want of room is one line naming the directory."""

    def __init__(self, part: Part) -> None:
        buf = _to_bytes(part)
        self.size = buf.numel()
        self._file = tempfile.TemporaryFile(prefix="feda2v-part-")  # noqa: SIM115 (closed by load())
        try:
            write_at(self._file.fileno(), memoryview(buf.numpy()).cast("B"), 0)
        except OSError as exc:
            self._file.close()
            raise (write_error(tempfile.gettempdir(), exc) or exc) from None

    def load(self) -> Part:
        """The part, once (the file is closed, and so removed)."""
        try:
            buf = torch.empty(self.size, dtype=torch.uint8)
            read_at(self._file.fileno(), memoryview(buf.numpy()).cast("B"), 0, "a waiting half of the merge tree")
        finally:
            self._file.close()
        return _from_bytes(buf)


class TorchRanks(Ranks):
    """Ranks of a ``torch.distributed`` process group (collectives on CPU tensors)."""

    def __init__(self, owns_group: bool = False) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.owns_group = owns_group  # made by init_from_environment: finish() tears it down
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()

    def _all_sizes(self, size: int) -> list[int]:
        """Every rank's ``size``, in rank order."""
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world)]
        self.dist.all_gather(sizes, torch.tensor([size], dtype=torch.int64))
        return [int(s) for s in sizes]

    def _all_gather_bytes(self, buf: Tensor) -> list[Tensor]:
        sizes = self._all_sizes(buf.numel())
        longest = max(sizes)
        padded = torch.zeros(longest, dtype=torch.uint8)
        padded[:buf.numel()] = buf
        out = [torch.zeros(longest, dtype=torch.uint8) for _ in range(self.world)]
        self.dist.all_gather(out, padded)
        return [o[:s] for o, s in zip(out, sizes, strict=True)]

    def exchange(self, part: Part | None, blocks: list[int]) -> Iterator[Part]:
        # This rank's part is packed into its bytes now (the part itself is let go when this returns); the sizes
        # are gathered; then each rank's bytes are broadcast from it in block order as the parts are iterated,
        # received in place and rebuilt as views of them. A rank holds its own bytes until its turn and one
        # other part at a time: an all_gather held every rank's bytes at once, and gloo's a flat copy of them.
        dist = self.dist
        own: Tensor | None = _to_bytes(part)
        del part
        sizes = self._all_sizes(own.numel())

        def parts() -> Iterator[Part]:
            nonlocal own
            for src in range(len(blocks)):  # rank i computed the round's i-th block
                if src == self.rank:
                    buf, own = own, None
                else:
                    buf = torch.empty(sizes[src], dtype=torch.uint8)
                dist.broadcast(buf, src=src)
                yield _from_bytes(buf)
                del buf

        return parts()

    def send_part(self, part: Part, dst: int) -> None:
        buf = _to_bytes(part)
        self.dist.send(torch.tensor([buf.numel()], dtype=torch.int64), dst)
        self.dist.send(buf, dst)

    def receive_part(self, src: int) -> Part:
        size = torch.zeros(1, dtype=torch.int64)
        self.dist.recv(size, src)
        buf = torch.empty(int(size), dtype=torch.uint8)
        self.dist.recv(buf, src)
        return _from_bytes(buf)

    def broadcast_part(self, part: Part | None, src: int) -> Part:
        buf = _to_bytes(part) if self.rank == src else None
        size = torch.tensor([0 if buf is None else buf.numel()], dtype=torch.int64)
        self.dist.broadcast(size, src=src)
        if buf is None:
            buf = torch.empty(int(size), dtype=torch.uint8)
        self.dist.broadcast(buf, src=src)
        return _from_bytes(buf)  # on every rank alike (names in order, as the other exchanges give them)

    def all_strings(self, value: str) -> list[str]:
        data = torch.frombuffer(bytearray(value.encode()), dtype=torch.uint8) if value else \
            torch.zeros(0, dtype=torch.uint8)
        return [bytes(b.numpy().tobytes()).decode() for b in self._all_gather_bytes(data)]

    def average_gradients(self, params: list[Tensor], weight: float) -> None:
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.mul_(weight)
        self.sum_tensors([p.grad for p in params])

    def sum_tensors(self, tensors: list[Tensor]) -> None:
        if not tensors:
            return
        flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])  # one collective a call
        self.dist.all_reduce(flat)
        pos = 0
        for t in tensors:
            t.copy_(flat[pos:pos + t.numel()].view_as(t))
            pos += t.numel()

    def finish(self) -> None:
        # No rank leaves while rank 0 still writes, and none tears the group down with work in flight: a rank
        # that left early could abort in gloo's teardown, and torchrun then killed rank 0 mid-write.
        self.dist.barrier()
        if self.owns_group:  # a group the caller made stays the caller's
            self.dist.destroy_process_group()

    def all_mean(self, values: Mapping[str, float], weight: float) -> dict[str, float]:
        keys = sorted(values)
        t = torch.tensor([float(values[k]) * weight for k in keys] + [weight], dtype=torch.float64)
        self.dist.all_reduce(t)
        total = float(t[-1])
        return {k: float(t[i]) / total if total > 0 else float("nan") for i, k in enumerate(keys)}


def agree(ranks: Ranks, work: Callable[[], Any]) -> Any:
    """Run ``work()`` on this rank, then exchange the ranks' outcomes (one collective, made by every rank whatever
    happened): if any rank failed with a toolkit error, every rank raises the first one's message (as a
    ``UsageError`` or ``InputError``); an unexpected error is raised on its own rank after the exchange."""
    from feda2v_toolkit.errors import ToolkitError, UsageError

    result, message, own = None, "", None
    try:
        result = work()
    except ToolkitError as e:
        message, own = f"{type(e).__name__}:{e}", e
    except Exception as e:  # noqa: BLE001 - reported to the other ranks, raised here below
        message, own = f"InputError:rank {ranks.rank}: {type(e).__name__}: {e}", e
    failures = [m for m in ranks.all_strings(message) if m]
    if own is not None:
        raise own
    if failures:
        kind, _, text = failures[0].partition(":")
        raise (UsageError if kind == "UsageError" else InputError)(text)
    return result


def init_from_environment(device: torch.device | str = "cpu") -> Ranks:
    """The run's ranks: one process, or -- under ``torchrun`` (``WORLD_SIZE`` > 1) -- a process group over the
    launcher's rendezvous (gloo for CPU tensors, and NCCL for CUDA ones when the device is a GPU; ``"auto"``: a
    GPU when there is one)."""
    world = launched_world_size()
    if world == 1:
        return Ranks()
    import torch.distributed as dist

    missing = [v for v in LAUNCH_VARIABLES if v not in os.environ]
    if missing:
        raise InputError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: start data-parallel runs with "
                         "torchrun (e.g. torchrun --nproc-per-node 2 -m feda2v_toolkit train ...)")
    made = not dist.is_initialized()
    if made:
        cuda = torch.device(rank_device(str(device))).type == "cuda"
        backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=collective_timeout()))
        import atexit

        atexit.register(_destroy)  # a rank that stops early (an error) leaves without tearing the group down
    return TorchRanks(owns_group=made)


def _destroy() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def data_parallel_step(gen: Any, optimizers: Mapping[str, torch.optim.Optimizer], ranks: Ranks
                       ) -> Callable[..., dict[str, float]]:
    """A ``step_fn`` (``feda2v_toolkit.training.loop.run_steps``) for data-parallel training: each rank takes
    its share ``rows[rank::world]`` of every batch (all of it when the batch has fewer rows than ranks) and runs the
    generator's own ``training_step`` with its own noise (seeded per step and rank from the run's stream); before
    every optimiser step the gradients are averaged over the ranks, weighted by rows, so every rank takes the same
    step (the weights stay identical). Loss terms: the row-weighted mean over the ranks."""
    weight = [1.0]
    params = {name: [p for g in opt.param_groups for p in g["params"]] for name, opt in optimizers.items()}
    for name, opt in optimizers.items():
        opt.register_step_pre_hook(lambda _opt, _a, _k, name=name: ranks.average_gradients(params[name], weight[0]))

    def step(x: Tensor, labels: Tensor | None, conditions: Tensor | None, ctx: Any) -> dict[str, float]:
        n = x.shape[0]
        if n >= ranks.world:
            sl = slice(ranks.rank, None, ranks.world)
            x, labels = x[sl], labels[sl] if labels is not None else None
            conditions = conditions[sl] if conditions is not None else None
            weight[0] = x.shape[0] / n
        else:
            weight[0] = 1.0 / ranks.world
        # each rank its own noise (latents, dropout, augmentation), drawn from the run's stream: the same on
        # every rank, so the ranks stay in step and the run stays reproducible
        step_seed = int(torch.randint(0, 2**62, (1,)))
        torch.manual_seed(derive_seed(step_seed, "rank", ranks.rank))
        terms = gen.training_step(x, labels=labels, conditions=conditions, optimizers=optimizers, ctx=ctx)
        torch.manual_seed(derive_seed(step_seed, "after"))  # the run's stream again, the same on every rank
        return ranks.all_mean(terms, weight[0])

    return step
