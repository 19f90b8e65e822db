"""The defenses benchmark's bookkeeping: defenses run through the pipeline, runs refused when their settings changed,
and the data-efficiency runs all training for the steps of the full run.
"""

import json
from pathlib import Path

import pytest

from benchmarks.defenses import defense_report, fraction_args, fraction_settings, training_plan
from refine_pl.errors import ConfigError
from refine_pl.metric_names import CLEAN_FLOOR, NO_DEFENSE, REPORT_ROWS

MNIST_PLAN = {"images": 3600, "batch_size": 64, "epochs": 30, "cosine_epochs": 30, "warmup_epochs": 1}
"""The MNIST REFINE job: 3,600 unlabeled training images, batch 64, 30 epochs, the first a warmup, on one cosine."""


@pytest.mark.slow  # a CLI run or worker processes
def test_the_plan_is_read_from_the_mnist_refine_config(victim_checkpoint: Path, tmp_path: Path) -> None:
    assert training_plan(victim_checkpoint, tmp_path, []) == MNIST_PLAN
    plain_cosine = [
        "--model.init_args.scheduler.class_path=torch.optim.lr_scheduler.CosineAnnealingLR",
        "--model.init_args.scheduler.init_args.T_max=25",
    ]
    plan = training_plan(victim_checkpoint, tmp_path, plain_cosine)
    assert (plan["epochs"], plan["cosine_epochs"], plan["warmup_epochs"]) == (30, 25, 0)
    step_lr = [
        "--model.init_args.scheduler.class_path=torch.optim.lr_scheduler.StepLR",
        "--model.init_args.scheduler.init_args.step_size=5",
    ]
    with pytest.raises(ConfigError, match="stretches one of"):
        training_plan(victim_checkpoint, tmp_path, step_lr)


@pytest.mark.parametrize("fraction", [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0])
def test_every_fraction_trains_for_the_steps_of_the_full_run(fraction: float) -> None:
    settings = fraction_settings(fraction, MNIST_PLAN)
    batches_per_epoch = settings["images"] // settings["batch_size"]
    assert settings["steps"] == 30 * (3600 // 64) == 1680
    assert settings["epochs"] * batches_per_epoch >= settings["steps"] > (settings["epochs"] - 1) * batches_per_epoch
    assert settings["cosine_epochs"] == pytest.approx(1680 / batches_per_epoch, abs=0.5)
    assert settings["warmup_epochs"] == pytest.approx(56 / batches_per_epoch, abs=0.5)  # the full run's first epoch
    assert settings["images"] == round(fraction * 3600) and settings["batch_size"] == min(64, settings["images"])
    args = fraction_args(fraction, settings)
    assert args[args.index("--trainer.max_steps") + 1] == "1680"
    assert args[args.index("--model.init_args.scheduler.init_args.warmup_epochs") + 1] == str(settings["warmup_epochs"])


def test_fewer_images_than_a_batch_train_in_one_batch_per_epoch() -> None:
    assert fraction_settings(0.01, MNIST_PLAN) == {
        "images": 36, "batch_size": 36, "epochs": 1680, "cosine_epochs": 1680, "warmup_epochs": 56, "steps": 1680,
    }  # fmt: skip
    assert fraction_settings(1.0, MNIST_PLAN)["epochs"] == 30


def test_a_plain_cosine_gets_no_warmup_argument() -> None:
    settings = fraction_settings(0.1, {**MNIST_PLAN, "warmup_epochs": 0})
    assert settings["warmup_epochs"] == 0
    assert not any("warmup" in arg for arg in fraction_args(0.1, settings))


def test_a_run_started_with_other_settings_is_refused_not_resumed(tmp_path: Path) -> None:
    (tmp_path / "benchmark.json").write_text(json.dumps({"args": ["--trainer.max_epochs=2"]}))
    with pytest.raises(ConfigError, match="holds a run started with args .*max_epochs=2.*, not \\[\\]"):
        defense_report("refine", tmp_path / "victim.ckpt", tmp_path / "clean.ckpt", tmp_path, [])


def test_a_training_free_defense_is_tested_through_the_pipeline_and_then_read_back(
    victim_checkpoint: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "shrinkpad"
    report = defense_report("shrinkpad", victim_checkpoint, victim_checkpoint, run_dir, [])
    assert report["defense"] == "shrinkpad" and not report["resumed"] and report["seconds"] > 0
    assert not (run_dir / "checkpoints").exists()  # tested as built, never fitted
    assert set(report) >= {row.key for row in REPORT_ROWS}
    # the victim is its own clean reference here: the two rows measure the same model on the same images
    assert report[NO_DEFENSE.key] == {rate: report[CLEAN_FLOOR.key][rate] for rate in NO_DEFENSE.rates}
    written = (run_dir / "report.json").stat().st_mtime_ns
    assert defense_report("shrinkpad", victim_checkpoint, victim_checkpoint, run_dir, []) == report
    assert (run_dir / "report.json").stat().st_mtime_ns == written  # the finished run is read, not run again
