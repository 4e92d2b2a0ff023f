"""Run under torchrun by tests/runtime/test_ranks.py: every rank trains the same private run (``DATA``, epsilon
4) through the Python API and records a digest of the model it ended with (``OUTDIR/model-RANK``)."""

import hashlib
import sys
from pathlib import Path

from feda2v_toolkit.training.pipeline import train

data, out = sys.argv[1], Path(sys.argv[2])
model = train({"generator_training_sequence_length": 4, "generator_dp_epsilon": 4.0}, data, seed=3,
              out=out / "model.safetensors")
digest = hashlib.sha256()
for name, value in sorted(model.generators["all"].state_dict().items()):
    digest.update(name.encode() + value.contiguous().numpy().tobytes())
(out / f"model-{model.metrics['privacy']['epsilon']:g}-{__import__('os').environ['RANK']}").write_text(
    digest.hexdigest())
