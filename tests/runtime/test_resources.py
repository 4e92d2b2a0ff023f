"""Work that cannot fit on disk is refused before it starts: free space of the target's file system."""

from __future__ import annotations

import shutil

import pytest

from feda2v_toolkit.errors import UsageError
from feda2v_toolkit.runtime.resources import free_disk_bytes, require_disk_space


def test_the_free_space_of_a_target_not_yet_made_is_that_of_its_nearest_existing_folder(tmp_path):
    free = free_disk_bytes(tmp_path / "not" / "yet" / "out")
    assert free is not None and abs(free - shutil.disk_usage(tmp_path).free) < 2**30


def test_needing_more_than_the_free_space_is_a_full_disk_error_naming_the_target_and_both_sizes(tmp_path):
    require_disk_space(1, tmp_path / "out", "writing 1 byte")
    free = free_disk_bytes(tmp_path)
    with pytest.raises(UsageError) as info:
        require_disk_space(free + 2**50, tmp_path / "out", "writing it all", hint="write less")
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'out'}: not enough free disk space (No space left on device): writing "
                              "it all needs about 1.0 PiB, its file system has ")
    assert message.endswith(" free; write less") and info.value.exit_code == 2
