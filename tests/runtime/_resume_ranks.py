"""Run under torchrun by tests/runtime/test_ranks.py: ``DATA OUTDIR interrupt`` trains a VAE for 4 epochs on
every rank and stops every rank as an interruption would right after the checkpoint of epoch 2 (rank 0's is
kept); ``DATA OUTDIR resume`` resumes that run; ``DATA OUTDIR whole`` runs it uninterrupted."""

import sys
from pathlib import Path

import feda2v_toolkit.training.pipeline as pipeline
from feda2v_toolkit.runtime.ranks import init_from_environment

data, out, mode = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
config = {"generator_type": "vae", "generator_training_sequence_length": 4, "generator_latent_dim": 8,
          "generator_hidden_dim": 16, "generator_training_epochs": 4, "generator_upsampler": "linear",
          "generator_granularity": "unified", "generator_checkpoint_frequency": 1}
saved = pipeline.save_checkpoint


def stop_after_epoch_2(path, model, optim, state):
    saved(path, model, optim, state)
    if state.epoch == 2:
        raise KeyboardInterrupt


ranks = init_from_environment()
if mode == "interrupt":
    pipeline.save_checkpoint = stop_after_epoch_2
try:
    pipeline.train(config, data, seed=3, out=out / f"{mode}.safetensors", resume=mode == "resume",
                   checkpoint_dir=out / "checkpoints", ranks=ranks, log=lambda m: print(m, file=sys.stderr))
except KeyboardInterrupt:
    ranks.finish()
