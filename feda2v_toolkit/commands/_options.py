"""Options shared by every command, so that one idea has one spelling and one range everywhere.

The convention (checked for every registered command, plugin commands included, by
``tests/hardening/test_option_convention.py``; see docs/plugins.md):

* ``-o/--out`` names what a command writes;
* ``--json`` prints a machine-readable report on stdout (every command that reports);
* ``-q/--quiet`` silences status messages;
* ``--overwrite`` replaces an existing output;
* ``--seed`` takes an integer in ``[0, 2**31 - 1]`` (:data:`SEED`), default 0 where it is not drawn at random;
* ``--device`` is ``auto|cpu|cuda``, default ``auto`` (:data:`DEVICE`);
* ``-k/--samples-per-class`` is a number of samples per class or ``auto`` (:data:`SAMPLES`);
* ``--full-length`` is the full sequence length L, ``--test-fraction`` the share of real clips held out for
  testing, ``--progress/--no-progress`` shows progress on every long command (on unless ``-q``);
* ``--traceback`` (on ``feda2v-tk`` itself) shows tracebacks; ``-v`` is not used for it.
"""

from __future__ import annotations

import click

#: the range of every ``--seed`` option (what torch.manual_seed and numpy accept alike)
SEED = click.IntRange(0, 2**31 - 1)


def schema_range(key: str, schema_file: str = "feda2v-generator.schema.json") -> click.IntRange:
    """The range of an option that overrides the integer config key ``key``: the schema's minimum and maximum
    (the schema is the one source of bounds, so the option is refused with its own name, not the key's)."""
    from feda2v_toolkit.config import package_schema

    prop = package_schema(schema_file)["properties"][key]
    prop = next((s for s in prop.get("anyOf", ()) if s.get("type") == "integer"), prop)
    return click.IntRange(prop.get("minimum"), prop.get("maximum"))


#: the range of a sequence length (``--lengths``, ``--training-length``): the training length's in the schema
LENGTH = schema_range("generator_training_sequence_length")
#: the range of a full sequence length (``--full-length``): the output length's in the schema
FULL_LENGTH = schema_range("generator_output_sequence_length")
#: the range of an embedding or condition width (``--dim``): the widest a generator may be (``generator_hidden_dim``)
WIDTH = schema_range("generator_hidden_dim")


#: the choices of every ``--device`` option (default ``auto``: cuda when available)
DEVICE = click.Choice(["auto", "cpu", "cuda"])
DEVICE_HELP = "Where the model runs: auto (cuda when available), cpu or cuda."


class SamplesPerClass(click.ParamType):
    """A positive number of samples per class, or ``auto``."""

    name = "N|auto"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> int | str:
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
        text = str(value).strip()
        if text == "auto":
            return text
        try:
            n = int(text)
        except ValueError:
            self.fail(f"{value!r} is not a positive integer or 'auto'", param, ctx)
        if n < 1:
            self.fail(f"must be >= 1 (or 'auto'), got {n}", param, ctx)
        return n


#: the type of every ``-k/--samples-per-class`` option
SAMPLES = SamplesPerClass()


class Fraction(click.ParamType):
    """A share strictly between 0 and 1; anything else is a one-line ``feda2v-tk: error:`` naming the option."""

    name = "FRACTION"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> float:
        from feda2v_toolkit.errors import UsageError

        option = param.opts[0] if param is not None and param.opts else "the fraction"
        try:
            share = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise UsageError(f"{option} must be a number between 0 and 1, got {value!r}") from None
        if not 0 < share < 1:
            raise UsageError(f"{option} must be between 0 and 1 (exclusive), got {value}")
        return share


#: the type of every ``--test-fraction`` option: a share strictly between 0 and 1
FRACTION = Fraction()


class MemoryBudget(click.ParamType):
    """A size (:func:`feda2v_toolkit.runtime.sizes.parse_size`): ``2GiB``, ``1.5GB``, ``512MiB`` or bytes."""

    name = "SIZE"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> int:
        from feda2v_toolkit.errors import UsageError
        from feda2v_toolkit.runtime.sizes import parse_size

        if isinstance(value, int) and not isinstance(value, bool):
            return value
        try:
            return parse_size(str(value), option="--memory-budget")
        except UsageError as e:
            self.fail(str(e), param, ctx)


def _set_budget(_ctx: click.Context, _param: click.Parameter, value: int | None) -> None:
    from feda2v_toolkit.runtime.resources import set_memory_budget

    set_memory_budget(value)  # also when not given: each invocation's own (a notebook may invoke several)


#: every ``--memory-budget`` option: the process-wide budget (``FEDA2V_MEMORY_BUDGET`` when not given)
MEMORY_BUDGET_OPTION = click.option(
    "--memory-budget", type=MemoryBudget(), callback=_set_budget, expose_value=False, is_eager=True,
    help="Memory to plan for, e.g. 4GB or 512MiB (GB = 10^9 bytes, GiB = 2^30) [default: $FEDA2V_MEMORY_BUDGET, "
         "else 2 GiB]: training keeps a cache larger than a quarter of it in a temporary file; analyze keeps its "
         "reduced clips and training features within an eighth each (else in temporary files) and its held-out "
         "features within an eighth; evaluate keeps its Gram matrices within a quarter; generate upsamples a batch "
         "within half (in pieces; the same samples).")
