"""A plugin can never take the CLI down: sys.exit, KeyboardInterrupt, printing or a slow import."""

from __future__ import annotations

import json
import sys

import pytest

from feda2v_toolkit import plugins
from feda2v_toolkit.plugins import discovery
from tests.plugin_fakes import fake_distribution, run_cli

HOSTILE = {
    "exits": "import sys\nsys.exit(3)\n",
    "interrupts": "raise KeyboardInterrupt\n",
    "prints": "print('hello from a chatty plugin')\n",
    "slow": "import time\ntime.sleep(0.3)\n",
}


@pytest.fixture
def hostile_site(tmp_path, monkeypatch):
    path = tmp_path / "site"
    for name, source in HOSTILE.items():
        fake_distribution(path, f"feda2v-tk-{name}", "1.0", {name: f"{name}_plugin"}, {f"{name}_plugin": source})
        monkeypatch.delitem(sys.modules, f"{name}_plugin", raising=False)
    monkeypatch.syspath_prepend(str(path))
    for var in (plugins.ENV_ALLOW, plugins.ENV_BLOCK, plugins.ENV_STRICT, plugins.ENV_DISABLE_AUTOLOAD):
        monkeypatch.delenv(var, raising=False)
    return path


def test_exit_and_interrupt_on_import_are_recorded_failures_and_printing_goes_to_stderr(hostile_site, monkeypatch,
                                                                                         capsys):
    monkeypatch.setattr(discovery, "SLOW_IMPORT_SECONDS", 0.2)
    with pytest.warns(plugins.PluginWarning) as caught:
        reg = plugins.load_registry(autoload=True)
    assert reg.plugin("exits").status == "failed"
    assert "called sys.exit(3)" in reg.plugin("exits").error
    assert reg.plugin("interrupts").status == "failed"
    assert "KeyboardInterrupt" in reg.plugin("interrupts").error
    assert reg.plugin("prints").status == "loaded"
    out, err = capsys.readouterr()
    assert "chatty" not in out and "chatty" in err
    slow = [str(w.message) for w in caught if "to import" in str(w.message)]
    assert len(slow) == 1 and "plugin 'slow'" in slow[0] and "--block-plugin slow" in slow[0]


def test_the_cli_works_and_its_json_stays_clean_with_hostile_plugins_installed(hostile_site):
    help_run = run_cli("--help", site=hostile_site)
    assert help_run.returncode == 0 and "Commands" in help_run.stdout
    for args in (["plugins", "--json"], ["schema"]):
        result = run_cli(*args, site=hostile_site)
        assert result.returncode == 0, result.stderr
        json.loads(result.stdout)  # nothing the plugins printed got into it
        assert "aborted" not in result.stderr and "internal error" not in result.stderr


BASE_EXCEPTIONS = {
    "closes": "raise GeneratorExit('closing')\n",
    "custom": "class Boom(BaseException):\n    pass\n\nraise Boom('a BaseException of its own')\n",
}


def test_generator_exit_and_custom_base_exceptions_on_import_are_recorded_failures(tmp_path, monkeypatch):
    site = tmp_path / "site"
    for name, source in BASE_EXCEPTIONS.items():
        fake_distribution(site, f"feda2v-tk-{name}", "1.0", {name: f"{name}_plugin"}, {f"{name}_plugin": source})
        monkeypatch.delitem(sys.modules, f"{name}_plugin", raising=False)
    monkeypatch.syspath_prepend(str(site))
    with pytest.warns(plugins.PluginWarning):
        reg = plugins.load_registry(autoload=True)
    assert reg.plugin("closes").status == "failed" and "GeneratorExit: closing" in reg.plugin("closes").error
    assert reg.plugin("custom").status == "failed" and "Boom: a BaseException of its own" in reg.plugin("custom").error
    for args in (["list", "generators", "-q"], ["plugins", "--json"]):
        result = run_cli(*args, site=site)
        assert result.returncode == 0 and "Traceback" not in result.stderr, (args, result.stderr)


def test_a_base_exception_raised_while_a_plugin_command_runs_is_one_line(tmp_path, monkeypatch):
    source = '''
    import click
    from feda2v_toolkit import hookimpl


    class Boom(BaseException):
        pass


    @hookimpl
    def feda2v_register_commands(cli):
        @cli.command("boom")
        def boom():
            """Raise a BaseException of its own."""
            raise Boom("boom")

        @cli.command("close")
        def close():
            """Raise GeneratorExit."""
            raise GeneratorExit
    '''
    site = tmp_path / "site"
    fake_distribution(site, "feda2v-tk-runtime", "1.0", {"runtime": "runtime_plugin"}, {"runtime_plugin": source})
    for command, name in (("boom", "Boom: boom"), ("close", "GeneratorExit")):
        result = run_cli(command, site=site)
        assert result.returncode == 1, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and f"raised {name}" in lines[0] and "runtime_plugin.py" in lines[0], lines
