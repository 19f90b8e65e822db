"""Predictions of the defended classifier on a folder of images, written as CSV: from a run or the exported file.

``train.py predict`` (the :class:`~callbacks.PredictionCSV` callback) and ``refine-pl-predict defended.safetensors
FOLDER`` (:func:`main`, no Lightning and no configs) read the images the same way and write the same columns:

| column | what it is |
|---|---|
| ``path`` | the image file |
| ``defended_class`` | the class the defended classifier ``M(f(T(x)))`` gives |
| ``defended_probability`` | its softmax probability under the defended classifier |
| ``victim_class`` | the class the suspect model ``f`` alone gives |
| ``disagree`` | whether the two differ: a triggered image, or one of REFINE's errors |
| ``score`` | how far the two models' predictions are apart (:func:`refine_pl.detection.detection_score`, >= 0) |
| ``flagged`` | ``score`` above the detector's threshold: a suspected triggered input (empty: no threshold known) |
| ``defended_name``, ``victim_name`` | the class names, when the data has them |

The threshold is the one recorded with the defended model, chosen on the run's held-out benign images at a 1 %
false-positive rate without labels (``refine-pl-predict --threshold`` replaces it; docs/detection.md).
"""

import argparse
import csv
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from refine_pl.classifier import DefendedClassifier
from refine_pl.console import exit_on_config_error
from refine_pl.detection import detection_score, flag
from refine_pl.errors import ConfigError
from refine_pl.export import load_defended, read_description, read_detector
from refine_pl.images import image_files, load_image_file


def predict_batch(defended: DefendedClassifier, images: Tensor) -> dict[str, Tensor]:
    """What the CSV says about each image of a batch ``[B, C, H, W]`` in [0, 1].

    Returns:
        ``defended_class`` ``[B]`` long, ``defended_probability`` ``[B]`` float32, ``victim_class`` ``[B]`` long and
        ``score`` ``[B]`` float32 (:func:`~refine_pl.detection.detection_score`).
    """
    with torch.no_grad():
        defended_logits, victim_logits = defended(images), defended.victim(images)
        probability, defended_class = defended_logits.float().softmax(1).max(1)
        victim_class = victim_logits.argmax(1)
        score = detection_score(victim_logits, defended_logits)
    return {
        "defended_class": defended_class,
        "defended_probability": probability,
        "victim_class": victim_class,
        "score": score,
    }


def prediction_rows(
    paths: Sequence[str],
    predictions: dict[str, Tensor],
    class_names: Sequence[str] | None,
    threshold: float | None = None,
) -> list[dict[str, str]]:
    """The CSV rows of ``paths`` in order, from :func:`predict_batch`'s outputs concatenated over the images.

    ``flagged`` is ``score > threshold`` (:func:`refine_pl.detection.flag`); empty without a threshold.
    """
    flagged = None if threshold is None else flag(predictions["score"], threshold)
    rows = []
    for position, path in enumerate(paths):
        defended, victim = int(predictions["defended_class"][position]), int(predictions["victim_class"][position])
        row = {
            "path": str(path),
            "defended_class": str(defended),
            "defended_probability": f"{float(predictions['defended_probability'][position]):.6f}",
            "victim_class": str(victim),
            "disagree": str(defended != victim).lower(),
            "score": f"{float(predictions['score'][position]):.6f}",
            "flagged": "" if flagged is None else str(bool(flagged[position])).lower(),
        }
        if class_names is not None:
            row["defended_name"], row["victim_name"] = class_names[defended], class_names[victim]
        rows.append(row)
    return rows


def write_predictions_csv(path: str | Path, rows: list[dict[str, str]]) -> Path:
    """Writes ``rows`` (from :func:`prediction_rows`) as a CSV file with a header line, and returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["path"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def predict_folder(
    defended_file: str | Path,
    folder: str | Path,
    victim_arch: str | None = None,
    batch_size: int = 64,
    threshold: float | None = None,
) -> list[dict[str, str]]:
    """The CSV rows for every image under ``folder``, classified by the exported file ``defended_file``.

    Images are read as the run's data source read them (size, crop or stretch, channels: recorded in the file).
    ``flagged`` uses ``threshold``, else the detector's threshold recorded in the file (none: the column is empty).

    Raises:
        ConfigError: The file is refused by :func:`~refine_pl.export.load_defended`, or the folder has no images.
    """
    description = read_description(defended_file)
    defended = load_defended(defended_file, victim_arch=victim_arch)
    paths = [str(p) for p in image_files(Path(folder))] if Path(folder).is_dir() else []
    if not paths:
        raise ConfigError(f"No image files under {folder} (jpg, png, ppm, bmp, pgm, tif, webp): check the folder.")
    size, crop, channels = description["image_size"], description["crop"], description["in_channels"]
    images = (
        torch.stack([load_image_file(path, size, crop, channels) for path in paths[start : start + batch_size]])
        for start in range(0, len(paths), batch_size)
    )
    batches = [predict_batch(defended, batch) for batch in images]
    predictions = {key: torch.cat([batch[key] for batch in batches]) for key in batches[0]}
    if threshold is None:
        detector = read_detector(defended_file)
        threshold = None if detector is None else detector["threshold"]
    return prediction_rows(paths, predictions, description["class_names"], threshold)


def check_output(output: str | Path, defended_file: str | Path, folder: str | Path) -> Path:
    """Refuses an ``--output`` that writing the CSV would destroy or cannot create, before anything is predicted.

    Raises:
        ConfigError: ``output`` is the defended file, one of the images under ``folder``, a directory, or lies under
            a path that is a file.
    """
    output = Path(output)
    target = output.resolve()
    if target == Path(defended_file).resolve():
        raise ConfigError(
            f"--output {output} is the defended model file, which the CSV would overwrite: name a new file."
        )
    if target.is_dir():
        raise ConfigError(f"--output {output} is a directory: name a CSV file, e.g. {output / 'predictions.csv'}.")
    if Path(folder).is_dir() and target in {path.resolve() for path in image_files(Path(folder))}:
        raise ConfigError(
            f"--output {output} is one of the images to classify, which the CSV would overwrite: name a new file."
        )
    blocking = next((parent for parent in output.parents if parent.exists() and not parent.is_dir()), None)
    if blocking is not None:
        raise ConfigError(f"--output {output} lies under {blocking}, which is a file: name a file in a folder.")
    return output


def main(argv: list[str] | None = None) -> None:
    """``refine-pl-predict defended.safetensors FOLDER [--output predictions.csv]``: classifies a folder."""
    parser = argparse.ArgumentParser(description="Classify a folder of images with an exported defended classifier.")
    parser.add_argument("defended_file", help="defended.safetensors written by a REFINE run")
    parser.add_argument("folder", help="folder of images (any nesting)")
    parser.add_argument("--output", default="predictions.csv", help="CSV file to write (default: %(default)s)")
    parser.add_argument(
        "--victim-arch", default=None, help="the import path of the victim's builder, when the file records one"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch, >= 1")
    parser.add_argument(
        "--threshold", type=float, default=None,
        help="flag images whose score exceeds this (default: the threshold recorded in the defended file)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size} is not a number of images: pass 1 or more.")
    if args.threshold is not None and not math.isfinite(args.threshold):
        raise ConfigError(f"--threshold {args.threshold} is not a finite score: pass a number, e.g. 2.5.")
    check_output(args.output, args.defended_file, args.folder)
    rows = predict_folder(args.defended_file, args.folder, args.victim_arch, args.batch_size, args.threshold)
    print(f"{len(rows)} predictions written to {write_predictions_csv(args.output, rows)}")
    if rows and rows[0]["flagged"] == "":
        print(
            f"{args.defended_file} records no detector threshold (exported before refine-pl chose one, or by a run "
            "that held out no benign images): the flagged column is empty; pass --threshold to set one."
        )
    elif rows:
        print(f"{sum(row['flagged'] == 'true' for row in rows)} of {len(rows)} images flagged as suspected triggers.")


def run() -> None:
    """Console entry point ``refine-pl-predict``: :func:`main`, with a ConfigError as one line and exit status 1."""
    exit_on_config_error(main)


if __name__ == "__main__":
    run()
