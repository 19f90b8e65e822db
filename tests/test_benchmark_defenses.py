"""The defenses benchmark's bookkeeping: runs refused when their settings changed, and the data-efficiency runs all
training for the steps of the full run.
"""

import json
from pathlib import Path

import pytest

from benchmarks.defenses import fraction_args, fraction_settings, run_defense
from refine_pl.errors import ConfigError

MNIST_PLAN = {"images": 3600, "batch_size": 64, "epochs": 20, "cosine_epochs": 20}
"""The MNIST REFINE job: 3,600 unlabeled training images, batch 64, 20 epochs on one cosine."""


@pytest.mark.parametrize("fraction", [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0])
def test_every_fraction_trains_for_the_steps_of_the_full_run(fraction: float) -> None:
    settings = fraction_settings(fraction, MNIST_PLAN)
    batches_per_epoch = settings["images"] // settings["batch_size"]
    assert settings["steps"] == 20 * (3600 // 64) == 1120
    assert settings["epochs"] * batches_per_epoch >= settings["steps"] > (settings["epochs"] - 1) * batches_per_epoch
    assert settings["cosine_epochs"] == pytest.approx(1120 / batches_per_epoch, abs=0.5)
    assert settings["images"] == round(fraction * 3600) and settings["batch_size"] == min(64, settings["images"])
    args = fraction_args(fraction, settings)
    assert args[args.index("--trainer.max_steps") + 1] == "1120"


def test_fewer_images_than_a_batch_train_in_one_batch_per_epoch() -> None:
    assert fraction_settings(0.01, MNIST_PLAN) == {
        "images": 36, "batch_size": 36, "epochs": 1120, "cosine_epochs": 1120, "steps": 1120,
    }  # fmt: skip
    assert fraction_settings(1.0, MNIST_PLAN)["epochs"] == 20


def test_a_run_started_with_other_settings_is_refused_not_resumed(tmp_path: Path) -> None:
    (tmp_path / "benchmark.json").write_text(json.dumps({"args": ["--trainer.max_epochs=2"]}))
    with pytest.raises(ConfigError, match="holds a run started with the arguments .*max_epochs=2.*, not \\[\\]"):
        run_defense("refine", tmp_path / "victim.ckpt", tmp_path / "clean.ckpt", tmp_path, [])
