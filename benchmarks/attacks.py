"""Every attack the REFINE paper defends against, as victims over seeds, defended with REFINE: the before/after table.

For each seed and attack: train the victim on the embedded MNIST-5k (``configs/victim/mnist.yaml`` merged with
``configs/attacks/<attack>.yaml``), train a clean model the same way without the attack (its ASR on the same
poisoned test set is the floor), defend the victim with each REFINE recipe (the same config for every
attack: a defender does not know the attack) and test them on the held-out images. The seed drives
everything seeded: victim training and data order, the attack's choices (poisoned samples, patterns,
per-sample transformations), the remap and REFINE's training.

Writes to ``--results-dir`` (the names start with ``--results-name``, ``attacks`` by default):

- ``attacks_seeds.csv``: one row per attack, victim architecture, recipe and seed: the victim's BA, ASR and
  any-class ASR, the clean floor's ASR and any-class ASR, REFINE's BA, label-free agreement, ASR, any-class ASR and
  RA (``FIGURES``), ``seconds`` (wall clock of the REFINE stage, fit and test) and ``victim_seconds`` (of the victim's
  training, NaN when not known whole: see :func:`benchmarks.victims.victim_seconds`);
- ``attacks.csv``: one row per attack and recipe: the mean over seeds of every figure, its standard deviation
  (``_std``, over seeds, n-1) and its worst seed (``_worst``: the lowest BA, victim ASR or RA, the highest floor or
  REFINE ASR), the seeds and the mean REFINE seconds;
- ``attacks.md`` (the table of ``attacks.csv`` as :func:`benchmarks.render.attacks` renders it, the gate and which
  rows meet it) and ``attacks_asr.png`` (ASR with error bars).

Runs go to ``--run-dir`` (see :mod:`benchmarks.victims`); finished runs are reused, so an interrupted benchmark
continues where it stopped.

    python benchmarks/attacks.py --seeds 0 1 2                 # every attack and the zoo: 33 REFINE runs
    python benchmarks/attacks.py --attacks wanet iad --seeds 0  # a subset
    python benchmarks/attacks.py --zoo-archs                   # the small CNN only
    python benchmarks/attacks.py --seeds 0 1 2 --zoo-seeds 0   # the zoo rows on seed 0 only
    python benchmarks/attacks.py --recipes reference --seeds 0 --zoo-archs --results-name attacks_reference
    python benchmarks/attacks.py --seeds 0 1 2 --finished-only  # the table of what has finished, training nothing

The victim zoo: besides ``--archs`` (every attack), ``--zoo-archs`` victims (default: the CIFAR-layout ResNet-18 of
width 16) are trained and defended for the ``--zoo-attacks`` (default: BadNets, Blended, WaNet) that are run.
"""

import argparse
import csv
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/attacks.py` from the root

from benchmarks import render
from benchmarks.victims import (
    ATTACKS,
    DEFAULT_ARCH,
    RECIPES,
    REPO,
    clean_model,
    defended_report,
    finished,
    victim,
    victim_seconds,
)
from refine_pl.architectures import ARCHITECTURES
from refine_pl.metric_names import (
    AGREEMENT,
    ANY_CLASS_ASR,
    ASR,
    BA,
    CLEAN_FLOOR,
    DEFENDED,
    LABEL_FREE,
    NO_DEFENSE,
    RA,
    ClassifierRow,
)
from refine_pl.pipeline import add_job_arguments

ZOO_ARCHS = ("resnet18_cifar_narrow",)
ZOO_ATTACKS = ("badnets", "blended", "wanet")
"""The victim zoo's default: a second architecture, defended for the three poison-only attacks of the paper."""
FIGURES = (
    "victim_ba", "victim_asr", "victim_any_class_asr", "clean_floor_asr", "clean_floor_any_class_asr", "refine_ba",
    "refine_agreement", "refine_asr", "refine_any_class_asr", "refine_ra",
)  # fmt: skip
WORST_IS_HIGHEST = {"clean_floor_asr", "clean_floor_any_class_asr", "refine_asr", "refine_any_class_asr"}
"""Figures whose worst seed is the highest (the others' is the lowest)."""
SEED_COLUMNS = ("attack", "arch", "recipe", "seed", *FIGURES, "seconds", "victim_seconds")

# The gate of issue 12, for the mean over seeds and for every seed.
MIN_VICTIM_ASR = {"lc": 0.80}
DEFAULT_MIN_VICTIM_ASR = 0.90
MAX_VICTIM_BA_GAP = 0.02  # victim BA within 2 points of the clean model
MAX_REFINE_ASR = 0.01  # REFINE ASR at most max(0.01, floor + 0.005) on the mean
FLOOR_MARGIN = 0.005
MAX_BA_DROP = 0.005  # REFINE BA at least victim BA - 0.005 on the mean
MAX_SEED_ASR = 0.02  # and no seed above ASR 0.02 ...
MAX_SEED_BA_DROP = 0.01  # ... or a 1-point BA drop
ANY_CLASS_MARGIN = 0.01  # REFINE holds against any class: mean any-class ASR <= the floor's + 1 point
ANY_CLASS_SEED_MARGIN = 0.02  # and in every seed <= the seed's floor + 2 points


def victim_combinations(
    archs: list[str], attacks: list[str], zoo_archs: list[str], zoo_attacks: list[str]
) -> list[tuple[str, str]]:
    """``(architecture, attack)`` of every victim to run, in order.

    Each of ``archs`` with every attack, then each zoo architecture not among them with the ``attacks`` that are also
    ``zoo_attacks``.
    """
    zoo = [arch for arch in dict.fromkeys(zoo_archs) if arch not in archs]
    return [(arch, attack) for arch in archs for attack in attacks] + [
        (arch, attack) for arch in zoo for attack in attacks if attack in zoo_attacks
    ]


def seed_row(
    attack: str,
    arch: str,
    recipe: str,
    seed: int,
    run_dir: Path,
    victim_args: list[str],
    refine_args: list[str],
    attack_args: list[str] | None = None,
) -> dict[str, Any]:
    """The figures of one attack, victim architecture, recipe and seed (trained now, or read from finished runs).

    ``victim_args`` go to the victim and the clean model, ``attack_args`` (e.g. an attack setting) to the victim only.
    """
    clean = clean_model(run_dir, seed, victim_args, arch)
    suspect = victim(run_dir, attack, seed, [*victim_args, *(attack_args or [])], arch)
    report, seconds = defended_report(run_dir, attack, recipe, seed, suspect, clean, refine_args, arch)

    def rate(row: ClassifierRow, key: str) -> float:  # NaN: not measured (or a report written before the rate was)
        value = report[row.key].get(key)
        return math.nan if value is None else value

    return {
        "attack": attack,
        "arch": arch,
        "recipe": recipe,
        "seed": seed,
        "victim_ba": rate(NO_DEFENSE, BA),
        "victim_asr": rate(NO_DEFENSE, ASR),
        "victim_any_class_asr": rate(NO_DEFENSE, ANY_CLASS_ASR),
        "clean_floor_asr": rate(CLEAN_FLOOR, ASR),
        "clean_floor_any_class_asr": rate(CLEAN_FLOOR, ANY_CLASS_ASR),
        "clean_ba": rate(CLEAN_FLOOR, BA),
        "refine_ba": rate(DEFENDED, BA),
        # The label-free estimate of the REFINE BA relative to the victim's (NaN: the run held out no image)
        "refine_agreement": (report.get(LABEL_FREE) or {}).get(AGREEMENT, math.nan),
        "refine_asr": rate(DEFENDED, ASR),
        "refine_any_class_asr": rate(DEFENDED, ANY_CLASS_ASR),
        "refine_ra": rate(DEFENDED, RA),
        "seconds": seconds,
        "victim_seconds": victim_seconds(run_dir, attack, seed, arch),
    }


def spread(figure: str, values: list[float], worst_is_highest: bool) -> dict[str, float]:
    """``figure``'s mean over seeds, its standard deviation (``_std``, n-1; 0 for one seed), its worst (``_worst``)."""
    return {
        figure: statistics.fmean(values),
        f"{figure}_std": statistics.stdev(values) if len(values) > 1 else 0.0,
        f"{figure}_worst": max(values) if worst_is_highest else min(values),
    }


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per attack, victim architecture and recipe: mean, standard deviation and worst seed of every figure."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["attack"], row["arch"], row["recipe"]), []).append(row)
    summary = []
    for (attack, arch, recipe), group in groups.items():
        seeds = " ".join(str(r["seed"]) for r in group)
        entry: dict[str, Any] = {"attack": attack, "arch": arch, "recipe": recipe, "seeds": seeds}
        for figure in (*FIGURES, "clean_ba"):
            values = [r[figure] for r in group]
            if any(math.isnan(value) for value in values):  # not measured in a run (no validation: no agreement)
                entry[figure] = entry[f"{figure}_std"] = entry[f"{figure}_worst"] = math.nan
                continue
            entry.update(spread(figure, values, worst_is_highest=figure in WORST_IS_HIGHEST))
        entry["seconds"] = statistics.fmean(r["seconds"] for r in group)
        entry["victim_seconds"] = statistics.fmean(r["victim_seconds"] for r in group)  # NaN if one is unknown
        entry["per_seed"] = group
        summary.append(entry)
    return summary


def gate(entry: dict[str, Any]) -> tuple[bool, bool]:
    """(the victim is a real backdoor in every seed, REFINE meets the gate on the mean and in every seed)."""
    min_asr = MIN_VICTIM_ASR.get(entry["attack"], DEFAULT_MIN_VICTIM_ASR)
    seeds = entry["per_seed"]
    backdoor = all(r["victim_asr"] >= min_asr and r["victim_ba"] >= r["clean_ba"] - MAX_VICTIM_BA_GAP for r in seeds)
    on_mean = (
        entry["refine_asr"] <= max(MAX_REFINE_ASR, entry["clean_floor_asr"] + FLOOR_MARGIN)
        and entry["refine_ba"] >= entry["victim_ba"] - MAX_BA_DROP
    )
    every_seed = all(
        r["refine_asr"] <= MAX_SEED_ASR and r["refine_ba"] >= r["victim_ba"] - MAX_SEED_BA_DROP for r in seeds
    )
    return backdoor, on_mean and every_seed


def holds_any_class(entry: dict[str, Any]) -> bool:
    """Whether REFINE holds against any class (issue 25), on the mean and in every seed.

    On the mean: any-class ASR at most the floor's + 1 point, BA at most half a point below the victim's; in every
    seed: any-class ASR at most the seed's floor + 2 points. The any-class ASR is the one an attacker cannot game by
    a trigger that survives REFINE's transform and lands in the remapped target class; its floor is the clean model's
    any-class ASR on the same triggered images.
    """
    on_mean = (
        entry["refine_any_class_asr"] <= entry["clean_floor_any_class_asr"] + ANY_CLASS_MARGIN
        and entry["refine_ba"] >= entry["victim_ba"] - MAX_BA_DROP
    )
    return on_mean and all(
        r["refine_any_class_asr"] <= r["clean_floor_any_class_asr"] + ANY_CLASS_SEED_MARGIN for r in entry["per_seed"]
    )


def summary_columns() -> list[str]:
    """Columns of ``attacks.csv``."""
    return [
        "attack", "arch", "recipe",
        *(f"{figure}{suffix}" for figure in FIGURES for suffix in ("", "_std", "_worst")),
        "seeds", "seconds",
    ]  # fmt: skip


def write_csv(rows: list[dict[str, Any]], columns: list[str] | tuple[str, ...], path: Path) -> None:
    """``rows`` as CSV with ``columns``; fractions with 4 decimals, seconds (``*seconds``) with 1."""

    def cell(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([f"{row[c]:.1f}" if c.endswith("seconds") else cell(row[c]) for c in columns])


def markdown_table(summary: list[dict[str, Any]], threads: int, results_dir: Path, name: str) -> str:
    """The table of ``<name>.csv`` (:func:`benchmarks.render.attacks`), then whether each row meets the gate."""
    verdicts = [
        [
            entry["attack"],
            entry["arch"],
            entry["recipe"],
            *("yes" if passed else "no" for passed in (*gate(entry), holds_any_class(entry))),
        ]
        for entry in summary
    ]
    seeds = sorted({r["seed"] for entry in summary for r in entry["per_seed"]})
    return "\n\n".join(
        [
            render.attacks(results_dir, name),
            f"All seeds: {', '.join(map(str, seeds))}; {threads} torch thread(s).",
            render.table(["attack", "victim", "recipe", "real backdoor", "gate", "holds against any class"], verdicts),
            f"real backdoor: in every seed, victim ASR >= {DEFAULT_MIN_VICTIM_ASR:.2f} (>= 0.80 for lc) and victim BA "
            f"at most {MAX_VICTIM_BA_GAP * 100:.0f} points below the clean model's. gate: mean REFINE ASR <= "
            f"max({MAX_REFINE_ASR}, floor + {FLOOR_MARGIN}) and mean REFINE BA >= victim BA - {MAX_BA_DROP}, and in "
            f"every seed REFINE ASR <= {MAX_SEED_ASR} and REFINE BA >= victim BA - {MAX_SEED_BA_DROP}. holds against "
            f"any class: mean REFINE any-class ASR <= floor any-class ASR + {ANY_CLASS_MARGIN}, mean REFINE BA >= "
            f"victim BA - {MAX_BA_DROP}, and in every seed REFINE any-class ASR <= that seed's floor + "
            f"{ANY_CLASS_SEED_MARGIN}.",
        ]
    )


def plot_asr(summary: list[dict[str, Any]], path: Path) -> None:
    """Bars of mean victim, floor and REFINE ASR per attack and recipe, with standard-deviation error bars."""
    labels = [
        "\n".join(
            [
                e["attack"],
                *([e["arch"]] if e["arch"] != DEFAULT_ARCH else []),
                *([e["recipe"]] if e["recipe"] != "refine" else []),
            ]
        )
        for e in summary
    ]
    bars = {"victim_asr": "no defense", "clean_floor_asr": "clean model (floor)", "refine_asr": "REFINE"}
    title = "ASR before / after REFINE over seeds (MNIST-5k); error bars: std"
    plot_bars(summary, labels, bars, "attack success rate", title, path)


def plot_bars(
    summary: list[dict[str, Any]], labels: list[str], bars: dict[str, str], ylabel: str, title: str, path: Path
) -> None:
    """Three bars per summary row (the mean of each figure of ``bars``, by legend label), standard-deviation errors."""
    positions = range(len(summary))
    figure, axes = plt.subplots(figsize=(1.2 * len(summary) + 2, 3.8))
    for offset, (name, label) in zip((-0.27, 0.0, 0.27), bars.items(), strict=True):
        axes.bar(
            [p + offset for p in positions], [e[name] for e in summary], width=0.27, label=label,
            yerr=[e[f"{name}_std"] for e in summary], capsize=2,
        )  # fmt: skip
    axes.set_xticks(list(positions), labels, rotation=30, ha="right", fontsize="small")
    axes.set_ylim(0, 1.2)  # room above the bars for the legend
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.legend(loc="upper center", ncol=3, fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_results(
    rows: list[dict[str, Any]], results_dir: Path, threads: int, name: str = "attacks"
) -> list[dict[str, Any]]:
    """Writes the per-seed csv, the summary csv and markdown and the chart of ``rows``; returns the summary.

    The files are ``<name>_seeds.csv``, ``<name>.csv``, ``<name>.md`` and ``<name>_asr.png`` in ``results_dir``.
    """
    summary = aggregate(rows)
    results_dir.mkdir(parents=True, exist_ok=True)
    write_csv(rows, SEED_COLUMNS, results_dir / f"{name}_seeds.csv")
    write_csv(summary, summary_columns(), results_dir / f"{name}.csv")
    (results_dir / f"{name}.md").write_text(markdown_table(summary, threads, results_dir, name) + "\n")
    plot_asr(summary, results_dir / f"{name}_asr.png")
    return summary


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Runs the benchmark with the command line ``argv``; returns the summary rows."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attacks", nargs="+", choices=ATTACKS, default=list(ATTACKS), help="attacks to run")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds (default: %(default)s)")
    parser.add_argument(
        "--archs", nargs="+", choices=sorted(ARCHITECTURES), default=[DEFAULT_ARCH],
        help="victim architectures of every attack (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--zoo-archs", nargs="*", choices=sorted(ARCHITECTURES), default=list(ZOO_ARCHS),
        help="more victim architectures, for the --zoo-attacks only; none to leave the zoo out (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--zoo-attacks", nargs="+", choices=ATTACKS, default=list(ZOO_ATTACKS),
        help="the attacks of the zoo architectures, among --attacks (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--zoo-seeds", nargs="+", type=int,
        help="the seeds of the zoo rows, among --seeds (default: every one; fewer to save time)",
    )  # fmt: skip
    parser.add_argument(
        "--recipes", nargs="+", choices=RECIPES, default=["refine"],
        help="REFINE recipes: refine (the MNIST config), reference (the reference recipe unchanged)",
    )  # fmt: skip
    parser.add_argument("--run-dir", type=Path, default=REPO / "runs" / "attacks", help="output folder of the runs")
    parser.add_argument("--results-dir", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument(
        "--results-name", default="attacks",
        help="file name stem of the results (default: %(default)s): another keeps a partial table apart",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument(
        "--finished-only", action="store_true",
        help="train nothing: the table of the runs that have finished (a partial table; its seeds column says which)",
    )  # fmt: skip
    add_job_arguments(parser, "victim", "the victims and clean models")
    add_job_arguments(parser, "refine", "the REFINE jobs")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    zoo_seeds = args.seeds if args.zoo_seeds is None else args.zoo_seeds
    for seed in args.seeds:
        zoo_archs = args.zoo_archs if seed in zoo_seeds else []
        for arch, attack in victim_combinations(args.archs, args.attacks, zoo_archs, args.zoo_attacks):
            for recipe in args.recipes:
                if args.finished_only and not finished(args.run_dir, attack, recipe, seed, arch):
                    continue
                rows.append(seed_row(attack, arch, recipe, seed, args.run_dir, args.victim_arg, args.refine_arg))
                # Written after every run, so an interrupted benchmark leaves the results of what it finished.
                summary = write_results(rows, args.results_dir, args.threads, args.results_name)
    if not rows:
        print(f"No finished run of these attacks and seeds in {args.run_dir}: nothing written.")
        return []
    print((args.results_dir / f"{args.results_name}.md").read_text())
    return summary


if __name__ == "__main__":
    main()
