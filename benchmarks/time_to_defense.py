"""Seconds to a defended model: the main job and its REFINE stage before issue 23 and now, side by side in one run.

Runs the main job (``python pipeline.py`` with its defaults: a clean model, the BadNets victim, REFINE, the test) in
fresh run folders, once per variant, one after the other in this process:

- ``before``: the REFINE configs of commit 528d108, ``configs/refine/reference.yaml`` +
  ``benchmarks/configs/mnist_528d108.yaml`` (30 epochs, validation every 5, no stopping rule), run by today's code;
- ``after``: the project's REFINE configs (``configs/refine/recipe.yaml`` + ``configs/refine/mnist.yaml``).

Both variants train the same victim and clean model (same configs and seed) and time every stage: ``clean_s`` and
``victim_s`` (the two victim jobs), ``refine_s`` (the REFINE stage: fit and test, with the deployment files) and
``main_job_s`` (all of it). The 224 px part (``--own-model-224``) times the own-model job's epochs at 224 px on
synthetic images (``refine-pl defend`` on a folder of random images in front of a randomly initialised torchvision
model: the timing, not the figures, is what counts) and projects the default run's time for ``--images`` unlabeled
images from them.

Writes ``time_to_defense.csv`` and ``time_to_defense.md`` (and ``own_model_224.json`` for the 224 px part) to
``--results-dir``. Run it alone on the machine: timings taken beside another job are worthless.

    python benchmarks/time_to_defense.py                       # both variants of the main job
    python benchmarks/time_to_defense.py --own-model-224       # the 224 px epochs too
"""

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/time_to_defense.py` from the root

from benchmarks import render
from benchmarks.speed import cpu_model
from benchmarks.victims import QUIET, REPO
from refine_pl import defend
from refine_pl.metric_names import AGREEMENT, ASR, BA, DEFENDED, LABEL_FREE, NO_DEFENSE
from refine_pl.pipeline import (
    DEFAULT_REFINE_CONFIGS,
    DEFAULT_VICTIM_CONFIGS,
    add_job_arguments,
    run_defense,
    train_victim,
)

VARIANTS: dict[str, list[str]] = {
    "before": ["configs/refine/reference.yaml", str(REPO / "benchmarks" / "configs" / "mnist_528d108.yaml")],
    "after": DEFAULT_REFINE_CONFIGS,
}
"""The REFINE configs of each variant of the main job."""
COLUMNS = (
    "variant", "clean_s", "victim_s", "refine_s", "main_job_s", "epochs", "victim_ba", "defended_ba", "defended_asr",
    "agreement",
)  # fmt: skip


def main_job(
    run_dir: Path, refine_configs: list[str], victim_args: list[str] = (), refine_args: list[str] = ()
) -> dict[str, Any]:
    """The main job with ``refine_configs`` in the fresh folder ``run_dir``, stage by stage: its seconds and figures.

    ``victim_args`` and ``refine_args`` are extra ``train.py`` arguments of the victim jobs and the REFINE job.
    """
    if run_dir.exists() and any(run_dir.iterdir()):
        raise SystemExit(f"{run_dir} is not empty: each variant is timed in a fresh folder; pass another --run-dir.")
    start = time.perf_counter()
    clean = train_victim(DEFAULT_VICTIM_CONFIGS[:1], run_dir / "clean", [*QUIET, *victim_args])
    after_clean = time.perf_counter()
    victim = train_victim(DEFAULT_VICTIM_CONFIGS, run_dir / "victim", [*QUIET, *victim_args])
    after_victim = time.perf_counter()
    report = run_defense(victim, refine_configs, run_dir, [*QUIET, *refine_args], clean)
    end = time.perf_counter()
    label_free = report.get(LABEL_FREE) or {}
    return {
        "clean_s": round(after_clean - start, 1),
        "victim_s": round(after_victim - after_clean, 1),
        "refine_s": round(end - after_victim, 1),
        "main_job_s": round(end - start, 1),
        "epochs": label_free.get("epoch", ""),
        "victim_ba": report[NO_DEFENSE.key][BA],
        "defended_ba": report[DEFENDED.key][BA],
        "defended_asr": report[DEFENDED.key][ASR],
        "agreement": label_free.get(AGREEMENT, ""),
    }


def write_synthetic_job(folder: Path, images: int, size: int, arch: str) -> tuple[Path, Path]:
    """A folder of ``images`` random PNG images of ``size`` px and the weights of a random ``arch`` (torchvision)."""
    import torchvision
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    image_folder = folder / "images"
    image_folder.mkdir(parents=True, exist_ok=True)
    for index in range(images):
        pixels = torch.randint(0, 256, (size, size, 3), generator=generator, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(image_folder / f"{index:05d}.png")
    torch.manual_seed(0)
    weights = folder / f"{arch}.pt"
    torch.save(torchvision.models.get_model(arch, num_classes=10).state_dict(), weights)
    return weights, image_folder


def own_model_224(run_dir: Path, images: int, projected_images: int, arch: str) -> dict[str, Any]:
    """Seconds per epoch of ``refine-pl defend`` at 224 px, from a 1-epoch and a 2-epoch run, and the projection.

    The timed epochs are one pass over the images; the projected epoch draws what the recipe's epoch draws from
    ``projected_images``: at least ``min_epoch_samples`` (a smaller set is passed over again).
    """
    weights, folder = write_synthetic_job(run_dir / "files", images, 256, arch)
    seconds = {}
    for epochs in (1, 2):
        start = time.perf_counter()
        defend.main([str(weights), str(folder), "--arch", arch, "--out", str(run_dir / f"e{epochs}"),
                     "--max-epochs", str(epochs), "--", "--data.init_args.min_epoch_samples", "0", *QUIET])  # fmt: skip
        seconds[epochs] = time.perf_counter() - start
    epoch = seconds[2] - seconds[1]  # one epoch (training and validation), without the start and the exports
    return {"arch": arch, "image_size": 224, "images_timed": images, "seconds_per_epoch": round(epoch, 1),
            **projection(epoch / images, projected_images)}  # fmt: skip


def projection(per_image: float, projected_images: int) -> dict[str, Any]:
    """The recipe's run over ``projected_images`` at ``per_image`` seconds per image and epoch."""
    max_epochs, batch_size, min_samples = (
        defend.recipe_setting(key)
        for key in ("trainer.max_epochs", "data.init_args.batch_size", "data.init_args.min_epoch_samples")
    )
    draws = max(projected_images, min_samples or 0)
    return {
        "seconds_per_image_epoch": round(per_image, 4),
        "projected_images": projected_images,
        "projected_epoch_draws": draws,
        "max_epochs": max_epochs,
        "batch_size": batch_size,
        "projected_epoch_s": round(per_image * draws, 1),
        "projected_run_min_at_max_epochs": round(per_image * draws * max_epochs / 60, 1),
    }


def conditions(threads: int) -> str:
    return (
        f"{cpu_model()} ({os.cpu_count()} cores), {threads} torch thread(s), "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    )


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Runs the benchmark with the command line ``argv``; returns the rows of ``time_to_defense.csv``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--run-dir", type=Path, default=REPO / "runs" / "time_to_defense")
    parser.add_argument("--results-dir", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--conditions", default="nothing else running", help="what else ran, for the record")
    parser.add_argument("--own-model-224", action="store_true", help="also time the own-model job at 224 px")
    parser.add_argument("--images", type=int, default=128, help="synthetic images timed at 224 px")
    parser.add_argument("--projected-images", type=int, default=1500, help="unlabeled images of the projection")
    parser.add_argument("--arch", default="mobilenet_v3_small", help="torchvision model of the 224 px timing")
    add_job_arguments(parser, "victim", "the victim jobs")
    add_job_arguments(parser, "refine", "the REFINE jobs")
    args = parser.parse_args(argv)
    rows = [
        {"variant": variant, **main_job(args.run_dir / variant, VARIANTS[variant], args.victim_arg, args.refine_arg)}
        for variant in args.variants
    ]
    args.results_dir.mkdir(parents=True, exist_ok=True)
    with (args.results_dir / "time_to_defense.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    record = {"conditions": f"{conditions(torch.get_num_threads())}, {args.conditions}"}
    if args.own_model_224:
        record["own_model_224"] = own_model_224(args.run_dir / "own_model_224", args.images, args.projected_images,
                                                args.arch)  # fmt: skip
    (args.results_dir / "time_to_defense.json").write_text(json.dumps(record, indent=2) + "\n")
    text = render.time_to_defense(args.results_dir)
    (args.results_dir / "time_to_defense.md").write_text(text + "\n")
    print(text)
    return rows


if __name__ == "__main__":
    main()
