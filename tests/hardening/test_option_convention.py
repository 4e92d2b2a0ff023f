"""One option convention, checked for every registered command (plugin commands included), so that
new commands are held to it automatically. See docs/plugins.md, "Command-line conventions"."""

from __future__ import annotations

import click
import pytest

from feda2v_toolkit.cli import COMMANDS, cli
from feda2v_toolkit.commands._options import SEED

#: built-in commands whose output is itself the machine-readable document (no separate --json report)
OUTPUT_IS_THE_DOCUMENT = {"schema"}


def _commands() -> dict[str, click.Command]:
    ctx = click.Context(cli)
    return {name: cli.get_command(ctx, name) for name in cli.list_commands(ctx)}


def _visible(cmd: click.Command) -> list[click.Option]:
    return [p for p in cmd.params if isinstance(p, click.Option) and not p.hidden]


def test_every_command_is_checked():
    assert set(COMMANDS) <= set(_commands())


@pytest.mark.parametrize("name", sorted(_commands()))
def test_every_command_follows_the_option_convention(name):
    cmd = _commands()[name]
    options = _visible(cmd)
    spelled = {opt: p for p in options for opt in p.opts + p.secondary_opts}
    problems = []
    for p in options:
        opts = set(p.opts)
        if opts & {"-v", "--verbose"}:
            problems.append(f"{p.opts}: -v/--verbose is not used; tracebacks are `feda2v-tk --traceback`")
        if opts & {"-o", "--out", "--output", "--output-dir", "--out-dir"} and set(p.opts) - {"-o", "--out"}:
            problems.append(f"{p.opts}: outputs are spelled -o/--out")
        if opts & {"-o", "--out"} and opts != {"-o", "--out"}:
            problems.append(f"{p.opts}: outputs are spelled -o/--out (both)")
        if opts & {"-q", "--quiet"} and opts != {"-q", "--quiet"}:
            problems.append(f"{p.opts}: quiet is spelled -q/--quiet")
        if "--json" in opts and not (p.is_flag and p.opts == ["--json"]):
            problems.append(f"{p.opts}: --json is a flag of its own")
        if "--format" in opts:
            problems.append(f"{p.opts}: machine-readable output is --json, not --format")
        if "--seed" in opts and not (isinstance(p.type, click.IntRange) and (p.type.min, p.type.max) ==
                                     (SEED.min, SEED.max)):
            problems.append(f"{p.opts}: --seed takes commands._options.SEED ([0, 2**31 - 1])")
        if "--force" in opts or "--replace" in opts:
            problems.append(f"{p.opts}: replacing outputs is --overwrite")
    if name in COMMANDS:  # the built-ins carry the whole set
        if "-q" not in spelled:
            problems.append("no -q/--quiet")
        if "--json" not in spelled and name not in OUTPUT_IS_THE_DOCUMENT:
            problems.append("no --json")
    assert not problems, f"{name}: " + "; ".join(problems)


def test_the_root_command_uses_traceback_not_v():
    visible = {opt for p in _visible(cli) for opt in p.opts}
    assert "--traceback" in visible and "-v" not in visible


def test_old_spellings_still_work_as_hidden_aliases(tmp_path, capsys):
    from tests.hardening.conftest import run_main

    cfg = tmp_path / "old.json"
    cfg.write_text('{"feda2v": {"generator_target_sequence_length": 1214}}')
    code, _, _ = run_main(["migrate", str(cfg), "--output", str(tmp_path / "new.json"), "-q"], capsys)
    assert code == 0 and (tmp_path / "new.json").exists()
    code, out, _ = run_main(["validate", str(tmp_path / "new.json"), "--format", "json", "-q"], capsys)
    assert code == 0 and out == ""
    code, out, _ = run_main(["validate", str(cfg), "--json"], capsys)
    assert code == 1 and out.startswith("{")


#: commands that run long enough to need --progress/--no-progress
LONG = {"train", "generate", "embed", "convert-data", "analyze", "evaluate", "privacy-tradeoff"}
#: commands whose --seed is drawn at random when omitted (and recorded in the model file), as their help says
RANDOM_SEED = {"train", "federate"}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_one_spelling_for_devices_samples_lengths_fractions_progress_and_seeds(name):
    from feda2v_toolkit.commands._options import DEVICE, FRACTION, SAMPLES

    cmd = _commands()[name]
    options = {opt: p for p in _visible(cmd) for opt in p.opts + p.secondary_opts}
    problems = []
    device = options.get("--device")
    if device is not None and (device.type is not DEVICE or device.default != "auto"):
        problems.append("--device is DEVICE (auto|cpu|cuda), default auto")
    if "-k" in options and options["-k"].type is not SAMPLES:
        problems.append("-k is -k/--samples-per-class of type SAMPLES (N or auto)")
    for spelling, better in (("--seq-len", "--full-length"), ("--holdout", "--test-fraction")):
        if spelling in options:
            problems.append(f"{spelling} is spelled {better} (the old spelling may stay as a hidden alias)")
    if "--test-fraction" in options and options["--test-fraction"].type is not FRACTION:
        problems.append("--test-fraction is of type FRACTION")
    if name in LONG and "--progress" not in options:
        problems.append("a long command has --progress/--no-progress")
    seed = options.get("--seed")
    if seed is not None and name not in RANDOM_SEED and (seed.default != 0 or "random" not in (seed.help or "")):
        problems.append("--seed defaults to 0 and says that it is not drawn at random")
    if seed is not None and name in RANDOM_SEED and (isinstance(seed.default, int) or "random" not in (seed.help or "")):
        problems.append("--seed of a training command is drawn at random when omitted, and says so")
    assert not problems, f"{name}: " + "; ".join(problems)


def test_the_old_spellings_of_lengths_and_fractions_still_work(tmp_path, capsys):
    from tests.hardening.conftest import run_main

    code, _, err = run_main(["demo-data", str(tmp_path / "d.safetensors"), "--per-class", "4", "--seq-len", "12",
                             "--dim", "4", "-q"], capsys)
    assert code == 0, err
    from feda2v_toolkit.data.open import open_dataset

    assert open_dataset(tmp_path / "d.safetensors").seq_len == 12
    code, out, err = run_main(["analyze", "-d", str(tmp_path / "d.safetensors"), "--lengths", "2", "--reducers",
                               "adaptive_avg", "--upsamplers", "linear", "--holdout", "0.5", "--json", "-q"], capsys)
    assert code == 0, err
    import json

    assert json.loads(out)["heldout"] == 8


@pytest.mark.parametrize(("argv", "message"), [
    (["demo-data", "x", "--dim", "70000"], "Invalid value for '--dim'"),
    (["train", "--no-such-option"], "No such option '--no-such-option'"),
    (["no-such-command"], "No such command 'no-such-command'"),
    (["train"], "Missing option '-d' / '--data'"),
    (["embed", "clips", "-o", "out", "--batch-size", "100000"], "Invalid value for '--batch-size'"),
])
def test_a_usage_error_is_one_line_naming_the_problem_and_where_help_is(argv, message, capsys):
    from tests.hardening.conftest import run_main

    code, out, err = run_main(argv, capsys)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    where = "feda2v-tk" if argv[0] == "no-such-command" else f"feda2v-tk {argv[0]}"
    assert err.startswith("feda2v-tk: error: ") and message in err and f"(see '{where} --help')" in err
