"""Every error is a handled error: each command, driven with the hostile inputs of every class, ends
in one ``feda2v-tk: error:`` line and a nonzero exit -- never in "internal error" (kept for our bugs)."""

from __future__ import annotations

import errno
import json

import pytest
import torch

from tests.hardening.conftest import TAMPERED_MODELS, run_main


def _assert_handled(argv, code, out, err, *, may_succeed=False):
    assert "internal error" not in err, (argv, err)
    assert "Traceback" not in err, (argv, err)
    assert may_succeed or code not in (0, None), (argv, out, err)
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) <= 1 or argv[0] in ("validate", "migrate"), (argv, err)


MALFORMED = {"class-names-string", "generators-missing", "init-args-not-object", "class-to-generator-empty",
             "class-counts-strings", "samples-per-class-list", "class-counts-negative"}


@pytest.mark.parametrize("case", sorted(TAMPERED_MODELS))
def test_tampered_model_files(case, tampered, tiny_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FEDA2V_MEMORY_LIMIT", str(2**32))
    model = str(tampered[case])
    for argv in (["inspect", model], ["inspect", model, "--json"],
                 ["generate", model, "-o", str(tmp_path / "out"), "-k", "2"],
                 ["evaluate", model, "-d", str(tiny_data), "-q"]):
        code, out, err = run_main(argv, capsys)
        # inspect shows the metadata without loading weights: it fails only for malformed metadata
        _assert_handled(argv, code, out, err, may_succeed=argv[0] == "inspect" and case not in MALFORMED)
    assert not (tmp_path / "out").exists()


@pytest.fixture
def hostile_data(tmp_path, symlink_loop):
    from safetensors.torch import save_file

    huge_label = tmp_path / "huge_label.safetensors"
    save_file({"embeddings": torch.zeros(2, 6, 4), "labels": torch.tensor([0, 2**40])}, str(huge_label))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    empty_dir = tmp_path / "empty_dir"
    empty_dir.mkdir()
    return {"device": "/dev/zero", "loop": str(symlink_loop), "huge-label": str(huge_label),
            "garbage": str(garbage), "empty-dir": str(empty_dir), "missing": str(tmp_path / "nope")}


@pytest.mark.parametrize("case", ["device", "loop", "huge-label", "garbage", "empty-dir", "missing"])
def test_hostile_datasets(case, hostile_data, model_file, tmp_path, capsys):
    data = hostile_data[case]
    for argv in (["train", "-d", data, "-o", str(tmp_path / "m.safetensors")],
                 ["plan", "-d", data], ["analyze", "-d", data, "-q"],
                 ["evaluate", str(model_file), "-d", data, "-q"],
                 ["generate", str(model_file), "-o", str(tmp_path / "out"), "--conditions", data]):
        code, out, err = run_main(argv, capsys)
        _assert_handled(argv, code, out, err)


@pytest.fixture
def hostile_configs(tmp_path, symlink_loop):
    inf = tmp_path / "inf.json"
    inf.write_text(json.dumps({"feda2v": {"generator_learning_rate": 1}}).replace("1}", "1e400}"))
    return {"device": "/dev/zero", "loop": str(symlink_loop), "infinity": str(inf), "missing": str(tmp_path / "no")}


@pytest.mark.parametrize("case", ["device", "loop", "infinity", "missing"])
def test_hostile_configs(case, hostile_configs, tiny_data, tmp_path, capsys):
    cfg = hostile_configs[case]
    for argv in (["validate", cfg], ["migrate", cfg], ["migrate", cfg, "--json"],
                 ["train", "-c", cfg, "-d", str(tiny_data), "-o", str(tmp_path / "m.safetensors")],
                 ["plan", "-c", cfg], ["analyze", "-c", cfg, "-d", str(tiny_data), "-q"]):
        code, out, err = run_main(argv, capsys)
        _assert_handled(argv, code, out, err)


def test_unwritable_outputs(not_a_dir, model_file, tiny_data, tmp_path, capsys):
    cfg = tmp_path / "old.json"
    cfg.write_text('{"feda2v": {"generator_target_sequence_length": 1214}}')
    bad = str(not_a_dir / "sub" / "x")
    for argv in (["train", "-d", str(tiny_data), "-o", bad + ".safetensors"],
                 ["train", "-d", str(tiny_data), "-o", str(tmp_path / "m.safetensors"), "--checkpoint-dir", bad],
                 ["generate", str(model_file), "-o", bad, "-k", "2"],
                 ["demo-data", bad + ".safetensors", "--per-class", "1", "--seq-len", "6", "--dim", "4"],
                 ["demo-data", "--legacy-config", bad + ".json"],
                 ["migrate", str(cfg), "-o", bad + ".json"],
                 ["schema", "-o", bad + ".json"],
                 ["convert", str(cfg), "-o", bad + ".safetensors"]):
        code, out, err = run_main(argv, capsys)
        _assert_handled(argv, code, out, err)


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disks(model_file, tiny_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("feda2v_toolkit.runtime.tensorfile._write_sorted", _disk_full)
    monkeypatch.setattr("feda2v_toolkit.data.writer._Shard.write_rows", _disk_full)
    for argv in (["train", "-d", str(tiny_data), "-o", str(tmp_path / "m.safetensors"), "--epochs", "1",
                  "--training-length", "4", "--hidden-dim", "8", "--latent-dim", "2", "--seed", "0", "-q"],
                 ["generate", str(model_file), "-o", str(tmp_path / "out"), "-k", "2"],
                 ["demo-data", str(tmp_path / "d.safetensors"), "--per-class", "1", "--seq-len", "6", "--dim", "4"],
                 ["demo-data", str(tmp_path / "shards"), "--per-class", "1", "--seq-len", "6", "--dim", "4"]):
        code, out, err = run_main(argv, capsys)
        _assert_handled(argv, code, out, err)
        assert "No space left on device" in err, argv
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_class_names_as_a_string_and_nan_weights_are_refused_not_silently_wrong(tampered, tmp_path, capsys):
    for case, needle in (("class-names-string", "'class_names' must be a non-empty list of strings"),
                         ("nan-weights", "contains NaN or inf")):
        code, _, err = run_main(["generate", str(tampered[case]), "-o", str(tmp_path / case), "-k", "2"], capsys)
        assert code == 1 and needle in err, err


@pytest.fixture
def hostile_cache(tmp_path):
    """AST caches of the original code with a 0-byte chunk, and with a chunk whose header has a negative shape."""
    import struct

    from tests.data.test_original_caches import write_ast_cache

    caches = {}
    for name in ("empty-chunk", "negative-shape"):
        write_ast_cache(tmp_path / name, {"dog": [2]})
        chunk = tmp_path / name / "dog" / "embeddings_000.npy"
        if name == "empty-chunk":
            chunk.write_bytes(b"")
        else:
            header = "{'descr': '<f4', 'fortran_order': False, 'shape': (-2, 14, 8), }"
            header += " " * (117 - len(header)) + "\n"
            chunk.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode())
        caches[name] = tmp_path / name
    return caches


@pytest.mark.parametrize("case", ["empty-chunk", "negative-shape"])
def test_broken_cache_chunks_are_one_line_input_errors(case, hostile_cache, tmp_path, capsys):
    for argv in (["plan", "-d", str(hostile_cache[case])],
                 ["convert-data", str(hostile_cache[case]), "-o", str(tmp_path / "out")]):
        code, out, err = run_main(argv, capsys)
        _assert_handled(argv, code, out, err)
        assert code == 1 and "aborted" not in err and "embeddings_000.npy" in err, err
    assert not (tmp_path / "out").exists()


def test_a_model_file_without_its_model_document_is_an_input_error(model_file, tmp_path, capsys):
    from safetensors import safe_open

    from feda2v_toolkit.model.file import write_safetensors

    with safe_open(str(model_file), framework="pt") as fh:
        meta = {k: v for k, v in fh.metadata().items() if k != "model"}
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open is not a dict
    write_safetensors(tmp_path / "nodoc.safetensors", tensors, meta)
    for argv in (["generate", str(tmp_path / "nodoc.safetensors"), "-o", str(tmp_path / "out"), "-k", "2"],
                 ["inspect", str(tmp_path / "nodoc.safetensors")]):
        code, out, err = run_main(argv, capsys)
        _assert_handled(argv, code, out, err)
        assert code == 1 and "no 'model' metadata document" in err


@pytest.fixture
def hostile_manifests(tmp_path):
    (tmp_path / "root").mkdir()
    escape = tmp_path / "root" / "escape.csv"
    escape.write_text("path,label\n../../etc/passwd,a\n")
    absolute = tmp_path / "root" / "absolute.json"
    absolute.write_text(json.dumps([{"path": "/etc/passwd", "label": "a"}]))
    nested = tmp_path / "root" / "nested.json"
    nested.write_text("[" * 100_000 + "]" * 100_000)
    return {"escape": (escape, "is outside the audio root"), "absolute": (absolute, "is outside the audio root"),
            "nested": (nested, "nested too deeply")}


@pytest.mark.parametrize("case", ["escape", "absolute", "nested"])
def test_hostile_manifests_are_one_line_errors(case, hostile_manifests, tmp_path, capsys):
    pytest.importorskip("transformers")
    manifest, needle = hostile_manifests[case]
    argv = ["embed", str(manifest), "-o", str(tmp_path / "out")]
    code, out, err = run_main(argv, capsys)
    _assert_handled(argv, code, out, err)
    assert code == 1 and needle in err, err


@pytest.mark.parametrize("seconds", ["inf", "nan", "1e300"])
def test_absurd_clip_lengths_are_usage_errors(seconds, tmp_path, capsys):
    argv = ["embed", str(tmp_path), "-o", str(tmp_path / "out"), "--clip-seconds", seconds]
    code, out, err = run_main(argv, capsys)
    _assert_handled(argv, code, out, err)
    assert code == 2 and "--clip-seconds" in err


def test_a_dataset_larger_than_the_address_space_is_a_usage_error(tmp_path):
    """A sparse 37 GB dataset file under a 12 GB address-space limit: one line, exit 2 (not 'unable to mmap')."""
    import resource
    import struct
    import subprocess
    import sys

    n, s, d = 20000, 1214, 768
    emb = n * s * d * 2
    header = {"__metadata__": {"feda2v_format": "dataset", "format_version": "1", "class_names": '["a", "b"]'},
              "embeddings": {"dtype": "F16", "shape": [n, s, d], "data_offsets": [0, emb]},
              "labels": {"dtype": "I64", "shape": [n], "data_offsets": [emb, emb + 8 * n]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    big = tmp_path / "big.safetensors"
    try:
        with open(big, "wb") as fh:
            fh.write(struct.pack("<Q", len(raw)) + raw)
            fh.truncate(8 + len(raw) + emb + 8 * n)
    except OSError:
        pytest.skip("this file system has no sparse files of 37 GB")

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (12 * 2**30, 12 * 2**30))

    runs = [["plan", "-d", str(big)], ["analyze", "-d", str(big), "-q"],
            ["convert-data", str(big), "-o", str(tmp_path / "out")]]
    code = ("import json, sys\nfrom feda2v_toolkit.cli import main\n"  # one interpreter for the three commands
            "for argv in json.loads(sys.argv[1]):\n"
            "    try:\n        main(argv)\n    except SystemExit as exc:\n"
            "        print('exit', argv[0], exc.code, file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(runs)], capture_output=True, text=True,
                          timeout=300, preexec_fn=limit)
    lines = proc.stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("exit ")] == ["exit plan 2", "exit analyze 2",
                                                                   "exit convert-data 2"], proc.stderr
    errors = [line for line in lines if not line.startswith("exit ")]
    assert len(errors) == 3 and all("cannot memory-map the file" in line for line in errors), proc.stderr
    assert not (tmp_path / "out").exists()


def test_files_that_need_unpickling_are_one_line_without_torchs_advice(tmp_path, capsys):
    import pickle

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps({"embeddings": Payload()}))
    saved = tmp_path / "saved.pt"
    torch.save({"embeddings": Payload(), "labels": torch.zeros(2)}, saved)
    for argv in (["plan", "-d", str(raw)], ["plan", "-d", str(saved)], ["convert-data", str(saved), "-o",
                                                                         str(tmp_path / "o")],
                 ["convert", str(saved), "-o", str(tmp_path / "m.safetensors")]):
        code, out, err = run_main(argv, capsys)
        _assert_handled(argv, code, out, err)
        assert len(err.strip().splitlines()) == 1 and "never unpickles" in err, err
        assert "weights_only=False" not in err and "\x1b[" not in err and "must never run" not in out + err
