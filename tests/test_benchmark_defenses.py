"""The defenses benchmark's bookkeeping: defenses run through the pipeline, runs refused when their settings changed,
the matrix over seeds built from every finished run, and the data-efficiency runs all training for the steps of the
full run.
"""

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from benchmarks import defenses, victims
from benchmarks.defenses import (
    MATRIX_ATTACKS,
    TRUE_LABELS,
    defense_report,
    fraction_args,
    fraction_settings,
    matrix_rows,
    missing_note,
    parse_args,
    planned_cells,
    summarise,
    training_plan,
    true_label_rows,
    write_matrix,
    write_true_labels,
)
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


def _rates(ba: float, asr: float, der: float | None = None) -> dict[str, float]:
    rates = {"ba": ba, "asr": asr, "any_class_asr": asr, "ra": 1 - asr}
    return rates if der is None else {**rates, "der": der}


def _report(defended: dict[str, float], victim_ba: float = 0.98) -> dict[str, Any]:
    return {"no_defense": _rates(victim_ba, 1.0), "clean_floor": _rates(0.98, 0.0), "defended": defended}


def _finish_refine(run_dir: Path, attack: str, seed: int, defended: dict[str, float], seconds: float) -> None:
    job = run_dir / f"{attack}_s{seed}" / "refine"
    job.mkdir(parents=True)
    (job / "report.json").write_text(json.dumps(_report(defended)))
    (job / "timing.json").write_text(json.dumps({"seconds": seconds, "resumed": False}))


def _finish_defense(run_dir: Path, attack: str, seed: int, defense: str, report: dict[str, Any]) -> None:
    job = run_dir / f"{attack}_s{seed}" / defense
    job.mkdir(parents=True)
    (job / "report.json").write_text(json.dumps(report))
    args = ["--seed_everything", str(seed)]
    (job / "benchmark.json").write_text(json.dumps({"args": args, "seconds": 12.0, "resumed": False}))


def test_the_paper_comparison_runs_over_three_seeds_and_the_other_defenses_on_seed_0() -> None:
    cells = planned_cells(["badnets"], ["refine", "shrinkpad", "neural_cleanse"], [0, 1, 2])
    assert cells == [
        ("badnets", 0, "refine"), ("badnets", 0, "shrinkpad"), ("badnets", 0, "neural_cleanse"),
        ("badnets", 1, "refine"), ("badnets", 1, "neural_cleanse"),
        ("badnets", 2, "refine"), ("badnets", 2, "neural_cleanse"),
    ]  # fmt: skip
    assert planned_cells(["badnets"], ["shrinkpad"], [1, 2]) == []  # a seed-0 defense has nothing on seeds 1-2
    assert set(MATRIX_ATTACKS) >= {"badnets", "batt", "refine_in_loop", "robust_trigger", "low_frequency"}


def test_the_matrix_holds_every_finished_run_and_names_the_missing_ones(tmp_path: Path) -> None:
    for seed, asr in ((0, 0.0), (1, 0.02), (2, 0.01)):
        _finish_refine(tmp_path, "badnets", seed, _rates(0.97, asr, 0.99), 100.0 + seed)
    _finish_defense(tmp_path, "badnets", 0, "shrinkpad", _report(_rates(0.90, 0.5, 0.7)))
    args = parse_args(["--run-dir", str(tmp_path), "--results-dir", str(tmp_path / "results"), "--finished-only"])
    rows, missing, carried = matrix_rows(args)
    assert carried == 0  # no committed results file in --results-dir
    assert [(r["seed"], r["defense"]) for r in rows if r["attack"] == "badnets"] == [
        (0, "none"), (0, "clean_floor"), (0, "refine"), (0, "shrinkpad"),
        (1, "none"), (1, "clean_floor"), (1, "refine"), (2, "none"), (2, "clean_floor"), (2, "refine"),
    ]  # fmt: skip
    assert ("badnets", 0, "shrinkpad") not in missing and ("badnets", 0, "median") in missing
    assert ("wanet", 2, "refine") in missing
    assert "median: every run" in missing_note(missing)
    assert "shrinkpad: blended (seed 0), wanet (seed 0)" in missing_note(missing)

    summary = {(r["attack"], r["defense"]): r for r in summarise(rows)}
    refine = summary["badnets", "refine"]
    assert refine["seeds"] == "0 1 2" and refine["asr"] == pytest.approx(0.01)
    assert refine["asr_std"] == pytest.approx(0.01) and refine["asr_worst"] == 0.02  # the highest ASR is the worst
    assert refine["ba_worst"] == 0.97 and refine["seconds"] == pytest.approx(101.0)
    assert summary["badnets", "shrinkpad"]["seeds"] == "0" and summary["badnets", "shrinkpad"]["asr_std"] == 0.0
    assert summary["badnets", "none"]["der"] is None and summary["badnets", "none"]["seconds"] is None


def test_a_victim_measured_differently_in_two_runs_of_one_seed_is_refused(tmp_path: Path) -> None:
    _finish_refine(tmp_path, "badnets", 0, _rates(0.97, 0.0, 0.99), 100.0)
    _finish_defense(tmp_path, "badnets", 0, "shrinkpad", _report(_rates(0.90, 0.5, 0.7), victim_ba=0.5))
    with pytest.raises(ConfigError, match="badnets seed 0: the victim or clean model measured in the shrinkpad run"):
        matrix_rows(parse_args(["--run-dir", str(tmp_path), "--fresh", "--finished-only"]))


def test_a_run_of_other_arguments_is_not_read_as_the_matrix(tmp_path: Path) -> None:
    _finish_defense(tmp_path, "badnets", 0, "shrinkpad", _report(_rates(0.90, 0.5, 0.7)))
    with pytest.raises(ConfigError, match="holds a run started with args"):
        matrix_rows(parse_args(["--run-dir", str(tmp_path), "--fresh", "--defense-arg=--trainer.max_epochs=1"]))


def test_the_matrix_files_say_partial_and_render_the_seeds_each_cell_holds(tmp_path: Path) -> None:
    for seed in (0, 1):
        _finish_refine(tmp_path, "badnets", seed, _rates(0.97, 0.01 * seed, 0.99), 100.0)
    _finish_defense(tmp_path, "badnets", 0, "shrinkpad", _report(_rates(0.90, 0.5, 0.7)))
    _finish_refine(tmp_path, "wanet", 0, _rates(0.97, 0.0, 0.99), 100.0)
    results = tmp_path / "results"
    text = write_matrix(parse_args(["--run-dir", str(tmp_path), "--results-dir", str(results), "--finished-only"]))
    assert text.startswith("**PARTIAL** matrix")
    assert "refine: badnets (seed 2), blended (seed 0 1 2), wanet (seed 1 2)," in text
    assert (results / "defenses.md").read_text() == text + "\n"
    asr = text[text.index("**ASR**") :]
    # REFINE's column holds seeds 0 1 for most attacks; wanet's cell says its own seeds
    assert "| REFINE (seeds 0 1) | ShrinkPad (seeds 0) |" in asr
    assert (
        "| badnets | 0.0000 ± 0.0000 (0.0000) | 1.0000 ± 0.0000 (1.0000) | 0.0050 ± 0.0071 (0.0100) | 0.5000 |" in asr
    )
    assert "| wanet | 0.0000 [seeds 0] | 1.0000 [seeds 0] | 0.0000 [seeds 0] | not run |" in asr
    assert "REFINE has the higher mean DER on 1 of the 1 attacks" in text
    assert (results / "defenses_heatmap.png").stat().st_size > 0


def test_the_true_label_side_row_stands_beside_the_matrix_run_that_read_no_label(tmp_path: Path) -> None:
    _finish_defense(tmp_path, "badnets", 0, "neural_cleanse", _report(_rates(0.98, 1.0, 0.0)))
    _finish_defense(tmp_path, "badnets", 0, "neural_cleanse_true_labels", _report(_rates(0.97, 0.01, 0.98)))
    side = tmp_path / "badnets_s0" / "neural_cleanse_true_labels" / "benchmark.json"
    args = parse_args(["--run-dir", str(tmp_path), "--results-dir", str(tmp_path / "results"), "--finished-only"])
    with pytest.raises(ConfigError, match="holds a run started with args"):  # not the true-label arguments
        true_label_rows(args)
    side.write_text(json.dumps({"args": ["--seed_everything", "0", *TRUE_LABELS], "seconds": 30.0, "resumed": False}))
    rows = true_label_rows(args)
    assert [(r["defense"], r["labels"], r["asr"], r["seconds"]) for r in rows] == [
        ("neural_cleanse", "victim", 1.0, 12.0), ("neural_cleanse", "true", 0.01, 30.0),
    ]  # fmt: skip
    text = write_true_labels(args)
    assert "| badnets | Neural Cleanse | true | 0.9700 | 0.0100 | 0.0100 | 0.9800 | 30 |" in text
    assert "| badnets | Neural Cleanse | victim's predictions | 0.9800 | 1.0000 |" in text


def test_no_finished_side_row_says_how_to_run_them(tmp_path: Path) -> None:
    args = parse_args(["--run-dir", str(tmp_path), "--results-dir", str(tmp_path / "results"), "--finished-only"])
    assert "--true-labels" in write_true_labels(args)
    assert (tmp_path / "results" / "defenses_true_labels.csv").read_text().startswith("attack,defense,labels,")


def _committed(monkeypatch: pytest.MonkeyPatch, changed: list[str] | None) -> None:
    """Results files read as committed as they are, with ``changed`` the configs changed since (None: in no commit)."""
    record = None if changed is None else lambda record, configs: (record.read_text(), changed)
    monkeypatch.setattr(defenses, "committed_record", record or (lambda record, configs: None))


def _earlier_session(tmp_path: Path) -> Path:
    """The results of an earlier session: BadNets seed 0 with REFINE and ShrinkPad, whose run folders are gone."""
    earlier = tmp_path / "earlier"
    _finish_refine(earlier, "badnets", 0, _rates(0.97, 0.0, 0.99), 100.0)
    _finish_defense(earlier, "badnets", 0, "shrinkpad", _report(_rates(0.90, 0.5, 0.7)))
    results = tmp_path / "results"
    write_matrix(parse_args(["--run-dir", str(earlier), "--results-dir", str(results), "--fresh", "--finished-only"]))
    return results


def test_runs_of_an_earlier_session_are_carried_from_the_committed_results(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    results = _earlier_session(tmp_path)
    _committed(monkeypatch, [])
    _finish_defense(tmp_path / "runs", "badnets", 0, "median", _report(_rates(0.95, 1.0, 0.0)))  # this session's
    args = parse_args(["--run-dir", str(tmp_path / "runs"), "--results-dir", str(results), "--finished-only"])
    rows, missing, carried = matrix_rows(args)
    assert carried == 2
    assert [(r["defense"], r["ba"], r["seconds"]) for r in rows if r["attack"] == "badnets"] == [
        ("none", 0.98, None), ("clean_floor", 0.98, None), ("refine", 0.97, 100.0), ("shrinkpad", 0.9, 12.0),
        ("median", 0.95, 12.0),
    ]  # fmt: skip
    assert ("badnets", 0, "refine") not in missing and ("badnets", 1, "refine") in missing
    text = write_matrix(args)
    assert "2 runs are carried from the committed defenses_seeds.csv" in text
    rows_again, _, carried_again = matrix_rows(args)  # the file now written is carried alike
    assert rows_again == rows and carried_again == 2

    _finish_defense(tmp_path / "runs", "badnets", 0, "shrinkpad", _report(_rates(0.91, 0.4, 0.8)))
    rows, _, carried = matrix_rows(args)  # a run in --run-dir is read from its folder, not carried
    assert carried == 1 and [r["ba"] for r in rows if r["defense"] == "shrinkpad"] == [0.91]


def test_a_victim_retrained_unlike_the_one_the_carried_runs_defended_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    results = _earlier_session(tmp_path)
    _committed(monkeypatch, [])
    _finish_defense(tmp_path / "runs", "badnets", 0, "median", _report(_rates(0.95, 1.0, 0.0), victim_ba=0.5))
    args = parse_args(["--run-dir", str(tmp_path / "runs"), "--results-dir", str(results), "--finished-only"])
    with pytest.raises(ConfigError, match="badnets seed 0: the victim or clean model measured in the median run"):
        matrix_rows(args)


def test_nothing_is_carried_from_results_of_changed_configs_or_with_fresh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    results = _earlier_session(tmp_path)
    args = ["--run-dir", str(tmp_path / "runs"), "--results-dir", str(results), "--finished-only"]
    _committed(monkeypatch, ["refine_pl/configs/refine/recipe.yaml"])
    with pytest.raises(ConfigError, match="recipe.yaml changed since it was committed.*--fresh"):
        matrix_rows(parse_args(args))
    assert matrix_rows(parse_args([*args, "--fresh"]))[0] == []
    assert matrix_rows(parse_args([*args, "--defense-arg=--trainer.max_epochs=1"]))[2] == 0  # not the settings
    _committed(monkeypatch, None)  # a results file in no commit is no record
    assert matrix_rows(parse_args(args))[2] == 0


def test_true_label_side_rows_of_an_earlier_session_are_carried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    earlier = tmp_path / "earlier"
    _finish_defense(earlier, "badnets", 0, "neural_cleanse", _report(_rates(0.98, 1.0, 0.0)))
    _finish_defense(earlier, "badnets", 0, "neural_cleanse_true_labels", _report(_rates(0.97, 0.01, 0.98)))
    side = earlier / "badnets_s0" / "neural_cleanse_true_labels" / "benchmark.json"
    side.write_text(json.dumps({"args": ["--seed_everything", "0", *TRUE_LABELS], "seconds": 30.0, "resumed": False}))
    results = tmp_path / "results"
    write_true_labels(parse_args(["--run-dir", str(earlier), "--results-dir", str(results), "--fresh"]))
    _committed(monkeypatch, [])
    rows = true_label_rows(parse_args(["--run-dir", str(tmp_path / "runs"), "--results-dir", str(results)]))
    assert [(r["defense"], r["labels"], r["asr"], r["seconds"]) for r in rows] == [
        ("neural_cleanse", "victim", 1.0, 12.0), ("neural_cleanse", "true", 0.01, 30.0),
    ]  # fmt: skip


def test_a_results_file_is_read_as_committed_with_the_configs_changed_since(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(victims, "REPO", tmp_path)
    monkeypatch.setattr(victims, "resolve_config", lambda config: tmp_path / config)

    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True)

    git("init", "-q")
    record, config = tmp_path / "results.csv", tmp_path / "recipe.yaml"
    record.write_text("attack\nbadnets\n")
    config.write_text("lr: 1\n")
    assert victims.committed_record(record, ["recipe.yaml"]) is None  # in no commit yet
    git("add", ".")
    git("commit", "-q", "-m", "results and config")
    record.write_text("attack\nnot committed\n")
    assert victims.committed_record(record, ["recipe.yaml"]) == ("attack\nbadnets\n", [])
    config.write_text("lr: 2\n")
    assert victims.committed_record(record, ["recipe.yaml"])[1] == ["recipe.yaml"]  # not committed
    git("commit", "-q", "-m", "new config", "recipe.yaml")
    assert victims.committed_record(record, ["recipe.yaml"])[1] == ["recipe.yaml"]  # committed after the results
