"""``feda2v-tk demo-data``: write the AST-shaped demo dataset (and the legacy example config)."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import click

from feda2v_toolkit.commands._options import FULL_LENGTH, SEED, WIDTH
from feda2v_toolkit.errors import UsageError

#: the example config of the original FedA2V code, shipped inside the package (works after `pip install .`)
LEGACY_CONFIG = "legacy-config.json"


def legacy_config_bytes() -> bytes:
    """The bundled legacy example config, as shipped."""
    return resources.files("feda2v_toolkit").joinpath("examples", LEGACY_CONFIG).read_bytes()


@click.command("demo-data")
@click.argument("out_arg", metavar="[OUT]", required=False, type=click.Path(path_type=Path))
@click.option("-o", "--out", "out_opt", type=click.Path(path_type=Path),
              help="Where to write the dataset (a .safetensors file, or a directory of shards); same as OUT.")
@click.option("--per-class", default=24, show_default=True, type=click.IntRange(min=1),
              help="Clips per class.")
@click.option("--classes", "num_classes", default=4, show_default=True, type=click.IntRange(1, 4),
              help="Number of classes (engine, drum, whistle, bird: the first N).")
@click.option("--full-length", "full_length", default=1214, show_default=True, type=FULL_LENGTH,
              help="Tokens per clip, L (1214 for AST).")
@click.option("--seq-len", "seq_len_alias", type=FULL_LENGTH, hidden=True,
              help="Deprecated spelling of --full-length.")
@click.option("--dim", default=768, show_default=True, type=WIDTH, help="Embedding width D.")
@click.option("--seed", default=0, show_default=True, type=SEED,
              help="Fixes the dataset's structure and its clips (not drawn at random: the same seed writes the "
                   "same bytes).")
@click.option("--first-clip", default=0, show_default=True, type=click.IntRange(min=0),
              help="Index of the first clip: more clips of the same structure, e.g. a held-out set.")
@click.option("--dtype", default="float16", show_default=True, type=click.Choice(["float32", "float16", "bfloat16"]))
@click.option("--legacy-config", "legacy_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the example config of the original FedA2V code here (for `feda2v-tk migrate`); "
                   "without OUT, only the config is written.")
@click.option("--overwrite", is_flag=True, help="Replace OUT (a file, or a directory holding only dataset shards) "
                                                "and the --legacy-config file if they exist.")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="Do not report what was written.")
def demo_data_cmd(out_arg: Path | None, out_opt: Path | None, per_class: int, num_classes: int, full_length: int,
                  seq_len_alias: int | None, dim: int, seed: int, first_clip: int, dtype: str,
                  legacy_path: Path | None, overwrite: bool, as_json: bool, quiet: bool) -> None:
    """Write the demo dataset to OUT (a .safetensors file, or a directory of shards).

    Up to four sound classes with AST's token layout (2 summary tokens, 12 x 101 frequency-major patches);
    see `feda2v_toolkit.data.demo` for what distinguishes them. For fast tests, not for judging methods.
    """
    from feda2v_toolkit.runtime.atomic import check_output

    if out_arg is not None and out_opt is not None:
        raise UsageError("give OUT or -o/--out, not both")
    out = out_arg if out_arg is not None else out_opt
    if out is None and legacy_path is None:
        raise UsageError("give OUT (or -o/--out), --legacy-config FILE, or both")
    seq_len = seq_len_alias if seq_len_alias is not None else full_length
    if out is not None and legacy_path is not None:
        check_output(legacy_path, inputs=[out], role="dataset output")
    if legacy_path is not None:
        check_output(legacy_path, overwrite=overwrite)
    if out is not None:
        check_output(out, overwrite=overwrite, directory=out.suffix != ".safetensors")
    written: dict[str, object] = {}
    if out is not None:
        from feda2v_toolkit.data.dataset import DTYPES
        from feda2v_toolkit.data.demo import write_demo_dataset

        path = write_demo_dataset(out, per_class, seq_len=seq_len, dim=dim, num_classes=num_classes, seed=seed,
                                  dtype=DTYPES[dtype], first_clip=first_clip, overwrite=overwrite)
        written.update(dataset=str(path), clips=per_class * num_classes, shape=[seq_len, dim], dtype=dtype)
        if not quiet:
            click.echo(f"feda2v-tk: wrote {per_class * num_classes} clips [{seq_len}, {dim}] {dtype} to {path}",
                       err=True)
    if legacy_path is not None:
        from feda2v_toolkit.runtime.atomic import atomic_open

        with atomic_open(legacy_path, "wb") as fh:
            fh.write(legacy_config_bytes())
        written["legacy_config"] = str(legacy_path)
        if not quiet:
            click.echo(f"feda2v-tk: wrote the legacy example config to {legacy_path}", err=True)
    if as_json:
        click.echo(json.dumps(written, indent=2))
