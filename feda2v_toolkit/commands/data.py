"""``feda2v-tk demo-data``: write the AST-shaped demo dataset."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("demo-data")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--per-class", default=24, show_default=True, type=click.IntRange(min=1),
              help="Clips per class (4 classes).")
@click.option("--classes", "num_classes", default=4, show_default=True, type=click.IntRange(1, 4))
@click.option("--seq-len", default=1214, show_default=True, type=click.IntRange(min=1))
@click.option("--dim", default=768, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**31 - 1),
              help="Fixes the dataset's structure and its clips.")
@click.option("--first-clip", default=0, show_default=True, type=click.IntRange(min=0),
              help="Index of the first clip: more clips of the same structure, e.g. a held-out set.")
@click.option("--dtype", default="float16", show_default=True, type=click.Choice(["float32", "float16", "bfloat16"]))
@click.option("-q", "--quiet", is_flag=True, help="Do not report what was written.")
def demo_data_cmd(out: Path, per_class: int, num_classes: int, seq_len: int, dim: int, seed: int, first_clip: int,
                  dtype: str, quiet: bool) -> None:
    """Write the demo dataset to OUT (a .safetensors file, or a directory of shards).

    Four sound classes with AST's token layout (2 summary tokens, 12 x 101 frequency-major patches);
    see `feda2v_toolkit.demo` for what distinguishes them.
    """
    from feda2v_toolkit.data import DTYPES
    from feda2v_toolkit.demo import write_demo_dataset

    if out.exists() and out.is_file():
        raise click.UsageError(f"{out} exists; choose another path or remove it")
    path = write_demo_dataset(out, per_class, seq_len=seq_len, dim=dim, num_classes=num_classes, seed=seed,
                              dtype=DTYPES[dtype], first_clip=first_clip)
    if not quiet:
        click.echo(f"feda2v-tk: wrote {per_class * num_classes} clips [{seq_len}, {dim}] {dtype} to {path}",
                   err=True)
