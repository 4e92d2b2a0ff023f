"""Bad input: every unreadable file gets one clear line and the right exit code, and nothing is written."""

from __future__ import annotations

import pytest

from feda2v_toolkit.config import load_config
from feda2v_toolkit.errors import InputError, UsageError

from .conftest import FIXTURES, copy_fixture

BAD = FIXTURES / "bad"

# fixture file -> (code, text the one-line message must contain, "line:column" or None)
CASES = {
    "malformed.json": ("json-syntax", "Expecting ',' delimiter at line 4, column 5", "4:5"),
    "comments.json": ("json-comments", "JSON does not allow comments", "3:5"),
    "trailing-comma.json": ("json-syntax", "trailing comma at line 3, column 44", "3:44"),
    "empty.json": ("empty-file", "empty file", None),
    "array.json": ("not-object", "top level is an array; expected a JSON object", "1:1"),
    "latin1.json": ("not-utf8", "not UTF-8 text: byte 0xe9 at line 3, column 21", "3:21"),
    "nan.json": ("json-syntax", "NaN is not valid JSON", None),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_bad_file_gets_one_line_naming_file_position_and_cause(feda2v, monkeypatch, name):
    code, text, position = CASES[name]
    monkeypatch.chdir(BAD)
    run = feda2v("validate", name)
    assert run.code == 1
    assert len(run.lines) == 1
    line = run.lines[0]
    assert line.startswith(f"{name}:{position}: error: " if position else f"{name}: error: ")
    assert text in line and line.endswith(f"[{code}]")


@pytest.mark.parametrize("name", sorted(CASES))
def test_migrate_refuses_bad_files_and_writes_nothing(feda2v, tmp_path, name):
    path = copy_fixture(BAD / name, tmp_path)
    before = path.read_bytes()
    run = feda2v("migrate", "--in-place", path)
    assert run.code == 1
    assert run.stderr.count("feda2v-tk: error:") == 1 and str(path) in run.stderr
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_missing_file_is_an_io_error_with_exit_2(feda2v, tmp_path):
    for command in ("validate", "migrate"):
        run = feda2v(command, tmp_path / "nope.json")
        assert run.code == 2
        assert "nope.json" in run.stdout + run.stderr and "no such file" in run.stdout + run.stderr


def test_directory_mixing_good_and_bad_files_reports_each_bad_file_once(feda2v, tmp_path):
    copy_fixture(FIXTURES / "reference" / "new.json", tmp_path, "good.json")
    (tmp_path / "sub").mkdir()
    copy_fixture(BAD / "comments.json", tmp_path / "sub")
    copy_fixture(BAD / "empty.json", tmp_path)
    (tmp_path / ".hidden").mkdir()
    copy_fixture(BAD / "malformed.json", tmp_path / ".hidden")  # hidden directories are skipped
    (tmp_path / "notes.txt").write_text("not json")
    run = feda2v("validate", tmp_path)
    assert run.code == 1
    assert [line.split(": ")[0].rsplit("/", 1)[-1] for line in run.lines] == ["empty.json", "comments.json:3:5"]
    assert "3 files checked: 1 valid, 2 invalid" in run.stderr


def test_a_missing_file_among_invalid_ones_makes_the_exit_code_2(feda2v, tmp_path):
    copy_fixture(BAD / "empty.json", tmp_path)
    run = feda2v("validate", tmp_path / "empty.json", tmp_path / "missing.json")
    assert run.code == 2
    assert len(run.lines) == 2


def test_directory_without_json_files_is_a_usage_error(feda2v, tmp_path):
    run = feda2v("validate", tmp_path)
    assert run.code == 2
    assert "holds no .json files" in run.stdout


def test_very_large_file_is_refused_without_reading_it(feda2v, tmp_path, monkeypatch):
    from feda2v_toolkit.config import document

    monkeypatch.setattr(document, "MAX_CONFIG_BYTES", 1024)
    big = tmp_path / "big.json"
    big.write_text('{"feda2v": {"_comment": "' + "x" * 4096 + '"}}')
    run = feda2v("validate", big)
    assert run.code == 1
    assert len(run.lines) == 1 and "file is too large (4" in run.lines[0] and "[file-too-large]" in run.lines[0]
    run = feda2v("migrate", "--in-place", big)
    assert run.code == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["big.json"]


def test_default_size_limit_is_generous_for_configs_but_bounded():
    from feda2v_toolkit.config.document import MAX_CONFIG_BYTES

    assert 1024 * 1024 <= MAX_CONFIG_BYTES <= 64 * 1024 * 1024


def test_load_config_raises_one_line_errors_naming_the_file(tmp_path):
    with pytest.raises(UsageError, match=r"missing\.json: no such file"):
        load_config(tmp_path / "missing.json")
    with pytest.raises(InputError, match=r"comments\.json:3:5: invalid JSON: comment"):
        load_config(BAD / "comments.json")
    with pytest.raises(InputError, match="top level is an array"):
        load_config(str(BAD / "array.json"))
