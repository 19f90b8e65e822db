"""Black-box REFINE against white-box REFINE: the attacks table's victims defended through their answers only.

For each attack and seed, the attacks benchmark's victim (:mod:`benchmarks.victims`, trained there if missing) is
wrapped so that it answers class probabilities only (``probabilities``) or classes only (``labels``)
(:class:`~refine_pl.black_box.ModelAnswers`), and defended by black-box REFINE
(:class:`~refine_pl.black_box_module.BlackBoxRefineLitModule`, the recipe with ``configs/refine/black_box.yaml``)
with a surrogate of the victim's architecture (the small CNN) and of another one (the narrow CIFAR ResNet-18). Each
row stands beside the white-box REFINE run of the attacks benchmark on the same victim (``<attack>_s<seed>/refine``
under ``--victims-dir``; read, never rerun here: a missing one leaves its cells empty).

Writes to ``--results-dir``:

- ``black_box.csv``: one row per attack, seed, answers mode, surrogate and query budget: BA, ASR, any-class ASR of
  the defended classifier ``M(f_blackbox(T(x)))``, the surrogate's agreement with the victim on the clean test
  images, the training queries (images the black box answered), the seconds of the run, and white-box REFINE's BA,
  ASR, any-class ASR and seconds;
- ``black_box.md``: the table (:func:`benchmarks.render.black_box`).

A finished run (``report.json`` and ``timing.json`` in its folder under ``--run-dir``) is read back, not rerun, so
an interrupted benchmark continues where it stopped and can run in parts::

    python benchmarks/black_box.py                                      # 8 attacks, seed 0, both modes, both surrogates
    python benchmarks/black_box.py --attacks badnets wanet batt --seeds 1 2 --modes probabilities --surrogates small_cnn
    python benchmarks/black_box.py --attacks badnets --budgets 0.05 0.1 0.25 0.5   # the query-budget curve
    python benchmarks/black_box.py --finished-only    # the rows of what has finished, training nothing
    python benchmarks/black_box.py --variant online --attacks wanet --modes labels   # other settings (VARIANTS)

Every option defaults to all of its values (``--modes``, ``--surrogates``): name them to run a part.
"""

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/black_box.py` from the root

from benchmarks import render
from benchmarks.victims import ATTACKS, QUIET, RECIPES, victim
from refine_pl.checkpoints import newest_complete_checkpoint
from refine_pl.pipeline import run_defense

BLACK_BOX_CONFIG = "configs/refine/black_box.yaml"
MODES = ("probabilities", "labels")
SURROGATES = ("small_cnn", "resnet18_cifar_narrow")
"""The victim's own architecture (the attacks table's small CNN) and another one."""
_OPTION = "--model.init_args."
_ONLINE = [f"{_OPTION}surrogate_online=true", f"{_OPTION}surrogate_refresh_epochs=0"]
_NO_ROLLBACK = f"{_OPTION}agreement_rollback=null"
_ROLLBACK_SURROGATE = f"{_OPTION}rollback_keeps_surrogate=false"
VARIANTS: dict[str, list[str]] = {
    "config": [],  # configs/refine/black_box.yaml as it is: a refresh every epoch, the rollback of T
    "no_rollback": [_NO_ROLLBACK],  # without the rollback (the config before it)
    "online": [*_ONLINE, _NO_ROLLBACK],  # a refresh in every training step instead
    "online_lr1e-4": [*_ONLINE, f"{_OPTION}surrogate_refresh_lr=0.0001", _NO_ROLLBACK],  # and at a tenth of the rate
    "refresh_lr1e-4": [f"{_OPTION}surrogate_refresh_lr=0.0001", _NO_ROLLBACK],  # every epoch, a tenth of the rate
    "smoothing0.1": [f"{_OPTION}surrogate_label_smoothing=0.1", _NO_ROLLBACK],  # label-only, label smoothing
    "rollback": [_ROLLBACK_SURROGATE],  # the rollback of T and the surrogate
    "online_rollback": [*_ONLINE, _ROLLBACK_SURROGATE],  # online, the rollback of T and the surrogate
    "online_rollback_schedule": [*_ONLINE, _ROLLBACK_SURROGATE, f"{_OPTION}surrogate_refresh_schedule=true"],
    "online_rollback_t": [*_ONLINE],  # online, the rollback of T
}
"""Variants of the black-box settings: overrides of the jobs. A variant's runs go to ``<run-dir>_<variant>`` and its
rows to ``black_box_<variant>.csv`` (``config``: ``<run-dir>`` and ``black_box.csv``)."""
COLUMNS = (
    "attack", "seed", "mode", "surrogate", "budget", "ba", "asr", "any_class_asr", "surrogate_agreement", "queries",
    "seconds", "white_box_ba", "white_box_asr", "white_box_any_class_asr", "white_box_seconds",
)  # fmt: skip


def job_folder(run_dir: Path, attack: str, seed: int, mode: str, surrogate: str, budget: float) -> Path:
    """The folder of one black-box run: ``<attack>_s<seed>/<mode>_<surrogate>[_budget<b>]``."""
    suffix = "" if budget == 1 else f"_budget{budget:g}"
    return run_dir / f"{attack}_s{seed}" / f"{mode}_{surrogate}{suffix}"


def victim_checkpoint(victims_dir: Path, attack: str, seed: int, extra: list[str]) -> Path:
    """The attacks benchmark's victim of ``attack`` and ``seed``: its finished checkpoint, else trained there."""
    checkpoint, _ = newest_complete_checkpoint(victims_dir / f"{attack}_s{seed}" / "victim")
    if checkpoint is not None and (victims_dir / f"{attack}_s{seed}" / "victim" / "timing.json").is_file():
        return Path(checkpoint)
    return victim(victims_dir, attack, seed, extra)


def white_box(victims_dir: Path, attack: str, seed: int) -> dict[str, float]:
    """White-box REFINE's figures on the same victim (the attacks benchmark's run); NaN where it has not run."""
    job = victims_dir / f"{attack}_s{seed}" / "refine"
    figures = {"white_box_ba": math.nan, "white_box_asr": math.nan, "white_box_any_class_asr": math.nan}
    if (job / "report.json").is_file():
        defended = json.loads((job / "report.json").read_text())["defended"]
        figures = {
            "white_box_ba": defended["ba"],
            "white_box_asr": _figure(defended.get("asr")),
            "white_box_any_class_asr": _figure(defended.get("any_class_asr")),
        }
    timing = job / "timing.json"
    seconds = json.loads(timing.read_text())["seconds"] if timing.is_file() else math.nan
    return {**figures, "white_box_seconds": seconds}


def _figure(value: Any) -> float:
    return math.nan if value is None else float(value)


def finished(job: Path) -> bool:
    """Whether the black-box run in ``job`` has finished (its report and its timing written)."""
    return (job / "report.json").is_file() and (job / "timing.json").is_file()


def black_box_row(
    run_dir: Path,
    victims_dir: Path,
    attack: str,
    seed: int,
    mode: str,
    surrogate: str,
    budget: float,
    victim_args: list[str],
    refine_args: list[str],
) -> dict[str, Any]:
    """One row: the black-box run (run unless finished) beside white-box REFINE."""
    job = job_folder(run_dir, attack, seed, mode, surrogate, budget)
    timing = job / "timing.json"
    if not finished(job):
        checkpoint = victim_checkpoint(victims_dir, attack, seed, victim_args)
        resumed, start = job.exists(), time.perf_counter()
        arguments = [
            *QUIET, "--seed_everything", str(seed), "--model.init_args.remap_seed", str(seed),
            "--model.init_args.answers", mode, "--model.init_args.surrogate_arch", surrogate,
            "--model.init_args.query_budget", f"{budget:g}", *refine_args,
        ]  # fmt: skip
        run_defense(checkpoint, [*RECIPES["refine"], BLACK_BOX_CONFIG], job, arguments)
        timing.write_text(json.dumps({"seconds": time.perf_counter() - start, "resumed": resumed}) + "\n")
    defended = json.loads((job / "report.json").read_text())["defended"]
    record = json.loads((job / "black_box.json").read_text())
    agreement = record.get("surrogate_test_agreement")
    return {
        "attack": attack, "seed": seed, "mode": mode, "surrogate": surrogate, "budget": budget,
        "ba": defended["ba"], "asr": _figure(defended.get("asr")),
        "any_class_asr": _figure(defended.get("any_class_asr")),
        "surrogate_agreement": math.nan if agreement is None else float(agreement),
        "queries": int(record["training_queries"]), "seconds": json.loads(timing.read_text())["seconds"],
        **white_box(victims_dir, attack, seed),
    }  # fmt: skip


def merge(path: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of ``path`` (a run in parts) with ``rows`` replacing those of the same run, in a fixed order."""
    key = ("attack", "seed", "mode", "surrogate", "budget")
    kept = {}
    for row in render.read_csv(path) if path.is_file() else []:
        kept[(row["attack"], int(row["seed"]), row["mode"], row["surrogate"], float(row["budget"]))] = row
    for row in rows:
        kept[tuple(row[k] for k in key)] = row
    order = {name: i for i, name in enumerate(ATTACKS)}
    return [
        kept[k]
        for k in sorted(kept, key=lambda k: (order.get(k[0], len(order)), k[0], k[1], -k[4], MODES.index(k[2]), k[3]))
    ]


def _cell(column: str, value: Any) -> str:
    """A csv cell: fractions with 4 decimals, seconds with 1, the budget as short as it goes; read-back rows as read."""
    if not isinstance(value, float):
        return str(value)
    if column == "budget":
        return f"{value:g}"
    return f"{value:.1f}" if column.endswith("seconds") else f"{value:.4f}"


def results_name(variant: str) -> str:
    """The file name stem of a variant's results (:data:`VARIANTS`): ``black_box`` or ``black_box_<variant>``."""
    return "black_box" if variant == "config" else f"black_box_{variant}"


def write_results(rows: list[dict[str, Any]], results_dir: Path, threads: int, variant: str = "config") -> None:
    """Writes the variant's csv (merged with the rows already there) and markdown table (:func:`results_name`)."""
    results_dir.mkdir(parents=True, exist_ok=True)
    name = results_name(variant)
    path = results_dir / f"{name}.csv"
    merged = merge(path, rows)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        writer.writerows([_cell(column, row[column]) for column in COLUMNS] for row in merged)
    table = render.black_box(results_dir, name)
    (results_dir / f"{name}.md").write_text(f"{table}\n\n{threads} torch thread(s).\n")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=ATTACKS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--surrogates", nargs="+", default=list(SURROGATES), help="surrogate architectures")
    parser.add_argument(
        "--budgets", nargs="+", type=float, default=[1.0],
        help="query budgets (share of the unlabeled training images the black box may answer), e.g. a curve for one "
        "attack: 0.05 0.1 0.25 0.5 1",
    )  # fmt: skip
    parser.add_argument("--victims-dir", type=Path, default=Path("runs/attacks"), help="the attacks benchmark's runs")
    parser.add_argument("--run-dir", type=Path, default=Path("runs/black_box"))
    parser.add_argument("--results-dir", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--victim-arg", action="append", default=[], help="extra argument of a missing victim's job")
    parser.add_argument("--refine-arg", action="append", default=[], help="extra argument of the black-box jobs")
    parser.add_argument(
        "--variant", default="config", choices=VARIANTS,
        help="black-box settings other than the config's (VARIANTS; runs in <run-dir>_<variant>)",
    )  # fmt: skip
    parser.add_argument(
        "--finished-only", action="store_true",
        help="train nothing: write the rows of the runs asked for that have finished (a partial table)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    run_dir = args.run_dir if args.variant == "config" else Path(f"{args.run_dir}_{args.variant}")
    refine_args = [*VARIANTS[args.variant], *args.refine_arg]
    rows = []
    for attack in args.attacks:
        for seed in args.seeds:
            for budget in args.budgets:
                for mode in args.modes:
                    for surrogate in args.surrogates:
                        job = (attack, seed, mode, surrogate, budget)
                        if args.finished_only and not finished(job_folder(run_dir, *job)):
                            continue
                        folders = (run_dir, args.victims_dir)
                        rows.append(black_box_row(*folders, *job, args.victim_arg, refine_args))
                        write_results(rows, args.results_dir, torch.get_num_threads(), args.variant)
    return rows


if __name__ == "__main__":
    main()
