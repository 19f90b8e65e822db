"""Every ``train.py`` and ``pipeline.py`` command that README.md and docs/*.md show still parses, with the configs
it names.
"""

import re
import shlex

import pytest

from refine_pl.cli import cli_main
from refine_pl.pipeline import config_flags, parse_args
from tests.conftest import REPO

DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def documented_commands(program: str) -> list[list[str]]:
    """The arguments of every ``python <program> ...`` command in the documents' shell blocks, continuations joined."""
    text = "\n".join(path.read_text() for path in DOCUMENTS)
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:2] == ["python", program]:
                commands.append(words[2:])
    return commands


def _parses(args: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # the documents' paths are relative to the repository root
    with pytest.raises(SystemExit) as stop:
        cli_main([*args, "--print_config"])
    assert stop.value.code == 0, args


def test_the_documents_show_commands_of_both_entry_points() -> None:
    assert len(documented_commands("train.py")) >= 10 and len(documented_commands("pipeline.py")) >= 2


@pytest.mark.parametrize("args", documented_commands("train.py"), ids=" ".join)
def test_documented_train_command_parses(
    args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    _parses(args, monkeypatch)


@pytest.mark.parametrize("args", documented_commands("pipeline.py"), ids=" ".join)
def test_documented_pipeline_command_parses_with_each_stage(
    args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    options = parse_args(args)
    _parses(["fit", *config_flags(options.victim_config), *options.victim_arg], monkeypatch)
    _parses(["fit", *config_flags(options.refine_config), *options.refine_arg], monkeypatch)
