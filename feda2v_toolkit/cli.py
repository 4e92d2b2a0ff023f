"""The ``feda2v-tk`` command line: a thin click layer over the Python API.

Sub-commands live in :mod:`feda2v_toolkit.commands` and are imported only when used, so ``--help``,
``--version`` and the config commands never import torch. Errors the user can fix
(:class:`~feda2v_toolkit.errors.ToolkitError`) are printed on one line; ``--traceback`` shows more.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from typing import Any

import click

from feda2v_toolkit import __version__
from feda2v_toolkit.errors import Terminated, ToolkitError, cli_caller, environment_error, plain

#: command name -> "module:attribute" (imported on demand).
COMMANDS: dict[str, str] = {
    "validate": "feda2v_toolkit.commands.config:validate_cmd",
    "migrate": "feda2v_toolkit.commands.config:migrate_cmd",
    "schema": "feda2v_toolkit.commands.config:schema_cmd",
    "train": "feda2v_toolkit.commands.train:train_cmd",
    "federate": "feda2v_toolkit.commands.federated:federate_cmd",
    "split": "feda2v_toolkit.commands.split:split_cmd",
    "generate": "feda2v_toolkit.commands.model:generate_cmd",
    "inspect": "feda2v_toolkit.commands.model:inspect_cmd",
    "convert": "feda2v_toolkit.commands.convert:convert_cmd",
    "demo-data": "feda2v_toolkit.commands.data:demo_data_cmd",
    "embed": "feda2v_toolkit.commands.embed:embed_cmd",
    "convert-data": "feda2v_toolkit.commands.embed:convert_data_cmd",
    "plan": "feda2v_toolkit.commands.analysis:plan_cmd",
    "analyze": "feda2v_toolkit.commands.analysis:analyze_cmd",
    "evaluate": "feda2v_toolkit.commands.analysis:evaluate_cmd",
    "privacy-tradeoff": "feda2v_toolkit.commands.analysis:privacy_tradeoff_cmd",
    "plugins": "feda2v_toolkit.commands.plugins:plugins_cmd",
    "list": "feda2v_toolkit.commands.plugins:list_cmd",
}

#: one-line help for each built-in command, so ``--help`` does not import the command modules.
SHORT_HELP: dict[str, str] = {
    "validate": "Validate experiment configs against the schema.",
    "migrate": "Migrate deprecated config keys to the current schema.",
    "schema": "Print the combined JSON Schema (core plus plugins).",
    "train": "Reduce sequences, train a generator, export it as safetensors.",
    "federate": "Train one model over several nodes' datasets with the Flower app.",
    "split": "Partition a dataset into one dataset per node (class or Dirichlet).",
    "generate": "Sample a trained model and write the samples as safetensors shards.",
    "inspect": "Show a model file's metadata, parameter counts and metrics.",
    "convert": "Import a checkpoint of the original FedA2V code.",
    "demo-data": "Write the bundled AST-shaped demo dataset.",
    "embed": "Embed audio clips with an Audio Spectrogram Transformer into a dataset.",
    "convert-data": "Write any readable dataset (e.g. the original code's caches) as shards.",
    "plan": "Exact parameter counts and memory for training lengths.",
    "analyze": "Measure information kept by reducer/upsampler pairs per length.",
    "evaluate": "Measure synthetic samples against held-out real data.",
    "privacy-tradeoff": "Train at several DP epsilons; usefulness vs membership leakage.",
    "plugins": "List plugins, what they register and load failures.",
    "list": "List registered generators, reducers or upsamplers.",
}

_STATE: dict[str, Any] = {"traceback": bool(os.environ.get("FEDA2V_TRACEBACK"))}


class LazyGroup(click.Group):
    """A click group whose built-in commands are imported on first use, plus plugin commands.

    Plugin commands (hook ``feda2v_register_commands``) are added when the command list is needed
    (``--help``, an unknown name, ``feda2v-tk plugins``); a failing hook is recorded against its plugin
    and never takes the CLI down, and built-in command names cannot be taken over.
    """

    def load_plugin_commands(self) -> None:
        from feda2v_toolkit.plugins import get_registry

        get_registry().add_commands(self, reserved=COMMANDS)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self.load_plugin_commands()
        return sorted(set(COMMANDS) | set(self.commands))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is not None:
            module_name, attr = target.split(":")
            return _progress_follows_options(getattr(importlib.import_module(module_name), attr))
        self.load_plugin_commands()
        cmd = self.commands.get(cmd_name)
        return _progress_follows_options(cmd) if cmd is not None else None

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            if name in SHORT_HELP:
                rows.append((name, SHORT_HELP[name]))
            else:
                cmd = self.commands.get(name)
                if cmd is not None and not cmd.hidden:
                    rows.append((name, cmd.get_short_help_str(limit=60)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def _progress_follows_options(cmd: click.Command) -> click.Command:
    """Run ``cmd`` with the process-wide progress default of its options: ``--no-progress`` or ``-q`` turn
    off the progress of every phase inside it (component fits, plugins), ``--progress`` turns it on."""
    if getattr(cmd, "_feda2v_progress", False):
        return cmd
    original = cmd.invoke

    def invoke(ctx: click.Context) -> Any:
        from feda2v_toolkit.runtime.progress import configured

        shown = ctx.params.get("progress")
        if shown is None and ctx.params.get("quiet"):
            shown = False
        with configured(shown if isinstance(shown, bool) else None):
            return original(ctx)

    cmd.invoke = invoke  # type: ignore[method-assign]
    cmd._feda2v_progress = True  # type: ignore[attr-defined]
    return cmd


def _plugin_option(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    """Apply a plugin switch as soon as it is parsed (eager), so that ``--help`` honours it too."""
    if not value:
        return
    from feda2v_toolkit import plugins

    if param.name == "strict_plugins":
        plugins.configure(strict=True)
    elif param.name == "no_plugins":
        plugins.configure(autoload=False)
    elif param.name == "allow_plugins":
        plugins.configure(allow=list(value))
    elif param.name == "block_plugins":
        plugins.configure(also_block=list(value))


def _plugin_switch(*decls: str, **kwargs: Any) -> Any:
    return click.option(*decls, is_eager=True, expose_value=False, callback=_plugin_option, **kwargs)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="feda2v-tk")
@click.option("--traceback", "traceback_", is_flag=True, help="Show full tracebacks for errors.")
@click.option("-v", "--verbose", "verbose", is_flag=True, hidden=True,
              help="Deprecated spelling of --traceback.")
@_plugin_switch("--strict-plugins", is_flag=True,
                help="Make any plugin load problem fatal (also FEDA2V_STRICT_PLUGINS=1).")
@_plugin_switch("--no-plugins", is_flag=True,
                help="Do not autoload installed plugins (also FEDA2V_DISABLE_PLUGIN_AUTOLOAD=1).")
@_plugin_switch("--allow-plugin", "allow_plugins", multiple=True, metavar="NAME",
                help="Load only these installed plugins, by plugin or distribution name (repeatable; "
                     "replaces FEDA2V_PLUGINS=a,b).")
@_plugin_switch("--block-plugin", "block_plugins", multiple=True, metavar="NAME",
                help="Do not load this plugin (repeatable; adds to FEDA2V_BLOCK_PLUGINS=a,b).")
def cli(traceback_: bool, verbose: bool) -> None:
    """feda2v-tk: trusted configs, working generators and plugins for FedA2V audio-embedding sequences."""
    if traceback_ or verbose:
        _STATE["traceback"] = True


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    """Plugin warnings as one ``feda2v-tk: warning:`` line; others as Python shows them."""
    if category.__name__ == "PluginWarning":
        click.echo(f"feda2v-tk: warning: {message}", err=True)
        return
    _DEFAULT_SHOWWARNING(message, category, filename, lineno, file, line)


_DEFAULT_SHOWWARNING = warnings.showwarning


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated()


def handle_sigterm() -> Any:
    """Handle SIGTERM like Ctrl-C, so that every cleanup (partial outputs, temporaries) runs; return the
    previous handler (``None`` off the main thread, where signals cannot be handled)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _terminate)


def _restore_sigterm(previous: Any) -> None:
    if previous is not None:
        import signal

        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the CLI, turning user errors into one line and an exit code."""
    warnings.showwarning = _show_warning
    previous = handle_sigterm()
    try:
        with cli_caller():  # messages name command-line options (--overwrite), not Python arguments
            _run(argv)
    finally:  # main() may be called in-process (tests, notebooks): leave the host's handler as it was
        _restore_sigterm(previous)


def _run(argv: list[str] | None) -> None:
    try:
        rc = cli.main(args=argv, prog_name="feda2v-tk", standalone_mode=False)
    except Terminated:
        click.echo("feda2v-tk: terminated", err=True)
        sys.exit(143)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.UsageError as exc:  # one line, like every other error: the problem, then where help is
        where = exc.ctx.command_path if exc.ctx is not None else "feda2v-tk"
        click.echo(f"feda2v-tk: error: {plain(exc.format_message()).rstrip('.')} (see '{where} --help')", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.Abort as exc:
        if isinstance(exc.__cause__, Terminated):  # click turns KeyboardInterrupt into Abort
            click.echo("feda2v-tk: terminated", err=True)
            sys.exit(143)
        if isinstance(exc.__cause__, EOFError):  # ... and EOFError too: a bug of ours, not the user's Ctrl-C
            if _STATE["traceback"]:
                raise exc.__cause__ from None
            click.echo(f"feda2v-tk: internal error: EOFError: {exc.__cause__} (run with --traceback for details)",
                       err=True)
            sys.exit(1)
        click.echo("feda2v-tk: aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("feda2v-tk: interrupted", err=True)
        sys.exit(130)
    except ToolkitError as exc:
        if _STATE["traceback"]:
            import traceback

            traceback.print_exc()
        click.echo(f"feda2v-tk: error: {plain(str(exc))}", err=True)
        sys.exit(exc.exit_code)
    except BrokenPipeError:
        sys.stderr.close()
        sys.exit(1)
    except Exception as exc:
        if _STATE["traceback"]:
            raise
        handled = environment_error(exc)
        if handled is not None:
            click.echo(f"feda2v-tk: error: {handled}", err=True)
            sys.exit(handled.exit_code)
        click.echo(f"feda2v-tk: internal error: {type(exc).__name__}: {plain(str(exc))} (run with --traceback for "
                   "details)", err=True)
        sys.exit(1)
    except SystemExit:
        raise
    except BaseException as exc:  # GeneratorExit or a custom BaseException, raised by a plugin's code
        if _STATE["traceback"]:
            raise
        click.echo(f"feda2v-tk: error: {_base_exception_origin(exc)} raised {type(exc).__name__}"
                   f"{': ' + str(exc) if str(exc) else ''}; the command stopped (run with --traceback for details)",
                   err=True)
        sys.exit(1)
    sys.exit(rc if isinstance(rc, int) else 0)


def _base_exception_origin(exc: BaseException) -> str:
    """Which code raised ``exc``: the module of the innermost frame outside feda2v_toolkit, click and Python."""
    import traceback

    origin = "code outside feda2v-tk"
    for frame in traceback.extract_tb(exc.__traceback__):
        module = frame.filename.replace(os.sep, "/")
        stdlib = "/lib/python" in module and "site-packages" not in module
        if "/feda2v_toolkit/" in module or "/click/" in module or stdlib:
            continue
        origin = f"{frame.filename}:{frame.lineno}"
    return origin
