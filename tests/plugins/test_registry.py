"""The plugin registry: built-ins through the hooks, guarded loading, validation, clashes, discovery, switches."""

from __future__ import annotations

import importlib
import sys
import warnings

import click
import pytest
from plugin_fakes import (
    AVG,
    BOOM_PLUGIN,
    HELLO_PLUGIN,
    LINEAR,
    fake_distribution,
    fragment,
    generator,
    make_plugin,
    reducer,
    statuses,
    upsampler,
)

from feda2v_toolkit import API_VERSION, plugins
from feda2v_toolkit.errors import ComponentNotFoundError, PluginError, PluginValidationError
from feda2v_toolkit.plugins import PluginWarning, load_registry
from feda2v_toolkit.specs import Migration, SchemaFragment


def load(*extra, **kwargs):
    """A registry with only the built-ins and the given (name, plugin) pairs; warnings collected."""
    kwargs.setdefault("autoload", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reg = load_registry(extra_plugins=extra, **kwargs)
    reg.caught = [w for w in caught if issubclass(w.category, PluginWarning)]
    return reg


def migration(id="fake-0001", chain="fake", **kw):
    return Migration(id=id, chain=chain, from_version=kw.pop("from_version", 1), to_version=kw.pop("to_version", 2),
                     description="A step.", apply=kw.pop("apply", lambda section, ctx: dict(section)), **kw)


# -- built-ins ----------------------------------------------------------------------------------------

def test_builtins_register_through_the_public_hooks_from_the_default_plugin_modules():
    reg = load()
    builtin = reg.plugin("builtin")
    assert builtin.distribution == "feda2v-tk" and builtin.status == "loaded"
    assert builtin.modules == list(plugins.DEFAULT_PLUGIN_MODULES)
    registered = {reg.pm.get_name(p) for p in reg.pm.get_plugins()}
    assert registered == {f"builtin.{m.rsplit('.', 1)[-1]}" for m in plugins.DEFAULT_PLUGIN_MODULES}
    for module_name in plugins.DEFAULT_PLUGIN_MODULES:  # ordinary @hookimpl functions, like any plugin
        module = importlib.import_module(module_name)
        assert any(name.startswith("feda2v_register_") for name in vars(module))
    assert {"vae", "gan"} <= set(reg.names("generator"))
    assert "adaptive_avg" in reg.names("reducer") and "linear" in reg.names("upsampler")
    assert reg.get("generator", "vae").provenance.distribution == "feda2v-tk"
    assert not reg.failures


def test_loading_the_registry_imports_no_torch():
    code = ("import sys; from feda2v_toolkit.plugins import load_registry; load_registry(); "
            "print('torch' in sys.modules)")
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# -- a good plugin ------------------------------------------------------------------------------------

def test_a_plugin_registers_every_kind_with_provenance():
    fake = make_plugin(
        generators=lambda register: register(generator("fake_gen")),
        reducers=lambda register: register(reducer("fake_reducer")),
        upsamplers=lambda register: register(upsampler("fake_upsampler")),
        schema_fragments=lambda register: register(fragment(generator_type="fake_gen")),
        migrations=lambda register: register(migration()),
    )
    reg = load(("fake", fake))
    info = reg.plugin("fake")
    assert info.status == "loaded" and info.source == "direct" and not reg.failures
    assert info.registered == {"generators": ["fake_gen"], "reducers": ["fake_reducer"],
                               "upsamplers": ["fake_upsampler"], "schema_fragments": ["fake"],
                               "migrations": ["fake-0001"]}
    spec = reg.get("generator", "fake_gen")
    assert spec is reg.get("generator", "fake:fake_gen")
    assert spec.qualified_name == "fake:fake_gen" and spec.plugin == "fake"
    assert reg.migrations[-1].provenance.plugin == "fake"
    assert reg.settings(spec) == ["fake_depth"]  # keys of the fragment bound to the generator type


def test_component_classes_load_lazily_and_are_checked_against_their_base_class():
    fake = make_plugin(reducers=lambda register: register(reducer("wrong_base", factory=LINEAR)))
    reg = load(("fake", fake))
    assert reg.load("reducer", "adaptive_avg").__name__ == "AdaptiveAvgReducer"
    with pytest.raises(PluginValidationError, match="not a subclass of feda2v_toolkit.components.Reducer"):
        reg.load("reducer", "wrong_base")


def test_a_factory_that_cannot_be_imported_is_an_error_naming_the_plugin():
    fake = make_plugin(reducers=lambda register: register(reducer("ghost", factory="no_such_module:Thing")))
    reg = load(("fake", fake))
    with pytest.raises(PluginError, match=r"reducer fake:ghost .*cannot import 'no_such_module:Thing'"):
        reg.load("reducer", "ghost")


def test_a_class_factory_is_checked_at_registration():
    fake = make_plugin(reducers=lambda register: register(reducer("not_a_reducer", factory=dict)))
    reg = load(("fake", fake))
    assert reg.plugin("fake").status == "failed"
    assert "not a subclass of feda2v_toolkit.components.Reducer" in reg.plugin("fake").error


def test_unknown_names_suggest_the_closest_one():
    with pytest.raises(ComponentNotFoundError, match=r"no generator named 'vea'.*did you mean 'vae'"):
        load().get("generator", "vea")
    with pytest.raises(ComponentNotFoundError, match="no reducer 'nobody:adaptive_avg'"):
        load().get("reducer", "nobody:adaptive_avg")


# -- invalid plugins are skipped as a whole --------------------------------------------------------------

INVALID = {
    "wrong object": (dict(generators=lambda register: register({"name": "x"})),
                     "feda2v_register_generators registered dict; expected GeneratorSpec"),
    "spec of another kind": (dict(generators=lambda register: register(reducer())),
                             "registered ReducerSpec; expected GeneratorSpec"),
    "bad name": (dict(reducers=lambda register: register(reducer("Bad Name"))), "invalid reducer name 'Bad Name'"),
    "qualified name": (dict(reducers=lambda register: register(reducer("a:b"))), "invalid reducer name 'a:b'"),
    "no description": (dict(reducers=lambda register: register(reducer(description=" "))),
                       "needs a one-line description"),
    "factory without attribute": (dict(reducers=lambda register: register(reducer(factory="pkg.module"))),
                                  "must be 'module:attr'"),
    "settings as a string": (dict(reducers=lambda register: register(reducer(settings="fake_depth"))),
                             "settings must be a tuple"),
    "same name twice": (dict(reducers=lambda register: [register(reducer("twice")), register(reducer("twice"))]),
                        "reducer 'twice' registered twice"),
    "fragment without properties": (dict(schema_fragments=lambda register: register(
        SchemaFragment(name="f", schema={"type": "object"}))), "must be an object schema with 'properties'"),
    "invalid JSON Schema": (dict(schema_fragments=lambda register: register(
        fragment(properties={"fake_x": {"description": "x", "type": "integr"}}))), "is not a valid JSON Schema"),
    "property without description": (dict(schema_fragments=lambda register: register(
        fragment(properties={"fake_x": {"type": "integer"}}))), "key 'fake_x' needs a 'description'"),
    "redefining a core key": (dict(schema_fragments=lambda register: register(
        fragment(properties={"generator_hidden_dim": {"description": "mine now", "type": "integer"}}))),
        "config key 'generator_hidden_dim' is already defined by plugin 'builtin' (feda2v-tk"),
    "migration skipping a version": (dict(migrations=lambda register: register(migration(to_version=3))),
                                     "versions must be n -> n + 1"),
    "migration on the core chain": (dict(migrations=lambda register: register(
        migration(chain="core", from_version=2, to_version=3))), "only feda2v-tk itself adds steps to the 'core'"),
    "migration id taken": (dict(migrations=lambda register: register(
        migration(id="core-0001-split-target-sequence-length"))), "is already registered by plugin 'builtin'"),
    "hook raising": (dict(generators=lambda register: 1 / 0), "ZeroDivisionError: division by zero"),
    "hook with a wrong signature": (dict(generators=lambda reg: None), "feda2v_register_generators"),
    "misspelt hook": ({"feda2v_register_generator": lambda register: None},
                      "unknown hook 'feda2v_register_generator' (did you mean 'feda2v_register_generators'?)"),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_an_invalid_plugin_is_recorded_warned_and_skipped_as_a_whole(case):
    hooks, message = INVALID[case]
    # a valid upsampler registered by the same plugin must not survive its failure
    bad = make_plugin("bad", upsamplers=lambda register: register(upsampler("survivor")), **hooks)
    reg = load(("bad", bad))
    info = reg.plugin("bad")
    assert info.status == "failed"
    assert message in info.error
    assert [f.plugin for f in reg.failures] == ["bad"] and message in reg.failures[0].error
    assert reg.failures[0].traceback
    assert "survivor" not in reg.all_names("upsampler")
    assert not any(p is bad for p in reg.pm.get_plugins())
    assert [str(w.message) for w in reg.caught] and "skipped plugin 'bad'" in str(reg.caught[0].message)
    assert "vae" in reg.names("generator")  # the built-ins are untouched


@pytest.mark.parametrize("case", ["wrong object", "hook raising", "misspelt hook"])
def test_strict_mode_makes_a_plugin_failure_fatal(case, monkeypatch):
    hooks, message = INVALID[case]
    bad = make_plugin("bad", **hooks)
    with pytest.raises(PluginError, match="plugin 'bad'.*strict plugin mode"):
        load(("bad", bad), strict=True)
    monkeypatch.setenv(plugins.ENV_STRICT, "1")
    with pytest.raises(PluginError, match=message.split("(")[0].strip()[:30]):
        load(("bad", bad))
    monkeypatch.setenv(plugins.ENV_STRICT, "0")
    assert load(("bad", bad)).plugin("bad").status == "failed"


def test_a_migration_chain_belongs_to_the_plugin_that_started_it():
    first = make_plugin("first", migrations=lambda register: register(migration(id="a-1", chain="shared")))
    second = make_plugin("second", migrations=lambda register: register(
        migration(id="b-2", chain="shared", from_version=2, to_version=3)))
    reg = load(("first", first), ("second", second))
    assert reg.plugin("first").status == "loaded"
    assert "chain 'shared' belongs to plugin 'first'" in reg.plugin("second").error


# -- API version --------------------------------------------------------------------------------------

def test_a_plugin_needing_a_newer_api_is_reported_incompatible_not_loaded():
    future = make_plugin("future", min_api=API_VERSION + 1, reducers=lambda register: register(reducer("later")))
    reg = load(("future", future))
    info = reg.plugin("future")
    assert info.status == "incompatible" and info.min_api_version == API_VERSION + 1
    assert f"requires feda2v-tk plugin API version {API_VERSION + 1}" in info.error
    assert "upgrade feda2v-tk" in info.error
    assert "later" not in reg.all_names("reducer")
    assert reg.failures[0].status == "incompatible"


def test_a_plugin_declaring_the_current_api_loads():
    now = make_plugin("now", min_api=API_VERSION, reducers=lambda register: register(reducer("today")))
    reg = load(("now", now))
    assert reg.plugin("now").status == "loaded" and reg.plugin("now").min_api_version == API_VERSION


def test_a_malformed_api_declaration_is_a_failure():
    odd = make_plugin("odd", min_api="2", reducers=lambda register: register(reducer("odd")))
    assert "feda2v_min_api_version must be an integer" in load(("odd", odd)).plugin("odd").error


# -- name clashes ----------------------------------------------------------------------------------------

def test_two_plugins_with_one_component_name_is_an_error_naming_both_and_neither_wins(tmp_path, monkeypatch):
    site = tmp_path / "site"
    for dist, ep in (("feda2v-tk-alpha", "alpha"), ("feda2v-tk-beta", "beta")):
        fake_distribution(site, dist, "1.0", {ep: f"{ep}_mod"}, {f"{ep}_mod": f'''
            from feda2v_toolkit import hookimpl
            from feda2v_toolkit.specs import ReducerSpec

            @hookimpl
            def feda2v_register_reducers(register):
                register(ReducerSpec(name="pool", description="{ep}'s pool.", factory="{AVG}"))
        '''})
    monkeypatch.syspath_prepend(str(site))
    reg = load(autoload=True, allow=["alpha", "beta"])
    errors = [f.error for f in reg.failures]
    assert len(errors) == 2 and errors[0] == errors[1]  # recorded against both plugins
    assert "alpha:pool (from feda2v-tk-alpha 1.0) and beta:pool (from feda2v-tk-beta 1.0)" in errors[0]
    with pytest.raises(ComponentNotFoundError, match="feda2v-tk-alpha 1.0.*feda2v-tk-beta 1.0.*qualified name"):
        reg.get("reducer", "pool")
    assert reg.get("reducer", "alpha:pool").provenance.distribution == "feda2v-tk-alpha"
    assert reg.get("reducer", "beta:pool").provenance.distribution == "feda2v-tk-beta"
    assert {"alpha:pool", "beta:pool"} <= set(reg.names("reducer"))
    assert reg.plugin("alpha").status == reg.plugin("beta").status == "loaded"
    with pytest.raises(PluginError, match="feda2v-tk-alpha 1.0.*feda2v-tk-beta 1.0"):
        load(autoload=True, allow=["alpha", "beta"], strict=True)


def test_a_plugin_reusing_a_builtin_name_cannot_change_what_configs_mean():
    impostor = make_plugin("impostor", generators=lambda register: register(generator("vae")))
    reg = load(("impostor", impostor))
    assert reg.get("generator", "vae").plugin == "builtin"
    assert reg.get("generator", "impostor:vae").plugin == "impostor"
    assert reg.names("generator").count("vae") == 1 and "impostor:vae" in reg.names("generator")
    error = reg.plugin("impostor").error
    assert "builtin:vae (from feda2v-tk" in error and "impostor:vae (from not installed)" in error
    assert "'vae' keeps meaning builtin:vae" in error


def test_the_same_plugin_name_twice_is_refused():
    one = make_plugin("one", reducers=lambda register: register(reducer("r1")))
    two = make_plugin("two", reducers=lambda register: register(reducer("r2")))
    reg = load(("same", one), ("same", two))
    assert "r1" in reg.names("reducer") and "r2" not in reg.all_names("reducer")
    assert "plugin name 'same' is already taken" in reg.failures[0].error


# -- discovery through entry points ---------------------------------------------------------------------

@pytest.fixture
def site(tmp_path, monkeypatch):
    """A directory on sys.path holding two fake installed distributions: hello (good) and boom (broken)."""
    path = tmp_path / "site"
    fake_distribution(path, "feda2v-tk-hello", "1.2.3", {"hello": "hello_plugin"}, {"hello_plugin": HELLO_PLUGIN})
    fake_distribution(path, "feda2v-tk-boom", "0.9", {"boom": "boom_plugin"}, {"boom_plugin": BOOM_PLUGIN})
    monkeypatch.syspath_prepend(str(path))
    for name in ("hello_plugin", "boom_plugin"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    for var in (plugins.ENV_ALLOW, plugins.ENV_BLOCK, plugins.ENV_STRICT, plugins.ENV_DISABLE_AUTOLOAD):
        monkeypatch.delenv(var, raising=False)
    return path


def test_entry_point_plugins_are_found_with_their_distribution_and_version(site):
    reg = load(autoload=True)
    hello = reg.plugin("hello")
    assert (hello.distribution, hello.version, hello.source, hello.status) == \
        ("feda2v-tk-hello", "1.2.3", "entry-point", "loaded")
    assert hello.modules == ["hello_plugin"] and hello.min_api_version == 1
    spec = reg.get("reducer", "hello_avg")
    assert (spec.qualified_name, spec.provenance.distribution, spec.provenance.version) == \
        ("hello:hello_avg", "feda2v-tk-hello", "1.2.3")


def test_a_plugin_that_fails_to_import_is_recorded_with_distribution_version_and_error(site):
    reg = load(autoload=True)
    boom = reg.plugin("boom")
    assert boom.status == "failed"
    (failure,) = reg.failures
    assert failure.to_json() == {"plugin": "boom", "distribution": "feda2v-tk-boom", "version": "0.9",
                                 "status": "failed",
                                 "error": "import of 'boom_plugin' failed: ImportError: boom: a dependency is missing"}
    assert "skipped plugin 'boom' (feda2v-tk-boom 0.9)" in str(reg.caught[0].message)
    assert reg.plugin("hello").status == "loaded"  # the others load regardless
    with pytest.raises(PluginError, match="plugin 'boom' \\(feda2v-tk-boom 0.9\\): import of 'boom_plugin' failed"):
        load(autoload=True, strict=True)


def test_autoload_can_be_disabled_by_environment(site, monkeypatch):
    monkeypatch.setenv(plugins.ENV_DISABLE_AUTOLOAD, "1")
    reg = load(autoload=None)
    assert [p.name for p in reg.plugins] == ["builtin"] and not reg.failures


@pytest.mark.parametrize("allowed", ["hello", "feda2v-tk-hello", "feda2v_tk_hello", " hello , other "])
def test_the_allow_list_loads_only_the_named_plugins_by_plugin_or_distribution_name(site, monkeypatch, allowed):
    monkeypatch.setenv(plugins.ENV_ALLOW, allowed)
    reg = load(autoload=None)
    assert reg.plugin("hello").status == "loaded"
    assert reg.plugin("boom").status == "disabled" and not reg.failures


def test_an_empty_allow_list_loads_no_plugin(site, monkeypatch):
    monkeypatch.setenv(plugins.ENV_ALLOW, "")
    reg = load(autoload=None)
    assert statuses(reg.plugins) == {"builtin": "loaded", "hello": "disabled", "boom": "disabled"}


def test_the_block_list_skips_plugins(site, monkeypatch):
    monkeypatch.setenv(plugins.ENV_BLOCK, "boom,nothing")
    reg = load(autoload=None)
    assert reg.plugin("boom").status == "blocked" and reg.plugin("hello").status == "loaded"
    assert not reg.failures
    (typo,) = [str(w.message) for w in reg.caught]
    assert "block-list" in typo and "'nothing', which is not an installed plugin" in typo and "hello" in typo
    assert load(autoload=True, block=["feda2v-tk-hello"]).plugin("hello").status == "blocked"


def test_two_distributions_claiming_one_plugin_name_is_an_error_naming_the_first(site, tmp_path, monkeypatch):
    other = tmp_path / "other-site"
    fake_distribution(other, "feda2v-tk-hello-fork", "2.0", {"hello": "hello_plugin"})
    monkeypatch.syspath_prepend(str(other))
    reg = load(autoload=True, allow=["hello"])
    failed = [p for p in reg.plugins if p.status == "failed"]
    assert len(failed) == 1 and "plugin name 'hello' is already used by" in failed[0].error


def test_an_entry_point_may_not_take_the_builtin_name_or_a_colon(tmp_path, monkeypatch):
    path = tmp_path / "site"
    fake_distribution(path, "feda2v-tk-sneaky", "1.0", {"builtin": "hello_plugin", "a:b": "hello_plugin"},
                      {"hello_plugin": HELLO_PLUGIN})
    monkeypatch.syspath_prepend(str(path))
    monkeypatch.delitem(sys.modules, "hello_plugin", raising=False)
    reg = load(autoload=True, allow=["builtin", "a:b", "feda2v-tk-sneaky"])
    errors = " | ".join(f.error for f in reg.failures)
    assert "plugin name 'builtin' is already used by feda2v-tk" in errors
    assert "invalid plugin (entry-point) name 'a:b'" in errors
    assert reg.get("generator", "vae").plugin == "builtin"


# -- commands hook ----------------------------------------------------------------------------------------

def test_plugin_commands_are_added_and_a_failing_hook_is_isolated():
    def good(cli):
        @cli.command("greet")
        def greet():
            """Greets."""

    def bad(cli):
        @cli.command("half")
        def half():
            """Added, then the hook fails."""
        raise RuntimeError("command hook broken")

    def greedy(cli):
        @cli.command("train")
        def train():
            """Tries to replace a built-in."""

        @cli.command("greet")
        def greet2():
            """Tries to replace another plugin's command."""

    reg = load(("good", make_plugin("good", commands=good)), ("bad", make_plugin("bad", commands=bad)),
               ("greedy", make_plugin("greedy", commands=greedy)))
    group = click.Group("feda2v-tk")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reg.add_commands(group, reserved={"train"})
        reg.add_commands(group, reserved={"train"})  # idempotent per group
    assert sorted(group.commands) == ["greet"]
    assert group.commands["greet"].help == "Greets."
    assert reg.plugin("good").registered == {"commands": ["greet"]}
    assert reg.plugin("bad").status == "loaded"  # its components (none here) stay usable
    assert "feda2v_register_commands failed: RuntimeError: command hook broken" in reg.plugin("bad").error
    greedy_errors = reg.plugin("greedy").errors
    assert any("command 'train' is already provided by feda2v-tk" in e for e in greedy_errors)
    assert any("command 'greet' is already provided by another plugin" in e for e in greedy_errors)
    assert len([w for w in caught if issubclass(w.category, PluginWarning)]) == 3
    assert "feda2v_register_commands" in reg.plugin("good").to_json()["hooks"]


def test_a_failing_command_hook_is_fatal_in_strict_mode():
    def bad(cli):
        raise RuntimeError("nope")

    reg = load(("bad", make_plugin("bad", commands=bad)), strict=True)
    with pytest.raises(PluginError, match="feda2v_register_commands failed: RuntimeError: nope"):
        reg.add_commands(click.Group("x"))


# -- the process-wide registry and helpers ---------------------------------------------------------------

def test_configure_and_the_process_wide_registry(monkeypatch):
    monkeypatch.delenv(plugins.ENV_DISABLE_AUTOLOAD, raising=False)
    plugins.configure(autoload=False)
    reg = plugins.get_registry()
    assert reg is plugins.get_registry()
    assert [p.name for p in reg.plugins] == ["builtin"]
    assert "vae" in plugins.list_generators() and "adaptive_avg" in plugins.list_reducers()
    assert "linear" in plugins.list_upsamplers()
    red = plugins.create_reducer("adaptive_avg", length=3)
    assert type(red).__name__ == "AdaptiveAvgReducer" and red.length == 3
    assert type(plugins.create_upsampler("builtin:cubic")).__name__ == "CubicUpsampler"


def test_using_registry_swaps_the_process_wide_registry_temporarily():
    custom = load(("fake", make_plugin(reducers=lambda register: register(reducer("only_here")))))
    before = plugins.get_registry()
    with plugins.using_registry(custom):
        assert "only_here" in plugins.list_reducers()
    assert plugins.get_registry() is before and "only_here" not in plugins.list_reducers()


def test_plugin_info_json_is_what_feda2v_tk_plugins_prints():
    reg = load(("fake", make_plugin(min_api=1, reducers=lambda register: register(reducer("x1")))))
    assert reg.plugin("fake").to_json() == {
        "name": "fake", "distribution": None, "version": None, "source": "direct", "status": "loaded",
        "error": None, "min_api_version": 1, "modules": ["fake_plugin_fake"],
        "hooks": ["feda2v_register_reducers"], "registered": {"reducers": ["x1"]}}
