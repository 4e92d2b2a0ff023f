"""The README stays true: its command table is the CLI's, and it opens with the two set-up commands."""

from __future__ import annotations

import re
from pathlib import Path

from feda2v_toolkit.cli import COMMANDS, SHORT_HELP

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_readme_opens_with_the_demo_and_test_commands():
    first_block = re.search(r"```bash\n(.*?)```", README, re.S)
    assert first_block is not None
    commands = [line.split("#")[0].strip() for line in first_block.group(1).splitlines()]
    assert commands == ["make demo", "make test"]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(r"^make test$", ci, re.M)


def test_command_table_lists_every_command_with_its_help_line():
    table = README.split("<!-- commands")[1].split("<!-- /commands -->")[0]
    rows = dict(re.findall(r"^\| `([a-z-]+)` \| (.+?) \|$", table, re.M))
    assert rows == {name: SHORT_HELP[name] for name in COMMANDS}


def test_documentation_links_resolve():
    for target in re.findall(r"\]\(((?:docs|plugins)/[^)#]+)\)", README):
        assert (ROOT / target).exists(), target
