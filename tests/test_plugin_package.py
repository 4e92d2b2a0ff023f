"""The example plugin package, installed for real into a fresh virtual environment, through the real executable.

The fresh venv gets its own (non-editable) installs of feda2v-tk and plugins/feda2v-tk-flow, built from
copies of their sources with the venv's pip (``--no-deps --no-build-isolation --no-index``: nothing is
downloaded). The heavy dependencies (torch, pluggy, jsonschema, click, safetensors, tqdm, setuptools,
pip, pytest) come from the environment running the tests through a ``.pth`` file: a path line in a
``.pth`` adds that directory without running *its* ``.pth`` files, so the outer editable install of
feda2v-tk stays invisible and the venv uses its own copy (a test checks that). The broken-plugin fixture
is pip-installed into a separate ``--target`` directory and switched on with ``PYTHONPATH``.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.venv, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
FLOW = REPO / "plugins" / "feda2v-tk-flow"
BROKEN = REPO / "tests" / "fixtures" / "broken-plugin"
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "build", "dist", "*.egg-info", ".pytest_cache")


class Venv:
    """A fresh virtual environment with feda2v-tk and feda2v-tk-flow installed, plus the broken fixture aside."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.dir = root / "venv"
        self.bin = self.dir / ("Scripts" if os.name == "nt" else "bin")
        self.python = self.bin / "python"
        self.exe = self.bin / "feda2v-tk"
        self.broken_site = root / "broken-site"
        self.work = root / "work"
        self.work.mkdir()

    def env(self, extra: dict[str, str] | None = None, *, broken: bool = False) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("FEDA2V_") and k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        env["COLUMNS"] = "200"
        if broken:
            env["PYTHONPATH"] = str(self.broken_site)
        env.update(extra or {})
        return env

    def run(self, *args: str, broken: bool = False, env: dict[str, str] | None = None,
            expect: int | None = 0) -> subprocess.CompletedProcess[str]:
        """``feda2v-tk ARGS`` with the venv's console script."""
        proc = subprocess.run([str(self.exe), *args], capture_output=True, text=True, cwd=self.work,
                              env=self.env(env, broken=broken), timeout=300)
        if expect is not None and proc.returncode != expect:
            raise AssertionError(f"feda2v-tk {' '.join(args)} exited {proc.returncode} (expected {expect}):\n"
                                 f"{proc.stdout}\n{proc.stderr}")
        return proc

    def python_run(self, *args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.python), *args], capture_output=True, text=True, cwd=cwd or self.work,
                              env=self.env(), timeout=timeout)


def _outer_site_dirs() -> list[str]:
    """Where the running interpreter finds its packages (venv or system, plus the user site)."""
    dirs = [*site.getsitepackages(), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    return [d for d in dict.fromkeys(dirs) if Path(d).is_dir()]


def _copy_sources(dest: Path) -> tuple[Path, Path, Path]:
    main = dest / "feda2v-tk"
    main.mkdir(parents=True)
    shutil.copytree(REPO / "feda2v_toolkit", main / "feda2v_toolkit", ignore=IGNORE)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, main / name)
    flow = shutil.copytree(FLOW, dest / "feda2v-tk-flow", ignore=IGNORE)
    broken = shutil.copytree(BROKEN, dest / "broken-plugin", ignore=IGNORE)
    return main, flow, broken


def _pip(python: Path, *args: str) -> None:
    proc = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                           "--disable-pip-version-check", "--quiet", *args],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"pip install {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Venv:
    try:
        import pip  # noqa: F401
    except ImportError:  # pragma: no cover - every supported setup has pip
        pytest.skip("pip is not installed in the test environment")
    t0 = time.perf_counter()
    v = Venv(tmp_path_factory.mktemp("plugin-package"))
    main, flow, broken = _copy_sources(v.root / "src")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(v.dir)], check=True, timeout=120)
    purelib = subprocess.run([str(v.python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "_feda2v_test_outer_site.pth").write_text("\n".join(_outer_site_dirs()) + "\n", "utf-8")
    _pip(v.python, str(main), str(flow))
    _pip(v.python, "--target", str(v.broken_site), str(broken))
    print(f"\nfresh venv with feda2v-tk + feda2v-tk-flow in {time.perf_counter() - t0:.1f}s")
    return v


@pytest.fixture(scope="module")
def demo_data(venv) -> Path:
    venv.run("demo-data", "data.safetensors", "--per-class", "4", "--seq-len", "40", "--dim", "8")
    return venv.work / "data.safetensors"


FLOW_CONFIG = {
    "feda2v": {
        "generator_type": "realnvp",
        "generator_reducer": "dct",
        "generator_upsampler": "dct",
        "generator_training_sequence_length": 4,
        "generator_output_sequence_length": 40,
        "generator_training_epochs": 2,
        "generator_batch_size": 8,
        "synthetic_samples_per_class": 2,
        "flow_coupling_layers": 2,
        "flow_hidden_dim": 16,
        "flow_temperature": 0.9,
    }
}


def write_config(venv: Venv, name: str, config: dict) -> Path:
    path = venv.work / name
    path.write_text(json.dumps(config, indent=2) + "\n", "utf-8")
    return path


# -- installation ---------------------------------------------------------------------------------------

def test_the_fresh_venv_uses_its_own_installs(venv):
    code = ("import feda2v_toolkit, feda2v_tk_flow, importlib.metadata as m; "
            "print(feda2v_toolkit.__file__); print(feda2v_tk_flow.__file__); print(m.version('feda2v-tk-flow'))")
    out = venv.python_run("-c", code).stdout.split()
    assert all(Path(p).is_relative_to(venv.dir) for p in out[:2]), out
    assert out[2] == "0.2.0"
    assert venv.exe.is_file()


def test_plugins_json_lists_the_example_plugin_with_distribution_and_version(venv):
    out = json.loads(venv.run("plugins", "--json").stdout)
    print("\n$ feda2v-tk plugins --json\n" + json.dumps(out, indent=2))
    flow = {p["name"]: p for p in out["plugins"]}["flow"]
    assert (flow["distribution"], flow["version"], flow["source"], flow["status"]) == \
        ("feda2v-tk-flow", "0.2.0", "entry-point", "loaded")
    assert flow["modules"] == ["feda2v_tk_flow.plugin"] and flow["min_api_version"] == 1
    assert flow["registered"] == {"generators": ["realnvp"], "reducers": ["dct"], "upsamplers": ["dct"],
                                  "schema_fragments": ["flow"], "migrations": ["flow-0001-rename-num-layers"],
                                  "commands": ["flow-nll"]}
    assert out["failures"] == []
    text = venv.run("plugins").stdout
    assert "flow  [loaded]  feda2v-tk-flow 0.2.0  (entry-point)" in text


def test_list_shows_the_plugin_components_and_their_settings(venv):
    gens = {row["name"]: row for row in json.loads(venv.run("list", "generators", "--json").stdout)}
    realnvp = gens["realnvp"]
    assert (realnvp["qualified_name"], realnvp["distribution"], realnvp["version"]) == \
        ("flow:realnvp", "feda2v-tk-flow", "0.2.0")
    settings = {s["key"]: s for s in realnvp["settings"]}
    assert settings["flow_coupling_layers"]["default"] == 6 and settings["flow_coupling_layers"]["type"] == "integer"
    assert "generator_learning_rate" in settings
    reducers = venv.run("list", "reducers").stdout
    assert "dct  (flow:dct, feda2v-tk-flow 0.2.0)" in reducers
    assert "flow-nll" in venv.run("--help").stdout


# -- config keys ------------------------------------------------------------------------------------------

def test_validate_accepts_the_plugin_keys_and_rejects_a_wrong_type(venv):
    good = write_config(venv, "flow.json", FLOW_CONFIG)
    venv.run("validate", str(good))
    bad = write_config(venv, "bad.json", {"feda2v": {**FLOW_CONFIG["feda2v"], "flow_hidden_dim": "wide"}})
    proc = venv.run("validate", str(bad), expect=1)
    report = proc.stdout + proc.stderr
    assert "flow_hidden_dim" in report and "bad.json:" in report


def test_migrate_rewrites_the_plugin_deprecated_key(venv):
    old = {"feda2v": {"generator_type": "realnvp", "flow_num_layers": 4, "flow_hidden_dim": 16}}
    path = write_config(venv, "old.json", old)
    report = venv.run("validate", str(path), expect=1)
    assert "'flow_num_layers' is deprecated" in report.stdout and "use flow_coupling_layers" in report.stdout
    printed = json.loads(venv.run("migrate", str(path)).stdout)
    section = printed["feda2v"]
    assert list(section) == ["schema_versions", "generator_type", "flow_coupling_layers", "flow_hidden_dim"]
    assert section["flow_coupling_layers"] == 4 and section["schema_versions"] == {"flow": 2}
    venv.run("migrate", "--in-place", str(path))
    assert json.loads(path.read_text())["feda2v"] == section
    venv.run("validate", "--strict", str(path))


# -- train and generate -----------------------------------------------------------------------------------

def test_train_generate_and_inspect_with_the_plugin_generator_reducer_and_upsampler(venv, demo_data):
    config = write_config(venv, "train.json", FLOW_CONFIG)
    venv.run("train", "-c", str(config), "-d", str(demo_data), "-o", "flow.safetensors", "--seed", "0")
    info = json.loads(venv.run("inspect", "flow.safetensors", "--json").stdout)
    blob = json.dumps(info)
    assert "feda2v-tk-flow" in blob and "flow:realnvp" in blob and "flow:dct" in blob
    text = venv.run("inspect", "flow.safetensors").stdout
    assert "realnvp" in text and "feda2v-tk-flow" in text
    venv.run("generate", "flow.safetensors", "-o", "samples", "--seed", "1")
    code = ("import sys, json; from feda2v_toolkit.data import open_dataset; ds = open_dataset(sys.argv[1]); "
            "print(json.dumps([len(ds), ds.seq_len, ds.dim, ds.class_names]))")
    n, length, dim, classes = json.loads(venv.python_run("-c", code, str(venv.work / "samples")).stdout)
    assert (length, dim) == (40, 8) and n == 2 * len(classes)
    nll = json.loads(venv.run("flow-nll", "flow.safetensors", str(demo_data), "--json").stdout)
    assert nll["sequences"] == 4 * len(classes) and nll["skipped"] == 0


def test_the_plugin_own_tests_pass_in_the_venv(venv):
    copy = venv.root / "src" / "feda2v-tk-flow"
    # `-o pythonpath=` drops the plugin's `src` from sys.path: the tests import the installed package
    proc = venv.python_run("-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "pythonpath=", str(copy / "tests"),
                           cwd=copy, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


# -- the broken-plugin fixture ----------------------------------------------------------------------------

BROKEN_EXPECTED = {  # plugin -> (status, part of the error)
    "broken-import": ("failed", "RuntimeError: feda2v_tk_broken.import_error is broken on purpose"),
    "broken-register": ("failed", "feda2v_register_generators registered dict; expected GeneratorSpec"),
    "broken-command": ("loaded", "feda2v_register_commands failed: RuntimeError: command hook broken on purpose"),
    "future-api": ("incompatible", "requires feda2v-tk plugin API version 999"),
    "clash": ("loaded", "generator name 'vae' is registered by builtin:vae (from feda2v-tk 0.1.0) and "
                        "clash:vae (from feda2v-tk-broken 0.0.1)"),
}


def test_broken_plugins_are_reported_with_distribution_version_and_error(venv):
    out = json.loads(venv.run("plugins", "--json", broken=True).stdout)
    plugins = {p["name"]: p for p in out["plugins"]}
    for name, (status, error) in BROKEN_EXPECTED.items():
        p = plugins[name]
        assert (p["distribution"], p["version"], p["status"]) == ("feda2v-tk-broken", "0.0.1", status), name
        assert error in p["error"], (name, p["error"])
    failures = {f["plugin"]: f for f in out["failures"]}
    assert set(failures) == set(BROKEN_EXPECTED)
    assert all(f["distribution"] == "feda2v-tk-broken" and f["version"] == "0.0.1" for f in failures.values())
    assert plugins["flow"]["status"] == "loaded"
    assert plugins["broken-command"]["registered"] == {"upsamplers": ["still_works"]}
    assert "half_registered" not in venv.run("list", "reducers", broken=True).stdout


def test_the_cli_keeps_working_next_to_broken_plugins(venv, demo_data):
    help_ = venv.run("--help", broken=True)
    assert "train" in help_.stdout and "flow-nll" in help_.stdout and "half-added" not in help_.stdout
    assert "feda2v-tk: warning: skipped plugin 'broken-import' (feda2v-tk-broken 0.0.1)" in help_.stderr
    assert "Traceback" not in help_.stderr
    venv.run("validate", str(write_config(venv, "ok.json", FLOW_CONFIG)), broken=True)
    old = write_config(venv, "old-flow.json", {"feda2v": {"generator_type": "realnvp", "flow_num_layers": 3}})
    assert json.loads(venv.run("migrate", str(old), broken=True).stdout)["feda2v"]["flow_coupling_layers"] == 3
    config = write_config(venv, "vae.json", {"feda2v": {
        "generator_type": "vae", "generator_training_sequence_length": 4, "generator_training_epochs": 1,
        "generator_hidden_dim": 16, "generator_latent_dim": 4, "generator_batch_size": 8}})
    venv.run("train", "-c", str(config), "-d", str(demo_data), "-o", "vae.safetensors", broken=True)
    info = json.loads(venv.run("inspect", "vae.safetensors", "--json", broken=True).stdout)
    assert "builtin:vae" in json.dumps(info)  # `vae` kept meaning the built-in despite the impostor


def test_strict_mode_makes_broken_plugins_fatal(venv):
    for args, env in ((("--strict-plugins", "plugins"), None), (("plugins",), {"FEDA2V_STRICT_PLUGINS": "1"})):
        proc = venv.run(*args, broken=True, env=env, expect=1)
        assert proc.stderr.startswith("feda2v-tk: error: plugin '")
        assert "(feda2v-tk-broken 0.0.1)" in proc.stderr and "strict plugin mode" in proc.stderr


def test_autoload_switch_and_allow_list(venv):
    out = json.loads(venv.run("plugins", "--json", broken=True, env={"FEDA2V_DISABLE_PLUGIN_AUTOLOAD": "1"}).stdout)
    assert [p["name"] for p in out["plugins"]] == ["builtin"] and out["failures"] == []
    out = json.loads(venv.run("plugins", "--json", broken=True, env={"FEDA2V_PLUGINS": "flow"}).stdout)
    status = {p["name"]: p["status"] for p in out["plugins"]}
    assert status["flow"] == "loaded" and out["failures"] == []
    assert {status[name] for name in BROKEN_EXPECTED} == {"disabled"}
    out = json.loads(venv.run("--allow-plugin", "feda2v-tk-flow", "plugins", "--json", broken=True).stdout)
    assert out["failures"] == []
    out = json.loads(venv.run("--block-plugin", "feda2v-tk-broken", "plugins", "--json", broken=True).stdout)
    assert {p["name"]: p["status"] for p in out["plugins"]}["clash"] == "blocked" and out["failures"] == []
