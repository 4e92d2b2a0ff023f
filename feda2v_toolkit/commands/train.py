"""``feda2v-tk train``: a thin layer over :func:`feda2v_toolkit.training.pipeline.train`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from feda2v_toolkit.commands._options import DEVICE, DEVICE_HELP, MEMORY_BUDGET_OPTION, SEED, schema_range
from feda2v_toolkit.commands._warnings import warnings_as_messages

#: CLI option -> generator-section key it overrides
OVERRIDE_OPTIONS: dict[str, str] = {
    "generator_type": "generator_type",
    "epochs": "generator_training_epochs",
    "batch_size": "generator_batch_size",
    "learning_rate": "generator_learning_rate",
    "training_length": "generator_training_sequence_length",
    "output_length": "generator_output_sequence_length",
    "granularity": "generator_granularity",
    "reducer": "generator_reducer",
    "upsampler": "generator_upsampler",
    "hidden_dim": "generator_hidden_dim",
    "latent_dim": "generator_latent_dim",
    "autocast": "generator_autocast",
    "classes": "generator_classes",
    "dp_epsilon": "generator_dp_epsilon",
    "dp_delta": "generator_dp_delta",
    "dp_public_data": "generator_dp_public_data",
}


def _class_list(_ctx: Any, _param: Any, value: str | None) -> list[str] | None:
    if value is None:
        return None
    names = [c.strip() for c in value.split(",") if c.strip()]
    if not names:
        raise click.BadParameter("name at least one class")
    return names


def collect_overrides(options: dict[str, Any], *, learned_upsampling: bool | None) -> dict[str, Any]:
    """Config keys set on the command line (options left unset override nothing)."""
    out = {key: options[opt] for opt, key in OVERRIDE_OPTIONS.items() if options.get(opt) is not None}
    if learned_upsampling is None and options.get("upsampler") is not None:
        # --upsampler NAME wins over a config's use_learned_upsampling: true (which would select 'learned')
        learned_upsampling = options["upsampler"] == "learned"
    if learned_upsampling is not None:
        out["use_learned_upsampling"] = learned_upsampling
    return out


def training_options(*, epochs: bool) -> Any:
    """The options ``train`` and ``federate`` share: config overrides, seed, device, checkpoints, metrics, progress
    (``epochs``: with ``--epochs``; federate counts rounds instead)."""
    options = [
        click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
                     help="Experiment config (JSON); without it, the schema defaults are used."),
        click.option("--generator-type", help="Overrides generator_type."),
        *([click.option("--epochs", type=schema_range("generator_training_epochs"),
                        help="Overrides generator_training_epochs.")] if epochs else []),
        click.option("--batch-size", type=schema_range("generator_batch_size"), help="Overrides generator_batch_size."),
        click.option("--learning-rate", type=click.FloatRange(min=0, min_open=True),
                     help="Overrides generator_learning_rate."),
        click.option("--training-length", type=schema_range("generator_training_sequence_length"),
                     help="Overrides generator_training_sequence_length."),
        click.option("--output-length", type=schema_range("generator_output_sequence_length"),
                     help="Overrides generator_output_sequence_length."),
        click.option("--granularity", type=click.Choice(["unified", "per_class", "per_group"]),
                     help="Overrides generator_granularity."),
        click.option("--classes", metavar="A,B,...", callback=_class_list,
                     help="Train on these classes only (overrides generator_classes)."),
        click.option("--reducer", help="Overrides generator_reducer."),
        click.option("--upsampler", help="Overrides generator_upsampler."),
        click.option("--learned-upsampling/--no-learned-upsampling", default=None,
                     help="Overrides use_learned_upsampling."),
        click.option("--hidden-dim", type=schema_range("generator_hidden_dim"), help="Overrides generator_hidden_dim."),
        click.option("--latent-dim", type=schema_range("generator_latent_dim"), help="Overrides generator_latent_dim."),
        click.option("--autocast", type=click.Choice(["float32", "bfloat16"]), help="Overrides generator_autocast."),
        click.option("--dp-epsilon", type=click.FloatRange(min=0, min_open=True),
                     help="Record-level differential privacy: the target epsilon for everything the run releases "
                          "(overrides generator_dp_epsilon; docs/privacy.md)."),
        click.option("--dp-delta", type=click.FloatRange(min=0, max=1, min_open=True, max_open=True),
                     help="Its delta, below 1/N for N training clips (overrides generator_dp_delta, default 1e-5)."),
        click.option("--dp-public-data", type=click.Path(exists=True), metavar="PATH",
                     help="Public clips (never trained on, not protected) that fit the normalisation, upsampler and "
                          "basis under DP (overrides generator_dp_public_data)."),
        click.option("--seed", type=SEED, help="Random seed (overrides generator_seed; drawn at random and "
                                                "reported when neither is set)."),
        click.option("--device", default="auto", show_default=True, type=DEVICE, help=DEVICE_HELP),
        MEMORY_BUDGET_OPTION,
        click.option("--overwrite", is_flag=True, help="Replace OUT (and its metrics file) if they exist."),
        click.option("--resume", is_flag=True, help="Continue from the last checkpoint if there is one."),
        click.option("--checkpoint-dir", type=click.Path(file_okay=False, path_type=Path),
                     help="Where checkpoints go [default: beside OUT, in OUT-without-suffix.checkpoints/]."),
        click.option("--keep-checkpoints", is_flag=True,
                     help="Keep the last checkpoint once the model is written (default: removed)."),
        click.option("--metrics", "metrics_path", type=click.Path(dir_okay=False, path_type=Path),
                     help="One JSON line of metrics per epoch here [default: OUT with .metrics.jsonl]."),
        click.option("--progress/--no-progress", default=None, help="Progress bar [default: when on a terminal]."),
        click.option("--json", "as_json", is_flag=True, help="Print the final metrics as JSON on stdout."),
        click.option("-q", "--quiet", is_flag=True, help="No status messages."),
    ]

    def decorate(func: Any) -> Any:
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


@click.command("train")
@click.option("-d", "--data", "data_path", required=True, type=click.Path(path_type=Path),
              help="Dataset: a .safetensors file, a directory of shards, or a legacy .pt cache.")
@click.option("-o", "--out", "out_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Model file to write (.safetensors).")
@training_options(epochs=True)
def train_cmd(config_path: Path | None, data_path: Path, out_path: Path, seed: int | None, device: str,
              overwrite: bool, resume: bool, checkpoint_dir: Path | None, keep_checkpoints: bool,
              metrics_path: Path | None,
              progress: bool | None, as_json: bool, quiet: bool, learned_upsampling: bool | None,
              **options: Any) -> None:
    """Reduce sequences, train a generator, and export it as one safetensors file.

    The config is migrated in memory and validated first; command-line options override its keys.
    Training is the pipeline federate runs, over one site holding all of DATA. Data-parallel over processes:
    torchrun --nproc-per-node N -m feda2v_toolkit train ... (the same model; docs/performance.md).
    """
    from feda2v_toolkit.runtime.malloc import STREAM_BUFFER_BYTES, reuse_freed_memory

    reuse_freed_memory(STREAM_BUFFER_BYTES)  # first: glibc fixes its number of heaps when a second thread allocates
    from feda2v_toolkit.runtime.launch import launched_rank
    from feda2v_toolkit.training.pipeline import train

    if launched_rank() > 0:  # torchrun: rank 0 speaks and writes for the run
        quiet, as_json, progress = True, False, False

    def say(msg: str) -> None:
        if not quiet:
            click.echo(f"feda2v-tk: {msg}", err=True)

    config: Any = config_path if config_path is not None else {}
    overrides = collect_overrides(options, learned_upsampling=learned_upsampling)
    if metrics_path is None:
        metrics_path = out_path.with_name(out_path.stem + ".metrics.jsonl")
    with warnings_as_messages():
        model = train(config, data_path, out=out_path, overrides=overrides, seed=seed, device=device,
                      resume=resume, checkpoint_dir=checkpoint_dir, metrics_path=metrics_path,
                      progress=progress, log=say, overwrite=overwrite, keep_checkpoints=keep_checkpoints)
    report(model, out_path, say, as_json)


def report(model: Any, out_path: Path, say: Any, as_json: bool) -> None:
    """The summary line and the ``--json`` document of a finished training run (train and federate)."""
    final = model.metrics
    val = final.get("val") or {}
    sites = final.get("sites") or []
    summary = f"trained {len(model.generators)} {model.generator_type} generator(s), {final['epochs']} epochs"
    if len(sites) > 1:
        summary += f" over {len(sites)} sites"
    if val:
        summary += f", held-out loss {val.get('loss', float('nan')):.5g}"
    say(summary)
    if as_json:
        import json

        click.echo(json.dumps({"model": str(out_path), "generators": len(model.generators),
                               "generator_type": model.generator_type, "seed": model.seed, "metrics": final},
                              indent=2, default=str))
