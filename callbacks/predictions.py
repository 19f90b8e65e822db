"""Callback that writes what ``train.py predict`` classified as ``predictions.csv``."""

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from pytorch_lightning import Callback, LightningModule, Trainer
from torch import Tensor

from callbacks.checkpoint import require_trained_weights
from refine_pl.detection import calibrate_on
from refine_pl.predict import prediction_rows, write_predictions_csv


class PredictionCSV(Callback):
    """After ``predict``, writes one CSV row per image of the datamodule's ``predict_root``, in path order.

    The file is ``filename`` in the trainer's ``default_root_dir``; its columns are described in
    :mod:`refine_pl.predict`.

    In a multi-process run every process classifies its share and the rows are gathered on the first process.
    ``flagged`` uses the detector's threshold chosen on the datamodule's held-out benign images (its ``val_set``) at
    a 1 % false-positive rate, as the exported file records it; empty when the data holds none out.

    Args:
        filename: Name of the CSV file.
    """

    def __init__(self, filename: str = "predictions.csv") -> None:
        self.filename = filename
        self._batches: list[dict[str, Tensor]] = []

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        require_trained_weights(trainer, self.filename)
        self._batches = []

    def on_predict_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int, *args: Any
    ) -> None:
        self._batches.append({key: value.detach().cpu() for key, value in outputs.items()})

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        batches = self._batches
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            gathered: list[Any] = [None] * trainer.world_size
            dist.all_gather_object(gathered, batches)
            batches = [batch for part in gathered for batch in part]
        self._batches = []
        if trainer.global_rank != 0 or not batches:
            return
        predictions = {key: torch.cat([batch[key] for batch in batches]) for key in batches[0]}
        order = predictions["index"].argsort()
        predictions = {key: value[order] for key, value in predictions.items()}
        datamodule = trainer.datamodule
        paths = [datamodule.predict_paths[int(i)] for i in predictions["index"]]
        defended = getattr(pl_module, "defended", None)
        detector = None if defended is None else calibrate_on(defended, getattr(datamodule, "val_set", None))
        threshold = None if detector is None else detector["threshold"]
        rows = prediction_rows(paths, predictions, datamodule.class_names, threshold)
        path = write_predictions_csv(Path(trainer.default_root_dir) / self.filename, rows)
        print(f"{len(rows)} predictions saved to {path}")
