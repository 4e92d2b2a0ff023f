"""What a launcher (``torchrun``) tells a process through its environment: its rank, the number of ranks, how
long a collective may wait. No torch import: commands read these before deciding anything heavy."""

from __future__ import annotations

import os

from feda2v_toolkit.errors import InputError

#: environment variables torchrun (and other launchers) set
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


#: environment variable: seconds a rank waits in a collective for the others (default: 24 hours -- ranks of an
#: ``embed`` run may finish their shards hours apart; a rank that fails ends the run through torchrun)
ENV_TIMEOUT = "FEDA2V_RANKS_TIMEOUT"


def collective_timeout() -> float:
    try:
        return max(1.0, float(os.environ.get(ENV_TIMEOUT, "") or 86400))
    except ValueError:
        raise InputError(f"{ENV_TIMEOUT}={os.environ.get(ENV_TIMEOUT)!r} is not a number of seconds") from None


def launched_rank() -> int:
    """``RANK`` as a launcher set it (0 when not launched by one): rank 0 speaks and writes for the run."""
    try:
        return max(0, int(os.environ.get("RANK", "0") or 0))
    except ValueError:
        return 0


def launched_world_size() -> int:
    """``WORLD_SIZE`` as a launcher set it (1 when not launched by one)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        raise InputError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} is not a number of processes") from None
