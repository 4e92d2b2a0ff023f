"""Scale benchmark (issue 18, part 3): peak memory, wall time and throughput of each command vs N.

For each N (default 1k, 4k, 16k, 64k clips; a size whose data do not fit the free disk is skipped, with
the reason printed -- or, with ``--link``, written as N/2^k clips whose shards are hard-linked 2^k times), the script writes N clips of AST shape -- ``[1214, 768]`` float16, the demo data's 4
classes, streamed into 256 MiB shards by the package's own writer (``write_demo_dataset`` ->
``DatasetWriter``) -- measures the disk's sequential read rate on those shards (page cache dropped first
with ``posix_fadvise(DONTNEED)``), then runs each command in a fresh child process with that data:

* ``train``      -- default generator (gaussian, closed form) at ``generator_training_sequence_length`` 16, on
  the CPU (``--device``: every ``train`` variant's; ``auto`` takes a GPU where there is one)
* ``generate``   -- the trained model, ``-k auto`` (as many samples as training clips per class) at the
  full length 1214, float16: about as many bytes as the input (its training clips)
* ``evaluate``   -- the trained model against the same data (defaults: ``--split all``, ``-k auto``)
* ``analyze``    -- ``--lengths 16``, every registered pair (the defaults)
* ``plan``       -- ``--data``
* ``split``      -- ``--nodes 2 --by class``
* ``convert-data`` -- shards to shards
* ``train-2ranks``, ``train-4ranks`` -- ``train`` data-parallel under ``torchrun --nproc-per-node 2`` (4): one
  intra-op thread per rank, as torchrun sets; the peak is the whole process tree's
* ``train-1thread`` -- ``train`` in one process with one intra-op thread (``OMP_NUM_THREADS=1``): one rank, the
  reference of the ranks' scaling (and the same model bytes as theirs)
* ``train-dp``   -- ``train`` with record-level DP (``--dp-epsilon 8``)

Before each command the data's pages are dropped from the page cache (``posix_fadvise(DONTNEED)``), so
every command reads from the disk ("cold-ish": the host's own cache below the virtual disk is beyond
reach). Per command: peak RSS (the larger of the child's ``VmHWM`` and the RSS of its whole process tree,
both sampled every 0.25 s -- not ``wait4``'s ``ru_maxrss``, which inherits the benchmark's own peak across
fork + exec; also the tree's peak *anonymous* RSS, ``RssAnon``: memory-mapped
data pages count in RSS but are file-backed and droppable), wall time (process start to exit, start-up included) and
throughput (input clips/s and MB/s of input data), and the 1-minute load average at its end (the machine
may be shared). A command is killed after ``--timeout`` seconds or
when its tree's RSS exceeds ``--rss-cap`` (a watchdog so that the machine survives; reported as such).
Outputs are deleted after each command and the data after each size.

Summary: per command, peak RSS at the largest N / at the smallest, time ratio vs N ratio, and train's
throughput as a fraction of the disk's read rate; compared with the issue's targets (peak RSS at 16k within
1.2x of 1k, < 2 GB for train; train >= 50% of disk read; 16k/1k time within 20x). For the ``train`` variants,
the stage times ``train`` prints (the reduce pass: read, reduce and the sums, shared out over the ranks; the
closed-form fit: the generator's statistics over the blocks, shared out too, and the solve every rank repeats)
and, with ``train-1thread`` among the commands, each variant's speed-up over it (one rank) and its scaling
efficiency (speed-up / ranks). ``--warm`` runs every command with the data in the page cache (read once before
it, not dropped), ``--warm train-1thread,train-4ranks`` those commands: the ranks' arithmetic, not the disk.

Usage: python bench/bench_scale.py [--sizes 1k,4k,16k,64k] [--commands train,generate,...] [--link] [--warm [CMDS]]
       [--distinct 1000] [--device cpu|auto|cuda] [--timeout 1200] [--rss-cap 16GB] [--workdir DIR] [--json OUT]
       python bench/bench_scale.py --summarize run1.json run2.json   (tables of earlier runs, merged by N)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _memory import tree_rss  # noqa: E402  (bench/ is the script's directory)

L, D = 1214, 768
CLIP_BYTES = L * D * 2  # float16
CLASSES = 4
REPO = Path(__file__).resolve().parent.parent
COMMANDS = ("train", "generate", "evaluate", "analyze", "plan", "split", "convert-data", "train-1thread",
            "train-2ranks", "train-4ranks", "train-dp")
#: the stage times ``train`` prints (rank 0 under torchrun): the reduce pass and the closed-form fit
STAGES = {"reduce_s": re.compile(r"reduced (?:\d+ sequences )?(?:the sequences )?to \d+ tokens in ([0-9.]+)s"),
          "fit_s": re.compile(r"fitted \d+ generators? (?:in closed form|from noisy statistics).* in ([0-9.]+)s")}


def ranks_of(name: str) -> int:
    """How many processes share ``name``'s work (``train-<k>ranks``: k; any other command: one)."""
    if name.startswith("train-") and name.endswith("ranks"):
        return int(name[len("train-"):-len("ranks")])
    return 1


def stage_times(text: str) -> dict[str, float]:
    """The stage times in a ``train`` log (``{}`` for other commands)."""
    found = {}
    for key, pattern in STAGES.items():
        m = pattern.search(text)
        if m:
            found[key] = float(m.group(1))
    return found


def warm_commands(warm: str | None) -> set[str]:
    """The commands ``--warm`` names (``"all"``: every one; none given: none)."""
    return set(COMMANDS) if warm == "all" else {c.strip() for c in (warm or "").split(",") if c.strip()}


def launcher(name: str) -> list[str]:
    """How a command starts: ``python -m feda2v_toolkit``, or under torchrun for ``train-<k>ranks``."""
    if ranks_of(name) > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks_of(name)),
                "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0", "-m", "feda2v_toolkit"]
    return [sys.executable, "-m", "feda2v_toolkit"]
NEEDS_MODEL = {"generate", "evaluate"}
#: commands whose output is about as large as the input (disk needed: data + this)
WRITES_COPY = {"generate", "split", "convert-data"}


def parse_size(text: str) -> int:
    text = text.strip().lower()
    scale = {"k": 1000, "m": 1_000_000}.get(text[-1:], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def parse_bytes(text: str) -> int:
    text = text.strip().upper()
    for suffix, scale in (("GIB", 2**30), ("MIB", 2**20), ("GB", 10**9), ("MB", 10**6)):
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * scale)
    return int(text)


def label(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def machine() -> dict:
    mem = 0
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    model = ""
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"cores": os.cpu_count(), "cpu": model, "mem_bytes": mem, "python": sys.version.split()[0]}


def data_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def drop_cache(path: Path) -> None:
    """Drop ``path``'s (clean) pages from the page cache, after writing back any dirty ones."""
    os.sync()
    for f in data_files(path):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm_cache(path: Path, block: int = 16 * 2**20) -> None:
    """Read ``path``'s files once, so that the next command finds them in the page cache."""
    buf = memoryview(bytearray(block))
    for f in data_files(path):
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


def disk_read_rate(path: Path, limit: int, block: int = 16 * 2**20) -> dict:
    """Sequential read of ``path``'s files (up to ``limit`` bytes) after dropping them from the cache."""
    drop_cache(path)
    buf = bytearray(block)
    view = memoryview(buf)
    total = 0
    seen: set[tuple[int, int]] = set()
    t0 = time.perf_counter()
    for f in data_files(path):
        inode = (f.stat().st_dev, f.stat().st_ino)
        if inode in seen:  # a hard link (--link) to a file read already
            continue
        seen.add(inode)
        with open(f, "rb", buffering=0) as fh:
            while total < limit:
                got = fh.readinto(view)
                if not got:
                    break
                total += got
        if total >= limit:
            break
    seconds = time.perf_counter() - t0
    drop_cache(path)
    return {"bytes": total, "seconds": seconds, "MBps": total / seconds / 1e6}


def link_copies(path: Path, copies: int) -> int:
    """Hard-link every shard of ``path`` ``copies - 1`` more times under new names (``c1-part-00000.safetensors``
    ...): the dataset then has ``copies`` x the clips, on the disk once. The copy's number comes first, so
    reading the shards in name order is ``copies`` full passes over the data on disk (larger than memory:
    each pass reads from the disk), not one file read ``copies`` times in a row (the page cache's).
    Returns the shard count."""
    shards = sorted(path.glob("*.safetensors"))
    for k in range(1, copies):
        for f in shards:
            os.link(f, f.with_name(f"c{k}-{f.name}"))
    return len(shards) * copies


def make_data(path: Path, n: int, distinct: int = 0) -> dict:
    """N clips (N/4 per class, 4 classes) written as shards by the package's writer, in this process.

    ``distinct`` > 0: only that many distinct demo clips are made (a quarter per class) and each class's
    are cycled to fill N -- the same bytes on disk at a fraction of the CPU cost (the demo generator
    costs ~20 CPU-seconds per 1,000 clips); 0: every clip distinct (``write_demo_dataset``).
    """
    from feda2v_toolkit.data.demo import CLASS_NAMES, make_demo_dataset, write_demo_dataset
    from feda2v_toolkit.data.writer import DatasetWriter

    per_class = n // CLASSES
    t0 = time.perf_counter()
    if distinct <= 0 or distinct >= n:
        write_demo_dataset(path, per_class)
    else:
        import torch

        base_per_class = max(1, distinct // CLASSES)
        emb, labels, _ = make_demo_dataset(base_per_class, num_classes=CLASSES)
        with DatasetWriter(path, class_names=CLASS_NAMES[:CLASSES], dtype=torch.float16,
                           extra_metadata={"source": "feda2v-tk demo (cycled)"}) as writer:
            for c in range(CLASSES):
                block = emb[labels == c]
                left = per_class
                while left:
                    take = min(left, block.shape[0])
                    writer.add(block[:take], torch.full((take,), c))
                    left -= take
    seconds = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in data_files(path))
    return {"clips": per_class * CLASSES, "bytes": size, "seconds": seconds, "shards": len(data_files(path)),
            "distinct": min(distinct, n) if distinct > 0 else n}


def tree_anon(pid: int) -> int:
    """Anonymous resident memory (``RssAnon``, bytes) of process ``pid`` and its descendants: RSS without the
    file-backed pages of memory-mapped data, which the kernel can drop under pressure."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    children.setdefault(int(fh.read().rsplit(")", 1)[1].split()[1]), []).append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            with open(f"/proc/{p}/status") as fh:
                for line in fh:
                    if line.startswith("RssAnon:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
    return total


def vm_hwm(pid: int) -> int:
    """``VmHWM`` (peak RSS of the process's current address space, bytes) of ``pid``; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class _Watch:
    """Samples the RSS of a child's process tree; kills the tree (its session) above ``cap`` bytes."""

    def __init__(self, pid: int, cap: int, interval: float = 0.25) -> None:
        self.pid, self.cap, self.interval = pid, cap, interval
        self.peak, self.anon_peak, self.hwm, self.capped = 0, 0, 0, False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = tree_rss(self.pid)
            self.peak = max(self.peak, rss)
            self.anon_peak = max(self.anon_peak, tree_anon(self.pid))
            self.hwm = max(self.hwm, vm_hwm(self.pid))
            if rss > self.cap and not self.capped:
                self.capped = True
                kill_session(self.pid)
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def kill_session(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)  # the child leads its own session (start_new_session)


def run_command(argv: list[str], logdir: Path, name: str, timeout: float, cap: int) -> dict:
    """Run ``feda2v-tk ARGV`` in a fresh process; peak RSS, wall time, exit status, last error line."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if name == "train-1thread":  # one rank: one intra-op thread, as torchrun gives each rank
        env["OMP_NUM_THREADS"] = "1"
    out, err = logdir / f"{name}.stdout", logdir / f"{name}.stderr"
    with open(out, "wb") as fo, open(err, "wb") as fe:
        t0 = time.perf_counter()
        proc = subprocess.Popen([*launcher(name), *argv], stdout=fo, stderr=fe, env=env,
                                start_new_session=True)
        watch = _Watch(proc.pid, cap)
        timed_out = False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - t0 > timeout:
                timed_out = True
                kill_session(proc.pid)
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
        seconds = time.perf_counter() - t0
        watch.stop()
        proc.returncode = os.waitstatus_to_exitcode(status)  # already reaped: keep Popen from waiting again
    code = proc.returncode
    load = os.getloadavg()[0]
    # Not wait4's ru_maxrss: Linux carries the *parent's* peak into a child across fork/vfork + exec
    # (exec records the old address space's high-water mark), so a child of a big parent reads big.
    peak = max(watch.hwm, watch.peak)
    log = err.read_text(errors="replace")
    lines = [x for x in log.splitlines() if x.strip()]
    result = {"argv": argv, "returncode": code, "seconds": seconds, "peak_rss": peak, "stages": stage_times(log),
              "maxrss_wait4_unreliable": usage.ru_maxrss * 1024, "hwm_sampled": watch.hwm,
              "tree_peak_sampled": watch.peak, "anon_peak_sampled": watch.anon_peak,
              "load1": load,
              "status": "ok"}
    if timed_out:
        result["status"] = f"timeout after {timeout:.0f}s"
    elif watch.capped:
        result["status"] = f"killed at RSS cap {cap / 1e9:.1f} GB"
    elif code != 0:
        result["status"] = f"exit {code}"
    if result["status"] != "ok":
        killed = "killed (SIGKILL) by the benchmark" if (timed_out or watch.capped) else "no stderr"
        result["error"] = lines[-1] if lines else f"({killed}; no error line)"
    return result


def command_argv(name: str, data: Path, work: Path, device: str = "cpu") -> tuple[list[str], list[Path]]:
    """The command line for ``name`` and the outputs to delete afterwards (``train``'s variants on ``device``)."""
    model = work / "model.safetensors"
    if name.startswith("train-"):  # data-parallel or private: its own model file, the same config
        argv, outputs = command_argv("train", data, work, device)
        extra = ["--dp-epsilon", "8"] if name == "train-dp" else []  # record-level DP at epsilon 8
        return [a if a != str(model) else str(work / f"{name}.safetensors") for a in argv] + extra, \
            [*outputs, work / f"{name}.safetensors", work / f"{name}.metrics.jsonl"]
    if name == "train":
        cfg = work / "train-config.json"
        cfg.write_text(json.dumps({"generator_training_sequence_length": 16}))
        return (["train", "-c", str(cfg), "-d", str(data), "-o", str(model), "--seed", "0", "--no-progress",
                 "--overwrite", "--checkpoint-dir", str(work / "ck"), "--device", device], [work / "ck"])
    if name == "generate":
        out = work / "generated"
        return (["generate", str(model), "-o", str(out), "-k", "auto", "--output-length", str(L), "--dtype",
                 "float16", "--no-progress"], [out])
    if name == "evaluate":
        return ["evaluate", str(model), "-d", str(data), "--no-progress"], []
    if name == "analyze":
        return ["analyze", "-d", str(data), "--lengths", "16", "--no-progress"], []
    if name == "plan":
        return ["plan", "--data", str(data)], []
    if name == "split":
        out = work / "nodes"
        return ["split", str(data), "-o", str(out), "--nodes", "2", "--by", "class"], [out]
    if name == "convert-data":
        out = work / "converted"
        return ["convert-data", str(data), "-o", str(out), "--no-progress"], [out]
    raise ValueError(name)


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def bench_size(n: int, commands: list[str], root: Path, args, save=lambda r: None) -> dict:
    """Every measurement at one N; ``save(result)`` is called after each step (partial results survive)."""
    work = Path(tempfile.mkdtemp(prefix=f"scale-{label(n)}-", dir=root))
    data = work / "data"
    result: dict = {"n": n, "commands": {}}
    try:
        copies = getattr(args, "copies", {}).get(n, 1)
        gen = result["data"] = make_data(data, n // copies, args.distinct)
        if copies > 1:  # the disk holds N / copies clips; the rest are hard links to them
            gen.update(clips=n, shards=link_copies(data, copies), on_disk_bytes=gen["bytes"],
                       bytes=gen["bytes"] * copies, linked_copies=copies)
        written = gen.get("on_disk_bytes", gen["bytes"])
        print(f"[{label(n)}] wrote {gen['clips'] // gen.get('linked_copies', 1)} clips, {written / 1e9:.2f} GB in "
              f"{gen['seconds']:.0f}s ({written / gen['seconds'] / 1e6:.0f} MB/s; {gen['distinct']} distinct clips)"
              + (f"; {gen['clips']} clips in {gen['shards']} shards with the links" if "linked_copies" in gen else ""),
              flush=True)
        save(result)
        disk = result["disk_read"] = disk_read_rate(data, args.read_limit)
        print(f"[{label(n)}] disk sequential read (cache dropped): {disk['bytes'] / 1e9:.2f} GB in "
              f"{disk['seconds']:.1f}s = {disk['MBps']:.0f} MB/s", flush=True)
        for name in commands:
            if name in NEEDS_MODEL and not (work / "model.safetensors").exists():
                result["commands"][name] = {"status": "skipped", "error": "no model: train did not finish",
                                            "seconds": None, "peak_rss": None}
                print(f"[{label(n)}] {name}: skipped (no model)", flush=True)
                continue
            free = shutil.disk_usage(work).free
            if name in WRITES_COPY and free < gen["bytes"] + 3 * 10**9:
                why = (f"its output (~{gen['bytes'] / 1e9:.0f} GB, a copy of the data) + 3 GB headroom "
                       f"(the disk is shared) does not fit: "
                       f"{free / 1e9:.0f} GB free")
                result["commands"][name] = {"status": "skipped", "error": why, "seconds": None, "peak_rss": None}
                print(f"[{label(n)}] {name}: skipped: {why}", flush=True)
                continue
            argv, outputs = command_argv(name, data, work, args.device)
            warm = name in warm_commands(args.warm)
            if warm:
                warm_cache(data)
            else:
                drop_cache(data)
            r = run_command(argv, work, name, args.timeout, args.rss_cap)
            r["clips_per_s"] = gen["clips"] / r["seconds"]
            r["MBps"] = gen["bytes"] / r["seconds"] / 1e6
            for out in outputs:
                remove(out)
            r["page_cache"] = "warm" if warm else "dropped"
            result["commands"][name] = r
            save(result)
            extra = f" -- {r['error']}" if r["status"] != "ok" else ""
            print(f"[{label(n)}] {name} ({r['page_cache']} page cache): {r['status']}, {r['seconds']:.1f}s, peak RSS {r['peak_rss'] / 1e9:.2f} GB "
                  f"(anonymous {r['anon_peak_sampled'] / 1e9:.2f} GB), "
                  f"{r['clips_per_s']:.0f} clips/s = {r['MBps']:.0f} MB/s of input, load {r['load1']:.1f}{extra}",
                  flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the data and every output of this size
    return result


def peak_of(c: dict) -> float | None:
    """A command's peak RSS; for JSON written before ``hwm_sampled`` existed, the sampled tree peak (those
    files' ``peak_rss`` included wait4's ru_maxrss, which can carry the benchmark's own peak)."""
    if c.get("seconds") is None:
        return None
    if "hwm_sampled" in c:
        return c["peak_rss"]
    return c.get("tree_peak_sampled", c["peak_rss"])


def fmt_gb(v: float | None) -> str:
    return "—" if v is None else f"{v / 1e9:.2f}"


def summary(results: list[dict], commands: list[str]) -> str:
    done = [r for r in results if "commands" in r]
    rows = ["| command | N | status | wall (s) | peak RSS (GB) | of it anonymous (GB) | clips/s | MB/s of input "
            "| load |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for name in commands:
        for r in done:
            c = r["commands"].get(name)
            if c is None:
                continue
            status = c["status"] if c["status"] == "ok" else f"**{c['status']}**"
            secs = "—" if c["seconds"] is None else f"{c['seconds']:.1f}"
            rate = "—" if c["seconds"] is None else f"{c['clips_per_s']:.0f}"
            mbps = "—" if c["seconds"] is None else f"{c['MBps']:.0f}"
            load = f"{c['load1']:.1f}" if "load1" in c else "—"
            anon = fmt_gb(c.get("anon_peak_sampled"))
            rows.append(f"| `{name}` | {label(r['n'])} | {status} | {secs} | {fmt_gb(peak_of(c))} | {anon} | {rate} "
                        f"| {mbps} "
                        f"| {load} |")
    lines = ["\n".join(rows), ""]
    lines.append("| N | data (GB) | written in (s) | disk read (MB/s) | train MB/s | train / disk read |")
    lines.append("|---:|---:|---:|---:|---:|---:|")
    for r in done:
        if "disk_read" not in r:  # interrupted before the probe
            continue
        t = r["commands"].get("train")
        disk = r["disk_read"]["MBps"]
        if t and t["status"] == "ok":
            tr, frac = f"{t['MBps']:.0f}", f"{100 * t['MBps'] / disk:.0f}%"
        else:
            tr, frac = "—", "—"
        linked = r["data"].get("linked_copies", 1)
        size = f"{r['data']['bytes'] / 1e9:.2f}" + (f" ({linked} links of {r['data']['on_disk_bytes'] / 1e9:.2f})"
                                                     if linked > 1 else "")
        lines.append(f"| {label(r['n'])} | {size} | {r['data']['seconds']:.0f} | {disk:.0f} | "
                     f"{tr} | {frac} |")
    variants = [c for c in commands if c == "train" or c.startswith("train-") and c != "train-dp"]
    if len(variants) >= 2:
        lines += ["", "| command | N | processes x threads | page cache | wall (s) | reduce pass (s) | closed-form fit (s) | "
                  "reduce + fit (s) | reduce + fit: speed-up over one rank | efficiency | wall: speed-up |",
                  "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in done:
            one = r["commands"].get("train-1thread")
            one_stages = sum(one["stages"].values()) if one and one["status"] == "ok" and \
                len(one.get("stages", {})) == len(STAGES) else None
            for name in variants:
                c = r["commands"].get(name)
                if not c or c["status"] != "ok":
                    continue
                st = c.get("stages", {})
                both = sum(st.values()) if len(st) == len(STAGES) else None
                k = ranks_of(name)
                how = f"{k} x 1" if name != "train" else "1 x all cores"
                speed = eff = wall = "—"
                if one_stages and both:
                    speed = f"{one_stages / both:.2f}x"
                    eff = f"{100 * one_stages / both / k:.0f}%" if name != "train" else "—"
                    wall = f"{one['seconds'] / c['seconds']:.2f}x"
                fmt = lambda v: "—" if v is None else f"{v:.1f}"  # noqa: E731
                lines.append(f"| `{name}` | {label(r['n'])} | {how} | {c.get('page_cache', 'dropped')} | {c['seconds']:.1f} | {fmt(st.get('reduce_s'))} | "
                             f"{fmt(st.get('fit_s'))} | {fmt(both)} | {speed} | {eff} | {wall} |")
    if len(done) >= 2:
        lo, hi = done[0], done[-1]
        nr = hi["n"] / lo["n"]
        lines += ["", f"| command | peak RSS {label(hi['n'])} / {label(lo['n'])} | time {label(hi['n'])} / "
                  f"{label(lo['n'])} (N x{nr:.0f}) |", "|---|---:|---:|"]
        for name in commands:
            a, b = lo["commands"].get(name), hi["commands"].get(name)
            if not a or not b or a["status"] != "ok":
                continue
            if b["status"] == "ok":
                mem, tim = f"{peak_of(b) / peak_of(a):.2f}x", f"{b['seconds'] / a['seconds']:.1f}x"
            elif b["seconds"] is not None:  # killed: lower bounds
                mem = f">= {peak_of(b) / peak_of(a):.2f}x ({b['status']})"
                tim = f">= {b['seconds'] / a['seconds']:.1f}x ({b['status']})"
            else:
                mem = tim = b["status"]
            lines.append(f"| `{name}` | {mem} | {tim} |")
    return "\n".join(lines)


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1k,4k,16k,64k", help="clip counts, e.g. 1k,4k,16k (multiples of 4)")
    ap.add_argument("--commands", default=",".join(COMMANDS))
    ap.add_argument("--timeout", type=float, default=1200, help="wall-clock limit per command, seconds")
    ap.add_argument("--rss-cap", type=parse_bytes, default=parse_bytes("16GB"),
                    help="kill a command whose process tree exceeds this RSS (e.g. 16GB)")
    ap.add_argument("--read-limit", type=parse_bytes, default=parse_bytes("8GB"),
                    help="bytes read for the disk read-rate probe (at most the data)")
    ap.add_argument("--distinct", type=int, default=0,
                    help="make only this many distinct clips and cycle them per class (cheaper data) [0: all]")
    ap.add_argument("--link", action="store_true",
                    help="a size whose data do not fit the disk: write N/2^k clips and hard-link each shard 2^k "
                         "times (the commands see N clips in N/256 MiB files, read in name order as 2^k passes "
                         "over the N/2^k on disk; when those are larger than memory every pass reads the disk; "
                         "the read probe reads each file once)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "auto", "cuda"],
                    help="train's --device for every train variant [cpu: the same arithmetic for one process and "
                         "the ranks, also on a machine with a GPU]")
    ap.add_argument("--warm", nargs="?", const="all", metavar="COMMANDS",
                    help="run these commands (comma-separated; none named: every one) with the data in the page "
                         "cache, not dropped first (the arithmetic, not the disk)")
    ap.add_argument("--workdir", type=Path, default=None, help="where data are written [default: a temp dir]")
    ap.add_argument("--json", type=Path, help="write every measurement as JSON here (after each command)")
    ap.add_argument("--summarize", type=Path, nargs="+", metavar="JSON",
                    help="run nothing: print the tables of these --json files (e.g. separate runs per size)")
    args = ap.parse_args()
    args.copies = {}
    if args.summarize:
        merged = [r for f in args.summarize for r in json.loads(f.read_text())["results"]]
        merged.sort(key=lambda r: r["n"])
        names = [c for c in COMMANDS if any(c in r.get("commands", {}) for r in merged)]
        print(summary(merged, names))
        for r in merged:
            if "skipped" in r:
                print(f"\n{label(r['n'])}: skipped ({r['skipped']})")
        return
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    commands = [c.strip() for c in args.commands.split(",") if c.strip()]
    unknown = (set(commands) | warm_commands(args.warm)) - set(COMMANDS)
    if unknown:
        ap.error(f"unknown commands: {', '.join(sorted(unknown))}")
    if "train" not in commands and NEEDS_MODEL & set(commands):
        ap.error("generate and evaluate need train's model: include train")
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="feda2v-scale-", dir=args.workdir))

    import torch

    info = machine()
    free = shutil.disk_usage(root).free
    info.update(torch=torch.__version__, threads=torch.get_num_threads(), disk_free_bytes=free, workdir=str(root))
    print(f"machine: {info['cores']} cores ({info['cpu']}), {info['mem_bytes'] / 2**30:.1f} GiB RAM, "
          f"{free / 1e9:.0f} GB free on {root} (df), torch {info['torch']}, {info['threads']} threads; "
          f"timeout {args.timeout:.0f}s per command, RSS cap {args.rss_cap / 1e9:.1f} GB", flush=True)
    results: list[dict] = []

    def save(current: dict | None = None) -> None:
        if args.json:
            done = results + ([current] if current is not None else [])
            args.json.write_text(json.dumps({"machine": info, "args": vars(args) | {
                "json": str(args.json), "workdir": str(args.workdir)}, "results": done}, indent=1))

    try:
        for n in sizes:
            if n % CLASSES:
                print(f"[{label(n)}] skipped: N must be a multiple of {CLASSES}")
                results.append({"n": n, "skipped": f"not a multiple of {CLASSES}"})
                continue
            data_bytes = n * CLIP_BYTES
            scratch = n * 16 * D * 4  # train's reduced cache at length 16, in $TMPDIR when it leaves memory
            need = data_bytes + scratch + 2 * 10**9  # data, scratch, headroom; commands writing a copy: checked each
            free = shutil.disk_usage(root).free
            copies = 1
            while args.link and need > free and n % (CLASSES * copies * 2) == 0 and n // (copies * 2) >= 1000:
                copies *= 2  # --link: N / copies distinct clips on the disk, each shard hard-linked `copies` times
                need = data_bytes // copies + scratch + 2 * 10**9
            if need > free:
                why = (f"needs {data_bytes / copies / 1e9:.0f} GB of float16 data"
                       + (f" ({n // copies} clips, hard-linked {copies} times)" if copies > 1 else "")
                       + f" + {scratch / 1e9:.1f} GB of train's reduced cache + 2 GB headroom = {need / 1e9:.0f} GB "
                       f"(and as much again for generate/split/convert-data's output); {free / 1e9:.0f} GB free "
                       f"on this disk")
                print(f"[{label(n)}] skipped: does not fit: {why}", flush=True)
                results.append({"n": n, "skipped": f"does not fit the disk: {why}"})
                continue
            if copies > 1:
                args.copies[n] = copies
                print(f"[{label(n)}] the data do not fit the disk: {n // copies} clips on it "
                      f"({data_bytes / copies / 1e9:.0f} GB), each shard hard-linked {copies} times", flush=True)
            results.append(bench_size(n, commands, root, args, save))
            save()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print()
    print(summary(results, commands))
    for r in results:
        if "skipped" in r:
            print(f"\n{label(r['n'])}: skipped ({r['skipped']})")
    save()


if __name__ == "__main__":
    main()
