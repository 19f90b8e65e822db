"""Shared fixtures: a small backdoored victim trained once per test session through the real CLI."""

from pathlib import Path

import pytest
import torch

from refine_pl.cli import cli_main

REPO = Path(__file__).resolve().parents[1]
VICTIM_CONFIG = str(REPO / "configs" / "victim" / "mnist.yaml")
BADNETS_CONFIG = str(REPO / "configs" / "attacks" / "badnets.yaml")
BACKDOORED_VICTIM = ["--config", VICTIM_CONFIG, "--config", BADNETS_CONFIG]
REFINE_CONFIG = str(REPO / "configs" / "refine" / "mnist.yaml")
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def victim_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BadNets victim (small CNN, embedded MNIST) trained for 3 epochs with the main job's config."""
    root = tmp_path_factory.mktemp("victim")
    cli_main(["fit", *BACKDOORED_VICTIM, "--trainer.max_epochs", "3", "--trainer.default_root_dir", str(root), *QUIET])
    path = root / "checkpoints" / "last.ckpt"
    assert path.is_file()
    return path
