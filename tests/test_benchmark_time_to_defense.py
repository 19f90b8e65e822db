"""benchmarks/time_to_defense.py: both variants of the main job timed stage by stage, in the files render reads."""

import csv
import json
from pathlib import Path

import pytest
import yaml

from benchmarks import render, time_to_defense
from refine_pl.configs import resolve_config
from tests.test_benchmark_main_job import TINY


def test_the_before_variant_is_the_recipe_of_528d108_and_the_after_variant_the_main_jobs() -> None:
    before = [yaml.safe_load(Path(resolve_config(config)).read_text()) for config in time_to_defense.VARIANTS["before"]]
    assert before[0]["model"]["init_args"]["scheduler"]["class_path"] == "torch.optim.lr_scheduler.MultiStepLR"
    assert before[1]["trainer"]["max_epochs"] == 30 and before[1]["trainer"]["check_val_every_n_epoch"] == 5
    assert all("LabelFreeStopping" not in str(config) for config in before)
    assert time_to_defense.VARIANTS["after"] == ["configs/refine/recipe.yaml", "configs/refine/mnist.yaml"]


@pytest.mark.slow
def test_a_tiny_run_times_every_stage_of_both_variants(tmp_path: Path) -> None:
    results = tmp_path / "results"
    rows = time_to_defense.main(["--run-dir", str(tmp_path / "runs"), "--results-dir", str(results), *TINY])
    with (results / "time_to_defense.csv").open(newline="") as handle:
        written = list(csv.DictReader(handle))
    assert [row["variant"] for row in written] == ["before", "after"] == [row["variant"] for row in rows]
    for row in written:
        stages = [float(row[key]) for key in ("clean_s", "victim_s", "refine_s")]
        assert all(seconds > 0 for seconds in stages)
        assert float(row["main_job_s"]) == pytest.approx(sum(stages), abs=0.3)
        assert 0 <= float(row["defended_ba"]) <= 1 and 0 <= float(row["defended_asr"]) <= 1
    report = json.loads((tmp_path / "runs" / "after" / "report.json").read_text())
    assert float(written[1]["defended_ba"]) == pytest.approx(report["defended"]["ba"])
    assert "torch thread(s)" in json.loads((results / "time_to_defense.json").read_text())["conditions"]
    table = (results / "time_to_defense.md").read_text()
    assert table.strip() == render.time_to_defense(results) and "After / before: REFINE stage" in table
    with pytest.raises(SystemExit, match="is not empty"):  # a variant is only ever timed in a fresh folder
        time_to_defense.main(["--run-dir", str(tmp_path / "runs"), "--results-dir", str(results), *TINY])
