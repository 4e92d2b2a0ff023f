"""``feda2v-tk federate`` (train over several nodes' datasets with the Flower app) and ``feda2v-tk split``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from feda2v_toolkit.commands._options import SEED, schema_range
from feda2v_toolkit.commands._warnings import warnings_as_messages
from feda2v_toolkit.commands.train import training_options
from feda2v_toolkit.errors import UsageError
from feda2v_toolkit.federated import CONNECT_WAIT

FLOWER_MISSING = 'federated training needs Flower: pip install "feda2v-tk[federated]"'


def require_flower() -> None:
    try:
        import flwr  # noqa: F401
    except ImportError:
        raise UsageError(FLOWER_MISSING) from None


@click.command("federate")
@click.option("-n", "--node", "nodes", multiple=True, type=click.Path(path_type=Path),
              help="One node's dataset (repeat per node): it is read only by that node's ClientApp.")
@click.option("--superlink", metavar="HOST:PORT",
              help="Run on Flower's Deployment engine: submit to this SuperLink (its --port) and wait; the "
                   "nodes are the SuperNodes connected to it, each with its own data (no --node).")
@click.option("--min-nodes", type=click.IntRange(min=1), default=1, show_default=True,
              help="With --superlink: wait for this many SuperNodes before starting.")
@click.option("--wait", "wait_s", type=click.FloatRange(min=0, min_open=True), default=86_400.0,
              show_default=True, help="With --superlink: give up (and stop the run) after this many seconds.")
@click.option("--connect-wait", "connect_s", type=click.FloatRange(min=0), default=CONNECT_WAIT, show_default=True,
              help="With --superlink: keep trying a SuperLink that does not answer yet (still starting) this "
                   "many seconds.")
@click.option("--simulate", "simulate", type=click.IntRange(min=1, max=10_000), metavar="N",
              help="Run N virtual sites on Flower's Simulation Engine (Ray), dealing the clips of --data over "
                   "them (--by, --alpha); no --node.")
@click.option("-d", "--data", "sim_data", type=click.Path(path_type=Path), help="With --simulate: the dataset to deal.")
@click.option("--by", "sim_by", default="dirichlet", show_default=True, type=click.Choice(["class", "dirichlet"]),
              help="With --simulate: class ownership or Dirichlet(alpha) label skew (as split --by).")
@click.option("--alpha", "sim_alpha", default=0.3, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="With --simulate --by dirichlet: concentration (small = more skew).")
@click.option("--split-seed", default=0, show_default=True, type=SEED, help="With --simulate: seed of the deal.")
@click.option("--cpus-per-site", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="With --simulate: CPU cores Ray reserves for each running ClientApp.")
@click.option("-o", "--out", "out_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Model file to write (.safetensors), written only when the run completes.")
@click.option("--rounds", type=schema_range("federated_rounds", "federated.schema.json"),
              help="Overrides federated_rounds.")
@click.option("--local-epochs", type=schema_range("federated_local_epochs", "federated.schema.json"),
              help="Overrides federated_local_epochs.")
@click.option("--dp-noise", type=click.FloatRange(min=0, max=1e6),
              help="Node-level DP (a whole site is the unit; weight updates only): overrides "
                   "federated_dp_noise_multiplier (0 = off). For a clip's privacy use --dp-epsilon.")
@click.option("--dp-clip", type=click.FloatRange(min=0, min_open=True, max=1e12),
              help="Node-level DP: overrides federated_dp_clipping_norm.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True),
              help="Seconds to wait for the nodes in each stage (overrides federated_round_timeout).")
@training_options(epochs=False)
def federate_cmd(config_path: Path | None, nodes: tuple[Path, ...], superlink: str | None, min_nodes: int,
                 wait_s: float, connect_s: float, simulate: int | None, sim_data: Path | None, sim_by: str, sim_alpha: float,
                 split_seed: int, cpus_per_site: float, out_path: Path, rounds: int | None, local_epochs: int | None,
                 dp_noise: float | None, dp_clip: float | None, timeout: float | None, seed: int | None,
                 overwrite: bool, device: str, resume: bool, checkpoint_dir: Path | None, keep_checkpoints: bool,
                 metrics_path: Path | None,
                 progress: bool | None, as_json: bool, quiet: bool, learned_upsampling: bool | None,
                 **options: Any) -> None:
    """Train one model over several nodes' datasets with the Flower app; only releases move, never clips.

    The same training pipeline as train: every --node is one site, run in this process on Flower's
    in-process engine; with --simulate N, N virtual sites share --data on Flower's Simulation Engine; with
    --superlink, the SuperNodes of a running Flower Deployment engine are the sites (docs/federated.md). Prints a line per round, checkpoints after every round (--resume continues
    a killed run exactly) and writes one model file in the same format as train.
    """
    from feda2v_toolkit.commands.train import collect_overrides, report
    from feda2v_toolkit.errors import InputError
    from feda2v_toolkit.runtime.atomic import check_output

    require_flower()
    overrides: dict[str, Any] = {k: v for k, v in {
        "federated_rounds": rounds, "federated_local_epochs": local_epochs,
        "federated_dp_noise_multiplier": dp_noise, "federated_dp_clipping_norm": dp_clip}.items() if v is not None}
    overrides.update(collect_overrides(options, learned_upsampling=learned_upsampling))

    def say(msg: str) -> None:
        if not quiet:
            click.echo(f"feda2v-tk: {msg}", err=True)

    if simulate is not None:
        if nodes or superlink:
            raise UsageError("--simulate deals --data over virtual sites: drop --node and --superlink")
        if sim_data is None:
            raise UsageError("--simulate needs --data DATA (the dataset to deal over the virtual sites)")
        if not sim_data.exists():
            raise InputError(f"{sim_data}: no such dataset")
        from feda2v_toolkit.federated.simulation import federate_simulation

        with warnings_as_messages():
            model = federate_simulation(config_path if config_path is not None else {}, sim_data, sites=simulate,
                                        how=sim_by, alpha=sim_alpha, split_seed=split_seed, out=out_path, seed=seed,
                                        overrides=overrides, timeout=timeout, cpus_per_site=cpus_per_site,
                                        resume=resume, checkpoint_dir=checkpoint_dir,
                                        metrics_path=metrics_path or out_path.with_name(out_path.stem + ".metrics.jsonl"),
                                        log=say, overwrite=overwrite, keep_checkpoints=keep_checkpoints)
        report(model, out_path, say, as_json)
        return
    if sim_data is not None:
        raise UsageError("--data is for --simulate; real sites are given with --node")
    if superlink is not None:
        if nodes:
            raise UsageError("--superlink runs on the SuperNodes' own data: drop --node")
        check_output(out_path, overwrite=overwrite)
        _federate_deployed(superlink, config_path, out_path, min_nodes, wait_s, seed, timeout, quiet, as_json,
                           overrides, resume, checkpoint_dir, metrics_path, overwrite, keep_checkpoints, connect_s)
        return
    if len(nodes) < 1:
        raise UsageError("give at least one --node (or --superlink)")
    seen: dict[Path, Path] = {}
    for p in nodes:
        if not p.exists():
            raise InputError(f"{p}: no such dataset")
        real = p.resolve()
        if real in seen:
            raise UsageError(f"{p}: the same dataset as {seen[real]} (given twice); every node holds its own data")
        seen[real] = p
    if metrics_path is None:
        metrics_path = out_path.with_name(out_path.stem + ".metrics.jsonl")
    config: Any = config_path if config_path is not None else {}
    with warnings_as_messages():
        from feda2v_toolkit.federated.engine import federate_local

        model = federate_local(config, nodes, out=out_path, seed=seed, overrides=overrides, timeout=timeout,
                               resume=resume, checkpoint_dir=checkpoint_dir, metrics_path=metrics_path,
                               progress=progress, device=device, log=say, overwrite=overwrite,
                               keep_checkpoints=keep_checkpoints)
    report(model, out_path, say, as_json)


def _federate_deployed(superlink: str, config_path: Path | None, out_path: Path, min_nodes: int, wait_s: float,
                       seed: int | None, timeout: float | None, quiet: bool, as_json: bool,
                       overrides: dict[str, Any], resume: bool, checkpoint_dir: Path | None,
                       metrics_path: Path | None, overwrite: bool = False, keep_checkpoints: bool = False,
                       connect_s: float = CONNECT_WAIT) -> None:
    """``federate --superlink``: submit the app to a running SuperLink and wait for the run to finish."""
    from feda2v_toolkit.errors import InputError
    from feda2v_toolkit.federated.deploy import submit_and_wait

    if config_path is not None and not config_path.exists():
        raise InputError(f"{config_path}: no such config file")

    def say(msg: str) -> None:
        if not quiet:
            click.echo(f"feda2v-tk: {msg}", err=True)

    run_config: dict[str, Any] = {
        "config": str(config_path.resolve()) if config_path is not None else "", "out": str(out_path.resolve()),
        "seed": "" if seed is None else str(seed), "timeout": float(timeout or 0.0), "nodes": min_nodes,
        "overrides": json.dumps({k: v for k, v in overrides.items() if v is not None}), "resume": resume,
        "checkpoint-dir": str(checkpoint_dir.resolve()) if checkpoint_dir else "", "overwrite": overwrite,
        "keep-checkpoints": keep_checkpoints,
        "metrics": str((metrics_path or out_path.with_name(out_path.stem + ".metrics.jsonl")).resolve())}
    result = submit_and_wait(superlink, run_config, wait=wait_s, log=say, connect_wait=connect_s,
                             progress=lambda line: say(line[len("feda2v-tk: "):]))
    for line in result["log"]:
        say(line[len("feda2v-tk: "):])
    if as_json:
        click.echo(json.dumps({"out": run_config["out"], "run": result["run"]}, default=str))
