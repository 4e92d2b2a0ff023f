"""``feda2v-tk embed`` (audio -> AST embeddings) and ``feda2v-tk convert-data`` (any readable dataset,
e.g. the original code's caches, -> our shard format)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from feda2v_toolkit.commands._options import DEVICE, DEVICE_HELP

DEFAULT_MODEL = "MIT/ast-finetuned-audioset-10-10-0.4593"  # feda2v_toolkit.audio.embed.DEFAULT_MODEL, without importing it


@click.command("embed")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Dataset directory of shards to write (resumed if an earlier run was interrupted).")
@click.option("--model", default=DEFAULT_MODEL, show_default=True,
              help="AST checkpoint: a Hugging Face hub name or a local save_pretrained directory (offline: "
                   "the directory, see docs/data.md).")
@click.option("--revision", help="Hub revision (branch, tag or commit) of --model.")
@click.option("--clip-seconds", default=10.0, show_default=True, type=click.FloatRange(0.03, 3600),
              help="Pad (zeros at the end) or crop every clip to this length; FedA2V used 5 for ESC-50 and "
                   "VEGAS, 10 for VGGSound.")
@click.option("--crop", default="start", show_default=True, type=click.Choice(["start", "center"]),
              help="Which part of a longer clip to keep.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1, 1024),
              help="Clips per forward pass (their features and activations are held at once; at most 1024).")
@click.option("--shard-size", "shard_mb", default=256, show_default=True, type=click.IntRange(1, 65536),
              help="Approximate shard size in MiB (a whole number of batches, at least one; under torchrun each "
                   "rank embeds whole shards, so use at least as many shards as ranks).")
@click.option("--device", default="auto", show_default=True, type=DEVICE, help=DEVICE_HELP)
@click.option("--read-workers", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Threads reading and featurising the next batches while the model runs (more for a GPU).")
@click.option("--dtype", default="float16", show_default=True, type=click.Choice(["float32", "float16", "bfloat16"]),
              help="Storage dtype of the embeddings (inference runs in float32).")
@click.option("--on-error", default="skip", show_default=True, type=click.Choice(["skip", "fail"]),
              help="An unreadable or empty audio file: list it and go on, or stop.")
@click.option("--path-column", default="path", show_default=True, help="Manifest column with the audio path.")
@click.option("--label-column", default="label", show_default=True, help="Manifest/dataset column with the label.")
@click.option("--fold-column", default="fold", show_default=True, help="Manifest/dataset column with the fold "
                                                                       "(used when present).")
@click.option("--audio-column", default="audio", show_default=True, help="Saved dataset's audio column.")
@click.option("--audio-root", type=click.Path(file_okay=False, path_type=Path),
              help="Directory manifest paths are relative to [default: the manifest's directory].")
@click.option("--split", help="Split of a saved DatasetDict (needed when it has several).")
@click.option("--folds", help="Comma-separated folds to keep (manifest/dataset fold column).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory holding only dataset shards "
                                                "(and an unfinished run with other settings).")
@click.option("--progress/--no-progress", default=None,
              help="Progress: a bar on a terminal, else a line every 15 s [default: on unless -q].")
@click.option("--json", "as_json", is_flag=True, help="Print the run report as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress or status messages.")
def embed_cmd(source: Path, out: Path, model: str, revision: str | None, clip_seconds: float, crop: str,
              batch_size: int, shard_mb: int, device: str, read_workers: int, dtype: str, on_error: str, path_column: str, label_column: str,
              fold_column: str, audio_column: str, audio_root: Path | None, split: str | None, folds: str | None,
              overwrite: bool, progress: bool | None, as_json: bool, quiet: bool) -> None:
    """Embed the audio clips of SOURCE with an Audio Spectrogram Transformer into a dataset directory.

    SOURCE is a folder of class sub-folders, a CSV/JSON manifest (path, label, optional fold columns) or a
    Hugging Face dataset saved with save_to_disk. Each clip is read (soundfile), downmixed to mono,
    resampled to 16 kHz (soxr), padded or cropped to --clip-seconds and embedded: last_hidden_state,
    [1214, 768] for the 10-10 AudioSet checkpoints. Needs: pip install "feda2v-tk[audio]". Data-parallel:
    torchrun --nproc-per-node N -m feda2v_toolkit embed ... (one rank per GPU or CPU worker; the same output).
    """
    from feda2v_toolkit.runtime.malloc import one_arena

    one_arena()  # chunks stream through background threads: one heap for all of them
    from feda2v_toolkit.audio.sources import ClipPolicy, open_source, require
    from feda2v_toolkit.runtime.launch import launched_rank

    if launched_rank() > 0:  # torchrun: rank 0 reports for the run
        quiet, as_json = True, False

    policy = ClipPolicy(clip_seconds, crop)  # checked before anything is read
    require("transformers", "soundfile", "soxr")
    from feda2v_toolkit.audio.embed import embed, partial_dir

    src = open_source(source, path_column=path_column, label_column=label_column, fold_column=fold_column,
                      audio_column=audio_column, audio_root=str(audio_root) if audio_root else None, split=split,
                      folds=[f.strip() for f in folds.split(",") if f.strip()] if folds else None)
    try:
        report = embed(src, out, model=model, revision=revision, policy=policy,
                       batch_size=batch_size, shard_bytes=shard_mb * 2**20, device=device, dtype=dtype, on_error=on_error, overwrite=overwrite,
                       read_workers=read_workers, progress=False if quiet and progress is None else progress)
    except KeyboardInterrupt:
        work = partial_dir(out)
        if not quiet and any(work.glob("done-*.json")):
            click.echo(f"feda2v-tk: finished shards are kept in {work}; run the same command again to resume",
                       err=True)
        raise
    if not quiet:
        for item in report.skipped:
            click.echo(f"feda2v-tk: skipped {item['path']}: {item['reason']}", err=True)
        for name in report.dropped_classes:
            click.echo(f"feda2v-tk: left out class {name!r}: none of its clips could be read", err=True)
        resumed = f" ({report.resumed} done by an earlier run)" if report.resumed else ""
        click.echo(f"feda2v-tk: wrote {report.rows} of {report.clips} clips{resumed} "
                   f"[{report.settings['tokens']}, {report.settings['dim']}] {report.settings['dtype']} to {out}; "
                   f"{len(report.skipped)} skipped; {report.clips_per_second:.2f} clips/s", err=True)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))


@click.command("convert-data")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Dataset directory of shards to write (not SOURCE, nor inside it, nor holding it).")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]),
              help="Storage dtype [default: the source's].")
@click.option("--batch-size", type=click.IntRange(min=1), help="Clips per read [default: 32 MiB of clips].")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory holding only dataset shards.")
@click.option("--progress/--no-progress", default=None,
              help="Progress: a bar on a terminal, else a line every 15 s [default: on unless -q].")
@click.option("--json", "as_json", is_flag=True, help="Print a report as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress or status messages.")
def convert_data_cmd(source: Path, out: Path, dtype: str | None, batch_size: int | None, overwrite: bool,
                     progress: bool | None, as_json: bool, quiet: bool) -> None:
    """Write any dataset feda2v-tk reads (an AST cache directory or .pt cache of the original code, a legacy
    .pt, shards) to OUT in the safetensors shard format, streaming."""
    from feda2v_toolkit.runtime.malloc import one_arena

    one_arena()  # chunks stream through background threads: one heap for all of them
    from feda2v_toolkit.data.convert import convert_dataset

    result = convert_dataset(source, out, dtype=dtype, batch_size=batch_size, overwrite=overwrite,
                             progress=False if quiet and progress is None else progress)
    if not quiet:
        click.echo(f"feda2v-tk: wrote {result['clips']} clips [{result['seq_len']}, {result['dim']}] "
                   f"{result['dtype']}, {len(result['class_names'])} classes to {out}", err=True)
    if as_json:
        click.echo(json.dumps(result, indent=2))
