"""Every attack against every defense on the embedded MNIST-5k, and how much data REFINE needs.

The matrix: each victim of the attacks table and of the adaptive attacks (:mod:`benchmarks.victims`,
:mod:`benchmarks.adaptive`) is defended by every registered defense (:data:`refine_pl.defenses.DEFENSES`), each run
as the pipeline runs REFINE (:func:`refine_pl.pipeline.run_defense`: ``train.py fit`` when it trains, then
``train.py test``) with the MNIST REFINE job (``configs/refine/recipe.yaml`` + ``configs/refine/mnist.yaml``) and the
defense's overlay (``configs/defenses/<defense>.yaml``), the clean model of the same seed given as the reference of
the ASR floor. REFINE and the trigger-inversion defenses it is compared with in its paper (:data:`OVER_SEEDS`) run on
seeds 0, 1 and 2 (victim, clean model, the defense's own seed), the others on seed 0. Every figure comes from the
test's ``report.json``: BA, ASR, any-class ASR, RA of the defended classifier and its DER against the victim, and the
victim's and the clean model's, measured in one pass on the 1,000 held-out test images.
Victims, clean models and the REFINE runs are those of the attacks benchmark (the same ``--run-dir``): whichever
benchmark runs first trains them, the other reuses them.

The data-efficiency curve: REFINE on a fraction of the 3,600 unlabeled training images
(``--data.init_args.fraction``, drawn uniformly from the split seed), with the epochs scaled so that every fraction
trains for the steps of the full run (batch size lowered to the number of images when they are fewer), the cosine
schedule stretched alike, and one validation at the end (validation does not change training). The
full run's point is the matrix's REFINE run.

Writes to ``--results-dir``: ``defenses_seeds.csv`` (``attack,seed,defense,<rates>,seconds``; defense ``none`` is
the victim, ``clean_floor`` the clean model), ``defenses.csv`` (per attack and defense: the seeds held, each rate's
mean, standard deviation and worst seed, the mean seconds), ``defenses.md`` (the matrix per metric, each defense's
time, REFINE against the best other defense), ``defenses_heatmap.png`` (mean ASR and BA),
``defenses_true_labels.csv`` and ``.md`` (the labelled defenses' side rows with the true labels, ``--true-labels``,
beside their seed-0 runs on the victim's predictions), ``data_efficiency.csv``
(``attack,fraction,images,batch_size,epochs,cosine_epochs,warmup_epochs,steps,ba,asr,ra,der,seconds``),
``data_efficiency.md`` and ``data_efficiency.png``; the tables of the markdown files are rendered from the csv files by
:mod:`benchmarks.render`, as the docs' are. Runs go to ``--run-dir/<attack>_s<seed>/<defense>``
(``refine_f<fraction>`` for the curve, seed 0); a run whose folder holds its result is not run again, an interrupted
one resumes from its last checkpoint, so a killed benchmark continues where it stopped when started again with the
same arguments. The matrix files always hold every cell finished in ``--run-dir`` (not only those of this
invocation), so the benchmark can be run in parts; until every cell of the full matrix has finished they say
**PARTIAL** and which cells are missing. Run folders are not kept in git, the results files are: a run whose folder is
not in ``--run-dir`` is carried from ``defenses_seeds.csv`` (``defenses_true_labels.csv``) as last committed when no
config of the matrix changed since that commit, so the benchmark goes on in a later session on another machine
(``--fresh``: carry nothing).

    python benchmarks/defenses.py                                  # everything (many hours on a CPU)
    python benchmarks/defenses.py --defenses neural_cleanse --seeds 0 --efficiency-attacks   # one part
    python benchmarks/defenses.py --finished-only --efficiency-attacks                       # tables only
    python benchmarks/defenses.py --attacks badnets wanet --efficiency-attacks badnets --fractions 0.1 1
"""

import argparse
import csv
import io
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
from benchmarks.adaptive import ADAPTIVE_ATTACKS
from benchmarks.attacks import spread
from benchmarks.victims import (
    ATTACKS,
    QUIET,
    RECIPES,
    REPO,
    VICTIM_CONFIG,
    attack_config,
    clean_model,
    committed_record,
    defended_report,
    finished,
    finished_report,
    run_name,
    victim,
)
from refine_pl.cli import cli_main
from refine_pl.defenses import DEFENSES
from refine_pl.errors import ConfigError
from refine_pl.metric_names import ANY_CLASS_ASR, ASR, BA, CLEAN_FLOOR, DEFENDED, DER, NO_DEFENSE
from refine_pl.pipeline import add_job_arguments, config_flags, resume_flag, run_defense
from refine_pl.run_folder import recorded_settings

REFINE_JOB = RECIPES["refine"]
"""The MNIST REFINE job (the attacks benchmark's recipe ``refine``), which every defense's overlay is merged after."""
MATRIX_ATTACKS = (*ATTACKS, *ADAPTIVE_ATTACKS)
"""The matrix's rows: the attacks table's attacks, then the adaptive ones."""
SEEDS = (0, 1, 2)
OVER_SEEDS = ("refine", "neural_cleanse", "btidbf_unlearning", "btidbf_purification")
"""The defenses of the paper's comparison, run on :data:`SEEDS`; every other defense runs on seed 0."""
LABELLED_DEFENSES = ("neural_cleanse", "btidbf_unlearning", "btidbf_purification")
"""The defenses that need labels. In the matrix they get the victim's predictions (REFINE's threat model: unlabeled
images only); their side row, on seed 0, reads the training set's true labels instead: what labels are worth."""
TRUE_LABELS = ["--model.init_args.labels", "true"]
FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
EFFICIENCY_ATTACKS = ("badnets", "blended", "wanet")
SEED = 0
"""The seed of the data-efficiency curve and of the defenses not in :data:`OVER_SEEDS`."""
RATES = DEFENDED.rates
"""The rates of a defended row, each a column of the csv files."""
WORST_IS_HIGHEST = (ASR, ANY_CLASS_ASR)
"""Rates whose worst seed is the highest (the others' is the lowest)."""
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


def attack_folder(args: argparse.Namespace, attack: str, seed: int = SEED) -> Path:
    """The folder of ``attack``'s runs with ``seed`` (victim, REFINE, the others), shared with the attacks benchmark."""
    return args.run_dir / f"{attack}_{run_name(seed)}"


def defense_seeds(defense: str) -> tuple[int, ...]:
    """The seeds ``defense`` runs on in the full matrix."""
    return SEEDS if defense in OVER_SEEDS else (SEED,)


def planned_cells(attacks: list[str], defenses: list[str], seeds: list[int]) -> list[tuple[str, int, str]]:
    """The (attack, seed, defense) runs of the matrix among ``attacks``, ``defenses`` and ``seeds``, in table order."""
    return [
        (attack, seed, defense)
        for attack in attacks
        for seed in SEEDS
        for defense in defenses
        if seed in seeds and seed in defense_seeds(defense)
    ]


def cell_report(attack: str, seed: int, defense: str, args: argparse.Namespace) -> dict[str, Any] | None:
    """The report of one run of the matrix (with its ``seconds``), or None when it has not finished.

    REFINE is the attacks benchmark's run of the recipe ``refine``; the other defenses run in their own folders
    beside it, seeded with the cell's seed.
    """
    if defense == "refine":
        if not finished(args.run_dir, attack, "refine", seed):
            return None
        report, seconds = finished_report(args.run_dir, attack, "refine", seed)
        return {**report, "seconds": seconds}
    return finished_run(attack_folder(args, attack, seed) / defense, cell_args(seed, args))


def finished_run(folder: Path, run_args: list[str]) -> dict[str, Any] | None:
    """The report of the defense run in ``folder`` with its record (``seconds``), or None when it has not finished.

    Raises:
        ConfigError: ``folder`` holds a run started with other arguments than ``run_args``.
    """
    if not (folder / "report.json").is_file() or "seconds" not in run_record(folder / RESULT, run_args):
        return None
    return {**json.loads((folder / "report.json").read_text()), **json.loads((folder / RESULT).read_text())}


def cell_args(seed: int, args: argparse.Namespace) -> list[str]:
    """The arguments of a (non-REFINE) defense's run with ``seed``."""
    return [*args.defense_arg, "--seed_everything", str(seed)]


def true_label_folder(args: argparse.Namespace, attack: str, defense: str) -> Path:
    """The folder of ``defense``'s side row on ``attack`` (seed 0) with the true labels."""
    return attack_folder(args, attack) / f"{defense}_true_labels"


def true_label_report(attack: str, defense: str, args: argparse.Namespace) -> dict[str, Any] | None:
    """The report of ``defense``'s true-label side row on ``attack`` (with its ``seconds``), or None if unfinished."""
    return finished_run(true_label_folder(args, attack, defense), [*cell_args(SEED, args), *TRUE_LABELS])


def run_true_label_row(attack: str, defense: str, args: argparse.Namespace) -> None:
    """Runs ``defense`` with the true labels on ``attack``'s seed-0 victim (trained first when missing)."""
    clean = clean_model(args.run_dir, SEED, args.victim_arg)
    suspect = victim(args.run_dir, attack, SEED, args.victim_arg)
    folder = true_label_folder(args, attack, defense)
    defense_report(defense, suspect, clean, folder, [*cell_args(SEED, args), *TRUE_LABELS])


def true_label_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every finished side row, each beside the same defense's matrix run on seed 0 (victim labels) when finished.

    A run whose folder is not in ``--run-dir`` is carried from the committed ``defenses_true_labels.csv``
    (:func:`committed_rows`).
    """
    carried = committed_rows(args.results_dir / "defenses_true_labels.csv", ("attack", "defense", "labels"), args)
    rows = []
    for attack in MATRIX_ATTACKS:
        for defense in LABELLED_DEFENSES:
            runs = {"victim": cell_report(attack, SEED, defense, args)}
            runs["true"] = true_label_report(attack, defense, args)
            if runs["true"] is None and (attack, defense, "true") not in carried:
                continue
            for labels, run in runs.items():
                if run is not None:
                    rates = {rate: run[DEFENDED.key][rate] for rate in RATES}
                    rows.append(
                        {"attack": attack, "defense": defense, "labels": labels, **rates, "seconds": run["seconds"]}
                    )
                elif (attack, defense, labels) in carried:
                    rows.append(carried[attack, defense, labels])
    return rows


def run_cell(attack: str, seed: int, defense: str, args: argparse.Namespace) -> None:
    """Runs one cell of the matrix (its victim and clean model first, when they are not trained yet)."""
    clean = clean_model(args.run_dir, seed, args.victim_arg)
    suspect = victim(args.run_dir, attack, seed, args.victim_arg)
    if defense == "refine":
        defended_report(args.run_dir, attack, "refine", seed, suspect, clean, args.defense_arg)
    else:
        defense_report(defense, suspect, clean, attack_folder(args, attack, seed) / defense, cell_args(seed, args))


MATRIX_CONFIGS = [
    VICTIM_CONFIG,
    *(attack_config(attack) for attack in MATRIX_ATTACKS),
    *dict.fromkeys(config for entry in DEFENSES.values() for config in entry.configs(REFINE_JOB)),
]
"""Every config a run of the matrix reads: a change to one makes the figures of earlier runs another config's."""


def committed_rows(path: Path, key: tuple[str, ...], args: argparse.Namespace) -> dict[tuple[Any, ...], dict]:
    """The rows of the results file ``path`` as last committed, by the values of its ``key`` columns.

    Run folders are not kept in git; the results files are. A run whose folder is not in ``--run-dir`` (an earlier
    session's, on another machine) is carried into the tables from its committed row, so the benchmark goes on over
    sessions. Nothing is carried with ``--fresh``, with extra victim or defense arguments (the committed rows are the
    benchmark's own settings), from a file in no commit, or from changes to the file not committed.

    Raises:
        ConfigError: A config of the matrix changed since ``path`` was committed: its rows are another config's.
    """
    extra = args.victim_arg or args.defense_arg
    committed = None if args.fresh or extra else committed_record(path, MATRIX_CONFIGS)
    if committed is None:
        return {}
    text, changed = committed
    if changed:
        raise ConfigError(
            f"{path} holds runs of earlier configs: {', '.join(changed)} changed since it was committed. Rerun them "
            "(the whole benchmark), or pass --fresh to build the tables from the runs in --run-dir alone."
        )
    rows = [_parsed(row) for row in csv.DictReader(io.StringIO(text))]
    return {tuple(row[column] for column in key): row for row in rows}


def _parsed(row: dict[str, str]) -> dict[str, Any]:
    """A row read back from a results csv: rates and seconds as numbers (None where empty), the seed an int."""
    numbers = {*RATES, "seconds"}
    parsed: dict[str, Any] = {k: (float(v) if v else None) if k in numbers else v for k, v in row.items()}
    if "seed" in parsed:
        parsed["seed"] = int(parsed["seed"])
    return parsed


def _rounded(rates: dict[str, Any]) -> dict[str, Any]:
    """A classifier's measured rates as the csv holds them (4 decimals), to compare a run with a carried row."""
    return {rate: round(rates[rate], 4) for rate in NO_DEFENSE.rates}


def matrix_rows(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[tuple[str, int, str]], int]:
    """The rows of the finished runs of the full matrix, the runs that have not finished, and how many were carried.

    A run is read from its folder under ``--run-dir``, or else carried from the committed ``defenses_seeds.csv`` of
    ``--results-dir`` (:func:`committed_rows`). Each attack and seed also gets the victim's (``none``) and the clean
    model's (``clean_floor``) row. The victim and the clean model are measured in every defense's test pass; they
    must agree across the runs, carried ones included (to the csv's 4 decimals): a victim retrained here must be the
    one the carried runs defended.
    """
    carried = committed_rows(args.results_dir / "defenses_seeds.csv", ("attack", "seed", "defense"), args)
    rows: list[dict[str, Any]] = []
    missing = []
    carried_runs = 0
    measured: dict[tuple[str, int], tuple[str, tuple[Any, Any]]] = {}
    for attack, seed, defense in planned_cells(list(MATRIX_ATTACKS), list(DEFENSES), list(SEEDS)):
        report = cell_report(attack, seed, defense, args)
        if report is not None:
            models = (report[NO_DEFENSE.key], report[CLEAN_FLOOR.key])
            row = {"attack": attack, "seed": seed, "defense": defense, **report[DEFENDED.key]}
            row["seconds"] = report["seconds"]
        elif (attack, seed, defense) in carried:
            models = (carried[attack, seed, "none"], carried[attack, seed, CLEAN_FLOOR.key])
            row = carried[attack, seed, defense]
            carried_runs += 1
        else:
            missing.append((attack, seed, defense))
            continue
        first = measured.setdefault((attack, seed), (defense, models))
        if tuple(map(_rounded, models)) != tuple(map(_rounded, first[1])):
            raise ConfigError(  # the same models on the same images: a difference is a bug or another victim
                f"{attack} seed {seed}: the victim or clean model measured in the {defense} run differs from the "
                f"{first[0]} run's: {_rounded(models[0])}, {_rounded(models[1])} against {_rounded(first[1][0])}, "
                f"{_rounded(first[1][1])}."
            )
        if first[0] == defense:
            for key, model in (("none", models[0]), (CLEAN_FLOOR.key, models[1])):
                rates = {rate: model[rate] for rate in NO_DEFENSE.rates}
                rows.append({"attack": attack, "seed": seed, "defense": key, **rates, DER: None, "seconds": None})
        rows.append({key: row[key] for key in ("attack", "seed", "defense", *RATES, "seconds")})
    return rows, missing, carried_runs


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per attack and defense (victim and clean model included).

    Each holds the seeds, every rate's mean, standard deviation and worst seed (:func:`benchmarks.attacks.spread`)
    and the mean seconds.
    """
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["attack"], row["defense"]), []).append(row)
    summary = []
    for (attack, defense), group in groups.items():
        entry: dict[str, Any] = {"attack": attack, "defense": defense, "seeds": " ".join(str(r["seed"]) for r in group)}
        for rate in RATES:
            values = [r[rate] for r in group]
            if None in values:  # DER of the victim and the clean model
                entry.update({rate: None, f"{rate}_std": None, f"{rate}_worst": None})
            else:
                entry.update(spread(rate, values, worst_is_highest=rate in WORST_IS_HIGHEST))
        seconds = [r["seconds"] for r in group]
        entry["seconds"] = None if None in seconds else sum(seconds) / len(seconds)
        summary.append(entry)
    return summary


def missing_note(missing: list[tuple[str, int, str]]) -> str:
    """What of the full matrix has not finished, per defense: every run, or the attacks and their seeds."""
    by_defense: dict[str, dict[str, list[str]]] = {}
    for attack, seed, defense in missing:
        by_defense.setdefault(defense, {}).setdefault(attack, []).append(str(seed))
    parts = []
    for defense, attacks in by_defense.items():
        if len(planned_cells(list(MATRIX_ATTACKS), [defense], list(SEEDS))) == sum(map(len, attacks.values())):
            parts.append(f"{defense}: every run")
        else:
            parts.append(f"{defense}: " + ", ".join(f"{a} (seed {' '.join(seeds)})" for a, seeds in attacks.items()))
    return "; ".join(parts)


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
    """``rows`` as CSV: rates (with their ``_std`` and ``_worst``) with 4 decimals, seconds with 1, None empty."""
    rates = {f"{rate}{suffix}" for rate in RATES for suffix in ("", "_std", "_worst")}
    formatted = {*rates, "seconds"}
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_cell(row[c], 4 if c in rates else 1) if c in formatted else row[c] for c in columns])


def is_full(args: argparse.Namespace) -> bool:
    """Whether ``args`` ask for the whole data-efficiency curve with its own settings."""
    return (
        not args.victim_arg
        and not args.defense_arg
        and list(args.efficiency_attacks) == list(EFFICIENCY_ATTACKS)
        and tuple(args.fractions) == FRACTIONS
    )


def matrix_description(args: argparse.Namespace, missing: list[tuple[str, int, str]], carried: int) -> str:
    """What the matrix files hold: full, or PARTIAL with the runs still missing; the extra arguments, if any.

    It says how many runs were carried from the committed results (:func:`committed_rows`).
    """
    over_seeds = ", ".join(d for d in OVER_SEEDS if d in DEFENSES)
    held = f"seeds {' '.join(map(str, SEEDS))} for {over_seeds}, seed {SEED} for the others"
    extra = (
        f"; extra victim arguments {args.victim_arg or 'none'}, extra defense arguments {args.defense_arg or 'none'} "
        "(**REDUCED RUN**, not the benchmark's figures)"
        if args.victim_arg or args.defense_arg
        else ""
    )
    origin = (
        f" {carried} runs are carried from the committed defenses_seeds.csv (run in earlier sessions; their folders "
        "are not in the run folder), the others read from their run folders."
        if carried
        else ""
    )
    if not missing:
        return f"Full matrix: {len(MATRIX_ATTACKS)} attacks x {len(DEFENSES)} defenses, {held}{extra}.{origin}"
    return (
        f"**PARTIAL** matrix ({held}{extra}): {len(missing)} runs of the full matrix have not finished: "
        f"{missing_note(missing)}.{origin}"
    )


def curve_description(args: argparse.Namespace) -> str:
    """What was run for the curve, saying REDUCED when it is less than the full curve."""
    settings = (
        f"data efficiency on {', '.join(args.efficiency_attacks) or 'no attack'} at fractions "
        f"{', '.join(f'{f:g}' for f in args.fractions)}; extra victim arguments {args.victim_arg or 'none'}; extra "
        f"defense arguments {args.defense_arg or 'none'}"
    )
    if is_full(args):
        return f"Full curve, seed {SEED}: {settings}."
    return f"**REDUCED RUN** (not the benchmark's figures), seed {SEED}: {settings}."


def plot_heatmap(summary: list[dict[str, Any]], note: str, path: Path) -> None:
    """Mean ASR and BA of every attack x defense held, two annotated heat maps; a cell not measured yet is blank."""
    cells = {(row["attack"], row["defense"]): row for row in summary}
    attacks = list(dict.fromkeys(row["attack"] for row in summary))
    defenses = [d for d in DEFENSES if any(row["defense"] == d for row in summary)]
    columns = [CLEAN_FLOOR.key, "none", *defenses]
    labels = ["clean model", "victim", *(DEFENSES[d].label for d in defenses)]
    figure, axes = plt.subplots(2, 1, figsize=(0.9 * len(columns) + 2, 2 * (0.4 * len(attacks) + 1.8)))
    for axis, (metric, title, colours) in zip(axes, ((ASR, "ASR", "Reds"), (BA, "BA", "Greens")), strict=True):
        values = [[cells[a, c][metric] if (a, c) in cells else math.nan for c in columns] for a in attacks]
        axis.imshow(values, cmap=colours, vmin=0, vmax=1, aspect="auto")
        for i, row in enumerate(values):
            for j, value in enumerate(row):
                if not math.isnan(value):
                    colour = "white" if value > 0.6 else "black"
                    axis.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color=colour)
        axis.set_xticks(range(len(columns)), labels, rotation=40, ha="right", fontsize=8)
        axis.set_yticks(range(len(attacks)), attacks, fontsize=8)
        axis.set_title(f"{title}, mean over the seeds held (MNIST-5k, small CNN{note})")
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
    parser.add_argument("--attacks", nargs="+", choices=MATRIX_ATTACKS, default=list(MATRIX_ATTACKS))
    parser.add_argument("--defenses", nargs="+", choices=list(DEFENSES), default=list(DEFENSES))
    parser.add_argument(
        "--seeds", nargs="+", type=int, choices=SEEDS, default=list(SEEDS),
        help=f"seeds to run; {', '.join(OVER_SEEDS)} run on each, the other defenses on seed {SEED} only",
    )  # fmt: skip
    parser.add_argument(
        "--finished-only", action="store_true", help="run nothing of the matrix: write the tables of what has finished"
    )
    parser.add_argument(
        "--efficiency-attacks", nargs="*", choices=ATTACKS, default=list(EFFICIENCY_ATTACKS),
        help="attacks of the data-efficiency curve (none: no curve)",
    )  # fmt: skip
    parser.add_argument("--fractions", nargs="+", type=float, default=list(FRACTIONS))
    parser.add_argument(
        "--true-labels", action="store_true",
        help=f"also run the side rows of {', '.join(LABELLED_DEFENSES)} (those of --defenses) with the true labels, "
        f"seed {SEED}",
    )  # fmt: skip
    parser.add_argument(
        "--run-dir", type=Path, default=REPO / "runs" / "attacks",
        help="folder of the runs: victims, clean model and REFINE shared with benchmarks/attacks.py",
    )  # fmt: skip
    parser.add_argument("--results-dir", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument(
        "--fresh", action="store_true",
        help="carry nothing from the committed results files: the tables hold the runs in --run-dir alone",
    )  # fmt: skip
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


MATRIX_COLUMNS = ("attack", "defense", "seeds", *(f"{r}{x}" for r in RATES for x in ("", "_std", "_worst")), "seconds")
"""Columns of ``defenses.csv``."""


def write_matrix(args: argparse.Namespace) -> str:
    """Writes the matrix files from every finished run under ``--run-dir``; returns the markdown."""
    rows, missing, carried = matrix_rows(args)
    summary = summarise(rows)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    write_csv(rows, ("attack", "seed", "defense", *RATES, "seconds"), args.results_dir / "defenses_seeds.csv")
    write_csv(summary, MATRIX_COLUMNS, args.results_dir / "defenses.csv")
    tables = [render.defenses(args.results_dir, metric) for metric in render.METRICS]
    tables += [render.defenses_time(args.results_dir), render.defenses_verdict(args.results_dir)]
    text = "\n\n".join([matrix_description(args, missing, carried), *tables])
    (args.results_dir / "defenses.md").write_text(text + "\n")
    plot_heatmap(summary, "; PARTIAL" if missing else "", args.results_dir / "defenses_heatmap.png")
    return text


def write_true_labels(args: argparse.Namespace) -> str:
    """Writes ``defenses_true_labels.csv`` and ``.md`` from every finished side row; returns the markdown."""
    rows = true_label_rows(args)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    write_csv(rows, ("attack", "defense", "labels", *RATES, "seconds"), args.results_dir / "defenses_true_labels.csv")
    text = render.defenses_true_labels(args.results_dir)
    (args.results_dir / "defenses_true_labels.md").write_text(text + "\n")
    return text


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    for run in args.rerun:
        shutil.rmtree(args.run_dir / run, ignore_errors=True)
    if not args.finished_only:
        for attack, seed, defense in planned_cells(args.attacks, args.defenses, args.seeds):
            run_cell(attack, seed, defense, args)
        if args.true_labels:
            for attack in args.attacks:
                for defense in (d for d in args.defenses if d in LABELLED_DEFENSES):
                    run_true_label_row(attack, defense, args)
    print(write_matrix(args))
    print(f"\n{write_true_labels(args)}")
    if args.efficiency_attacks:
        clean = clean_model(args.run_dir, SEED, args.victim_arg)
        curve = [
            row
            for attack in args.efficiency_attacks
            for row in efficiency_rows(attack, victim(args.run_dir, attack, SEED, args.victim_arg), clean, args)
        ]
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
        description = curve_description(args)
        (args.results_dir / "data_efficiency.md").write_text(f"{description}\n\n{table}\n")
        plot_efficiency(curve, "" if is_full(args) else "; REDUCED RUN", args.results_dir / "data_efficiency.png")
        print(f"\n{table}")


if __name__ == "__main__":
    main()
