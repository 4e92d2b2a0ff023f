"""``feda2v-tk demo-data``: write the AST-shaped demo dataset (and the legacy example config)."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import click

from feda2v_toolkit.commands._options import SEED
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
              help="Clips per class (4 classes).")
@click.option("--classes", "num_classes", default=4, show_default=True, type=click.IntRange(1, 4))
@click.option("--seq-len", default=1214, show_default=True, type=click.IntRange(min=1))
@click.option("--dim", default=768, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", default=0, show_default=True, type=SEED,
              help="Fixes the dataset's structure and its clips.")
@click.option("--first-clip", default=0, show_default=True, type=click.IntRange(min=0),
              help="Index of the first clip: more clips of the same structure, e.g. a held-out set.")
@click.option("--dtype", default="float16", show_default=True, type=click.Choice(["float32", "float16", "bfloat16"]))
@click.option("--legacy-config", "legacy_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the example config of the original FedA2V code here (for `feda2v-tk migrate`); "
                   "without OUT, only the config is written.")
@click.option("--overwrite", is_flag=True, help="Replace OUT (and the --legacy-config file) if they exist.")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="Do not report what was written.")
def demo_data_cmd(out_arg: Path | None, out_opt: Path | None, per_class: int, num_classes: int, seq_len: int,
                  dim: int, seed: int, first_clip: int, dtype: str, legacy_path: Path | None, overwrite: bool,
                  as_json: bool, quiet: bool) -> None:
    """Write the demo dataset to OUT (a .safetensors file, or a directory of shards).

    Four sound classes with AST's token layout (2 summary tokens, 12 x 101 frequency-major patches);
    see `feda2v_toolkit.data.demo` for what distinguishes them.
    """
    if out_arg is not None and out_opt is not None:
        raise UsageError("give OUT or -o/--out, not both")
    out = out_arg if out_arg is not None else out_opt
    if out is None and legacy_path is None:
        raise UsageError("give OUT (or -o/--out), --legacy-config FILE, or both")
    for path in (out, legacy_path):
        if path is not None and path.exists() and path.is_file() and not overwrite:
            raise UsageError(f"{path} exists; choose another path, or pass --overwrite")
    if out is not None and out.exists() and out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"{out}: directory exists and is not empty; choose another path, or pass --overwrite")
    from feda2v_toolkit.runtime.atomic import atomic_open, check_writable

    for path in (out, legacy_path):
        if path is not None:
            check_writable(path)
    written: dict[str, object] = {}
    if legacy_path is not None:
        with atomic_open(legacy_path, "wb") as fh:
            fh.write(legacy_config_bytes())
        written["legacy_config"] = str(legacy_path)
        if not quiet:
            click.echo(f"feda2v-tk: wrote the legacy example config to {legacy_path}", err=True)
    if out is not None:
        from feda2v_toolkit.data.dataset import DTYPES
        from feda2v_toolkit.data.demo import write_demo_dataset

        path = write_demo_dataset(out, per_class, seq_len=seq_len, dim=dim, num_classes=num_classes, seed=seed,
                                  dtype=DTYPES[dtype], first_clip=first_clip, overwrite=overwrite)
        written.update(dataset=str(path), clips=per_class * num_classes, shape=[seq_len, dim], dtype=dtype)
        if not quiet:
            click.echo(f"feda2v-tk: wrote {per_class * num_classes} clips [{seq_len}, {dim}] {dtype} to {path}",
                       err=True)
    if as_json:
        click.echo(json.dumps(written, indent=2))
