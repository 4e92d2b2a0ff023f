"""``feda2v-tk split``: partition a dataset into one dataset per node (no Flower needed)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from feda2v_toolkit.commands._options import SEED


@click.command("split")
@click.argument("data", type=click.Path(exists=True, path_type=Path))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for the node datasets (node0.safetensors, node1.safetensors, ...); other files in it "
                   "are left alone.")
@click.option("--nodes", "num_nodes", required=True, type=click.IntRange(min=1), help="Number of nodes.")
@click.option("--by", "how", default="class", show_default=True, type=click.Choice(["class", "dirichlet"]),
              help="class: each class lives on one node (round-robin, as FedA2V's nodes had); dirichlet: every "
                   "class spread over the nodes with Dirichlet(alpha) proportions (label skew).")
@click.option("--alpha", default=0.3, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Concentration of --by dirichlet (small = more skew).")
@click.option("--seed", default=0, show_default=True, type=SEED,
              help="Seeds the assignment (not drawn at random: the same seed writes the same bytes).")
@click.option("--overwrite", is_flag=True, help="Replace existing node files in OUT.")
@click.option("--json", "as_json", is_flag=True, help="Print per-node class counts as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="Do not report what was written.")
def split_cmd(data: Path, out_dir: Path, num_nodes: int, how: str, alpha: float, seed: int, overwrite: bool,
              as_json: bool, quiet: bool) -> None:
    """Partition dataset DATA into one dataset per node, for federated experiments."""
    from feda2v_toolkit.runtime.malloc import one_arena

    one_arena()  # chunks stream through background threads: one heap for all of them
    from feda2v_toolkit.data.split import split_dataset

    result = split_dataset(data, out_dir, num_nodes, how=how, alpha=alpha, seed=seed, overwrite=overwrite)
    if as_json:
        click.echo(json.dumps(result))
    elif not quiet:
        for node in result["nodes"]:
            counts = ", ".join(f"{c} {n}" for c, n in node["classes"].items())
            click.echo(f"feda2v-tk: {node['path']}: {node['clips']} clips ({counts})", err=True)
