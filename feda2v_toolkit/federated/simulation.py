"""Many virtual sites on one machine with Flower's Simulation Engine (``flwr.simulation``, Ray backend).

``feda2v-tk federate --simulate N --data DATA`` deals the clips of one dataset over ``N`` virtual SuperNodes
(by class, or with Dirichlet(alpha) label skew: :func:`feda2v_toolkit.data.split.assign`) and runs the same
ServerApp and ClientApp handlers as a real federation, with Ray scheduling the ClientApps over the machine's
cores (``cpus_per_site`` each). Every virtual site reads its own rows of DATA lazily; nothing is copied. For
experiments with tens to hundreds of sites: docs/federated.md has measured wall time and memory.
Needs ``pip install "feda2v-tk[simulation]"`` (Flower's simulation extra: Ray).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from feda2v_toolkit.errors import UsageError

SIMULATION_MISSING = 'the simulation engine needs Ray: pip install "feda2v-tk[simulation]"'

#: per process: (dataset path, sites, how, alpha, seed) -> (dataset, site of every row)
_PARTITIONS: dict[tuple[Any, ...], tuple[Any, Any]] = {}


def partition(data: str, sites: int, how: str, alpha: float, seed: int) -> tuple[Any, Any]:
    """The dataset and the site index of each of its rows (computed once per process)."""
    key = (str(data), sites, how, alpha, seed)
    if key not in _PARTITIONS:
        from feda2v_toolkit.data.open import open_dataset
        from feda2v_toolkit.data.split import assign

        ds = open_dataset(data)
        _PARTITIONS[key] = (ds, assign(ds.labels, ds.num_classes, sites, how=how, alpha=alpha, seed=seed,
                                       option="--simulate"))
    return _PARTITIONS[key]


def simulation_client_app(data: str, sites: int, how: str, alpha: float, seed: int) -> Any:
    """A ClientApp whose virtual SuperNode ``partition-id`` ``p`` is the site holding the rows dealt to ``p``."""
    from flwr.clientapp import ClientApp

    from feda2v_toolkit.federated.app import register_stages, site_index
    from feda2v_toolkit.training.site import Site
    from feda2v_toolkit.training.spec import RunSpec

    def make_site(meta: Mapping[str, Any], context: Any) -> Site:
        ds, owner = partition(data, sites, how, alpha, seed)
        pid = int(context.node_config["partition-id"])
        view = ds.subset((owner == pid).nonzero().flatten(), name=f"{Path(data).name}#{pid}")
        return Site(view, RunSpec.from_section(meta["config"]), site_index(meta))

    return register_stages(ClientApp(), make_site)


def federate_simulation(config: Any, data: str | os.PathLike[str], *, sites: int, how: str = "dirichlet",
                        alpha: float = 0.3, split_seed: int = 0, out: str | os.PathLike[str] | None = None,
                        seed: int | None = None, overrides: Mapping[str, Any] | None = None,
                        timeout: float | None = None, cpus_per_site: float = 1.0, resume: bool = False,
                        checkpoint_dir: str | os.PathLike[str] | None = None,
                        metrics_path: str | os.PathLike[str] | None = None,
                        log: Callable[[str], None] | None = None, overwrite: bool = False,
                        keep_checkpoints: bool = False) -> Any:
    """Train over ``sites`` virtual sites holding a split of ``data`` on Flower's Simulation Engine; returns the
    model (written to ``out`` when given)."""
    try:
        import ray
        from flwr.serverapp import ServerApp
        from flwr.simulation import run_simulation
    except ImportError:
        raise UsageError(SIMULATION_MISSING) from None
    from feda2v_toolkit.data.open import open_dataset
    from feda2v_toolkit.data.split import assign
    from feda2v_toolkit.errors import InputError
    from feda2v_toolkit.federated.app import FlowerTransport, wait_for_nodes
    from feda2v_toolkit.federated.run import federate
    from feda2v_toolkit.training.pipeline import check_outputs

    check_outputs(out, metrics_path, None, inputs=[data], overwrite=overwrite, resume=resume)  # before Ray starts
    ds = open_dataset(data)  # fail here, in one line, rather than in every virtual site
    owner = assign(ds.labels, ds.num_classes, sites, how=how, alpha=alpha, seed=split_seed, option="--simulate")
    empty = [i for i in range(sites) if not bool((owner == i).any())]
    if empty:
        raise InputError(f"{data}: {len(empty)} of {sites} sites would get no clips ({len(ds)} clips); use fewer "
                         f"sites or a larger --alpha")
    result: dict[str, Any] = {}
    server = ServerApp()

    @server.main()
    def _main(grid: Any, context: Any) -> None:
        try:
            nodes = wait_for_nodes(grid, sites, 120)
            if len(nodes) < sites:
                raise UsageError(f"only {len(nodes)} of {sites} virtual sites started")
            result["model"] = federate(config, FlowerTransport(grid, nodes, timeout), out=out, seed=seed,
                                       overrides=overrides, engine="simulation", resume=resume,
                                       checkpoint_dir=checkpoint_dir, metrics_path=metrics_path, log=log,
                                       overwrite=overwrite, inputs=[data], keep_checkpoints=keep_checkpoints)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread below
            result["error"] = exc

    backend = {"client_resources": {"num_cpus": cpus_per_site, "num_gpus": 0.0},
               "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False, "log_to_driver": False}}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)  # Ray's helper processes outlive the run by a moment
        try:
            run_simulation(server_app=server, client_app=simulation_client_app(str(data), sites, how, alpha, split_seed),
                           num_supernodes=sites, backend_config=backend)
        finally:
            ray.shutdown()
    if "error" in result:
        raise result["error"]
    if "model" not in result:
        raise UsageError("the simulation ended without a model (see Flower's log above)")
    return result["model"]
