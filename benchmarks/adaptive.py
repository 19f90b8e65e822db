"""Attackers who know REFINE: adaptive victims over seeds, defended with the one REFINE config a defender uses.

Each adaptive attack (``ADAPTIVE_ATTACKS``, configs under ``configs/attacks/``) trains a victim on the embedded
MNIST-5k per seed like the attacks table does (:mod:`benchmarks.attacks`: the same clean models, the same REFINE
recipe, the same seeding; the default run folder is the attacks table's, so the clean models are shared), and the
victim is defended with REFINE's recipe, which knows nothing of the attack. What counts is the any-class ASR: a
trigger that survives REFINE's transform lands in the remapped target class, where the ASR reads 0.

Writes to ``--results-dir``:

- ``adaptive_seeds.csv``: one row per attack and seed (the columns of ``attacks_seeds.csv``, with
  ``victim_seconds``: the attack's cost, the wall clock of the victim's training);
- ``adaptive.csv``: one row per attack: mean, standard deviation and worst seed of every figure, the mean victim
  seconds, and two verdicts: ``real_backdoor`` (victim ASR >= 0.90 and BA within 2 points of the clean model, every
  seed) and ``holds`` (:func:`benchmarks.attacks.holds_any_class`);
- ``adaptive.md`` (the table as :func:`benchmarks.render.adaptive` renders it) and ``adaptive_asr.png`` (any-class
  ASR of victim, floor and REFINE, with error bars).

    python benchmarks/adaptive.py                          # the three adaptive attacks, seeds 0-2
    python benchmarks/adaptive.py --attacks robust_trigger --seeds 0
"""

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/adaptive.py` from the root

from benchmarks import render
from benchmarks.attacks import SEED_COLUMNS, aggregate, gate, holds_any_class, seed_row, summary_columns, write_csv
from benchmarks.victims import DEFAULT_ARCH, REPO
from refine_pl.pipeline import add_job_arguments

ADAPTIVE_ATTACKS = ("refine_in_loop", "robust_trigger", "low_frequency")
"""Config names under configs/attacks/ of the attacks that know REFINE."""
VERDICTS = ("real_backdoor", "holds")


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of ``adaptive.csv``: :func:`benchmarks.attacks.aggregate` with the victim seconds and the verdicts."""
    summary = aggregate(rows)
    for entry in summary:
        seconds = [r["victim_seconds"] for r in entry["per_seed"]]
        entry["victim_seconds"] = statistics.fmean(seconds)  # NaN when a victim's training was not timed whole
        backdoor, _ = gate(entry)
        entry["real_backdoor"] = "yes" if backdoor else "no"
        entry["holds"] = "yes" if holds_any_class(entry) else "no"
    return summary


def plot_any_class(summary: list[dict[str, Any]], path: Path) -> None:
    """Bars of the mean any-class ASR of victim, clean floor and REFINE per attack, standard-deviation error bars."""
    positions = range(len(summary))
    figure, axes = plt.subplots(figsize=(1.6 * len(summary) + 2, 3.8))
    bars = (
        (-0.27, "victim_any_class_asr", "no defense"),
        (0.0, "clean_floor_any_class_asr", "clean model (floor)"),
        (0.27, "refine_any_class_asr", "REFINE"),
    )
    for offset, name, label in bars:
        axes.bar(
            [p + offset for p in positions], [e[name] for e in summary], width=0.27, label=label,
            yerr=[e[f"{name}_std"] for e in summary], capsize=2,
        )  # fmt: skip
    axes.set_xticks(list(positions), [e["attack"] for e in summary], fontsize="small")
    axes.set_ylim(0, 1.2)
    axes.set_ylabel("any-class attack success rate")
    axes.set_title("Attackers who know REFINE (MNIST-5k): any-class ASR over seeds; error bars: std")
    axes.legend(loc="upper center", ncol=3, fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_results(rows: list[dict[str, Any]], results_dir: Path, threads: int) -> list[dict[str, Any]]:
    """Writes ``adaptive_seeds.csv``, ``adaptive.csv``, ``adaptive.md`` and ``adaptive_asr.png``; returns the rows."""
    summary = summarise(rows)
    results_dir.mkdir(parents=True, exist_ok=True)
    write_csv(rows, SEED_COLUMNS, results_dir / "adaptive_seeds.csv")
    columns = [*summary_columns(), "victim_seconds", *VERDICTS]
    write_csv(summary, columns, results_dir / "adaptive.csv")
    (results_dir / "adaptive.md").write_text(f"{render.adaptive(results_dir)}\n\n{threads} torch thread(s).\n")
    plot_any_class(summary, results_dir / "adaptive_asr.png")
    return summary


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Runs the benchmark with the command line ``argv``; returns the summary rows."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--attacks", nargs="+", choices=ADAPTIVE_ATTACKS, default=list(ADAPTIVE_ATTACKS), help="attacks to run"
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds (default: %(default)s)")
    parser.add_argument(
        "--run-dir", type=Path, default=REPO / "runs" / "attacks",
        help="output folder of the runs (default: the attacks table's, whose clean models it shares)",
    )  # fmt: skip
    parser.add_argument("--results-dir", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    add_job_arguments(parser, "victim", "the victims and clean models")
    add_job_arguments(parser, "refine", "the REFINE jobs")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    for seed in args.seeds:
        for attack in args.attacks:
            rows.append(seed_row(attack, DEFAULT_ARCH, "refine", seed, args.run_dir, args.victim_arg, args.refine_arg))
            summary = write_results(rows, args.results_dir, args.threads)  # after every run: a partial table stays
    print((args.results_dir / "adaptive.md").read_text())
    return summary


if __name__ == "__main__":
    main()
