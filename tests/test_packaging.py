"""Configs are package data: every one is in the wheel, and its ``configs/...`` name finds it without a checkout."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from refine_pl.configs import CONFIGS, resolve_config
from refine_pl.defenses import DEFENSES
from refine_pl.errors import ConfigError
from tests.conftest import REPO

BUILD_INPUTS = ("setup.cfg", "pyproject.toml", "README.md", "refine_pl", "datamodules", "callbacks")
"""What setup.cfg builds the wheel from: its metadata files and its packages."""


def _shipped(root: Path) -> list[str]:
    """The files of the configs folder ``root`` (its Python module aside), relative to it."""
    return sorted(
        path.relative_to(root).as_posix()
        for path in root.rglob("*")
        if path.is_file() and path.name != "__init__.py" and "__pycache__" not in path.parts
    )


SHIPPED = _shipped(CONFIGS)


def test_the_configs_folder_holds_every_kind_of_job() -> None:
    assert {name.split("/")[0] for name in SHIPPED} == {"attacks", "cluster", "defenses", "refine", "victim"}
    assert "refine/reference.yaml" in SHIPPED and "cluster/slurm_ddp.sbatch" in SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_a_config_name_finds_the_shipped_file_from_any_folder(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_config(f"configs/{name}") == str(CONFIGS / name)
    assert resolve_config(f"./configs/{name}") == str(CONFIGS / name)


def test_a_file_that_exists_is_used_as_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    own = tmp_path / "configs" / "refine" / "reference.yaml"  # the user's copy, edited, under the shipped name
    own.parent.mkdir(parents=True)
    own.write_text("trainer:\n  max_epochs: 1\n")
    assert resolve_config("configs/refine/reference.yaml") == "configs/refine/reference.yaml"
    assert resolve_config(str(own)) == str(own)
    assert resolve_config("my_job.yaml") == "my_job.yaml"  # not a configs/ name: jsonargparse reads or refuses it


def test_an_unknown_config_name_says_where_it_looked_and_what_ships(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=f"in {tmp_path} nor among refine-pl's configs in {CONFIGS}") as unknown:
        resolve_config("configs/refine/mnsit.yaml")
    assert "configs/refine/mnist.yaml" in str(unknown.value) and "\n" not in str(unknown.value)
    with pytest.raises(ConfigError, match=r"configs/attacks/, configs/cluster/, configs/defenses/"):
        resolve_config("configs/attack/badnets.yaml")


@pytest.mark.parametrize("name", sorted(name for name, entry in DEFENSES.items() if entry.overlay))
def test_every_defense_overlay_is_a_shipped_config(name: str) -> None:
    overlay = DEFENSES[name].overlay
    assert overlay.startswith("configs/") and Path(resolve_config(overlay)).is_relative_to(CONFIGS)


@pytest.mark.slow
def test_the_wheel_holds_every_config_and_finds_them_without_a_checkout(tmp_path: Path) -> None:
    # Built from a copy of the sources, so that a build/ folder left in the checkout cannot add files to the wheel.
    source = tmp_path / "source"
    source.mkdir()
    for name in BUILD_INPUTS:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, source / name)
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path / "dist"), str(source)]
    subprocess.run(command, check=True, capture_output=True, timeout=600)
    (wheel,) = (tmp_path / "dist").glob("refine_pl-*.whl")
    installed = tmp_path / "installed"  # a pure-Python wheel unpacked is the package as pip installs it
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(installed)
    assert _shipped(installed / "refine_pl" / "configs") == _shipped(source / "refine_pl" / "configs") == SHIPPED

    # Only the unpacked wheel is importable as refine_pl there, and the current folder is an empty one.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = (
        "import json, sys, refine_pl.configs as c; "
        "print(json.dumps([c.__file__, *(c.resolve_config('configs/' + n) for n in sys.argv[1:])]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, *SHIPPED],
        cwd=elsewhere, env={**os.environ, "PYTHONPATH": str(installed), "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    module, *resolved = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(module).is_relative_to(installed)
    assert resolved == [str(installed / "refine_pl" / "configs" / name) for name in SHIPPED]
