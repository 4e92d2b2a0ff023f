"""Options shared by every command, so that one idea has one spelling and one range everywhere.

The convention (checked for every registered command, plugin commands included, by
``tests/hardening/test_option_convention.py``; see docs/plugins.md):

* ``-o/--out`` names what a command writes;
* ``--json`` prints a machine-readable report on stdout (every command that reports);
* ``-q/--quiet`` silences status messages;
* ``--overwrite`` replaces an existing output;
* ``--seed`` takes an integer in ``[0, 2**31 - 1]`` (:data:`SEED`);
* ``--traceback`` (on ``feda2v-tk`` itself) shows tracebacks; ``-v`` is not used for it.
"""

from __future__ import annotations

import click

#: the range of every ``--seed`` option (what torch.manual_seed and numpy accept alike)
SEED = click.IntRange(0, 2**31 - 1)
