"""Run under torchrun by tests/runtime/test_ranks.py: rank 0 "writes" slowly, then every rank finishes and
records when it left (``OUTDIR/left-RANK``) and whether the group is still up."""

import sys
import time
from pathlib import Path

import torch.distributed as dist

from feda2v_toolkit.runtime.ranks import init_from_environment

out = Path(sys.argv[1])
ranks = init_from_environment()
if ranks.rank == 0:
    time.sleep(1.5)
    (out / "written").write_text(repr(time.time()))
ranks.finish()
(out / f"left-{ranks.rank}").write_text(f"{time.time()!r} {dist.is_initialized()}")
