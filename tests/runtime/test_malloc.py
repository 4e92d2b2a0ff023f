"""The allocator tuning of the CLI's own process (glibc): keep freed chunk buffers while streaming, hand them
back between stages; a no-op elsewhere."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from feda2v_toolkit.runtime import malloc

_PROBE = """
import sys
from feda2v_toolkit.runtime import malloc

def rss():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096

if sys.argv[1] == "keep":
    assert malloc.reuse_freed_memory(malloc.STREAM_BUFFER_BYTES)
base = rss()
blocks = [bytearray(8 * 2**20) for _ in range(6)]  # 48 MB written: below the threshold, heap blocks
del blocks
kept = rss() - base
released = malloc.release_freed_memory()
print(kept, released, rss() - base)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt and malloc_trim")
def test_freed_chunk_buffers_stay_resident_until_released():
    """In a fresh process (the settings are process-wide): the freed buffers stay resident for reuse, and
    release_freed_memory hands them back -- only in a process that asked to keep them."""
    def probe(mode: str) -> tuple[int, str, int]:
        out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
        kept, released, left = out.stdout.split()
        return int(kept), released, int(left)

    kept, released, left = probe("keep")
    assert kept > 40 * 2**20 and released == "True" and left < 16 * 2**20
    assert probe("default")[1] == "False"  # nothing asked, nothing done


_THREAD_PROBE = """
import sys, threading
from feda2v_toolkit.runtime import malloc
if sys.argv[1] == "one":
    assert malloc.one_arena()
kept = []
worker = threading.Thread(target=lambda: kept.append(bytearray(2**20)))  # a background thread allocates
worker.start()
worker.join()
malloc.libc().malloc_stats()  # glibc prints one "Arena N:" section per heap on stderr
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt and malloc_stats")
def test_with_one_arena_a_background_thread_allocates_from_the_main_heap():
    """Streaming commands call one_arena first: chunk buffers freed by one thread are then found again by the
    next chunk's allocation in another (with a heap per thread the peak rose in steps over a run)."""
    def heaps(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", _THREAD_PROBE, mode], capture_output=True, text=True, check=True)
        return sum(line.startswith("Arena ") for line in out.stderr.splitlines())

    assert heaps("one") == 1
    assert heaps("default") == 2  # the probe would notice a thread that never got a heap of its own


@pytest.mark.parametrize("command", [["convert-data"], ["split"], ["analyze"], ["evaluate"], ["embed"]])
def test_streaming_commands_ask_for_one_arena_before_any_work(command, monkeypatch, tmp_path):
    from feda2v_toolkit.cli import main

    calls: list[str] = []

    def one_arena() -> bool:
        calls.append("one")
        raise SystemExit(0)  # stop the command there: nothing of it may have run before

    monkeypatch.setattr(malloc, "one_arena", one_arena)
    args = {"convert-data": [str(tmp_path / "in"), "-o", str(tmp_path / "out")],
            "split": [str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--nodes", "2"],
            "analyze": ["-d", str(tmp_path / "in")],
            "evaluate": [str(tmp_path / "m.safetensors"), "-d", str(tmp_path / "in")],
            "embed": [str(tmp_path / "in"), "-o", str(tmp_path / "out")]}[command[0]]
    (tmp_path / "in").mkdir()
    (tmp_path / "m.safetensors").write_bytes(b"")
    with pytest.raises(SystemExit):
        main([*command, *args])
    assert calls == ["one"]


def test_elsewhere_nothing_is_changed(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert malloc.reuse_freed_memory(malloc.STREAM_BUFFER_BYTES) is False
    assert malloc.release_freed_memory() is False


def test_the_train_command_keeps_chunk_buffers_for_reuse_and_the_pipeline_releases_them(tiny_data, tmp_path,
                                                                                        monkeypatch):
    from feda2v_toolkit.cli import main

    calls: list[object] = []
    monkeypatch.setattr(malloc, "reuse_freed_memory", lambda limit=0: calls.append(("keep", limit)) or True)
    monkeypatch.setattr("feda2v_toolkit.training.pipeline.release_freed_memory",
                        lambda: calls.append("release") or True)
    with pytest.raises(SystemExit) as exit_:
        main(["train", "-d", str(tiny_data), "-o", str(tmp_path / "m.safetensors"), "--seed", "0",
              "--no-progress", "--checkpoint-dir", str(tmp_path / "ck")])
    assert exit_.value.code in (0, None)
    assert calls == [("keep", malloc.STREAM_BUFFER_BYTES), "release"]
