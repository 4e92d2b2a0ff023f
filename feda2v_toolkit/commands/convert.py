"""``feda2v-tk convert``: import generator checkpoints of the original FedA2V code."""

from __future__ import annotations

import json
from pathlib import Path

import click

from feda2v_toolkit.commands._options import FULL_LENGTH, LENGTH, WIDTH


@click.command("convert")
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--out", "out_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Model file to write (.safetensors); an existing one only with --overwrite.")
@click.option("--dim", type=WIDTH,
              help="Embedding width D, for files that store no sequence_length [default: 768]; checked "
                   "against the weights otherwise.")
@click.option("--training-length", type=LENGTH,
              help="Reduced length l the generators were trained at, for files that store no sequence_length.")
@click.option("--full-length", default=1214, show_default=True, type=FULL_LENGTH,
              help="Full sequence length L of the embeddings (1214 for AST).")
@click.option("--output-length", type=FULL_LENGTH,
              help="Default length of generated samples [default: the training length, as the original].")
@click.option("--classes", help="Comma-separated class names in label order (required for a unified "
                                "checkpoint that lists no classes).")
@click.option("--upsampler", default="linear", show_default=True,
              help="Interpolating upsampler (linear is the original).")
@click.option("--dry-run", is_flag=True, help="Check and report; write nothing.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (atomically, once the model is built).")
@click.option("--json", "as_json", is_flag=True, help="Print the conversion report as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No status messages.")
def convert_cmd(checkpoints: tuple[Path, ...], out_path: Path, dim: int | None, training_length: int | None,
                full_length: int, output_length: int | None, classes: str | None, upsampler: str, dry_run: bool,
                overwrite: bool, as_json: bool, quiet: bool) -> None:
    """Convert original FedA2V generator CHECKPOINTS (.pt) into one feda2v-tk model file.

    Accepts one unified checkpoint (client or server), a server file with prompt_generators, or the
    per_class / per_group client files of one run. Files are read with weights_only=True (never
    unpickled). GANs and CLIP/T5-conditioned VAEs are refused: they have no equivalent here.
    """
    from feda2v_toolkit.model.original_checkpoints import check_output, convert, convert_checkpoints

    options = {"dim": dim, "training_length": training_length, "full_length": full_length,
               "output_length": output_length, "class_names": classes, "upsampler": upsampler}
    if dry_run:
        check_output(out_path, checkpoints, overwrite=overwrite)
        result = convert_checkpoints(checkpoints, **options)
    else:
        result = convert(checkpoints, out_path, overwrite=overwrite, **options)
    if not quiet:
        for note in result.notes:
            click.echo(f"feda2v-tk: {note}", err=True)
        model = result.model
        where = "would write" if dry_run else "wrote"
        click.echo(f"feda2v-tk: {where} {out_path}: {len(model.generators)} {model.granularity} vae generator(s), "
                   f"classes {', '.join(model.class_names)}", err=True)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
