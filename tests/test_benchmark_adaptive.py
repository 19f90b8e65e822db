"""benchmarks/adaptive.py: the verdicts read the any-class ASR, and the files say what the rows measured."""

import csv
import math
from pathlib import Path

import pytest

from benchmarks import adaptive, attacks, render
from tests.test_benchmark_attacks import TINY_REFINE, TINY_VICTIM


def seed_row(seed: int, **figures: float) -> dict:
    """A per-seed row of a real backdoor that REFINE removes, with ``figures`` changed."""
    row = {
        "attack": "robust_trigger", "arch": "small_cnn", "recipe": "refine", "seed": seed,
        "victim_ba": 0.98, "victim_asr": 0.99, "victim_any_class_asr": 0.99, "clean_floor_asr": 0.002,
        "clean_floor_any_class_asr": 0.03, "clean_ba": 0.985, "refine_ba": 0.98, "refine_agreement": 0.97,
        "refine_asr": 0.0, "refine_any_class_asr": 0.035, "refine_ra": 0.95, "seconds": 100.0,
        "victim_seconds": 60.0 + seed, "survival_victim_target": 1.0, "survival_through_t_target": 0.02,
        "survival_through_t_target_clean": 0.0, "survival_perturbation_ratio": 0.5,
    }  # fmt: skip
    return {**row, **figures}


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_refine_holds_when_no_class_gains_more_than_the_floor_allows() -> None:
    (entry,) = adaptive.summarise([seed_row(seed) for seed in (0, 1, 2)])
    assert (entry["real_backdoor"], entry["holds"]) == ("yes", "yes")
    assert entry["victim_seconds"] == 61.0


def test_a_trigger_that_survives_into_a_remapped_class_fails_with_asr_0() -> None:
    # Seed 1: the trigger still works through REFINE, but the remap sent its images to one other class.
    rows = [seed_row(0), seed_row(1, refine_any_class_asr=0.60), seed_row(2)]
    (entry,) = adaptive.summarise(rows)
    assert entry["refine_asr"] == 0.0
    assert entry["holds"] == "no"
    assert attacks.gate(entry)[1]  # the standard gate, which reads the target's ASR only, is fooled
    # One seed a little over its floor + 2 points fails too, while the mean stays within a point.
    rows = [seed_row(0), seed_row(1, refine_any_class_asr=0.051), seed_row(2, refine_any_class_asr=0.03)]
    (entry,) = adaptive.summarise(rows)
    assert entry["refine_any_class_asr"] <= entry["clean_floor_any_class_asr"] + 0.01
    assert entry["holds"] == "no"
    (entry,) = adaptive.summarise([seed_row(0), seed_row(1, refine_ba=0.97), seed_row(2)])  # BA -0.33 point
    assert entry["holds"] == "yes"
    (entry,) = adaptive.summarise([seed_row(0), seed_row(1, refine_ba=0.96), seed_row(2)])  # BA -0.67 point
    assert entry["holds"] == "no"


def test_a_victim_that_is_no_real_backdoor_is_said_so() -> None:
    (weak,) = adaptive.summarise([seed_row(0), seed_row(1, victim_asr=0.85)])
    (costly,) = adaptive.summarise([seed_row(0), seed_row(1, victim_ba=0.96)])  # 2.5 points below the clean model
    assert weak["real_backdoor"] == costly["real_backdoor"] == "no"


def test_the_results_files_hold_the_rows_and_the_table_their_figures(tmp_path: Path) -> None:
    rows = [seed_row(0), seed_row(1, refine_any_class_asr=0.60, victim_seconds=math.nan)]
    adaptive.write_results(rows, tmp_path, threads=1)
    seeds = read_csv(tmp_path / "adaptive_seeds.csv")
    assert [r["seed"] for r in seeds] == ["0", "1"] and seeds[1]["victim_seconds"] == "nan"
    (summary,) = read_csv(tmp_path / "adaptive.csv")
    assert float(summary["refine_any_class_asr"]) == 0.3175 and summary["refine_any_class_asr_worst"] == "0.6000"
    assert (summary["real_backdoor"], summary["holds"]) == ("yes", "no")
    table = render.adaptive(tmp_path)
    assert "| robust_trigger | 0 1 | 0.9800 ± 0.0000 (0.9800) |" in table
    assert "| 0.3175 ± 0.3995 (0.6000) | 0.9500 ± 0.0000 (0.9500) | - | yes | no |" in table  # time unknown: -
    assert (tmp_path / "adaptive.md").read_text().startswith(table)
    assert "| robust_trigger | 1 | 1.0000 | 0.0200 | 0.0000 | 0.5000 |" in render.adaptive_survival(tmp_path)
    assert render.adaptive_verdict(tmp_path) == (
        "REFINE holds against 0 of the 1 adaptive attacks measured (seeds 0, 1; does not hold: robust_trigger)."
    )
    assert (tmp_path / "adaptive_asr.png").stat().st_size > 0


@pytest.mark.slow
def test_a_tiny_run_writes_every_figure_and_the_survival_of_the_trigger(tmp_path: Path) -> None:
    runs, results = tmp_path / "runs", tmp_path / "results"
    adaptive.main(
        ["--attacks", "robust_trigger", "--seeds", "3", "--run-dir", str(runs), "--results-dir", str(results),
         *TINY_VICTIM, *TINY_REFINE]
    )  # fmt: skip
    (row,) = read_csv(results / "adaptive_seeds.csv")
    measured = [figure for figure in attacks.FIGURES if figure != "refine_agreement"]  # the tiny run validates not
    assert all(row[figure] not in ("", "nan") for figure in measured)
    survival = {key: float(row[f"survival_{key}"]) for key in adaptive.SURVIVAL}
    assert all(0.0 <= survival[key] <= 1.0 for key in ("victim_target", "through_t_target", "through_t_target_clean"))
    assert survival["perturbation_ratio"] > 0  # the patch changes T's output somewhat, whatever T learned
    assert float(row["victim_seconds"]) > 0
    (summary,) = read_csv(results / "adaptive.csv")
    assert summary["seeds"] == "3" and summary["real_backdoor"] in ("yes", "no") and summary["holds"] in ("yes", "no")
    assert (results / "adaptive_robust_trigger_grid.png").stat().st_size > 0
    assert "| robust_trigger | 3 |" in (results / "adaptive.md").read_text()
