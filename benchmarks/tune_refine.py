"""Choosing the one REFINE config for every attack on attacks and seeds the benchmark table never sees.

A defender does not know the attack, so the MNIST config must be chosen without looking at the rows of
``benchmarks/attacks.py``. This script trains a *tuning set* of victims - variants of the poison-only attacks
with other triggers, targets and seeds (100 and up) than the table's - and defends each with every candidate
config (overrides of the MNIST REFINE job, ``configs/refine/recipe.yaml`` + ``configs/refine/mnist.yaml``). For
each candidate it reports, per victim, the margin to the gate of the table (ASR <= max(0.01, floor + 0.005), BA >=
victim BA - 0.005), the REFINE stage's seconds, the epochs it trained (the label-free stopping rule may end it
before ``max_epochs``) and its label-free agreement; the fastest candidate whose worst-case margins are positive
is the one to adopt. Results: ``tuning.csv`` and ``tuning.md`` (its table rendered from the csv by
:func:`benchmarks.render.tuning`) in ``--results-dir``.

    python benchmarks/tune_refine.py                         # every candidate on every tuning victim
    python benchmarks/tune_refine.py --candidates recipe e12   # a subset
"""

import argparse
import csv
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/tune_refine.py` from the root

from benchmarks import render
from benchmarks.victims import QUIET, RECIPES, REPO, VICTIM_CONFIG, attack_config, configs_version
from refine_pl.metric_names import AGREEMENT, ASR, BA, CLEAN_FLOOR, DEFENDED, LABEL_FREE, NO_DEFENSE
from refine_pl.pipeline import run_defense, train_victim

TUNING_SEED = 100
TUNING_VICTIMS: dict[str, tuple[str, list[str]]] = {
    # name: (attack config, overrides): triggers, targets and seeds (100 unless the name ends in _s<seed>) that the
    # table does not use
    "badnets_checker_tl": ("badnets", ["--data.init_args.attack.init_args.pattern=checkerboard",
                                       "--data.init_args.attack.init_args.location=top_left",
                                       "--data.init_args.attack.init_args.patch_size=4",
                                       "--data.init_args.attack.init_args.target_label=7"]),
    "blended_a015": ("blended", ["--data.init_args.attack.init_args.alpha=0.15",
                                 "--data.init_args.attack.init_args.target_label=3"]),
    "wanet_g8": ("wanet", ["--data.init_args.attack.init_args.grid_size=8",
                           "--data.init_args.attack.init_args.target_label=5"]),
    "batt_cw20": ("batt", ["--data.init_args.attack.init_args.angle=-20",
                           "--data.init_args.attack.init_args.target_label=2"]),
    "physical_ba_d15": ("physical_ba", ["--data.init_args.attack.init_args.degrees=15",
                                        "--data.init_args.attack.init_args.target_label=9"]),
    "adaptive_patch_t4": ("adaptive_patch", ["--data.init_args.attack.init_args.target_label=4"]),
    # two more seeds of the two transformation triggers, whose residual ASR varies most from seed to seed
    "batt_cw20_s101": ("batt", ["--data.init_args.attack.init_args.angle=-20",
                                "--data.init_args.attack.init_args.target_label=2"]),
    "physical_ba_d15_s101": ("physical_ba", ["--data.init_args.attack.init_args.degrees=15",
                                             "--data.init_args.attack.init_args.target_label=9"]),
}  # fmt: skip

EPOCHS = "--trainer.max_epochs="
_OPTION = "--model.init_args."
CANDIDATES: dict[str, list[str]] = {
    "recipe": [],  # configs/refine/recipe.yaml + configs/refine/mnist.yaml as they are
    "e8": [f"{EPOCHS}8"],  # 8 epochs at most
    "e12": [f"{EPOCHS}12"],  # 12 epochs at most
    "w8": ["--model.init_args.transform.init_args.base_width=8"],  # a U-Net of half the width (a quarter the FLOPs)
    # Two down stages instead of four: a 28 px image needs no padding (to 32 px at depth 4) and the two smallest
    # stages go; its receptive field is smaller.
    "d2": ["--model.init_args.transform.init_args.depth=2"],
    "d2e20": ["--model.init_args.transform.init_args.depth=2", f"{EPOCHS}20"],  # and 20 epochs: issue 23's 60 s
    # Ten times the weight decay: by hand it kept mobilenet_v3_small's BA 0.927 (0.885 at the recipe's), an own-model
    # case that fits its 450 images (docs/own-model.md).
    "wd5e-3": ["--model.init_args.optimizer.init_args.weight_decay=0.005"],
    # Both: the own-model path's weight decay and the 28 px U-Net of two down stages (0.70x the REFINE stage's time),
    # tried as one recipe change to the MNIST job; it lost a BATT victim's BA (tuning_d2_wd5e-3.md).
    "d2_wd5e-3": [
        "--model.init_args.transform.init_args.depth=2",
        "--model.init_args.optimizer.init_args.weight_decay=0.005",
    ],
    # Black-box REFINE (docs/black-box.md), with labels only and with probabilities: a surrogate refresh every epoch
    # without the rollback, and an online surrogate (a refresh every step) with the rollback of T and the surrogate,
    # its rate constant or following T's. Each names its rollback settings, as they were measured, whatever
    # configs/refine/black_box.yaml (merged before them) holds since.
    **{
        f"bb_{answers}_{settings}": [f"{_OPTION}answers={answers}", *options]
        for answers in ("labels", "probabilities")
        for settings, options in (
            (
                "refresh",
                [
                    f"{_OPTION}surrogate_refresh_epochs=1",
                    f"{_OPTION}surrogate_online=false",
                    f"{_OPTION}agreement_rollback=null",
                ],
            ),
            (
                "online_rollback",
                [
                    f"{_OPTION}surrogate_refresh_epochs=0",
                    f"{_OPTION}surrogate_online=true",
                    f"{_OPTION}agreement_rollback=0.3",
                    f"{_OPTION}rollback_keeps_surrogate=false",
                ],
            ),
            (
                "online_rollback_schedule",  # and the surrogate's rate following T's warmup and cosine decay
                [
                    f"{_OPTION}surrogate_refresh_epochs=0",
                    f"{_OPTION}surrogate_online=true",
                    f"{_OPTION}agreement_rollback=0.3",
                    f"{_OPTION}rollback_keeps_surrogate=false",
                    f"{_OPTION}surrogate_refresh_schedule=true",
                ],
            ),
        )
    },
}
"""Candidate configs: overrides of the REFINE job (``train.py`` arguments) on top of the MNIST job's configs. The
cosine of every candidate ends at its ``max_epochs``; the label-free stopping rule may end it sooner."""
CANDIDATE_CONFIGS: dict[str, list[str]] = {
    candidate: ["configs/refine/black_box.yaml"] for candidate in CANDIDATES if candidate.startswith("bb_")
}
"""Configs a candidate merges after the MNIST job's (none unless named here)."""

GATE_ASR, FLOOR_MARGIN, GATE_BA_DROP = 0.01, 0.005, 0.005


def tuning_seed(name: str) -> int:
    """The seed of tuning victim ``name``: the number after a final ``_s``, else :data:`TUNING_SEED`."""
    stem, _, suffix = name.rpartition("_s")
    return int(suffix) if stem and suffix.isdigit() else TUNING_SEED


def tuning_victim(run_dir: Path, name: str) -> tuple[Path, Path]:
    """The victim ``name`` of the tuning set and the clean model of its seed (each trained once)."""
    seed = tuning_seed(name)
    seeded = [*QUIET, "--seed_everything", str(seed)]
    clean = train_victim([VICTIM_CONFIG], run_dir / f"clean_s{seed}", seeded)
    attack, overrides = TUNING_VICTIMS[name]
    arguments = [*seeded, "--data.init_args.attack.init_args.seed", str(seed), *overrides]
    return train_victim([VICTIM_CONFIG, attack_config(attack)], run_dir / name / "victim", arguments), clean


def candidate_row(run_dir: Path, name: str, candidate: str) -> dict[str, Any]:
    """REFINE of ``candidate`` on tuning victim ``name``: figures, gate margins and seconds (reused if finished)."""
    suspect, clean = tuning_victim(run_dir, name)
    job = run_dir / name / candidate
    timing = job / "timing.json"
    overrides, recipe = CANDIDATES[candidate], configs_version(RECIPES["refine"])
    if timing.is_file() and (job / "report.json").is_file():
        recorded = json.loads(timing.read_text())
        if recorded.get("overrides") != overrides:
            raise SystemExit(
                f"{job} holds a finished run of other overrides ({recorded.get('overrides')}, not {overrides}): "
                "move it away, or pass another --run-dir."
            )
        if recorded.get("recipe", recipe) != recipe:  # runs from before the recipe was recorded are taken as they are
            raise SystemExit(
                f"{job} holds a finished run of the recipe of {recorded['recipe']}, not of {recipe} (the last commit "
                f"of {', '.join(RECIPES['refine'])}): move it away, or pass another --run-dir."
            )
    else:
        start = time.perf_counter()
        seed = tuning_seed(name)
        arguments = [*QUIET, "--seed_everything", str(seed), "--model.init_args.remap_seed", str(seed)]
        configs = [*RECIPES["refine"], *CANDIDATE_CONFIGS.get(candidate, [])]
        run_defense(suspect, configs, job, [*arguments, *overrides], clean)
        seconds = time.perf_counter() - start
        timing.write_text(json.dumps({"seconds": seconds, "overrides": overrides, "recipe": recipe}) + "\n")
    report = json.loads((job / "report.json").read_text())
    victim, defended, floor = report[NO_DEFENSE.key], report[DEFENDED.key], report[CLEAN_FLOOR.key][ASR]
    return {
        "victim": name,
        "candidate": candidate,
        "victim_ba": victim[BA],
        "victim_asr": victim[ASR],
        "floor": floor,
        "refine_ba": defended[BA],
        "refine_asr": defended[ASR],
        "asr_margin": max(GATE_ASR, floor + FLOOR_MARGIN) - defended[ASR],
        "ba_margin": defended[BA] - (victim[BA] - GATE_BA_DROP),
        "seconds": json.loads(timing.read_text())["seconds"],
        "epochs": (report.get(LABEL_FREE) or {}).get("epoch"),
        "agreement": (report.get(LABEL_FREE) or {}).get(AGREEMENT),
    }


def summary_table(rows: list[dict[str, Any]], threads: int, results_dir: Path, name: str) -> str:
    """The table of ``<name>.csv`` (:func:`benchmarks.render.tuning`), then the gate and the conditions."""
    return (
        f"{render.tuning(results_dir, name)}\n\n"
        f"Tuning seed {TUNING_SEED} unless the victim's name ends in another; margins to the gate (ASR <= "
        f"max({GATE_ASR}, floor + {FLOOR_MARGIN}), BA >= victim BA - {GATE_BA_DROP}). Seconds: REFINE stage (fit and "
        f"test), {threads} torch thread(s)."
    )


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Runs the tuning with the command line ``argv``; returns the rows."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", nargs="+", choices=CANDIDATES, default=list(CANDIDATES))
    parser.add_argument("--victims", nargs="+", choices=TUNING_VICTIMS, default=list(TUNING_VICTIMS))
    parser.add_argument("--run-dir", type=Path, default=REPO / "runs" / "tuning")
    parser.add_argument("--results-dir", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--results-name", default="tuning", help="file name stem of the results (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [candidate_row(args.run_dir, name, candidate) for candidate in args.candidates for name in args.victims]
    args.results_dir.mkdir(parents=True, exist_ok=True)
    with (args.results_dir / f"{args.results_name}.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    table = summary_table(rows, args.threads, args.results_dir, args.results_name)
    (args.results_dir / f"{args.results_name}.md").write_text(table + "\n")
    print(table)
    return rows


if __name__ == "__main__":
    main()
