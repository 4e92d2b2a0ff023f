"""``feda2v-tk plan``, ``analyze``, ``evaluate`` and ``privacy-tradeoff``: measured answers (a thin layer over
:mod:`feda2v_toolkit.analysis`). torch is imported only when a command runs."""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from feda2v_toolkit.commands._options import (
    DEVICE,
    DEVICE_HELP,
    FRACTION,
    FULL_LENGTH,
    LENGTH,
    MEMORY_BUDGET_OPTION,
    SAMPLES,
    SEED,
    WIDTH,
    schema_range,
)
from feda2v_toolkit.errors import UsageError

#: ``plan --num-classes`` at most: the most classes a dataset without class names may have
MAX_PLAN_CLASSES = 100_000
#: ``--lengths`` lists at most this many lengths (each is a simulation or a measurement of its own)
MAX_LENGTHS = 64
#: ``plan --num-samples`` at most: a billion training sequences (far beyond any AST corpus; keeps plan's sizes finite)
MAX_PLAN_SAMPLES = 10**9


def _ints(option: str, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        out = [int(v) for v in value.replace(" ", "").split(",") if v]
    except ValueError:
        raise UsageError(f"{option}: expected comma-separated integers, got {value!r}") from None
    if not out:
        raise UsageError(f"{option}: give at least one value")
    if len(out) > MAX_LENGTHS:
        raise UsageError(f"{option}: at most {MAX_LENGTHS} lengths, got {len(out)}")
    bad = [v for v in out if not LENGTH.min <= v <= LENGTH.max]
    if bad:
        raise UsageError(f"{option}: lengths must be in [{LENGTH.min}, {LENGTH.max}] (those of "
                         f"generator_training_sequence_length), got {bad[0]}")
    return out


def _names(value: str | None) -> list[str] | None:
    names = [v.strip() for v in (value or "").split(",") if v.strip()]
    return names or None


def _clean(obj: Any) -> Any:
    """JSON-safe copy: NaN and infinities become null; tuple -> list; keys -> str."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _emit_json(doc: dict[str, Any]) -> None:
    click.echo(json.dumps(_clean(doc), indent=2, allow_nan=False))


@contextlib.contextmanager
def _no_warnings() -> Iterator[None]:
    """The measurement commands report on stdout/stderr themselves; library warnings are not shown."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _check_plot(plot_path: Path | None, inputs: list[Path | None], overwrite: bool) -> None:
    """Fail before the work, not after it, if a plot is asked for and matplotlib is missing or the plot
    file may not be written (the overwrite rule)."""
    if plot_path is not None:
        from feda2v_toolkit.analysis.plot import _pyplot
        from feda2v_toolkit.runtime.atomic import check_output

        check_output(plot_path, inputs=[p for p in inputs if p is not None], overwrite=overwrite)
        _pyplot()


def _report(result: Any, text: Callable[[Any], str], *, as_json: bool, plot_path: Path | None = None,
            plot: str = "", say: Callable[[str], None] | None = None) -> None:
    """Write the plot (``feda2v_toolkit.analysis.plot.<plot>``) if asked, then JSON or the text table."""
    if plot_path is not None:
        from feda2v_toolkit.analysis import plot as plots

        written = getattr(plots, plot)(result, plot_path)
        if say is not None:
            say(f"wrote {written}")
    if as_json:
        _emit_json(result.to_json())
    else:
        click.echo(text(result))


def _say(quiet: bool) -> Callable[[str], None]:
    def say(msg: str) -> None:
        if not quiet:
            click.echo(f"feda2v-tk: {msg}", err=True)

    return say


@click.command("plan")
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Experiment config (JSON); without it, the schema defaults are used.")
@click.option("--lengths", help="Comma-separated training lengths to tabulate, e.g. 4,8,16,32,64,1214 "
                                "[default: the configured one].")
@click.option("--memory-budget", help="Memory available for training, e.g. 8GB, 512MiB (GB = 10^9 bytes, "
                                      "GiB = 2^30): name the largest training length that fits.")
@click.option("-d", "--data", "data_path", type=click.Path(path_type=Path),
              help="Take D, the full length, the classes, conditions and sample count from this dataset.")
@click.option("--dim", type=WIDTH, help="Embedding width D [default: 768].")
@click.option("--full-length", type=FULL_LENGTH, help="Full sequence length L [default: 1214].")
@click.option("--num-classes", type=click.IntRange(0, MAX_PLAN_CLASSES),
              help="Classes (per_class generators, label conditioning) [default: the data's; without --data, 10 "
                   "are assumed and the report says so].")
@click.option("--condition-dim", type=click.IntRange(0, WIDTH.max),
              help="Width of per-sample condition embeddings [0].")
@click.option("--num-samples", type=click.IntRange(0, MAX_PLAN_SAMPLES),
              help="Training sequences: adds the trainer's reduced-data cache [default: 0, not counted].")
@click.option("--sample-batch", type=schema_range("synthetic_samples_per_class"),
              help="Samples generated at once [default: min(synthetic_samples_per_class, 64)].")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("-q", "--quiet", is_flag=True, help="No table; only the exit status (and errors).")
def plan_cmd(config_path: Path | None, lengths: str | None, memory_budget: str | None, data_path: Path | None,
             dim: int | None, full_length: int | None, num_classes: int | None, condition_dim: int | None,
             num_samples: int | None, sample_batch: int | None, as_json: bool, quiet: bool) -> None:
    """Exact parameter counts and training/generation memory of the configured generator per length.

    Parameters are counted on a meta-device model; memory is the simulated peak of real training steps
    on fake tensors (nothing is allocated). See docs/choosing-sequence-length.md.
    """
    from feda2v_toolkit.runtime.sizes import parse_size

    wanted = _ints("--lengths", lengths)
    budget = parse_size(memory_budget, option="--memory-budget") if memory_budget is not None else None
    shape: dict[str, Any] = {}  # what is not given: plan()'s defaults (the AST shape, 10 classes assumed)
    if data_path is not None:
        from feda2v_toolkit.data.open import open_dataset

        ds = open_dataset(data_path)
        shape.update(dim=ds.dim, full_length=ds.seq_len, num_classes=ds.num_classes,
                     condition_dim=ds.condition_dim, num_samples=len(ds), class_names=ds.class_names,
                     stored_itemsize=ds.storage_dtype.itemsize)
    given = {"dim": dim, "full_length": full_length, "num_classes": num_classes, "condition_dim": condition_dim,
             "num_samples": num_samples}
    shape.update({k: v for k, v in given.items() if v is not None})
    if num_classes is not None:  # an explicit class count replaces the data's classes
        shape.pop("class_names", None)

    from feda2v_toolkit.analysis.plan import plan
    from feda2v_toolkit.analysis.tables import plan_text

    with _no_warnings():
        result = plan(str(config_path) if config_path else None, lengths=wanted, memory_budget=budget,
                      sample_batch=sample_batch, **shape)
    if not quiet or as_json:
        _report(result, plan_text, as_json=as_json)


@click.command("analyze")
@click.option("-d", "--data", "data_path", required=True, type=click.Path(path_type=Path),
              help="Dataset: a .safetensors file, a directory of shards, or a legacy .pt cache.")
@click.option("--lengths", default="4,8,16,32,64", show_default=True, help="Comma-separated training lengths.")
@click.option("--reducers", help="Comma-separated reducer names [default: every registered one].")
@click.option("--upsamplers", help="Comma-separated upsampler names [default: every registered one].")
@click.option("--all-pairs", is_flag=True,
              help="Also pair non-positional reducers (pca) with interpolating upsamplers.")
@click.option("--test-fraction", default=0.25, show_default=True, type=FRACTION,
              help="Share of each class's clips held out for measuring (the rest fits reducers and upsamplers).")
@click.option("--holdout", "holdout_alias", type=FRACTION, hidden=True, help="Deprecated spelling of --test-fraction.")
@click.option("--seed", default=0, show_default=True, type=SEED,
              help="Seeds the held-out split (not drawn at random: the same seed, the same report).")
@click.option("--pool-positions", default=64, show_default=True, type=click.IntRange(min=1),
              help="Positions the classifier's features are pooled to.")
@click.option("--upsampler-epochs", default=1, show_default=True, type=click.IntRange(min=0),
              help="Cap on generator_upsampler_epochs for iterative trainable upsamplers (learned).")
@click.option("--max-clips", default=4096, show_default=True, type=click.IntRange(min=0),
              help="Analyse a seeded sample of at most this many clips, each class in proportion (bounds memory "
                   "and time; the report says when it samples); 0: every clip.")
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Config whose component settings to use [default: schema defaults].")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write a PNG plot here (needs matplotlib: pip install 'feda2v-tk[plot]').")
@click.option("--overwrite", is_flag=True, help="Replace the --plot file if it exists.")
@click.option("--progress/--no-progress", default=None,
              help="Progress: messages per phase, and off a terminal a line every 15 s while one runs "
                   "[default: on unless -q].")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress messages.")
@MEMORY_BUDGET_OPTION
def analyze_cmd(data_path: Path, lengths: str, reducers: str | None, upsamplers: str | None, all_pairs: bool,
                test_fraction: float, holdout_alias: float | None, seed: int, pool_positions: int,
                upsampler_epochs: int, max_clips: int, config_path: Path | None, plot_path: Path | None,
                overwrite: bool, progress: bool | None, as_json: bool, quiet: bool) -> None:
    """Measure what each reducer/upsampler pair keeps, per training length, on held-out data.

    R^2 and cosine of the reconstruction, downstream accuracy, and the linear optimum (position PCA)
    as the reference. See docs/choosing-sequence-length.md.
    """
    from feda2v_toolkit.runtime.malloc import one_arena

    one_arena()  # chunks stream through background threads: one heap for all of them
    wanted = _ints("--lengths", lengths)
    assert wanted is not None
    _check_plot(plot_path, [data_path, config_path], overwrite)
    from feda2v_toolkit.analysis.analyze import analyze
    from feda2v_toolkit.analysis.tables import analyze_text
    from feda2v_toolkit.runtime.progress import heartbeat

    say = _say(quiet)
    log, stop = heartbeat(say if progress is not False else None)
    try:
        with _no_warnings():
            result = analyze(data_path, wanted, reducers=_names(reducers), upsamplers=_names(upsamplers),
                             holdout=holdout_alias if holdout_alias is not None else test_fraction, seed=seed,
                             pool_positions=pool_positions, config=str(config_path) if config_path else None,
                             upsampler_epochs=upsampler_epochs, all_pairs=all_pairs,
                             max_clips=max_clips or None, log=log)
    finally:
        stop()
    _report(result, analyze_text, as_json=as_json, plot_path=plot_path, plot="plot_analysis", say=say)


@click.command("evaluate")
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-d", "--data", "data_path", required=True, type=click.Path(path_type=Path),
              help="Real data of the model's classes (held out from training, or see --split).")
@click.option("--split", type=click.Choice(["all", "heldout"]), default="all", show_default=True,
              help="all: every sequence of DATA is held-out real data; heldout: DATA is the training data "
                   "and only the sequences the trainer held out are used.")
@click.option("--train-data", "train_path", type=click.Path(path_type=Path),
              help="The model's training data (with --split all): runs the membership-inference audit and copy "
                   "detection, and measures usefulness by the standard protocol.")
@click.option("--test-fraction", default=0.5, show_default=True, type=FRACTION,
              help="Share of each class's real clips the downstream classifiers are tested on.")
@click.option("-k", "--samples-per-class", type=SAMPLES,
              help="Synthetic samples per class, or 'auto': as many as the class has real clips [default: auto].")
@click.option("--seed", default=0, show_default=True, type=SEED,
              help="Seeds the synthetic draws (as `generate --seed`) and the real train/test split (not drawn "
                   "at random).")
@click.option("--neighbours", default=5, show_default=True, type=click.IntRange(min=1),
              help="k of precision/recall/density/coverage.")
@click.option("--pool-positions", default=64, show_default=True, type=click.IntRange(min=1),
              help="Positions the classifier's features are pooled to.")
@click.option("--usefulness-draws", default=5, show_default=True, type=click.IntRange(min=1),
              help="Synthetic draws (seeds SEED, SEED+1, ...) the usefulness ratio is measured over.")
@click.option("--max-per-class", type=click.IntRange(min=2),
              help="Real sequences kept per class (a seeded uniform subset beyond) [default: 2000 per class, "
                   "4096 in all, at least 32 per class].")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write a PNG plot here (needs matplotlib: pip install 'feda2v-tk[plot]').")
@click.option("--overwrite", is_flag=True, help="Replace the --plot file if it exists.")
@click.option("--progress/--no-progress", default=None,
              help="Progress: messages per phase, and off a terminal a line every 15 s while one runs "
                   "[default: on unless -q].")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress messages.")
@MEMORY_BUDGET_OPTION
def evaluate_cmd(model_path: Path, data_path: Path, split: str, train_path: Path | None, test_fraction: float,
                 samples_per_class: int | str | None, seed: int, neighbours: int, pool_positions: int,
                 usefulness_draws: int, max_per_class: int | None, plot_path: Path | None, overwrite: bool,
                 progress: bool | None, as_json: bool, quiet: bool) -> None:
    """Measure a MODEL's synthetic samples against held-out real data of the same classes.

    Per class: Frechet distance, mean/covariance gaps, diversity, precision/recall, density/coverage;
    usefulness: train-on-synthetic / train-on-real accuracy (the standard protocol with the training data,
    over several synthetic draws); with the training data (--train-data, or --split heldout): a
    membership-inference audit (white-box and black-box attacks, AUC and TPR at low FPR) and copy detection
    (distance to the closest training record). See docs/evaluation.md.
    """
    from feda2v_toolkit.runtime.malloc import one_arena

    one_arena()  # chunks stream through background threads: one heap for all of them
    _check_plot(plot_path, [model_path, data_path, train_path], overwrite)
    from feda2v_toolkit.analysis.evaluate import evaluate
    from feda2v_toolkit.analysis.tables import evaluate_text
    from feda2v_toolkit.runtime.progress import heartbeat

    say = _say(quiet)
    log, stop = heartbeat(say if progress is not False else None)
    try:
        with _no_warnings():
            result = evaluate(model_path, data_path, split=split, train_data=train_path, test_fraction=test_fraction,
                              samples_per_class=None if samples_per_class == "auto" else samples_per_class,
                              seed=seed, neighbours=neighbours, pool_positions=pool_positions,
                              usefulness_seeds=usefulness_draws, max_per_class=max_per_class, log=log)
    finally:
        stop()
    _report(result, evaluate_text, as_json=as_json, plot_path=plot_path, plot="plot_evaluation", say=say)


@click.command("privacy-tradeoff")
@click.argument("data_path", metavar="DATA", type=click.Path(path_type=Path))
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Experiment config (JSON) to train with [default: schema defaults].")
@click.option("--epsilons", default="0.5,1,2,4,8,inf", show_default=True,
              help="Comma-separated target epsilons of record-level DP; 'inf' trains without DP.")
@click.option("--delta", "delta_text", metavar="DELTA",
              help="Target delta of every DP run, in (0, 1) [default: the config's generator_dp_delta, 1e-5].")
@click.option("--seeds", default=1, show_default=True, type=int,
              help="Models per epsilon (seeds SEED, SEED+1, ...: training, split and synthetic draws).")
@click.option("--seed", default=0, show_default=True, type=SEED,
              help="The first seed (not drawn at random: the same seed, the same split and training seeds).")
@click.option("--test-fraction", default=0.5, show_default=True, type=FRACTION,
              help="Share of each class's clips held out: the audit's non-members and the usefulness test clips.")
@click.option("--usefulness-draws", default=5, show_default=True, type=click.IntRange(min=1),
              help="Synthetic draws each usefulness ratio is averaged over.")
@click.option("--device", default="auto", show_default=True, type=DEVICE, help=DEVICE_HELP)
@click.option("-o", "--out", "out_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the JSON report here (atomically).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write a PNG plot here (needs matplotlib: pip install 'feda2v-tk[plot]').")
@click.option("--overwrite", is_flag=True, help="Replace the --out and --plot files if they exist.")
@click.option("--progress/--no-progress", default=None,
              help="Progress: a line per epsilon and seed, and off a terminal a line every 15 s while one runs "
                   "[default: on unless -q].")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress messages.")
def privacy_tradeoff_cmd(data_path: Path, config_path: Path | None, epsilons: str, delta_text: str | None,
                         seeds: int, seed: int, test_fraction: float, usefulness_draws: int, device: str,
                         out_path: Path | None, plot_path: Path | None, overwrite: bool, progress: bool | None,
                         as_json: bool, quiet: bool) -> None:
    """Train at each target epsilon and report usefulness and membership leakage side by side.

    DATA is split per class into a training part and a held-out part (--test-fraction); per epsilon (and
    seed) a model is trained with the config and record-level DP at that target (generator_dp_epsilon;
    'inf': none), then evaluated: usefulness (train-on-synthetic / train-on-real, standard protocol), the
    membership audit's strongest attack (AUC, TPR at FPR 1%), the spent epsilon the model records and
    the largest AUC the guarantee allows. See docs/privacy.md, "The trade-off on your data".
    """
    from feda2v_toolkit.analysis.tradeoff import check_delta, parse_epsilons

    targets = parse_epsilons(epsilons)
    delta = check_delta(delta_text) if delta_text is not None else None
    if seeds < 1:
        raise UsageError(f"--seeds must be >= 1, got {seeds}")
    inputs = [data_path, config_path]
    if out_path is not None and plot_path is not None and Path(out_path).resolve() == Path(plot_path).resolve():
        raise UsageError(f"{out_path}: --out and --plot name the same file")
    if out_path is not None:
        from feda2v_toolkit.runtime.atomic import check_output

        check_output(out_path, inputs=[p for p in inputs if p is not None], overwrite=overwrite)
    _check_plot(plot_path, inputs, overwrite)
    from feda2v_toolkit.analysis.tables import tradeoff_text
    from feda2v_toolkit.analysis.tradeoff import privacy_tradeoff
    from feda2v_toolkit.runtime.progress import heartbeat

    say = _say(quiet)
    log, stop = heartbeat(say if progress is not False else None)
    try:
        with _no_warnings():
            result = privacy_tradeoff(str(config_path) if config_path else None, data_path, targets, delta=delta,
                                      seeds=seeds, seed=seed, test_fraction=test_fraction,
                                      usefulness_draws=usefulness_draws, device=device, log=log)
    finally:
        stop()
    _report(result, tradeoff_text, as_json=as_json, plot_path=plot_path, plot="plot_tradeoff", say=say)
    if out_path is not None:
        from feda2v_toolkit.runtime.atomic import atomic_write_text

        atomic_write_text(out_path, json.dumps(_clean(result.to_json()), indent=2, allow_nan=False) + "\n")
        say(f"wrote {out_path}")
