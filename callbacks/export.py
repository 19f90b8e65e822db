"""Callback that saves the defended classifier of a REFINE run as one safetensors file."""

from pathlib import Path

from pytorch_lightning import Callback, LightningModule, Trainer
from pytorch_lightning.utilities import rank_zero_only

from callbacks.checkpoint import require_trained_weights
from refine_pl.errors import ConfigError
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
    and resizing are recorded with it, for predictions from the file.

    Args:
        filename: Name of the safetensors file.
    """

    def __init__(self, filename: str = "defended.safetensors") -> None:
        self.filename = filename

    @rank_zero_only
    def _export(self, trainer: Trainer, pl_module: LightningModule) -> None:
        defense = exportable_defense(trainer, pl_module, type(self).__name__, self.filename)
        data = trainer.datamodule
        names = getattr(data, "class_names", None)
        path = export_defended(
            defense.defended,
            defense.hparams.image_size,
            Path(trainer.default_root_dir) / self.filename,
            class_names=None if names is None else list(names),
            crop=getattr(getattr(data, "source", None), "crop", True),
        )
        print(f"Defended classifier saved to {path}")

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._export(trainer, pl_module)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._export(trainer, pl_module)
