"""Data-parallel training (torchrun): the same pipeline on several processes gives the model of one process."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from feda2v_toolkit.errors import UsageError
from feda2v_toolkit.runtime.ranks import (
    BLOCK_ROWS,
    Ranks,
    SpilledPart,
    add_parts,
    block_count,
    in_block,
    lane_owners,
    tree_split,
    waiting_halves,
)

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "0",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0"]
TRAIN = ["train", "--seed", "3", "--training-length", "4", "--latent-dim", "8"]


@pytest.fixture(scope="module")
def three_blocks(tmp_path_factory) -> Path:
    """1,200 tiny clips: three blocks of rows, so two ranks see an uneven last round."""
    from feda2v_toolkit.data.demo import write_demo_dataset

    path = tmp_path_factory.mktemp("ranks") / "data.safetensors"
    write_demo_dataset(path, 300, seq_len=50, dim=16)
    assert block_count(1200) == 3
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run(args: list[str], cwd: Path, *, ranks: int) -> subprocess.CompletedProcess[str]:
    """``feda2v-tk ARGS`` in one process or under torchrun; one intra-op thread per process either way (what
    torchrun sets), since float64 reductions may round differently on another number of threads."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = (TORCHRUN + ["-m", "feda2v_toolkit"]) if ranks > 1 else [sys.executable, "-m", "feda2v_toolkit"]
    return subprocess.run(cmd + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_two_ranks_write_the_bytes_of_one_process(three_blocks, tmp_path):
    args = [*TRAIN, "-d", str(three_blocks), "--upsampler", "lstsq"]
    one = run([*args, "-o", "one.safetensors"], tmp_path, ranks=1)
    assert one.returncode == 0, one.stderr
    two = run([*args, "-o", "two.safetensors"], tmp_path, ranks=2)
    assert two.returncode == 0, two.stderr
    assert "data-parallel: 2 ranks" in two.stderr
    assert two.stderr.count("wrote two.safetensors") == 1  # rank 0 speaks for the run
    assert sha256(tmp_path / "one.safetensors") == sha256(tmp_path / "two.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "one.metrics.jsonl", "one.safetensors", "two.metrics.jsonl", "two.safetensors"]  # rank 1 wrote nothing


def test_two_ranks_write_the_bytes_of_one_process_when_each_lane_holds_several_blocks(tmp_path):
    """Past LANES blocks the gaussian's merges run in parallel lanes: 19 blocks, lanes of two or three, of which
    rank 0 merges lanes 0-3 and rank 1 lanes 4-7, which it sends to rank 0 merged."""
    from feda2v_toolkit.data.demo import write_demo_dataset
    from feda2v_toolkit.runtime.ranks import LANES

    data = tmp_path / "many.safetensors"
    write_demo_dataset(data, 2400, seq_len=8, dim=8)
    assert block_count(9600) == 19 > 2 * LANES
    args = [*TRAIN, "-d", str(data)]
    one = run([*args, "-o", "one.safetensors"], tmp_path, ranks=1)
    assert one.returncode == 0, one.stderr
    two = run([*args, "-o", "two.safetensors"], tmp_path, ranks=2)
    assert two.returncode == 0, two.stderr
    assert sha256(tmp_path / "one.safetensors") == sha256(tmp_path / "two.safetensors")


def test_two_ranks_train_a_vae_with_averaged_gradients(three_blocks, tmp_path):
    from feda2v_toolkit.model.file import load_model

    args = [*TRAIN, "-d", str(three_blocks), "--generator-type", "vae", "--hidden-dim", "16", "--epochs", "2",
            "--upsampler", "linear", "-o", "vae.safetensors", "--json"]
    two = run(args, tmp_path, ranks=2)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count('"generator_type"') == 1  # one report, from rank 0
    model = load_model(tmp_path / "vae.safetensors")
    assert model.metrics["epochs"] == 2 and model.metrics["steps"] == 2 * 34  # 1,080 clips in global batches of 32
    assert all(torch.isfinite(p).all() for p in model.generators["all"].parameters())


def test_two_ranks_of_a_private_run_without_noise_write_the_bytes_of_one_process(three_blocks, tmp_path):
    """Epsilon inf (clipping only): the clipped statistics of the ranks' blocks add up to one process's."""
    for extra in ([], ["--reducer", "pca"]):
        args = [*TRAIN, "-d", str(three_blocks), "--dp-epsilon", "inf", *extra]
        one = run([*args, "-o", "one.safetensors", "--overwrite"], tmp_path, ranks=1)
        assert one.returncode == 0, one.stderr
        two = run([*args, "-o", "two.safetensors", "--overwrite"], tmp_path, ranks=2)
        assert two.returncode == 0, two.stderr
        assert sha256(tmp_path / "one.safetensors") == sha256(tmp_path / "two.safetensors"), extra


@pytest.mark.parametrize("kind", ["gaussian", "vae"])
def test_the_ranks_of_a_private_run_add_the_same_secret_noise_once(three_blocks, tmp_path, kind):
    """Every rank ends with the same noisy model (one draw of rank 0's secret noise per release or DP-SGD step)
    and the same spend, and another run draws other noise."""
    import json

    script = Path(__file__).with_name("_private_ranks.py")
    digests = []
    for attempt in ("a", "b"):
        out = tmp_path / attempt
        out.mkdir()
        proc = subprocess.run([*TORCHRUN, str(script), str(three_blocks), str(out), kind], capture_output=True,
                              text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
        assert proc.returncode == 0, proc.stderr
        ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in (0, 1)]
        assert ranks[0] == ranks[1]
        assert 3.99 < ranks[0]["epsilon"] <= 4.0 * (1 + 1e-9)
        if kind == "vae":
            assert ranks[0]["steps"]["generator.all.sgd"] > 0  # DP-SGD steps, each in the ledger of every rank
        digests.append(ranks[0]["digest"])
    assert digests[0] != digests[1]


def test_two_ranks_resume_an_interrupted_run_as_if_it_had_not_stopped(three_blocks, tmp_path):
    """Every rank starts again from rank 0's checkpoint: the resumed model is the uninterrupted one, byte for byte."""
    script = Path(__file__).with_name("_resume_ranks.py")
    for mode in ("whole", "interrupt", "resume"):
        proc = subprocess.run([*TORCHRUN, str(script), str(three_blocks), str(tmp_path), mode], capture_output=True,
                              text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
        assert proc.returncode == 0, proc.stderr
        if mode == "interrupt":
            assert not (tmp_path / "interrupt.safetensors").exists()
            assert (tmp_path / "checkpoints").is_dir()
        if mode == "resume":
            assert proc.stderr.count("after epoch 2") == 1  # rank 0 says so; every rank resumed (else: a hang)
    assert sha256(tmp_path / "whole.safetensors") == sha256(tmp_path / "resume.safetensors")


def test_data_parallel_runs_refuse_what_they_cannot_do(three_blocks, tmp_path):
    (tmp_path / "gan.json").write_text('{"gan_r1_weight": 0}')
    dp = run([*TRAIN, "-d", str(three_blocks), "-o", "m.safetensors", "--dp-epsilon", "4", "--generator-type", "gan",
              "-c", "gan.json"], tmp_path, ranks=2)
    assert dp.returncode != 0 and "exitcode  : 2" in dp.stderr  # torchrun reports each rank's exit status
    assert "feda2v-tk: error: DP-SGD with the generator type 'gan' runs in one process" in dp.stderr
    assert not (tmp_path / "m.safetensors").exists()


def test_rounds_give_every_block_to_one_rank_in_order():
    class Fake(Ranks):
        def __init__(self, rank: int, world: int) -> None:
            self.rank, self.world = rank, world

    for world in (1, 2, 3):
        seen = [b for r in range(world) for mine, _ in Fake(r, world).rounds(7) if (b := mine) is not None]
        assert sorted(seen) == list(range(7))
        orders = [order for _, order in Fake(0, world).rounds(7)]
        assert [b for o in orders for b in o] == list(range(7))


def test_one_process_combines_block_parts_in_block_order():
    parts = {b: {"x": torch.tensor([float(b)], dtype=torch.float64)} for b in range(5)}
    order: list[float] = []

    def merge(acc, part):
        order.append(float(part["x"]))
        return add_parts(acc, part)

    out = Ranks().combine(5, parts.__getitem__, merge)
    assert order == [0, 1, 2, 3, 4] and float(out["x"]) == 10


def leaf(b: int) -> dict[str, torch.Tensor]:
    return {"x": torch.tensor(list(str(b).encode()), dtype=torch.uint8)}


def shape(part) -> str:
    return bytes(part["x"].tolist()).decode()


class Shape:
    """A merge whose result spells the merges it ran (``(a b)``), counting them."""

    def __init__(self) -> None:
        self.merges = 0

    def __call__(self, acc, part):
        if acc is None:
            return part
        self.merges += 1
        return {"x": torch.tensor(list(f"({shape(acc)} {shape(part)})".encode()), dtype=torch.uint8)}


def test_lanes_merge_their_blocks_in_order_then_the_lanes_up_a_fixed_pairwise_tree():
    assert shape(Ranks().combine_lanes(10, leaf, Shape(), lanes=4)) == "((((0 4) 8) ((1 5) 9)) ((2 6) (3 7)))"
    assert shape(Ranks().combine_lanes(3, leaf, Shape(), lanes=4)) == "((0 1) 2)"  # one block a lane
    assert shape(Ranks().combine_lanes(7, leaf, Shape(), lanes=8)) == "(((0 1) (2 3)) ((4 5) 6))"
    assert shape(Ranks().combine_lanes(1, leaf, Shape(), lanes=8)) == "0"
    assert Ranks().combine_lanes(0, leaf, Shape()) is None


def test_the_tree_splits_off_the_largest_power_of_two_and_lanes_go_to_ranks_in_contiguous_runs():
    assert [tree_split(0, n) for n in range(2, 10)] == [1, 2, 2, 4, 4, 4, 4, 8]
    assert tree_split(4, 7) == 6
    assert lane_owners(8, 1) == [0] * 8
    assert lane_owners(8, 4) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert lane_owners(8, 3) == [0, 0, 1, 1, 1, 2, 2, 2]
    assert lane_owners(3, 5) == [0, 1, 2]  # more ranks than lanes: the last hold none; rank 0 holds lane 0


@pytest.mark.parametrize("blocks", [1, 2, 3, 4, 5, 7, 8, 9, 12, 15, 16, 17, 33])
def test_the_trees_waiting_halves_wait_on_disk_never_beside_a_merge(blocks, monkeypatch):
    """A process holds no more than the two results a merge takes, however deep the tree: the left halves wait in
    temporary files, at most ``waiting_halves`` of them at once, and come back with the same values."""
    import weakref

    from feda2v_toolkit.runtime import ranks as ranks_module

    alive: weakref.WeakSet = weakref.WeakSet()
    most_in_memory, on_disk, most_on_disk = [0], [0], [0]

    class Counted(ranks_module.SpilledPart):
        def __init__(self, part):
            super().__init__(part)
            on_disk[0] += 1
            most_on_disk[0] = max(most_on_disk[0], on_disk[0])

        def load(self):
            on_disk[0] -= 1
            part = super().load()
            alive.add(part["x"])
            return part

    monkeypatch.setattr(ranks_module, "SpilledPart", Counted)

    def compute(b):
        x = torch.tensor([b])
        alive.add(x)
        return {"x": x}

    def merge(acc, part):
        if acc is None:
            return part
        most_in_memory[0] = max(most_in_memory[0], len(alive) - 2)  # results held besides this merge's two
        x = torch.cat([acc["x"], part["x"]])
        alive.add(x)
        return {"x": x}

    merged = Ranks().combine_lanes(blocks, compute, merge)
    assert sorted(merged["x"].tolist()) == list(range(blocks))  # every block once, through the files
    assert most_in_memory[0] == 0 and on_disk[0] == 0
    assert most_on_disk[0] == waiting_halves(blocks)
    assert waiting_halves(blocks) <= 3  # log2(LANES): bounded whatever the number of blocks


def test_a_waiting_half_comes_back_with_its_values_and_dtypes():
    part = {"factor": torch.randn(7, 5, dtype=torch.float64), "means": torch.randn(3).float(),
            "count": torch.tensor(4, dtype=torch.int64)}
    back = SpilledPart(part).load()
    assert list(back) == sorted(part)
    assert all(torch.equal(back[k], part[k]) and back[k].dtype == part[k].dtype for k in part)


def test_a_full_temporary_directory_is_one_line_naming_it(monkeypatch):
    import errno
    import tempfile

    def full(*_args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("feda2v_toolkit.runtime.scratch.os.pwrite", full)
    with pytest.raises(UsageError, match=f"^{tempfile.gettempdir()}: cannot write: No space left on device"):
        SpilledPart({"x": torch.zeros(10)})


class ThreadRanks(Ranks):
    """Rank ``rank`` of ``world`` ranks run as threads, parts passed through queues (as TorchRanks passes them)."""

    def __init__(self, rank: int, world: int, boxes) -> None:
        self.rank, self.world, self.boxes = rank, world, boxes

    def send_part(self, part, dst):
        self.boxes[self.rank, dst].put(part)

    def receive_part(self, src):
        return self.boxes[src, self.rank].get(timeout=10)

    def broadcast_part(self, part, src):
        if self.rank == src:
            for r in range(self.world):
                if r != src:
                    self.boxes[src, r].put(part)
            return part
        return self.boxes[src, self.rank].get(timeout=10)


def run_ranks(world: int, blocks: int, lanes: int = 8) -> list[tuple[str, int, list[int]]]:
    """Every rank's result, merge count and computed blocks, the ranks running at once."""
    import queue
    import threading

    boxes = {(a, b): queue.Queue() for a in range(world) for b in range(world)}
    out: list = [None] * world

    def one(rank: int) -> None:
        merge, seen = Shape(), []

        def compute(b):
            seen.append(b)
            return leaf(b)

        result = ThreadRanks(rank, world, boxes).combine_lanes(blocks, compute, merge, lanes=lanes)
        out[rank] = (shape(result), merge.merges, seen)

    threads = [threading.Thread(target=one, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert all(o is not None for o in out), "a rank did not finish"
    return out


@pytest.mark.parametrize("blocks", [3, 8, 11, 32])
def test_any_number_of_ranks_gets_the_result_of_one_process_computing_each_block_once(blocks):
    expected = shape(Ranks().combine_lanes(blocks, leaf, Shape()))
    for world in (1, 2, 3, 4, 5, 8, 9):
        out = run_ranks(world, blocks)
        assert [o[0] for o in out] == [expected] * world
        assert sorted(b for o in out for b in o[2]) == list(range(blocks))


def test_the_ranks_share_out_the_merges_one_process_runs():
    """32 blocks (~18,000 clips): 31 merges in one process; with W ranks each runs its lanes' merges and its share
    of the tree's; rank 0 the most (the critical path): 16 of two ranks', 9 of four's, 6 of eight's."""
    merges = {world: [o[1] for o in run_ranks(world, 32)] for world in (1, 2, 4, 8)}
    assert merges[1] == [31]
    assert merges[2] == [16, 15]
    assert merges[4] == [9, 7, 8, 7]
    assert merges[8] == [6, 3, 4, 3, 5, 3, 4, 3]
    assert all(sum(m) == 31 for m in merges.values())


def test_in_block_picks_the_sorted_rows_of_a_block():
    rows = torch.tensor([0, 5, BLOCK_ROWS - 1, BLOCK_ROWS, BLOCK_ROWS + 3, 3 * BLOCK_ROWS - 1])
    assert in_block(rows, 0, 3 * BLOCK_ROWS).tolist() == [0, 5, BLOCK_ROWS - 1]
    assert in_block(rows, 1, 3 * BLOCK_ROWS).tolist() == [BLOCK_ROWS, BLOCK_ROWS + 3]
    assert in_block(rows, 2, 3 * BLOCK_ROWS).tolist() == [3 * BLOCK_ROWS - 1]


@pytest.mark.skipif(shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
                    reason="torchrun not installed")
def test_the_documented_torchrun_command_exists():
    assert subprocess.run([str(Path(sys.executable).with_name("torchrun")), "--help"], capture_output=True,
                          timeout=60).returncode == 0


def _documented(kind: str) -> list[str]:
    """The torchrun command of docs/scale.md that starts with ``torchrun`` and trains (``kind``: one machine or
    ``--nnodes``), continuation lines joined."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "scale.md").read_text(encoding="utf-8")
    commands = [c.replace("\\\n", " ") for b in re.findall(r"```\n(.*?)```", text, re.S)
                for c in re.split(r"\n(?=\S)", b) if c.startswith("torchrun")]
    found = [c for c in commands if " train " in c and (("--nnodes" in c) == (kind == "nodes"))]
    assert found, f"docs/scale.md has no {kind} torchrun train command"
    return found[0].split("#")[0].split()


def _as_test(argv: list[str], data: Path, out: Path, **replace: str) -> list[str]:
    """The documented command with this test's data, output and (for a 2-core machine) process counts."""
    swap = {"data/": str(data), "/shared/data": str(data), "model.safetensors": str(out),
            "/shared/model.safetensors": str(out), **replace}
    return [*TORCHRUN[:3], *[swap.get(a, a) for a in argv[1:]]]


def test_the_documented_one_machine_command_runs(three_blocks, tmp_path):
    argv = _documented("one")
    assert argv[:3] == ["torchrun", "--nproc-per-node", "4"]
    cmd = _as_test(argv, three_blocks, tmp_path / "m.safetensors")
    cmd[cmd.index("--nproc-per-node") + 1] = "2"
    cmd[3:3] = ["--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0"]  # a free port (tests run side by side)
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "m.safetensors").exists()


def test_the_documented_two_machine_command_runs_as_two_local_nodes(three_blocks, tmp_path):
    """The ``--nnodes 2`` command, started twice on this machine (one process per node) with a local rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    argv = _documented("nodes")
    assert "--nnodes" in argv and "--rdzv-endpoint" in argv
    cmd = _as_test(argv, three_blocks, tmp_path / "m.safetensors")
    cmd[cmd.index("--nproc-per-node") + 1] = "1"
    cmd[cmd.index("--rdzv-endpoint") + 1] = f"localhost:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    results = [n.communicate(timeout=300) for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], [err for _, err in results]
    one = run([*TRAIN[:1], "--seed", "0", "-d", str(three_blocks), "-o", "one.safetensors"], tmp_path, ranks=1)
    assert one.returncode == 0, one.stderr
    assert sha256(tmp_path / "one.safetensors") == sha256(tmp_path / "m.safetensors")


def test_parts_missing_some_keys_still_add_up():
    """A block without training clips has no upsampler sums; a later block's must not be lost (or raise)."""
    first = {"norm": torch.ones(2, dtype=torch.float64)}
    later = {"norm": torch.ones(2, dtype=torch.float64), "ups": torch.full((3,), 2.0, dtype=torch.float64)}
    out = add_parts(add_parts(None, first), later)
    assert out["norm"].tolist() == [2.0, 2.0] and out["ups"].tolist() == [2.0, 2.0, 2.0]


def test_each_rank_draws_its_own_noise_and_the_ranks_stay_in_step():
    from feda2v_toolkit.runtime.ranks import data_parallel_step

    class Gen:
        def training_step(self, x, *, labels, conditions, optimizers, ctx):
            self.noise = torch.randn(3)
            return {"loss": float(x.sum())}

    class Rank(Ranks):
        def __init__(self, rank: int) -> None:
            self.rank, self.world = rank, 2

    noise, after = [], []
    for r in (0, 1):
        torch.manual_seed(7)
        gen = Gen()
        step = data_parallel_step(gen, {}, Rank(r))
        step(torch.arange(4.0).reshape(4, 1, 1), None, None, None)
        noise.append(gen.noise)
        after.append(torch.randn(2))
    assert not torch.equal(noise[0], noise[1])  # a GAN's fakes differ between ranks
    assert torch.equal(after[0], after[1])  # the run's own stream is the same on every rank


def test_an_existing_output_stops_every_rank_with_one_message(three_blocks, tmp_path):
    (tmp_path / "m.safetensors").write_bytes(b"not mine")
    proc = run([*TRAIN, "-d", str(three_blocks), "-o", "m.safetensors"], tmp_path, ranks=2)
    assert proc.returncode != 0 and proc.stderr.count("exitcode  : 2") >= 1
    assert proc.stderr.count("--overwrite") >= 2  # both ranks say why, neither waits for the other
    assert (tmp_path / "m.safetensors").read_bytes() == b"not mine"


def test_no_rank_leaves_before_rank_0_has_written_and_the_group_is_torn_down_together(tmp_path):
    """A rank that left early could abort in gloo's teardown, and torchrun then killed rank 0 mid-write."""
    script = Path(__file__).with_name("_finish_ranks.py")
    proc = subprocess.run([*TORCHRUN, str(script), str(tmp_path)], env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    written = float((tmp_path / "written").read_text())
    for rank in (0, 1):
        left, still_up = (tmp_path / f"left-{rank}").read_text().split()
        assert float(left) >= written and still_up == "False"


def test_a_rank_that_cannot_see_the_checkpoint_stops_the_resumed_run(three_blocks, tmp_path):
    from feda2v_toolkit.errors import InputError
    from feda2v_toolkit.training.pipeline import train

    config = {"generator_type": "vae", "generator_training_sequence_length": 4, "generator_latent_dim": 8,
              "generator_hidden_dim": 16, "generator_training_epochs": 1, "generator_upsampler": "linear"}
    train(config, three_blocks, seed=3, checkpoint_dir=tmp_path / "ck", keep_checkpoints=True)

    class RankOneSeesNoCheckpoint(Ranks):
        rank, world = 0, 2

        def all_strings(self, value: str) -> list[str]:
            return [value, ""]

    with pytest.raises(InputError, match="rank 1 does not see rank 0's checkpoint"):
        train(config, three_blocks, seed=3, checkpoint_dir=tmp_path / "ck", resume=True,
              ranks=RankOneSeesNoCheckpoint())


def test_a_part_sent_between_ranks_comes_back_equal_and_only_its_largest_tensor_shares_the_received_bytes():
    from feda2v_toolkit.runtime.ranks import _from_bytes, _to_bytes

    part = {"factors": torch.randn(40, 12, dtype=torch.float64), "means": torch.randn(3, 12, dtype=torch.float64),
            "counts": torch.tensor([4.0, 5.0, 6.0], dtype=torch.float64), "block": torch.tensor([2, 1024])}
    buf = _to_bytes(part)
    back = _from_bytes(buf)
    assert list(back) == sorted(part)  # merged in name order on every rank
    assert all(torch.equal(back[k], part[k]) and back[k].dtype == part[k].dtype for k in part)
    shares = {k for k, v in back.items() if v.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()}
    assert shares == {"factors"}  # kept means or counts do not hold the whole received buffer
