"""``feda2v-tk generate`` and ``feda2v-tk inspect``: use and look into model files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from feda2v_toolkit.commands._options import (
    DEVICE,
    DEVICE_HELP,
    FULL_LENGTH,
    MEMORY_BUDGET_OPTION,
    SAMPLES,
    SEED,
)
from feda2v_toolkit.commands._warnings import warnings_as_messages


@click.command("generate")
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output directory for the safetensors shards (absent or empty; --overwrite replaces one that "
                   "holds only dataset shards).")
@click.option("-k", "--samples-per-class", "samples", type=SAMPLES,
              help="Samples per class, or 'auto' (as many as the class had training clips) [default: the "
                   "config's synthetic_samples_per_class].")
@click.option("--classes", help="Comma-separated class names [default: all].")
@click.option("--output-length", type=FULL_LENGTH,
              help="Tokens per sample [default: the model's output length: generator_output_sequence_length, "
                   "else the training length; `inspect` shows it]. The training data's full length (1214 for "
                   "AST) gives full-length samples.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]),
              help="Sample dtype [default: the training data's dtype, else float32].")
@click.option("--seed", default=0, show_default=True, type=SEED,
              help="Seeds the draws (not drawn at random: the same seed writes the same bytes).")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1),
              help="Samples drawn per model call; with the seed, it determines the samples.")
@click.option("--conditions", "conditions_path", type=click.Path(path_type=Path),
              help="Dataset file with 'conditions' (and 'labels') for embedding-conditioned models.")
@click.option("--shard-size", "shard_mb", default=256, show_default=True, type=click.IntRange(min=1),
              help="Approximate shard size in MiB.")
@MEMORY_BUDGET_OPTION
@click.option("--device", default="auto", show_default=True, type=DEVICE, help=DEVICE_HELP)
@click.option("--progress/--no-progress", default=None,
              help="Progress: a bar on a terminal, else a line every 15 s [default: on unless -q].")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it holds only dataset shards (once the new ones "
                                                "are done).")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress or status messages.")
def generate_cmd(model_path: Path, out_dir: Path, samples: int | str | None, classes: str | None,
                 output_length: int | None, dtype: str | None, seed: int, batch_size: int,
                 conditions_path: Path | None, shard_mb: int, device: str, progress: bool | None, overwrite: bool,
                 as_json: bool, quiet: bool) -> None:
    """Sample a trained MODEL and write the samples to OUT as safetensors shards.

    Samples have the model's output length (generator_output_sequence_length, else the training length:
    `inspect` shows it; --output-length to choose). The shards use the dataset format, so they feed
    straight back into train, analyze or evaluate.
    """
    from feda2v_toolkit.runtime.atomic import check_output
    from feda2v_toolkit.runtime.malloc import reuse_freed_memory

    reuse_freed_memory()  # first: glibc fixes its number of heaps when a second thread first allocates
    inputs = [model_path] + ([conditions_path] if conditions_path is not None else [])
    check_output(out_dir, inputs=inputs, overwrite=overwrite, directory=True)
    from feda2v_toolkit.model.file import load_model
    from feda2v_toolkit.model.generate import generate
    from feda2v_toolkit.training.pipeline import resolve_device

    model = load_model(model_path, device=resolve_device(device))
    names = [c.strip() for c in classes.split(",") if c.strip()] if classes else None
    with warnings_as_messages():
        report = generate(model, out_dir, samples=samples, classes=names, length=output_length, dtype=dtype,
                          seed=seed, batch_size=batch_size, conditions=conditions_path, shard_bytes=shard_mb * 2**20,
                          progress=False if quiet and progress is None else progress, overwrite=overwrite,
                          log=None if quiet else lambda m: click.echo(f"feda2v-tk: {m}", err=True))
    if as_json:
        click.echo(json.dumps({"directory": str(report.directory), "samples": report.samples,
                               "length": report.length, "shards": report.shards,
                               "bytes_written": report.bytes_written}, indent=2))


def describe(meta: dict[str, Any]) -> dict[str, Any]:
    """The facts ``inspect`` shows, from a model file's metadata (no weights loaded)."""
    doc = meta["model"]
    shapes = meta["tensor_shapes"]

    def elements(prefix: str) -> int:
        total = 0
        for name, shape in shapes.items():
            if name.startswith(prefix):
                n = 1
                for s in shape:
                    n *= s
                total += n
        return total

    params = {f"generator[{g['key']}]": g.get("parameters", elements(f"generators.{i}."))
              for i, g in enumerate(doc["generators"])}
    params["reducer"] = elements("reducer.")
    params["upsampler"] = elements("upsampler.")
    return {
        "toolkit_version": meta.get("toolkit_version"),
        "format_version": int(meta.get("format_version", 0)),
        "generator_type": doc["generator_type"],
        "granularity": doc["granularity"],
        "classes": {c: {"train_samples": doc.get("class_counts", {}).get(c),
                        "generator": doc["class_to_generator"].get(c)} for c in doc["class_names"]},
        "full_length": doc["full_length"],
        "training_length": doc["training_length"],
        "output_length": doc["output_length"],
        "dim": doc["dim"],
        "condition_dim": doc.get("condition_dim", 0),
        "reducer": doc["reducer"],
        "upsampler": doc["upsampler"],
        "generator_init_args": {g["key"]: g["init_args"] for g in doc["generators"]},
        "parameters": params,
        "parameters_total": sum(params.values()),
        "normalized": doc.get("normalized", False),
        "seed": doc.get("seed"),
        "metrics": doc.get("metrics", {}),
        "tensors": shapes,
        "config": doc.get("config", {}),
    }


@click.command("inspect")
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("-q", "--quiet", is_flag=True, help="Only check that the file reads; print nothing.")
def inspect_cmd(model_path: Path, as_json: bool, quiet: bool) -> None:
    """Show a model file's metadata, parameter counts per component, shapes and training metrics.

    The metadata is checked against the stored tensors' shapes first (no weight is read): an inconsistent
    or tampered file is refused as `generate` would refuse it."""
    from feda2v_toolkit.errors import InputError
    from feda2v_toolkit.model.file import check_consistency, read_model_metadata

    meta = read_model_metadata(model_path)
    # the metadata against the stored shapes, components built on the meta device (nothing allocated); a
    # component whose plugin is not installed here is shown unchecked
    check_consistency(meta.get("model"), meta["tensor_shapes"], model_path, skip_unavailable=True)
    try:
        _show(model_path, describe(meta), as_json=as_json, quiet=quiet)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise InputError(f"{model_path}: malformed model metadata: {type(exc).__name__}: {exc}") from None


def _show(model_path: Path, info: dict[str, Any], *, as_json: bool, quiet: bool) -> None:
    if quiet:
        return
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    gen = info["generator_type"]
    provider = f" ({gen['qualified_name']}, {gen.get('distribution')} {gen.get('version')})" \
        if gen.get("qualified_name") else ""
    click.echo(f"{model_path}: feda2v-tk model, format {info['format_version']}, "
               f"written by feda2v-tk {info['toolkit_version']}")
    click.echo(f"generator:   {gen['name']}{provider}, {info['granularity']}")
    click.echo(f"lengths:     {info['full_length']} -> {info['training_length']} (training) -> "
               f"{info['output_length'] or info['training_length']} (output), D = {info['dim']}"
               + (f", conditions [{info['condition_dim']}]" if info["condition_dim"] else ""))
    click.echo(f"reducer:     {info['reducer']['name']} {json.dumps(info['reducer']['init_args'])}")
    click.echo(f"upsampler:   {info['upsampler']['name']} {json.dumps(info['upsampler']['init_args'])}")
    click.echo("classes:     " + ", ".join(
        f"{c} ({v['train_samples'] if v['train_samples'] is not None else 'n/a'} -> "
        f"{v['generator'] or 'no generator'})" for c, v in info["classes"].items()))
    click.echo("parameters:  " + ", ".join(f"{k} {v:,}" for k, v in info["parameters"].items())
               + f"; total {info['parameters_total']:,}")
    metrics = info["metrics"]
    if metrics:
        train = metrics.get("train") or {}
        val = metrics.get("val") or {}
        fits = metrics.get("generator_fit") or {}
        if fits:  # closed-form generators
            click.echo(f"training:    fitted in closed form, seed {info['seed']}; " + "; ".join(
                f"{key}: " + ", ".join(f"{k} {v:.4g}" for k, v in f.items()) for key, f in fits.items()))
        else:
            click.echo(f"training:    {metrics.get('epochs')} epochs, seed {info['seed']}"
                       + "".join(f", {k} {v:.4g}" for k, v in train.items()))
        if val:
            click.echo("held out:    " + ", ".join(f"{k} {v:.4g}" for k, v in val.items()))
        sites = metrics.get("sites") or []
        fed = metrics.get("federated")  # model files of earlier versions
        if len(sites) > 1 or fed:
            cfg = info.get("config") or {}
            names = [s["name"] for s in sites] or [n["name"] for n in fed["nodes"]]
            how = ("generators fitted from merged statistics" if fits else
                   f"{cfg.get('federated_rounds')} rounds x {cfg.get('federated_local_epochs')} local epochs")
            click.echo(f"federated:   {len(names)} sites ({', '.join(names)}), {how}")
        elif sites:
            click.echo(f"data:        {sites[0]['name']}")
        privacy = metrics.get("privacy") or (fed or {}).get("privacy") or {}
        node = privacy.get("node_level") or (privacy if privacy.get("unit") == "a whole node (site)" else {})
        if privacy.get("unit") == "one clip (record-level)":
            eps = privacy.get("epsilon")
            click.echo(f"privacy:     record-level DP: epsilon {eps:.3g} at delta {privacy['delta']:g} spent (target "
                       f"{privacy.get('target_epsilon')}, {privacy.get('accountant')}); "
                       f"{len(privacy.get('releases') or {})} releases"
                       if eps is not None else "privacy:     record-level DP machinery with epsilon inf (no noise, "
                       "no guarantee)")
            dropped = privacy.get("classes_dropped") or []
            if dropped:
                click.echo(f"             classes dropped by the noisy counts: {', '.join(dropped)}")
        if node:
            click.echo(f"privacy:     node-level DP (a whole site is the unit, weight updates only): epsilon "
                       f"{node['epsilon']:.3g} at delta {node['delta']:g}")
        if privacy.get("unit") != "one clip (record-level)" and not node:
            click.echo("privacy:     no differential privacy (evaluate --train-data audits membership)")
        ups = metrics.get("upsampler") or {}
        if "heldout_mse" in ups:
            click.echo(f"upsampling:  held-out MSE {ups['heldout_mse']:.5g} ({ups['name']}) vs "
                       f"{ups['heldout_mse_linear']:.5g} (linear); R^2 {ups['heldout_r2']:.4f} vs "
                       f"{ups['heldout_r2_linear']:.4f}")
