"""benchmarks/black_box.py: black-box REFINE beside white-box REFINE, resumable, in parts, rendered from the csv."""

import csv
import json
import math
from pathlib import Path

import pytest

from benchmarks import black_box, render
from tests.test_benchmark_attacks import TINY_REFINE, TINY_VICTIM


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def row(attack: str = "badnets", seed: int = 0, mode: str = "probabilities", surrogate: str = "small_cnn",
        budget: float = 1.0, **figures: float) -> dict:  # fmt: skip
    values = {
        "attack": attack, "seed": seed, "mode": mode, "surrogate": surrogate, "budget": budget, "ba": 0.98,
        "asr": 0.001, "any_class_asr": 0.004, "surrogate_agreement": 0.97, "queries": 4500, "seconds": 500.0,
        "white_box_ba": 0.99, "white_box_asr": 0.0, "white_box_any_class_asr": 0.0025, "white_box_seconds": 444.3,
    }  # fmt: skip
    return {**values, **figures}


def test_rows_written_in_parts_merge_into_one_table_in_a_fixed_order(tmp_path: Path) -> None:
    black_box.write_results([row("wanet"), row(mode="labels")], tmp_path, threads=1)
    black_box.write_results([row(), row(mode="labels", ba=0.5), row(budget=0.1, white_box_ba=math.nan)], tmp_path, 1)
    rows = read_csv(tmp_path / "black_box.csv")
    assert [(r["attack"], r["mode"], r["budget"]) for r in rows] == [
        ("badnets", "probabilities", "1"), ("badnets", "labels", "1"), ("badnets", "probabilities", "0.1"),
        ("wanet", "probabilities", "1"),
    ]  # fmt: skip
    assert rows[1]["ba"] == "0.5000"  # the new run replaced the old row of the same run
    table = render.black_box(tmp_path)
    assert "| badnets | 0 | probabilities | small_cnn | 1 | 0.9800 | 0.0010 | 0.0040 | 0.9700 | 4500 | 500 |" in table
    assert "| badnets | 0 | probabilities | small_cnn | 0.1 |" in table and "| - | 0.0000 | 0.0025 | 444 |" in table
    assert (tmp_path / "black_box.md").read_text().startswith(table)


def test_a_variants_rows_come_under_the_configs_row_of_the_same_cell(tmp_path: Path) -> None:
    black_box.write_results([row("wanet", ba=0.5), row()], tmp_path, threads=1)
    black_box.write_results([row("wanet", ba=0.9), row("wanet", mode="labels", ba=0.1)], tmp_path, 1, "online")
    assert (tmp_path / "black_box_online.csv").is_file() and (tmp_path / "black_box_online.md").is_file()
    lines = [line for line in render.black_box_variants(tmp_path).splitlines() if line.startswith("| wanet")]
    assert [line.split(" | ")[2:6] for line in lines] == [
        ["labels", "small_cnn", "online", "0.1000"],  # no config row for this cell
        ["probabilities", "small_cnn", "config", "0.5000"],
        ["probabilities", "small_cnn", "online", "0.9000"],
    ]


@pytest.mark.slow
def test_a_tiny_run_measures_both_modes_beside_white_box_and_is_not_rerun(tmp_path: Path) -> None:
    runs, victims, results = tmp_path / "runs", tmp_path / "victims", tmp_path / "results"
    tiny = [
        *TINY_REFINE,
        "--refine-arg=--model.init_args.surrogate_epochs=1",
        "--refine-arg=--data.init_args.fraction=0.02",
        "--refine-arg=--data.init_args.min_epoch_samples=0",  # the surrogate's epoch: one pass over 64 images
        "--refine-arg=--trainer.callbacks.init_args.formats=[]",
    ]
    command = ["--attacks", "badnets", "--seeds", "0", "--surrogates", "small_cnn", "--victims-dir", str(victims),
               "--run-dir", str(runs), "--results-dir", str(results), *TINY_VICTIM, *tiny]  # fmt: skip
    black_box.main(command)
    rows = read_csv(results / "black_box.csv")
    assert [r["mode"] for r in rows] == ["probabilities", "labels"]
    for measured in rows:
        assert 0 <= float(measured["ba"]) <= 1 and 0 <= float(measured["asr"]) <= 1
        assert 0 < int(measured["queries"]) <= 90 and 0 <= float(measured["surrogate_agreement"]) <= 1
        assert measured["white_box_ba"] == "nan"  # the attacks benchmark's REFINE has not run here
    record = json.loads((runs / "badnets_s0" / "labels_small_cnn" / "black_box.json").read_text())
    assert record["answers"] == "labels"
    timing = runs / "badnets_s0" / "probabilities_small_cnn" / "timing.json"
    before = timing.read_text()
    black_box.main([*command[:6], "--modes", "probabilities", *command[6:]])  # finished: read back, not rerun
    assert timing.read_text() == before and len(read_csv(results / "black_box.csv")) == 2
    # --finished-only writes what has finished of what is asked for and starts nothing.
    black_box.main([*command, "--surrogates", "small_cnn", "resnet18_cifar_narrow", "--finished-only"])
    assert not (runs / "badnets_s0" / "probabilities_resnet18_cifar_narrow").exists()
    assert timing.read_text() == before and len(read_csv(results / "black_box.csv")) == 2
    # A variant runs with its overrides in a folder and a results file of its own.
    black_box.main([*command, "--modes", "labels", "--variant", "online"])
    online = runs.parent / "runs_online" / "badnets_s0" / "labels_small_cnn"
    assert "surrogate_online: true" in (online / "config.yaml").read_text()
    assert [r["mode"] for r in read_csv(results / "black_box_online.csv")] == ["labels"]
    assert len(read_csv(results / "black_box.csv")) == 2 and timing.read_text() == before
