"""Run under torchrun by tests/audio/test_embed.py: ``embed SOURCE OUT MODEL SHARD_BYTES`` on CPU, quietly."""

import sys

from feda2v_toolkit.audio.embed import embed
from feda2v_toolkit.audio.sources import ClipPolicy, open_source
from feda2v_toolkit.errors import ToolkitError

try:
    embed(open_source(sys.argv[1]), sys.argv[2], model=sys.argv[3], policy=ClipPolicy(1.0), batch_size=2,
          device="cpu", shard_bytes=int(sys.argv[4]), progress=False)
except ToolkitError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
