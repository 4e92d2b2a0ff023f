"""Run under torchrun by tests/runtime/test_ranks.py: every rank trains the same private run (``DATA``, epsilon
4, generator type ``TYPE``) through the Python API and records the epsilon it spent and a digest of the model it
ended with (``OUTDIR/rank-RANK.json``)."""

import hashlib
import json
import os
import sys
from pathlib import Path

from feda2v_toolkit.training.pipeline import train

data, out, kind = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
config = {"generator_training_sequence_length": 4, "generator_dp_epsilon": 4.0, "generator_type": kind}
if kind == "vae":
    config.update(generator_hidden_dim=16, generator_latent_dim=8, generator_training_epochs=2,
                  generator_upsampler="linear")
model = train(config, data, seed=3, out=out / "model.safetensors")
digest = hashlib.sha256()
for name, value in sorted(model.generators["all"].state_dict().items()):
    digest.update(name.encode() + value.contiguous().numpy().tobytes())
privacy = model.metrics["privacy"]
(out / f"rank-{os.environ['RANK']}.json").write_text(json.dumps(
    {"digest": digest.hexdigest(), "epsilon": privacy["epsilon"],
     "steps": {k: r.get("compositions") for k, r in privacy["releases"].items()}}))
