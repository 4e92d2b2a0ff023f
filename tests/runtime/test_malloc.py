"""The allocator tuning of the CLI's own process (glibc): keep freed chunk buffers while streaming, hand them
back between stages; a no-op elsewhere."""

from __future__ import annotations

import platform
import sys

import pytest

from feda2v_toolkit.runtime import malloc


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt and malloc_trim")
def test_freed_chunk_buffers_stay_in_the_heap_until_released():
    assert malloc.reuse_freed_memory(malloc.STREAM_BUFFER_BYTES)
    blocks = [bytearray(8 * 2**20) for _ in range(8)]  # below the raised threshold: heap blocks, not mappings
    del blocks
    assert malloc.release_freed_memory() is True  # glibc says it handed memory back


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
