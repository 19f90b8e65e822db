"""benchmarks/attacks.py: the seed drives every seeded choice, and the summary is the per-seed rows aggregated."""

import csv
import math
import statistics
from pathlib import Path

import pytest
import torch

from benchmarks import attacks, victims
from refine_pl.attacks import attack_from_spec
from refine_pl.weights import read_weights_file

TINY_VICTIM = [
    "--victim-arg=--trainer.max_epochs=1",
    "--victim-arg=--trainer.limit_train_batches=3",
    "--victim-arg=--trainer.limit_val_batches=0",
]
TINY_REFINE = [
    "--refine-arg=--trainer.max_epochs=1",
    "--refine-arg=--trainer.limit_train_batches=2",
    "--refine-arg=--trainer.limit_val_batches=0",
    "--refine-arg=--trainer.limit_test_batches=2",
    "--refine-arg=--model.init_args.transform.init_args.base_width=4",
]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def check_summary_aggregates_seed_rows(seed_rows: list[dict[str, str]], summary: list[dict[str, str]]) -> None:
    """Every summary row is the mean, standard deviation and worst seed of its per-seed rows (4 decimals)."""
    for entry in summary:
        key = ("attack", "arch", "recipe")
        group = [r for r in seed_rows if all(r[k] == entry[k] for k in key)]
        assert entry["seeds"].split() == [r["seed"] for r in group]
        # A results file written before a figure was measured (the agreement since issue 23, the any-class ASR and
        # REFINE's RA since issue 25) lacks only those.
        measured = [figure for figure in attacks.FIGURES if figure in entry]
        later = {"refine_agreement", "refine_ra", *(figure for figure in attacks.FIGURES if "any_class" in figure)}
        assert set(attacks.FIGURES) - set(measured) <= later
        for figure in measured:
            values = [float(r[figure]) for r in group]
            if any(math.isnan(value) for value in values):  # a run that did not measure it: NaN throughout
                assert all(math.isnan(float(entry[f"{figure}{suffix}"])) for suffix in ("", "_std", "_worst"))
                continue
            worst = max(values) if figure in attacks.WORST_IS_HIGHEST else min(values)
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            assert float(entry[figure]) == pytest.approx(statistics.fmean(values), abs=1e-4, nan_ok=True), figure
            assert float(entry[f"{figure}_std"]) == pytest.approx(spread, abs=1e-4, nan_ok=True), figure
            assert float(entry[f"{figure}_worst"]) == pytest.approx(worst, abs=1e-4, nan_ok=True), figure


@pytest.mark.slow
def test_a_tiny_two_seed_run_seeds_every_choice_and_aggregates_its_rows(tmp_path: Path) -> None:
    runs, results = tmp_path / "runs", tmp_path / "results"
    attacks.main(
        ["--attacks", "blended", "--seeds", "0", "1", "--zoo-seeds", "1", "--run-dir", str(runs),
         "--results-dir", str(results), *TINY_VICTIM, *TINY_REFINE]
    )  # fmt: skip
    seed_rows, summary = read_csv(results / "attacks_seeds.csv"), read_csv(results / "attacks.csv")
    zoo = attacks.ZOO_ARCHS[0]  # blended is a zoo attack: its victim of the zoo architecture is run on seed 1
    assert [(r["attack"], r["arch"], r["seed"]) for r in seed_rows] == [
        ("blended", "small_cnn", "0"), ("blended", "small_cnn", "1"), ("blended", zoo, "1")
    ]  # fmt: skip
    check_summary_aggregates_seed_rows(seed_rows, summary)
    assert all(figure in row for figure in attacks.FIGURES for row in (*seed_rows, *summary))  # a fresh run: all
    assert all(float(r["refine_any_class_asr"]) >= float(r["refine_asr"]) for r in seed_rows)
    assert all(float(r["victim_seconds"]) > 0 for r in seed_rows)  # every victim trained in this run
    table = (results / "attacks.md").read_text()
    assert table.count("| blended | small_cnn | refine | 0 1 |") == 1
    assert table.count(f"| blended | {zoo} | refine | 1 |") == 1
    assert not (runs / f"blended_{zoo}_s0").exists()
    assert (results / "attacks_asr.png").stat().st_size > 0

    # The seed changes the attack's choices (its recorded seed, hence the poisoned samples and the noise pattern),
    # the victim's and the clean model's training, and the remap.
    victims = [read_weights_file(runs / f"blended_s{seed}" / "victim" / "checkpoints" / "last.ckpt") for seed in (0, 1)]
    assert [v.attack_spec["init_args"]["seed"] for v in victims] == [0, 1]
    blank = torch.zeros(1, 1, 28, 28)
    patterns = [attack_from_spec(v.attack_spec).apply(blank, torch.tensor([0])) for v in victims]
    assert not torch.equal(*patterns)
    for name in ("victim", "clean"):
        folders = [runs / f"blended_s{s}" / "victim" if name == "victim" else runs / f"clean_s{s}" for s in (0, 1)]
        first, second = (read_weights_file(folder / "checkpoints" / "last.ckpt").state_dict for folder in folders)
        assert any(not torch.equal(first[key], second[key]) for key in first), name
    remaps = [
        torch.load(runs / f"blended_s{s}" / "refine" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"][
            "defended.remap.permutation"
        ]
        for s in (0, 1)
    ]
    assert not torch.equal(*remaps)


def test_the_zoo_architectures_run_only_their_attacks_and_can_be_left_out() -> None:
    archs, zoo = ["small_cnn"], ["resnet18_cifar_narrow"]
    assert attacks.victim_combinations(archs, ["badnets", "iad", "wanet"], zoo, ["badnets", "wanet"]) == [
        ("small_cnn", "badnets"), ("small_cnn", "iad"), ("small_cnn", "wanet"),
        ("resnet18_cifar_narrow", "badnets"), ("resnet18_cifar_narrow", "wanet"),
    ]  # fmt: skip
    assert attacks.victim_combinations(archs, ["iad"], zoo, ["badnets"]) == [("small_cnn", "iad")]
    assert attacks.victim_combinations(archs, ["badnets"], [], ["badnets"]) == [("small_cnn", "badnets")]
    # an architecture asked for every attack is not run twice as a zoo architecture
    assert attacks.victim_combinations(zoo, ["badnets"], zoo, ["badnets"]) == [("resnet18_cifar_narrow", "badnets")]


def test_the_committed_summary_is_the_committed_per_seed_rows_aggregated() -> None:
    results = Path(attacks.__file__).parent / "results"
    seed_rows, summary = read_csv(results / "attacks_seeds.csv"), read_csv(results / "attacks.csv")
    assert summary and {(r["attack"], r["arch"], r["recipe"]) for r in seed_rows} == {
        (r["attack"], r["arch"], r["recipe"]) for r in summary
    }
    check_summary_aggregates_seed_rows(seed_rows, summary)


def test_finished_only_tables_the_finished_runs_and_trains_nothing(tmp_path: Path) -> None:
    runs, results = tmp_path / "runs", tmp_path / "results"
    arguments = ["--attacks", "badnets", "--seeds", "0", "--zoo-archs", "--finished-only", "--run-dir", str(runs),
                 "--results-dir", str(results)]  # fmt: skip
    assert attacks.main(arguments) == []
    assert not runs.exists() and not results.exists()
    job = runs / "badnets_s0" / "refine"
    job.mkdir(parents=True)
    (job / "report.json").write_text("{}")
    assert not victims.finished(runs, "badnets", "refine", 0)  # no timing: the job did not end
    (job / "timing.json").write_text('{"seconds": 1.0, "resumed": false}')
    assert victims.finished(runs, "badnets", "refine", 0)
    assert not victims.finished(runs, "badnets", "refine", 1)
