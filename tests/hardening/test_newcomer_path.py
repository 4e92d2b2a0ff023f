"""The README followed literally, by a newcomer: the quick start from any directory after a plain
install, and every documentation example that runs is run here."""

from __future__ import annotations

import json
import re
import types
from pathlib import Path

import pytest
import torch

from feda2v_toolkit.commands.data import legacy_config_bytes
from tests.hardening.conftest import run_main

ROOT = Path(__file__).resolve().parents[2]
#: documentation whose ```python blocks run (blocks containing "..." are sketches and are skipped)
RUN_DOCS = ["README.md", "docs/training.md", "docs/data.md", "docs/migration.md"]


def _quick_start() -> list[list[str]]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("## Quick start", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("#")[0].split() for line in block.splitlines() if line.split("#")[0].strip()]


def test_the_quick_start_needs_nothing_but_the_installed_package():
    for argv in _quick_start():
        assert argv[0] == "feda2v-tk", f"the quick start runs only feda2v-tk commands, not {argv[0]!r}"
    # what `pip install .` ships: the legacy example config is package data
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    package_data = pyproject.split("[tool.setuptools.package-data]", 1)[1].split("\n[", 1)[0]
    assert '"examples/*.json"' in package_data
    assert json.loads(legacy_config_bytes())["feda2v"]["generator_target_sequence_length"] == 1214


def test_the_quick_start_runs_from_an_arbitrary_directory(tmp_path, capsys, monkeypatch):
    """Every quick-start command, literally, in an empty directory -- at tiny sizes (--dim 16, 2 epochs)."""
    monkeypatch.chdir(tmp_path)
    tiny = {"demo-data": ["--dim", "16"], "train": ["--epochs", "2", "--hidden-dim", "16", "--latent-dim", "4"],
            "generate": ["-k", "2"], "analyze": ["--lengths", "4", "--reducers", "adaptive_avg", "--upsamplers",
                                                 "linear", "-q"], "evaluate": ["-q", "-k", "4"]}
    for argv in _quick_start():
        argv = argv[1:]
        if argv[0] == "demo-data" and "--per-class" in argv:
            argv[argv.index("--per-class") + 1] = "6" if "--first-clip" not in argv else "4"
            if "--first-clip" in argv:
                argv[argv.index("--first-clip") + 1] = "24"
        if argv[0] == "generate" and "--samples-per-class" in argv:
            i = argv.index("--samples-per-class")
            del argv[i:i + 2]
        code, out, err = run_main([*argv, *tiny.get(argv[0], [])], capsys)
        assert code == 0, (argv, err)
    assert (tmp_path / "old-config.json").read_bytes() == legacy_config_bytes()
    assert not (tmp_path / "model.checkpoints").exists() and not (tmp_path / "checkpoints").exists()
    from feda2v_toolkit import open_dataset

    assert open_dataset(tmp_path / "synthetic").storage_dtype == torch.float16  # follows the float16 data


def _blocks(doc: str) -> list[str]:
    text = (ROOT / doc).read_text(encoding="utf-8")
    return [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "..." not in b]


@pytest.fixture
def docs_sandbox(tmp_path, monkeypatch, capsys):
    """A directory holding what the examples name: data, a config, a model, an old config."""
    monkeypatch.chdir(tmp_path)
    for argv in (["demo-data", "data.safetensors", "--per-class", "4", "--dim", "16", "-q"],
                 ["demo-data", "--legacy-config", "old.json", "-q"]):
        assert run_main(argv, capsys)[0] == 0
    config = json.loads(legacy_config_bytes())
    config["feda2v"].update(generator_training_epochs=2, generator_hidden_dim=16, generator_latent_dim=4,
                            generator_upsampler_epochs=1)
    config["feda2v"]["generator_training_sequence_length"] = config["feda2v"].pop("generator_target_sequence_length")
    config["feda2v"]["generator_training_sequence_length"] = 4
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize("doc", RUN_DOCS)
def test_documentation_examples_run(doc, docs_sandbox, capsys):
    if doc == "docs/training.md":  # its examples use a trained model
        assert run_main(["train", "-c", "config.json", "-d", "data.safetensors", "-o", "model.safetensors",
                         "--seed", "0", "-q"], capsys)[0] == 0
    blocks = _blocks(doc)
    assert blocks, f"{doc}: no runnable python example"
    namespace: dict[str, object] = {
        "embeddings": torch.randn(4, 1214, 16), "labels": torch.tensor([0, 1, 0, 1]),
        "my_batches": lambda: iter([(torch.randn(4, 1214, 16), torch.tensor([0, 1, 0, 1]))] * 2),
    }
    if doc == "docs/migration.md":  # its plugin example is a module the next example loads
        plugin = types.ModuleType("flowgen_example")
        exec(compile(next(b for b in blocks if "@hookimpl" in b), "flowgen_example", "exec"), plugin.__dict__)
        namespace["my_plugin_module"] = plugin
    for i, block in enumerate(blocks):
        exec(compile(block, f"{doc} example {i + 1}", "exec"), namespace)  # noqa: S102 - our own docs


def test_generate_refuses_an_existing_output_unless_overwrite(model_file, tmp_path, capsys):
    out = tmp_path / "synthetic"
    assert run_main(["generate", str(model_file), "-o", str(out), "-k", "2", "-q"], capsys)[0] == 0
    code, _, err = run_main(["generate", str(model_file), "-o", str(out), "-k", "2", "-q"], capsys)
    assert code == 2 and "--overwrite" in err
    code, _, err = run_main(["generate", str(model_file), "-o", str(out), "-k", "3", "-q", "--overwrite", "--json"],
                            capsys)
    assert code == 0, err
    from feda2v_toolkit import open_dataset

    assert len(open_dataset(out)) == 6 and sorted(p.name for p in tmp_path.iterdir()) == ["synthetic"]
    (out / "notes.txt").write_text("mine")
    code, _, err = run_main(["generate", str(model_file), "-o", str(out), "-k", "2", "--overwrite"], capsys)
    assert code == 2 and "not dataset shards" in err and (out / "notes.txt").exists()


def test_upsampler_on_the_command_line_beats_use_learned_upsampling_and_validate_warns(tmp_path, capsys):
    from feda2v_toolkit.commands.train import collect_overrides

    assert collect_overrides({"upsampler": "lstsq"}, learned_upsampling=None) == {
        "generator_upsampler": "lstsq", "use_learned_upsampling": False}
    assert collect_overrides({"upsampler": "lstsq"}, learned_upsampling=True)["use_learned_upsampling"] is True
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"feda2v": {"use_learned_upsampling": True, "generator_upsampler": "lstsq"}}))
    code, out, _ = run_main(["validate", str(cfg)], capsys)
    assert code == 0 and "conflicting-upsampler-keys" in out


@pytest.mark.parametrize("config", [None, {"feda2v": {"generator_type": "vae"}}], ids=["defaults", "vae"])
def test_the_plan_figures_quoted_in_the_docs_are_what_plan_prints(capsys, tmp_path, config):
    """The exact columns (parameters .. step peak) of the quoted `plan` tables, for the short lengths."""
    doc = (ROOT / "docs" / "choosing-sequence-length.md").read_text(encoding="utf-8")
    option = "" if config is None else "-c vae.json "
    quoted = doc.split(f"$ feda2v-tk plan {option}--lengths 4,8,16,32,64,1214 --memory-budget 8GB\n", 1)[1]
    quoted = quoted.split("```")[0]
    args = []
    if config is not None:
        (tmp_path / "vae.json").write_text(json.dumps(config))
        args = ["-c", str(tmp_path / "vae.json")]
    code, out, err = run_main(["plan", *args, "--lengths", "4,8,16"], capsys)
    assert code == 0, err

    def rows(text):
        return {line.split()[0].rstrip("*"): line.split()[1:12] for line in text.splitlines()
                if re.match(r"^\d+\*? ", line)}

    fresh, docs = rows(out), rows(quoted)
    for length in ("4", "8", "16"):
        assert fresh[length] == docs[length][:len(fresh[length])], length


def test_the_readme_python_snippet_does_not_replace_what_the_quick_start_wrote():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    snippet = readme.split("The same operations from Python", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    quick = [arg for argv in _quick_start() for i, arg in enumerate(argv)
             if i > 0 and (argv[i - 1] in ("-o", "--out") or (argv[1] == "demo-data" and i == 2))]
    written = re.findall(r'out="([^"]+)"|generate\(model, "([^"]+)"', snippet)
    assert written, snippet
    for names in written:
        for name in filter(None, names):
            assert name.rstrip("/") not in {q.rstrip("/") for q in quick}, name
    assert "overwrite=True" in readme.split("The same operations from Python", 1)[1].split("## ", 1)[0]


def test_the_readme_installs_the_cpu_build_of_torch_on_linux():
    install = (ROOT / "README.md").read_text(encoding="utf-8").split("## Install", 1)[1].split("## ", 1)[0]
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in install


def test_repr_of_a_model_is_a_few_lines(model_file):
    import feda2v_toolkit as ftk

    text = repr(ftk.load_model(model_file))
    assert len(text.splitlines()) <= 5 and len(text) < 600, text
    assert "vae" in text and "classes: a, b" in text and "30 -> 4 (training) -> 30 (output)" in text


def test_generate_promises_the_length_it_writes_and_warns_beyond_the_data(model_file, tmp_path, capsys):
    code, out, _ = run_main(["generate", "--help"], capsys)
    assert code == 0 and "full-length safetensors" not in out and "output length" in out
    code, _, err = run_main(["generate", str(model_file), "-o", str(tmp_path / "s"), "-k", "1",
                             "--output-length", "60"], capsys)
    assert code == 0 and "warning: output length 60 is longer than the training data's sequences (30" in err


def test_plan_without_data_says_the_class_count_is_assumed(capsys, tiny_data):
    code, out, _ = run_main(["plan", "--lengths", "4"], capsys)
    assert code == 0 and "10 classes (assumed: --data or --num-classes gives the real count)" in out
    code, out, _ = run_main(["plan", "--lengths", "4", "-d", str(tiny_data)], capsys)
    assert code == 0 and "4 classes" in out and "assumed" not in out


def test_list_describes_the_gaussians_latent_dim_as_its_rank(capsys):
    code, out, _ = run_main(["list", "generators", "--json"], capsys)
    gaussian = next(g for g in json.loads(out) if g["name"] == "gaussian")
    latent = next(s for s in gaussian["settings"] if s["key"] == "generator_latent_dim")
    assert "the gaussian's rank" in latent["description"]


def test_embed_offline_says_at_once_to_pass_a_model_directory(tmp_path, capsys, monkeypatch):
    pytest.importorskip("transformers")
    import time

    from tests.audio_fakes import make_class_folders

    clips = make_class_folders(tmp_path / "clips")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: no network
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    uncached = ["--model", "nobody/an-ast-in-no-cache"]  # (the hub library reads its cache path once, at import)
    t0 = time.perf_counter()
    code, _, err = run_main(["embed", str(clips), "-o", str(tmp_path / "out"), *uncached], capsys)
    assert code == 2 and time.perf_counter() - t0 < 30
    assert len(err.strip().splitlines()) == 1 and "pass --model DIR" in err, err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run_main(["embed", str(clips), "-o", str(tmp_path / "out"), *uncached], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "pass --model DIR" in err
    data_md = (ROOT / "docs" / "data.md").read_text(encoding="utf-8")
    assert "--model ast-audioset" in data_md and "hf download MIT/ast-finetuned-audioset-10-10-0.4593" in data_md


def test_the_demo_script_prints_no_ansi_codes_into_a_log():
    import subprocess

    step = next(line for line in (ROOT / "examples" / "demo.sh").read_text().splitlines() if "step()" in line)
    out = subprocess.run(["bash", "-c", f"{step}\nstep 'Demo data'"], capture_output=True, text=True, check=True)
    assert out.stdout == "\n==> Demo data\n"
