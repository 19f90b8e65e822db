"""The defenses benchmark's bookkeeping: victims trained once and reused, runs refused when their settings changed,
and the data-efficiency runs all training for the steps of the full run.
"""

import json
from pathlib import Path

import pytest

import benchmarks.victims as victims
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
        run_defense("refine", tmp_path / "victim.ckpt", tmp_path, [])


@pytest.mark.slow
def test_a_victim_is_trained_once_then_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tiny = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "0"]
    first = victims.find_or_train_victim("badnets", seed=3, root=tmp_path, args=tiny)
    folder = tmp_path / "badnets_s3"
    assert first.checkpoint.parent == folder / "checkpoints" and first.checkpoint.is_file() and not first.resumed
    record = json.loads((folder / "victim.json").read_text())
    assert (record["attack"], record["seed"], record["args"]) == ("badnets", 3, tiny)
    config = (folder / "config.yaml").read_text()
    assert "seed_everything: 3" in config and "seed: 3" in config  # the seed reaches the job and the attack

    def no_training(*args, **kwargs):
        raise AssertionError("a finished victim was trained again")

    monkeypatch.setattr(victims, "train_victim", no_training)
    assert victims.find_or_train_victim("badnets", seed=3, root=tmp_path, args=tiny) == first
    with pytest.raises(ConfigError, match="badnets_s3 holds a run started with the arguments"):
        victims.find_or_train_victim("badnets", seed=3, root=tmp_path, args=[])
    with pytest.raises(ConfigError, match="No attack config configs/attacks/nope.yaml"):
        victims.find_or_train_victim("nope", root=tmp_path)
