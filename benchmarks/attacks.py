"""Every attack the REFINE paper defends against, as a victim defended with REFINE: the before/after table.

For each attack: train the victim on the embedded MNIST-5k (``configs/victim/mnist.yaml`` merged with
``configs/attacks/<attack>.yaml``), defend it with the one REFINE config (``configs/refine/mnist.yaml`` merged
on ``reference.yaml``, the same for every attack) and test both on the held-out images, via
:func:`refine_pl.pipeline.run_pipeline`.
A clean model trained the same way (the victim config alone) gives the BA a victim should keep.

Writes ``attacks.csv`` (``attack,victim_ba,victim_asr,refine_ba,refine_asr,seconds``; fractions in [0, 1];
seconds: wall clock of the attack's whole pipeline), ``attacks.md`` (the same table, the clean BA and the
targets met) and ``attacks_asr.png`` (ASR before / after) to ``--results-dir``. Runs go to
``--run-dir/<attack>``; an attack whose run folder already holds a report is not run again unless
``--rerun`` names it, so an interrupted benchmark continues where it stopped.

    python benchmarks/attacks.py                       # every attack (a while on a CPU: see "seconds")
    python benchmarks/attacks.py --attacks badnets iad # a subset
"""

import argparse
import csv
import json
import shutil
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from refine_pl.cli import cli_main
from refine_pl.pipeline import config_flags, run_pipeline, train_victim

REPO = Path(__file__).resolve().parents[1]
VICTIM_CONFIG = str(REPO / "configs" / "victim" / "mnist.yaml")
REFINE_CONFIGS = [str(REPO / "configs" / "refine" / name) for name in ("reference.yaml", "mnist.yaml")]
ATTACKS = ("badnets", "blended", "wanet", "physical_ba", "iad", "lc", "batt", "adaptive_patch")
"""Config names under configs/attacks/, in the order of the REFINE paper's tables."""
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
COLUMNS = ("attack", "victim_ba", "victim_asr", "refine_ba", "refine_asr", "seconds")

# Targets of the benchmark (issue 3): a real backdoor, and REFINE removing it at little cost.
MIN_VICTIM_ASR = {"lc": 0.80, "adaptive_patch": 0.80}
DEFAULT_MIN_VICTIM_ASR = 0.90
MAX_BA_GAP = 0.03
MAX_REFINE_ASR = 0.03


def run_attack(attack: str, run_dir: Path, rerun: bool) -> dict[str, Any]:
    """Victim, REFINE and report for one attack; returns a row of the table (reusing a finished run)."""
    attack_dir = run_dir / attack
    timing = attack_dir / "benchmark.json"
    if rerun and attack_dir.exists():
        shutil.rmtree(attack_dir)
    if not (timing.is_file() and (attack_dir / "report.json").is_file()):
        resumed = attack_dir.exists()
        start = time.perf_counter()
        victim_configs = [VICTIM_CONFIG, str(REPO / "configs" / "attacks" / f"{attack}.yaml")]
        run_pipeline(victim_configs, REFINE_CONFIGS, attack_dir, QUIET, QUIET)
        seconds = time.perf_counter() - start
        timing.write_text(json.dumps({"seconds": seconds, "resumed": resumed}) + "\n")
    report = json.loads((attack_dir / "report.json").read_text())
    measured = json.loads(timing.read_text())
    return {
        "attack": attack,
        "victim_ba": report["no_defense"]["ba"],
        "victim_asr": report["no_defense"]["asr"],
        "refine_ba": report["defended"]["ba"],
        "refine_asr": report["defended"]["asr"],
        "seconds": measured["seconds"],
        "resumed": measured["resumed"],
    }


def clean_model_ba(run_dir: Path, rerun: bool) -> float:
    """Test BA of a model trained with the victim config and no attack (trained once, then reused)."""
    clean_dir = run_dir / "clean"
    result = clean_dir / "clean.json"
    if rerun and clean_dir.exists():
        shutil.rmtree(clean_dir)
    if not result.is_file():
        checkpoint = train_victim([VICTIM_CONFIG], clean_dir, QUIET)
        test_args = ["--trainer.default_root_dir", str(clean_dir), "--ckpt_path", str(checkpoint), *QUIET]
        cli = cli_main(["test", *config_flags([VICTIM_CONFIG]), *test_args])
        result.write_text(json.dumps({"ba": float(cli.trainer.callback_metrics["test/ba"])}) + "\n")
    return json.loads(result.read_text())["ba"]


def targets_met(row: dict[str, Any], clean_ba: float) -> tuple[bool, bool]:
    """(the victim is a real backdoor, REFINE meets its target) for one row."""
    min_asr = MIN_VICTIM_ASR.get(row["attack"], DEFAULT_MIN_VICTIM_ASR)
    backdoor = row["victim_asr"] >= min_asr and abs(row["victim_ba"] - clean_ba) <= MAX_BA_GAP
    defended = row["refine_asr"] <= MAX_REFINE_ASR and row["refine_ba"] >= row["victim_ba"] - MAX_BA_GAP
    return backdoor, defended


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        for row in rows:
            writer.writerow([row["attack"], *(f"{row[key]:.4f}" for key in COLUMNS[1:5]), f"{row['seconds']:.1f}"])


def markdown_table(rows: list[dict[str, Any]], clean_ba: float) -> str:
    """The table as markdown, with the clean model's BA and which targets each attack meets."""
    lines = [
        "| attack | victim BA | victim ASR | REFINE BA | REFINE ASR | seconds | real backdoor | REFINE target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        backdoor, defended = targets_met(row, clean_ba)
        seconds = f"{row['seconds']:.0f}" + (" (resumed)" if row["resumed"] else "")
        lines.append(
            f"| {row['attack']} | {row['victim_ba']:.4f} | {row['victim_asr']:.4f} | {row['refine_ba']:.4f} | "
            f"{row['refine_asr']:.4f} | {seconds} | {'yes' if backdoor else 'no'} | {'yes' if defended else 'no'} |"
        )
    return "\n".join(
        [
            f"Clean model (victim config, no attack): test BA {clean_ba:.4f}.",
            "",
            *lines,
            "",
            f"real backdoor: victim ASR >= {DEFAULT_MIN_VICTIM_ASR:.2f} (>= 0.80 for lc and adaptive_patch) and "
            f"victim BA within {MAX_BA_GAP * 100:.0f} points of the clean model. REFINE target: REFINE ASR <= "
            f"{MAX_REFINE_ASR:.2f} and REFINE BA at most {MAX_BA_GAP * 100:.0f} points below the victim's.",
        ]
    )


def plot_asr(rows: list[dict[str, Any]], path: Path) -> None:
    """Grouped bars of victim ASR and REFINE ASR per attack."""
    positions = range(len(rows))
    figure, axes = plt.subplots(figsize=(1.1 * len(rows) + 2, 3.6))
    axes.bar([p - 0.2 for p in positions], [r["victim_asr"] for r in rows], width=0.4, label="no defense")
    axes.bar([p + 0.2 for p in positions], [r["refine_asr"] for r in rows], width=0.4, label="REFINE")
    axes.axhline(MAX_REFINE_ASR, color="black", linewidth=0.8, linestyle="--", label=f"ASR {MAX_REFINE_ASR}")
    axes.set_xticks(list(positions), [r["attack"] for r in rows], rotation=30, ha="right")
    axes.set_ylim(0, 1.05)
    axes.set_ylabel("attack success rate")
    axes.set_title("ASR before / after REFINE (MNIST-5k, small CNN)")
    axes.legend(loc="upper right", fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attacks", nargs="+", choices=ATTACKS, default=list(ATTACKS), help="attacks to run")
    parser.add_argument("--run-dir", type=Path, default=Path("runs/attacks"), help="output folder of the runs")
    parser.add_argument("--results-dir", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument(
        "--rerun", nargs="*", default=[], choices=[*ATTACKS, "clean"], metavar="NAME",
        help="run these again from scratch even if finished ('clean' for the clean model)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    clean_ba = clean_model_ba(args.run_dir, "clean" in args.rerun)
    rows = [run_attack(attack, args.run_dir, attack in args.rerun) for attack in args.attacks]
    args.results_dir.mkdir(parents=True, exist_ok=True)
    write_csv(rows, args.results_dir / "attacks.csv")
    table = markdown_table(rows, clean_ba)
    (args.results_dir / "attacks.md").write_text(table + "\n")
    plot_asr(rows, args.results_dir / "attacks_asr.png")
    print(table)


if __name__ == "__main__":
    main()
