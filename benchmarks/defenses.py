"""Every attack against every defense on the embedded MNIST-5k, and how much data REFINE needs.

The matrix: for each attack, its victim (seed 0) is defended by every registered defense
(:data:`refine_pl.defenses.DEFENSES`), each run as the pipeline runs REFINE (:func:`refine_pl.pipeline.run_defense`:
``train.py fit`` when it trains, then ``train.py test``) with the MNIST REFINE job (``configs/refine/recipe.yaml``
+ ``configs/refine/mnist.yaml``) and the defense's overlay (``configs/defenses/<defense>.yaml``), the clean model
given as the reference of the ASR floor. Every figure comes from the test's ``report.json``: BA, ASR, RA of the
defended classifier and its DER against the victim, and the victim's and the clean model's, measured in one pass on
the 1,000 held-out test images.
Victims, the clean model and the REFINE runs are those of the attacks benchmark (:mod:`benchmarks.victims`, the
same ``--run-dir``): whichever benchmark runs first trains them, the other reuses them.

The data-efficiency curve: REFINE on a fraction of the 3,600 unlabeled training images
(``--data.init_args.fraction``, drawn uniformly from the split seed), with the epochs scaled so that every fraction
trains for the steps of the full run (batch size lowered to the number of images when they are fewer), the cosine
schedule stretched alike, and one validation at the end (validation does not change training). The
full run's point is the matrix's REFINE run.

Writes to ``--results-dir``: ``defenses.csv`` (``attack,defense,ba,asr,ra,der,seconds``; defense ``none`` is the
victim, ``clean_floor`` the clean model), ``defenses.md`` (the matrix per metric), ``defenses_heatmap.png`` (ASR and
BA), ``data_efficiency.csv``
(``attack,fraction,images,batch_size,epochs,cosine_epochs,warmup_epochs,steps,ba,asr,ra,der,seconds``),
``data_efficiency.md`` and ``data_efficiency.png``; the tables of the markdown files are rendered from the csv files by
:mod:`benchmarks.render`, as the docs' are. Runs go to ``--run-dir/<attack>_s0/<defense>``
(``refine_f<fraction>`` for the curve); a run whose folder holds its result is not run again, an interrupted one
resumes from its last checkpoint, so a killed benchmark continues where it stopped when started again with the
same arguments.

    python benchmarks/defenses.py                                  # everything (hours on a CPU)
    python benchmarks/defenses.py --attacks badnets wanet --efficiency-attacks badnets --fractions 0.1 1
"""

import argparse
import csv
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/defenses.py` from the root

from benchmarks import render
from benchmarks.victims import ATTACKS, QUIET, RECIPES, REPO, clean_model, defended_report, run_name, victim
from refine_pl.cli import cli_main
from refine_pl.defenses import DEFENSES
from refine_pl.errors import ConfigError
from refine_pl.metric_names import ASR, BA, CLEAN_FLOOR, DEFENDED, DER, NO_DEFENSE
from refine_pl.pipeline import add_job_arguments, config_flags, resume_flag, run_defense
from refine_pl.run_folder import recorded_settings

REFINE_JOB = RECIPES["refine"]
"""The MNIST REFINE job (the attacks benchmark's recipe ``refine``), which every defense's overlay is merged after."""
FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
EFFICIENCY_ATTACKS = ("badnets", "blended", "wanet")
SEED = 0
RATES = DEFENDED.rates
"""The rates of a defended row, each a column of the csv files."""
RESULT = "benchmark.json"
"""A run folder's record: ``{"args"}`` when the run starts, ``{"args", "seconds", "resumed"}`` once it is tested."""


def run_record(path: Path, args: list[str]) -> dict[str, Any]:
    """The record of the run whose ``benchmark.json`` is ``path``, or a new one for ``args``.

    Raises:
        ConfigError: The run was started with other ``args``: resuming it would continue another run's training
            with these settings, reusing it would report other settings' figures.
    """
    return recorded_settings(path, {"args": args}, "delete the folder or use another --run-dir")


def defense_report(defense: str, suspect: Path, clean: Path, run_dir: Path, args: list[str]) -> dict[str, Any]:
    """Runs ``defense`` against ``suspect`` in ``run_dir`` (:func:`~refine_pl.pipeline.run_defense`), or reads the run.

    Returns:
        The test's ``report.json`` with ``"seconds"`` (wall clock of fit and test) and ``"resumed"`` added.

    Raises:
        ConfigError: ``run_dir`` holds a run started with other ``args``.
    """
    entry = DEFENSES[defense]
    result = run_dir / RESULT
    record = run_record(result, args)
    if "seconds" not in record:
        run_dir.mkdir(parents=True, exist_ok=True)
        result.write_text(json.dumps(record) + "\n")
        resumed = bool(resume_flag(run_dir))
        start = time.perf_counter()
        run_defense(suspect, entry.configs(REFINE_JOB), run_dir, [*QUIET, *args], clean, trains=entry.trains)
        record.update(seconds=round(time.perf_counter() - start, 1), resumed=resumed)
        result.write_text(json.dumps(record) + "\n")
    return {**json.loads((run_dir / "report.json").read_text()), **record}


STRETCHABLE_SCHEDULES = ("torch.optim.lr_scheduler.CosineAnnealingLR", "refine_pl.schedules.WarmupCosineLR")


def training_plan(suspect: Path, run_dir: Path, args: list[str]) -> dict[str, int]:
    """The training images, batch size, epochs, cosine period and warmup epochs of the REFINE job with ``args``.

    Raises:
        ConfigError: The job's schedule is not a cosine, with or without warmup (the schedules the curve stretches).
    """
    cli = cli_main(
        [*config_flags(REFINE_JOB), "--model.init_args.victim_checkpoint", str(suspect),
         "--trainer.default_root_dir", str(run_dir), *QUIET, *args],
        run=False,
    )  # fmt: skip
    cli.datamodule.setup("fit")
    scheduler = cli.config["model"]["init_args"].get("scheduler")
    if scheduler is None or scheduler["class_path"] not in STRETCHABLE_SCHEDULES:
        raise ConfigError(
            f"The data-efficiency curve stretches one of {STRETCHABLE_SCHEDULES}; this REFINE job has {scheduler}."
        )
    return {
        "images": len(cli.datamodule.train_set),
        "batch_size": cli.datamodule.batch_size,
        "epochs": cli.trainer.max_epochs,
        # WarmupCosineLR without T_max ends with the training
        "cosine_epochs": scheduler["init_args"].get("T_max") or cli.trainer.max_epochs,
        "warmup_epochs": scheduler["init_args"].get("warmup_epochs", 0),
    }


def fraction_settings(fraction: float, plan: dict[str, int]) -> dict[str, int]:
    """The images, batch size, epochs, cosine period, warmup epochs and steps of the run on ``fraction`` of ``plan``.

    Steps are those of the full run (its epochs of ``images // batch_size`` batches); the batch size is the full
    run's unless fewer images are drawn; epochs, cosine period and warmup grow by the full run's batches per epoch
    over this run's, so the learning rate follows the same curve over the steps.
    """
    drawn = max(1, round(fraction * plan["images"]))
    batch = min(plan["batch_size"], drawn)
    stretch = (plan["images"] // plan["batch_size"]) / (drawn // batch)
    return {
        "images": drawn,
        "batch_size": batch,
        "epochs": math.ceil(plan["epochs"] * stretch),
        "cosine_epochs": round(plan["cosine_epochs"] * stretch),
        "warmup_epochs": round(plan["warmup_epochs"] * stretch),
        "steps": plan["epochs"] * (plan["images"] // plan["batch_size"]),
    }


def fraction_args(fraction: float, settings: dict[str, int]) -> list[str]:
    """The REFINE job's arguments for ``fraction`` with ``settings`` (see :func:`fraction_settings`)."""
    epochs = str(settings["epochs"])
    args = [
        "--data.init_args.fraction", str(fraction),
        "--data.init_args.batch_size", str(settings["batch_size"]),
        "--trainer.max_steps", str(settings["steps"]),
        "--trainer.max_epochs", epochs,
        "--model.init_args.scheduler.init_args.T_max", str(settings["cosine_epochs"]),
        "--trainer.check_val_every_n_epoch", epochs,
    ]  # fmt: skip
    if settings["warmup_epochs"]:  # a plain cosine has no warmup argument
        args += ["--model.init_args.scheduler.init_args.warmup_epochs", str(settings["warmup_epochs"])]
    return args


def attack_folder(args: argparse.Namespace, attack: str) -> Path:
    """The folder of ``attack``'s runs (victim, REFINE, the other defenses), shared with the attacks benchmark."""
    return args.run_dir / f"{attack}_{run_name(SEED)}"


def matrix_rows(attack: str, suspect: Path, clean: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The victim's row (``none``), the clean model's (``clean_floor``) and one row per defense for ``attack``.

    REFINE is the attacks benchmark's run of the recipe ``refine`` (seed 0); the other defenses run in their own
    folders beside it. The victim and the clean model are measured in every defense's test pass.
    """
    reports = {}
    for defense in args.defenses:
        if defense == "refine":
            report, seconds = defended_report(args.run_dir, attack, "refine", SEED, suspect, clean, args.defense_arg)
            reports[defense] = {**report, "seconds": seconds}
        else:
            reports[defense] = defense_report(
                defense, suspect, clean, attack_folder(args, attack) / defense, args.defense_arg
            )
    first = reports[args.defenses[0]]
    rows = [
        {"attack": attack, "defense": "none", **first[NO_DEFENSE.key], DER: None, "seconds": None},
        {"attack": attack, "defense": CLEAN_FLOOR.key, **first[CLEAN_FLOOR.key], DER: None, "seconds": None},
    ]
    for defense, report in reports.items():
        measured = (report[NO_DEFENSE.key], report[CLEAN_FLOOR.key])
        if measured != (first[NO_DEFENSE.key], first[CLEAN_FLOOR.key]):
            raise ConfigError(  # the same models on the same images: a difference is a bug
                f"{attack}: the victim or clean model measured in the {defense} run differs from the "
                f"{args.defenses[0]} run's: {measured[0]}, {measured[1]}."
            )
        rows.append({"attack": attack, "defense": defense, **report[DEFENDED.key], "seconds": report["seconds"]})
    return rows


def efficiency_rows(attack: str, suspect: Path, clean: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """REFINE on every fraction of the training images for ``attack``; the full-data point is the matrix's run."""
    plan = training_plan(suspect, attack_folder(args, attack), args.defense_arg)
    rows = []
    for fraction in args.fractions:
        settings = fraction_settings(fraction, plan)
        if fraction == 1:
            report, seconds = defended_report(args.run_dir, attack, "refine", SEED, suspect, clean, args.defense_arg)
        else:
            run_dir = attack_folder(args, attack) / f"refine_f{fraction:g}"
            run_args = [*args.defense_arg, *fraction_args(fraction, settings)]
            report = defense_report("refine", suspect, clean, run_dir, run_args)
            seconds = report["seconds"]
        rows.append({"attack": attack, "fraction": fraction, **settings, **report[DEFENDED.key], "seconds": seconds})
    return rows


def _cell(value: float | None, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def write_csv(rows: list[dict[str, Any]], columns: tuple[str, ...], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in rows:
            writer.writerow(
                [_cell(row[c]) if c in RATES else _cell(row[c], 1) if c == "seconds" else row[c] for c in columns]
            )


def is_full(args: argparse.Namespace, part: str) -> bool:
    """Whether ``args`` ask for the whole ``part`` (``"matrix"`` or ``"curve"``) with its own settings."""
    full_runs = not args.victim_arg and not args.defense_arg
    if part == "matrix":
        return full_runs and list(args.attacks) == list(ATTACKS) and list(args.defenses) == list(DEFENSES)
    return (
        full_runs and list(args.efficiency_attacks) == list(EFFICIENCY_ATTACKS) and tuple(args.fractions) == FRACTIONS
    )


def run_description(args: argparse.Namespace, part: str) -> str:
    """What was run for ``part`` (``"matrix"`` or ``"curve"``), saying REDUCED when it is less than the full part."""
    if part == "matrix":
        settings = f"attacks {', '.join(args.attacks)}; defenses {', '.join(args.defenses)}"
    else:
        settings = (
            f"data efficiency on {', '.join(args.efficiency_attacks) or 'no attack'} at fractions "
            f"{', '.join(f'{f:g}' for f in args.fractions)}"
        )
    settings += (
        f"; extra victim arguments {args.victim_arg or 'none'}; extra defense arguments {args.defense_arg or 'none'}"
    )
    if is_full(args, part):
        return f"Full {part}, seed {SEED}: {settings}."
    return f"**REDUCED RUN** (not the benchmark's figures), seed {SEED}: {settings}."


def plot_heatmap(rows: list[dict[str, Any]], attacks: list[str], defenses: list[str], note: str, path: Path) -> None:
    """ASR and BA of every attack x defense as two annotated heat maps, one above the other."""
    cells = {(row["attack"], row["defense"]): row for row in rows}
    columns = [CLEAN_FLOOR.key, "none", *defenses]
    labels = ["clean model", "victim", *(DEFENSES[d].label for d in defenses)]
    figure, axes = plt.subplots(2, 1, figsize=(0.9 * len(columns) + 2, 2 * (0.4 * len(attacks) + 1.8)))
    for axis, (metric, title, colours) in zip(axes, ((ASR, "ASR", "Reds"), (BA, "BA", "Greens")), strict=True):
        values = [[cells[a, c][metric] for c in columns] for a in attacks]
        axis.imshow(values, cmap=colours, vmin=0, vmax=1, aspect="auto")
        for i, row in enumerate(values):
            for j, value in enumerate(row):
                colour = "white" if value > 0.6 else "black"
                axis.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color=colour)
        axis.set_xticks(range(len(columns)), labels, rotation=40, ha="right", fontsize=8)
        axis.set_yticks(range(len(attacks)), attacks, fontsize=8)
        axis.set_title(f"{title} (MNIST-5k, small CNN{note})")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_efficiency(rows: list[dict[str, Any]], note: str, path: Path) -> None:
    """BA and ASR of REFINE against the fraction of training images, one line per attack."""
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for attack in dict.fromkeys(row["attack"] for row in rows):
        points = [row for row in rows if row["attack"] == attack]
        for axis, metric in zip(axes, (BA, ASR), strict=True):
            axis.plot([100 * p["fraction"] for p in points], [p[metric] for p in points], marker="o", label=attack)
    percents = sorted({100 * row["fraction"] for row in rows})
    for axis, title in zip(axes, ("BA", "ASR"), strict=True):
        axis.set_xscale("log")
        axis.set_xticks(percents, [f"{p:g}" for p in percents])
        axis.minorticks_off()
        axis.set_xlabel("unlabeled training images used (%)")
        axis.set_ylim(0, 1.02)
        axis.set_title(f"REFINE {title} (equal training steps{note})")
        axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attacks", nargs="+", choices=ATTACKS, default=list(ATTACKS))
    parser.add_argument("--defenses", nargs="+", choices=list(DEFENSES), default=list(DEFENSES))
    parser.add_argument(
        "--efficiency-attacks", nargs="*", choices=ATTACKS, default=list(EFFICIENCY_ATTACKS),
        help="attacks of the data-efficiency curve (none: no curve)",
    )  # fmt: skip
    parser.add_argument("--fractions", nargs="+", type=float, default=list(FRACTIONS))
    parser.add_argument(
        "--run-dir", type=Path, default=REPO / "runs" / "attacks",
        help="folder of the runs: victims, clean model and REFINE shared with benchmarks/attacks.py",
    )  # fmt: skip
    parser.add_argument("--results-dir", type=Path, default=REPO / "benchmarks" / "results")
    add_job_arguments(parser, "victim", "every victim job")
    add_job_arguments(parser, "defense", "every defense job")
    parser.add_argument(
        "--rerun", nargs="*", default=[], metavar="FOLDER",
        help="delete these run folders (under --run-dir) first, e.g. badnets_s0/shrinkpad or badnets_s0/refine_f0.1",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if not all(0 < f <= 1 for f in args.fractions):
        parser.error(f"--fractions must lie in (0, 1], got {args.fractions}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    for run in args.rerun:
        shutil.rmtree(args.run_dir / run, ignore_errors=True)
    clean = clean_model(args.run_dir, SEED, args.victim_arg)
    suspects = {
        attack: victim(args.run_dir, attack, SEED, args.victim_arg)
        for attack in dict.fromkeys([*args.attacks, *args.efficiency_attacks])
    }
    rows = [row for attack in args.attacks for row in matrix_rows(attack, suspects[attack], clean, args)]
    args.results_dir.mkdir(parents=True, exist_ok=True)
    description = run_description(args, "matrix")
    write_csv(rows, ("attack", "defense", *RATES, "seconds"), args.results_dir / "defenses.csv")
    matrix = "\n\n".join(render.defenses(args.results_dir, metric) for metric in render.METRICS)
    (args.results_dir / "defenses.md").write_text(f"{description}\n\n{matrix}\n")
    note = "" if is_full(args, "matrix") else "; REDUCED RUN"
    plot_heatmap(rows, args.attacks, args.defenses, note, args.results_dir / "defenses_heatmap.png")
    print(f"{description}\n\n{matrix}")
    if args.efficiency_attacks:
        curve = [row for a in args.efficiency_attacks for row in efficiency_rows(a, suspects[a], clean, args)]
        columns = (
            "attack",
            "fraction",
            "images",
            "batch_size",
            "epochs",
            "cosine_epochs",
            "warmup_epochs",
            "steps",
            *RATES,
            "seconds",
        )
        write_csv(curve, columns, args.results_dir / "data_efficiency.csv")
        table = render.data_efficiency(args.results_dir)
        description = run_description(args, "curve")
        (args.results_dir / "data_efficiency.md").write_text(f"{description}\n\n{table}\n")
        note = "" if is_full(args, "curve") else "; REDUCED RUN"
        plot_efficiency(curve, note, args.results_dir / "data_efficiency.png")
        print(f"\n{table}")


if __name__ == "__main__":
    main()
