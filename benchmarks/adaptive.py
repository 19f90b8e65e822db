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
    python benchmarks/adaptive.py --attacks refine_in_loop --seeds 100 --run-dir runs/adaptive_tuning \
        --results-dir benchmarks/results/adaptive_tuning --attack-arg=--data.init_args.attack.init_args.loop_rate=0.3 \
        --attack-arg=--data.init_args.attack.init_args.refresh_epochs=1 \
        --attack-arg=--data.init_args.attack.init_args.warmup_epochs=2   # the stronger variant on a tuning seed
"""

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.utils import make_grid, save_image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/adaptive.py` from the root

from benchmarks import render
from benchmarks.attacks import (
    SEED_COLUMNS,
    aggregate,
    gate,
    holds_any_class,
    plot_bars,
    seed_row,
    summary_columns,
    write_csv,
)
from benchmarks.victims import DEFAULT_ARCH, REPO, run_name, victim_folder
from datamodules import EmbeddedMNIST
from refine_pl.attacks import attack_from_spec
from refine_pl.export import load_defended
from refine_pl.pipeline import add_job_arguments
from refine_pl.weights import read_weights_file

ADAPTIVE_ATTACKS = ("refine_in_loop", "robust_trigger", "low_frequency")
"""Config names under configs/attacks/ of the attacks that know REFINE."""
VERDICTS = ("real_backdoor", "holds")
SURVIVAL = ("victim_target", "through_t_target", "through_t_target_clean", "perturbation_ratio")
"""The figures of :func:`trigger_survival`, per seed in ``adaptive_seeds.csv`` (as ``survival_<figure>``)."""
LAST = Path("checkpoints") / "last.ckpt"


def trigger_survival(refine_run: Path, victim_checkpoint: Path, grid: Path | None = None) -> dict[str, float]:
    """How much of an attack's trigger gets through REFINE's transform ``T``, on the held-out test images.

    Over the test images whose true class is neither the target ``t`` nor ``M(t)`` (the class the remap sends ``t``
    to, which the defended model rightly gives its own images), poisoned as the victim's recorded attack poisons them
    (``x + trigger``):

    - ``victim_target``: the share the victim ``f`` sends to ``t`` (its ASR on them);
    - ``through_t_target``: the share on which ``f(T(x + trigger))`` is ``t``, so that the defended model says
      ``M(t)``, one fixed class (a trigger that survived the transform);
    - ``through_t_target_clean``: the same without the trigger (``f(T(x))`` is ``t``: ``T``'s errors towards
      ``M(t)``);
    - ``perturbation_ratio``: the mean of ``||T(x + trigger) - T(x)|| / ||trigger||``, how large a difference the
      trigger still makes after ``T``, relative to the one it makes before.

    With ``grid``, a PNG of 8 such images: rows ``x + trigger``, ``T(x + trigger)`` and ``|T(x + trigger) - T(x)|``
    scaled to its maximum.
    """
    defended = load_defended(refine_run / "defended.safetensors").eval()
    attack = attack_from_spec(read_weights_file(victim_checkpoint).attack_spec)
    _, test_set = EmbeddedMNIST().load()
    items = [test_set[i] for i in range(len(test_set))]  # one pass: every item is read (and decoded) once
    images, labels = torch.stack([image for image, _ in items]), torch.tensor([label for _, label in items])
    remapped_target = int(defended.remap.permutation[attack.target_label])
    counted = (labels != attack.target_label) & (labels != remapped_target)
    images, indices = images[counted], torch.nonzero(counted).flatten()
    with torch.no_grad():
        triggered = attack.apply(images, indices)
        transformed, transformed_clean = defended.transform(triggered), defended.transform(images)
        victim = defended.victim
        target = attack.target_label
        through = victim(transformed).argmax(1) == target
        through_clean = victim(transformed_clean).argmax(1) == target
        ratio = (transformed - transformed_clean).flatten(1).norm(dim=1) / (triggered - images).flatten(1).norm(
            dim=1
        ).clamp(min=1e-12)
        figures = {
            "victim_target": float((victim(triggered).argmax(1) == target).float().mean()),
            "through_t_target": float(through.float().mean()),
            "through_t_target_clean": float(through_clean.float().mean()),
            "perturbation_ratio": float(ratio.mean()),
        }
    if grid is not None:
        shown = torch.linspace(0, len(images) - 1, 8).long()
        difference = (transformed[shown] - transformed_clean[shown]).abs()
        rows = torch.cat([triggered[shown], transformed[shown], difference / difference.max().clamp(min=1e-12)])
        rows = F.interpolate(rows.float(), scale_factor=max(1, 64 // rows.shape[-1]), mode="nearest")
        grid.parent.mkdir(parents=True, exist_ok=True)
        save_image(make_grid(rows, nrow=8, padding=2, pad_value=0.5), grid)
    return figures


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
    bars = {
        "victim_any_class_asr": "no defense",
        "clean_floor_any_class_asr": "clean model (floor)",
        "refine_any_class_asr": "REFINE",
    }
    title = "Adaptive attacks (MNIST-5k): any-class ASR; error bars: std"
    plot_bars(summary, [e["attack"] for e in summary], bars, "any-class attack success rate", title, path)


def write_results(rows: list[dict[str, Any]], results_dir: Path, threads: int) -> list[dict[str, Any]]:
    """Writes ``adaptive_seeds.csv``, ``adaptive.csv``, ``adaptive.md`` and ``adaptive_asr.png``; returns the rows."""
    summary = summarise(rows)
    results_dir.mkdir(parents=True, exist_ok=True)
    write_csv(rows, [*SEED_COLUMNS, *(f"survival_{key}" for key in SURVIVAL)], results_dir / "adaptive_seeds.csv")
    columns = [*summary_columns(), "victim_seconds", *VERDICTS]
    write_csv(summary, columns, results_dir / "adaptive.csv")
    tables = f"{render.adaptive(results_dir)}\n\n{render.adaptive_survival(results_dir)}"
    (results_dir / "adaptive.md").write_text(f"{tables}\n\n{threads} torch thread(s).\n")
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
    add_job_arguments(parser, "attack", "the victims only, not the clean models (a setting of the attack)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    for seed in args.seeds:
        for attack in args.attacks:
            row = seed_row(
                attack, DEFAULT_ARCH, "refine", seed, args.run_dir, args.victim_arg, args.refine_arg, args.attack_arg
            )
            runs = args.run_dir / f"{attack}_{run_name(seed)}"
            grid = args.results_dir / f"adaptive_{attack}_grid.png" if seed == args.seeds[0] else None
            survival = trigger_survival(runs / "refine", victim_folder(args.run_dir, attack, seed) / LAST, grid)
            rows.append({**row, **{f"survival_{key}": value for key, value in survival.items()}})
            summary = write_results(rows, args.results_dir, args.threads)  # after every run: a partial table stays
    print((args.results_dir / "adaptive.md").read_text())
    return summary


if __name__ == "__main__":
    main()
