"""Callback that saves the defended classifier of a REFINE run as one safetensors file."""

from pathlib import Path

from pytorch_lightning import Callback, LightningModule, Trainer
from pytorch_lightning.utilities import rank_zero_only

from callbacks.checkpoint import require_trained_weights
from refine_pl.black_box import BlackBox
from refine_pl.black_box_export import save_black_box_defense
from refine_pl.detection import DEFAULT_FPR, calibrate_on
from refine_pl.errors import ConfigError, cli_flag
from refine_pl.export import export_defended
from refine_pl.input_transform_module import InputTransformDefense


def exportable_defense(
    trainer: Trainer, pl_module: LightningModule, callback: str, output: str
) -> InputTransformDefense:
    """``pl_module``, checked to be a trained (or training-free) input-transform defense whose classifier exports.

    Raises:
        ConfigError: ``pl_module`` is not an :class:`~refine_pl.input_transform_module.InputTransformDefense`, or its
            weights were never trained (see :func:`~callbacks.checkpoint.require_trained_weights`).
    """
    if not isinstance(pl_module, InputTransformDefense):
        raise ConfigError(
            f"{callback} exports an input-transform defense (InputTransformDefense), not {type(pl_module).__name__}; "
            "remove the callback from configs that train another model."
        )
    require_trained_weights(trainer, output)
    return pl_module


class ExportDefendedClassifier(Callback):
    """Writes ``M(f(T(x)))`` to ``filename`` in the trainer's ``default_root_dir`` after fitting and testing.

    After ``fit`` the file holds the last trained weights; after ``test`` those of the tested checkpoint, i.e.
    the classifier the report measured. Load it with :func:`refine_pl.export.load_defended`. The data's class names
    and resizing are recorded with it, for predictions from the file, and so is the threshold of the detector of
    triggered inputs (:mod:`refine_pl.detection`), chosen without labels on the benign images the run held out
    (``--data.val_fraction``) at the false-positive rate ``detector_fpr``; a run that held none out records none.

    Args:
        filename: Name of the safetensors file.
        detector_fpr: Target false-positive rate of the detector's threshold on benign images, in (0, 1).
    """

    def __init__(self, filename: str = "defended.safetensors", detector_fpr: float = DEFAULT_FPR) -> None:
        if not isinstance(detector_fpr, (int, float)) or not 0 < detector_fpr < 1:
            raise ConfigError(
                f"detector_fpr is the detector's target false-positive rate and must be in (0, 1), got "
                f"{detector_fpr!r} ({cli_flag('trainer', 'callbacks')} ExportDefendedClassifier detector_fpr)."
            )
        self.filename = filename
        self.detector_fpr = detector_fpr

    @rank_zero_only
    def _export(self, trainer: Trainer, pl_module: LightningModule) -> None:
        defense = exportable_defense(trainer, pl_module, type(self).__name__, self.filename)
        data = trainer.datamodule
        if isinstance(defense.defended.victim, BlackBox):  # T and M only: the black box is not refine-pl's to copy
            record = getattr(defense, "record", None)
            path = save_black_box_defense(
                defense.defended, defense.hparams.image_size, Path(trainer.default_root_dir) / self.filename, record
            )
            print(f"Black-box defense (T and M) saved to {path}")
            return
        names = getattr(data, "class_names", None)
        path = export_defended(
            defense.defended,
            defense.hparams.image_size,
            Path(trainer.default_root_dir) / self.filename,
            class_names=None if names is None else list(names),
            crop=getattr(getattr(data, "source", None), "crop", True),
            detector=calibrate_on(defense.defended, getattr(data, "val_set", None), self.detector_fpr),
        )
        print(f"Defended classifier saved to {path}")

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._export(trainer, pl_module)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._export(trainer, pl_module)
