"""`feda2v-tk plugins`, `feda2v-tk list` and the plugin switches of the CLI, in fresh processes."""

from __future__ import annotations

import json

import pytest
from plugin_fakes import BOOM_PLUGIN, HELLO_PLUGIN, fake_distribution, run_cli, statuses


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Two fake installed distributions: feda2v-tk-hello 1.2.3 (good, adds `hello`) and feda2v-tk-boom 0.9
    (fails to import)."""
    path = tmp_path_factory.mktemp("site")
    fake_distribution(path, "feda2v-tk-hello", "1.2.3", {"hello": "hello_plugin"}, {"hello_plugin": HELLO_PLUGIN})
    fake_distribution(path, "feda2v-tk-boom", "0.9", {"boom": "boom_plugin"}, {"boom_plugin": BOOM_PLUGIN})
    return path


def plugins_json(*args: str, **kwargs) -> dict:
    proc = run_cli(*args, "plugins", "--json", **kwargs)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


# -- no torch -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [
    ("--help",), ("--version",), ("plugins",), ("plugins", "--json"), ("list", "generators"),
    ("list", "reducers", "--json"), ("list", "upsamplers"), ("hello",), ("plugins", "--help"),
])
def test_help_plugins_and_list_never_import_torch(args, site):
    proc = run_cli(*args, site=site, check_torch=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.rstrip().endswith("TORCH-FREE"), proc.stderr


# -- plugins ---------------------------------------------------------------------------------------------

def test_plugins_json_lists_every_plugin_with_distribution_version_registrations_and_failures(site):
    out = plugins_json(site=site)
    assert out["entry_point_group"] == "feda2v_toolkit.plugins" and out["api_version"] >= 1
    by_name = {p["name"]: p for p in out["plugins"]}
    assert list(statuses(out["plugins"])) == ["builtin", "boom", "hello"]
    builtin = by_name["builtin"]
    assert (builtin["distribution"], builtin["source"], builtin["status"]) == ("feda2v-tk", "builtin", "loaded")
    assert {"vae", "gan"} <= set(builtin["registered"]["generators"])
    hello = by_name["hello"]
    assert (hello["distribution"], hello["version"], hello["status"]) == ("feda2v-tk-hello", "1.2.3", "loaded")
    assert hello["registered"] == {"reducers": ["hello_avg"], "schema_fragments": ["hello"], "commands": ["hello"]}
    assert hello["min_api_version"] == 1
    boom = by_name["boom"]
    assert (boom["distribution"], boom["version"], boom["status"]) == ("feda2v-tk-boom", "0.9", "failed")
    assert out["failures"] == [{"plugin": "boom", "distribution": "feda2v-tk-boom", "version": "0.9",
                                "status": "failed", "error": boom["error"]}]
    assert "ImportError: boom: a dependency is missing" in boom["error"]


def test_plugins_text_output_and_the_warning_line(site):
    proc = run_cli("plugins", site=site)
    assert proc.returncode == 0
    assert "hello  [loaded]  feda2v-tk-hello 1.2.3  (entry-point)" in proc.stdout
    assert "boom  [failed]  feda2v-tk-boom 0.9  (entry-point)" in proc.stdout
    assert "    error: import of 'boom_plugin' failed: ImportError: boom: a dependency is missing" in proc.stdout
    assert ("feda2v-tk: warning: skipped plugin 'boom' (feda2v-tk-boom 0.9): import of 'boom_plugin' failed"
            in proc.stderr)
    assert "Traceback" not in proc.stderr


def test_a_broken_plugin_leaves_help_and_other_commands_working(site, tmp_path):
    help_ = run_cli("--help", site=site)
    assert help_.returncode == 0 and "hello" in help_.stdout and "plugins" in help_.stdout
    assert "Say hello from a plugin." in help_.stdout
    hello = run_cli("hello", site=site)
    assert hello.returncode == 0 and hello.stdout == "hello from a plugin\n"
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"feda2v": {"generator_reducer": "hello_avg", "hello_greeting": "hey"}}))
    validate = run_cli("validate", str(config), site=site)
    assert validate.returncode == 0, validate.stdout + validate.stderr
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"feda2v": {"hello_greeting": 3}}))
    invalid = run_cli("validate", str(bad), site=site)
    assert invalid.returncode == 1 and "hello_greeting" in invalid.stdout + invalid.stderr
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"feda2v": {"generator_target_sequence_length": 4}}))
    migrated = run_cli("migrate", str(old), site=site)
    assert migrated.returncode == 0, migrated.stderr
    assert json.loads(migrated.stdout)["feda2v"]["generator_training_sequence_length"] == 4


@pytest.mark.parametrize("switch", [("--strict-plugins",), ()])
def test_strict_mode_from_flag_or_environment_makes_the_failure_fatal(site, switch):
    env = {} if switch else {"FEDA2V_STRICT_PLUGINS": "1"}
    for args in (("plugins",), ("--help",), ("list", "reducers")):
        proc = run_cli(*switch, *args, site=site, env=env)
        assert proc.returncode == 1, args
        assert proc.stderr.startswith("feda2v-tk: error: plugin 'boom' (feda2v-tk-boom 0.9): import of 'boom_plugin'")
        assert "strict plugin mode" in proc.stderr and "Traceback" not in proc.stderr
    assert run_cli("--version", *switch, site=site, env=env).returncode == 0


def test_no_plugins_flag_and_environment_disable_autoloading(site):
    for args, env in ((("--no-plugins",), {}), ((), {"FEDA2V_DISABLE_PLUGIN_AUTOLOAD": "1"})):
        out = plugins_json(*args, site=site, env=env)
        assert [p["name"] for p in out["plugins"]] == ["builtin"] and out["failures"] == []
        assert "hello" not in run_cli(*args, "--help", site=site, env=env).stdout


def test_allow_list_flag_and_environment(site):
    for args, env in ((("--allow-plugin", "feda2v-tk-hello"), {}), ((), {"FEDA2V_PLUGINS": "hello"})):
        out = plugins_json(*args, site=site, env=env)
        assert statuses(out["plugins"]) == {"builtin": "loaded", "boom": "disabled", "hello": "loaded"}
        assert out["failures"] == []
    # the flag replaces the environment's list
    out = plugins_json("--allow-plugin", "boom", site=site, env={"FEDA2V_PLUGINS": "hello"})
    assert {p["name"]: p["status"] for p in out["plugins"]}["hello"] == "disabled"


def test_a_misspelt_allow_list_name_is_a_one_line_warning(site):
    proc = run_cli("--allow-plugin", "helo", "plugins", "--json", site=site)
    assert proc.returncode == 0
    warning = [line for line in proc.stderr.splitlines() if "helo" in line]
    assert len(warning) == 1 and "'helo', which is not an installed plugin" in warning[0], proc.stderr
    assert statuses(json.loads(proc.stdout)["plugins"])["hello"] == "disabled"


def test_block_flag_adds_to_the_environment(site):
    out = plugins_json("--block-plugin", "boom", site=site, env={"FEDA2V_BLOCK_PLUGINS": "hello"})
    assert statuses(out["plugins"]) == {"builtin": "loaded", "boom": "blocked", "hello": "blocked"}


def test_command_hook_failures_are_reported_by_plugins(tmp_path):
    site = tmp_path / "site"
    fake_distribution(site, "feda2v-tk-cmds", "3.0", {"cmds": "cmds_plugin"}, {"cmds_plugin": '''
        from feda2v_toolkit import hookimpl

        @hookimpl
        def feda2v_register_commands(cli):
            @cli.command("train")
            def train():
                """An impostor."""
            raise RuntimeError("half-way")
    '''})
    help_ = run_cli("--help", site=site)
    assert help_.returncode == 0
    assert "feda2v-tk: warning: problem with plugin 'cmds' (feda2v-tk-cmds 3.0): feda2v_register_commands " \
           "failed: RuntimeError: half-way" in help_.stderr
    out = plugins_json(site=site)
    (failure,) = out["failures"]
    assert failure["plugin"] == "cmds" and failure["distribution"] == "feda2v-tk-cmds" and failure["version"] == "3.0"
    assert "RuntimeError: half-way" in failure["error"]
    train_help = run_cli("train", "--help", site=site)
    assert "Reduce sequences, train a generator" in train_help.stdout


# -- list ---------------------------------------------------------------------------------------------

def test_list_json_gives_names_providers_descriptions_and_settings(site):
    proc = run_cli("list", "reducers", "--json", site=site)
    rows = {row["qualified_name"]: row for row in json.loads(proc.stdout)}
    hello = rows["hello:hello_avg"]
    assert hello["name"] == "hello_avg" and hello["distribution"] == "feda2v-tk-hello" and hello["version"] == "1.2.3"
    assert hello["description"] == "Average pooling, said hello."
    assert hello["settings"] == [{"key": "hello_greeting", "type": "string", "description": "What to say.",
                                  "fragment": "hello:hello", "default": "hi"}]
    gens = {row["name"]: row for row in json.loads(run_cli("list", "generators", "--json").stdout)}
    vae_keys = {s["key"]: s for s in gens["vae"]["settings"]}
    assert vae_keys["generator_hidden_dim"]["type"] == "integer" and "default" in vae_keys["generator_hidden_dim"]
    assert {s["key"] for s in gens["gan"]["settings"]} >= {"gan_loss", "gan_r1_weight"}
    assert gens["gan"]["plugin"] == "builtin" and gens["gan"]["distribution"] == "feda2v-tk"


def test_list_text(site):
    proc = run_cli("list", "reducers", site=site)
    assert "hello_avg  (hello:hello_avg, feda2v-tk-hello 1.2.3)" in proc.stdout
    assert "    - hello_greeting (string, default \"hi\"): What to say." in proc.stdout
    assert run_cli("list", "widgets").returncode == 2
