"""benchmarks/tune_refine.py: each tuning victim's seed, and no reuse of a run made with other overrides or recipe."""

import json
from pathlib import Path

import pytest

from benchmarks import tune_refine


def test_a_victim_name_carries_its_seed_or_gets_the_tuning_seed() -> None:
    assert tune_refine.tuning_seed("batt_cw20_s101") == 101
    assert tune_refine.tuning_seed("batt_cw20") == tune_refine.TUNING_SEED
    assert tune_refine.tuning_seed("physical_ba_d15") == tune_refine.TUNING_SEED  # "_d15" is not a seed
    assert all(tune_refine.tuning_seed(name) in (100, 101) for name in tune_refine.TUNING_VICTIMS)


def test_a_finished_run_of_other_overrides_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tune_refine, "tuning_victim", lambda run_dir, name: (tmp_path / "victim", tmp_path / "clean"))
    first, other, *_ = (name for name, overrides in tune_refine.CANDIDATES.items() if overrides)  # two that differ
    job = tmp_path / "batt_cw20" / other
    job.mkdir(parents=True)
    report = {
        "no_defense": {"ba": 0.98, "asr": 1.0}, "defended": {"ba": 0.99, "asr": 0.004}, "clean_floor": {"asr": 0.0}
    }  # fmt: skip
    (job / "report.json").write_text(json.dumps(report))
    (job / "timing.json").write_text(json.dumps({"seconds": 12.0, "overrides": tune_refine.CANDIDATES[first]}))
    with pytest.raises(SystemExit, match="other overrides"):
        tune_refine.candidate_row(tmp_path, "batt_cw20", other)

    (job / "timing.json").write_text(json.dumps({"seconds": 12.0, "overrides": tune_refine.CANDIDATES[other]}))
    row = tune_refine.candidate_row(tmp_path, "batt_cw20", other)
    assert row["asr_margin"] == pytest.approx(0.01 - 0.004) and row["ba_margin"] == pytest.approx(0.99 - 0.975)


def test_a_finished_run_of_another_recipe_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tune_refine, "tuning_victim", lambda run_dir, name: (tmp_path / "victim", tmp_path / "clean"))
    monkeypatch.setattr(tune_refine, "configs_version", lambda configs: "abc1234")
    job = tmp_path / "wanet_g8" / "recipe"
    job.mkdir(parents=True)
    report = {
        "no_defense": {"ba": 0.98, "asr": 1.0}, "defended": {"ba": 0.99, "asr": 0.004}, "clean_floor": {"asr": 0.0}
    }  # fmt: skip
    (job / "report.json").write_text(json.dumps(report))
    (job / "timing.json").write_text(json.dumps({"seconds": 12.0, "overrides": [], "recipe": "0ld0000"}))
    with pytest.raises(SystemExit, match="the recipe of 0ld0000, not of abc1234"):
        tune_refine.candidate_row(tmp_path, "wanet_g8", "recipe")
    (job / "timing.json").write_text(json.dumps({"seconds": 12.0, "overrides": [], "recipe": "abc1234"}))
    assert tune_refine.candidate_row(tmp_path, "wanet_g8", "recipe")["seconds"] == 12.0
