"""``feda2v-tk flow-nll``: exact held-out likelihood under a trained ``realnvp`` model.

Added to the CLI through the ``feda2v_register_commands`` hook. Only click is imported at module level;
torch and the model code load when the command runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click


def dataset_nll(model: Any, data: Any, *, batch_size: int = 64) -> dict[str, Any]:
    """Mean negative log-likelihood per element (nats, in the model's normalised space) of every
    sequence of ``data`` whose class the model knows, overall and per class.

    Sequences are reduced with the model's own reducer and normalised as in training, so the number
    is comparable with the training ``loss``.
    """
    import torch

    from feda2v_tk_flow.flow import RealNVPGenerator
    from feda2v_toolkit.data import Dataset, open_dataset
    from feda2v_toolkit.errors import UsageError

    if not all(isinstance(g, RealNVPGenerator) for g in model.generators.values()):
        raise UsageError(f"flow-nll needs a realnvp model; this one is {model.generator_type!r}")
    ds = data if isinstance(data, Dataset) else open_dataset(data)
    if ds.dim != model.dim or ds.seq_len != model.full_length:
        raise UsageError(f"data sequences are [{ds.seq_len}, {ds.dim}]; the model was trained on "
                         f"[{model.full_length}, {model.dim}]")
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    skipped = 0
    features = model.training_length * model.dim
    with torch.no_grad():
        for batch in ds.batches(batch_size):
            x = model.normalize(model.reducer(batch.embeddings.to(model.device)))
            for label in torch.unique(batch.labels).tolist():  # one log_prob call per class in the batch
                name = ds.class_names[label]
                rows = batch.labels == label
                key = model.class_to_generator.get(name)
                if key is None:
                    skipped += int(rows.sum())
                    continue
                gen = model.generators[key]
                n = int(rows.sum())
                labels = torch.full((n,), model.class_index(name), device=model.device)
                cond = None
                if batch.conditions is not None and gen.conditioning == "embedding":
                    cond = batch.conditions[rows].to(model.device)
                nll = -gen.log_prob(x[rows.to(x.device)], labels=labels, conditions=cond).double() / features
                sums[name] = sums.get(name, 0.0) + float(nll.sum())
                counts[name] = counts.get(name, 0) + n
    total = sum(counts.values())
    if total == 0:
        raise UsageError("no sequence of the data belongs to a class the model knows")
    return {"nll_per_element": sum(sums.values()) / total, "sequences": total, "skipped": skipped,
            "per_class": {c: sums[c] / counts[c] for c in sums}}


@click.command("flow-nll")
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("data_path", metavar="DATA", type=click.Path(path_type=Path))
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def flow_nll_cmd(model_path: Path, data_path: Path, batch_size: int, as_json: bool) -> None:
    """Exact held-out NLL per element of DATA under a realnvp MODEL (plugin feda2v-tk-flow).

    Lower is better; comparable with the training loss. Classes the model does not know are skipped.
    """
    from feda2v_toolkit.model import load_model

    result = dataset_nll(load_model(model_path), data_path, batch_size=batch_size)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"nll per element: {result['nll_per_element']:.5g} nats over {result['sequences']} sequences")
    for name, value in result["per_class"].items():
        click.echo(f"    {name}: {value:.5g}")
