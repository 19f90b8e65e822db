"""The base of every defense: the frozen victim, the evaluation beside it, and checkpoints that name it."""

import copy
from typing import Any, ClassVar, Literal

import torch
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn

from refine_pl.base_module import BackdoorLitModule
from refine_pl.classifier import NormalizedClassifier
from refine_pl.errors import ConfigError, cli_flag
from refine_pl.metric_names import AGREEMENT, CLEAN_FLOOR, DEFENDED, LABEL_FREE, NO_DEFENSE
from refine_pl.state_dicts import describe_key_mismatch
from refine_pl.victims import VictimRecord, load_victim
from refine_pl.weights import VICTIM_KEY

DATA_FACTS_KEY = "data_facts"
"""Key under which a defense's checkpoint records the data facts it was fitted with (:data:`DATA_FACTS`)."""

DATA_FACTS = ("num_classes", "in_channels", "image_size", "mean", "std")
"""The constructor arguments that describe the data (linked from the datamodule by the CLI): a checkpoint is
used only with the values it was fitted with, since a transform trained at one size or normalisation is neither
measured nor exported faithfully at another."""

DEFENSE_KINDS = {
    "input_transform": "an input transform T and an output map M around the frozen victim: M(f(T(x))) (ART's "
    "pre- and post-processors)",
    "model_repair": "a repaired copy of the victim replaces it; the user's model is never changed (ART's transformers)",
    "detector": "the victim answers as it is, and a score and a flag say which inputs look triggered (ART's detectors)",
}
"""Where a defense acts, by the name its registry entry and module carry."""

VictimAccess = Literal["white_box", "query_only"]


class DefendedLitModule(BackdoorLitModule):
    """What every defense shares, whatever it trains: the suspect model, its evaluation and its checkpoints.

    The victim ``f`` is loaded safely from ``victim_checkpoint`` (read once; what the file records besides the
    weights is :attr:`victim_record`) and frozen: its weights never change and it always runs in eval mode. So is
    the optional clean reference. Validation and test measure three classifiers on the same images, under the keys
    of :mod:`refine_pl.metric_names`: the defense's deployed classifier (:attr:`defended`: ``ba``, ``asr``,
    ``ra``, and ``der`` against the victim), the victim alone (``victim_*``) and the clean reference
    (``clean_*``, the ASR floor).

    Checkpoints hold what the defense trained, not the victim or the clean reference: they record the victim
    file's sha256, and loading one checks that this module's victim is the same file's model. They also hold the
    label-free estimate of their epoch (:attr:`label_free_estimate`), which a test of the checkpoint reports.

    Subclasses set :attr:`defended` (a module of the frozen victim and what the defense adds), say which kind of
    defense they are (:attr:`kind`, a key of :data:`DEFENSE_KINDS`), whether they train (:attr:`trains`) and
    whether their training needs gradients through the victim (:attr:`needs_victim_gradients`): such a defense
    is refused a query-only victim when it is built.

    Args:
        victim_checkpoint: The suspect model: a refine-pl victim .ckpt, a state_dict or safetensors file (with
            ``victim_arch``), or a torch.export archive (.pt2).
        num_classes: Number of classes (linked from the datamodule by the CLI).
        in_channels: Image channels (linked).
        image_size: Image side in pixels (linked).
        mean: Normalisation mean the victim expects, used when its checkpoint records none (linked).
        std: Normalisation std the victim expects, used when its checkpoint records none (linked).
        victim_arch: Architecture of bare weights files: a refine-pl or torchvision name, or the import path of
            your own builder (``package.module:function``); a refine-pl victim checkpoint records its own.
        clean_reference: Weights of a model of the victim's architecture trained on the same data without the
            attack. It is evaluated beside the victim (``clean_ba``, ``clean_asr``): its ASR is the floor of
            every ASR, how often triggered images land in the target class with no backdoor at all (transforming
            triggers such as rotations have a real one). Like the victim, it is not copied into checkpoints.
        victim_access: ``white_box``: the defense may run gradients through the victim. ``query_only``: the
            victim only answers queries (no gradient flows through it), as a model behind a prediction service
            would; a defense that needs gradients refuses it.
        optimizer: Builds the optimizer from the defense's trainable parameters.
        scheduler: Builds the learning-rate scheduler (stepped every epoch) from the optimizer.
        bf16: Train under bfloat16 autocast. None (default): where the hardware computes bf16 natively (x86 CPUs
            with AVX512-BF16 or AMX, NVIDIA GPUs from Ampere on) and the trainer runs in ``32-true`` precision;
            False: in the trainer's precision.
        channels_last: Keep the networks, and feed them images, in channels-last memory layout (results differ by
            float rounding only; faster convolutions on CPUs and tensor-core GPUs).
    """

    kind: ClassVar[str]
    """Where the defense acts: a key of :data:`DEFENSE_KINDS`."""
    needs_victim_gradients: ClassVar[bool] = False
    """Whether training runs gradients through the victim (then a query-only victim is refused)."""
    trained_part: ClassVar[str] = "trained part"
    """The constructor argument that builds what the defense trains, named by the error about a checkpoint whose
    weights do not fit it."""
    defended: nn.Module
    """The classifier the defense deploys, images ``[B, C, H, W]`` in [0, 1] to logits; set by the subclass."""

    def __init__(
        self,
        victim_checkpoint: str,
        num_classes: int,
        in_channels: int,
        image_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        victim_arch: str | None = None,
        clean_reference: str | None = None,
        victim_access: VictimAccess = "white_box",
        optimizer: OptimizerCallable = torch.optim.Adam,
        scheduler: LRSchedulerCallable | None = None,
        bf16: bool | None = None,
        channels_last: bool = True,
    ) -> None:
        rows = (DEFENDED, NO_DEFENSE, CLEAN_FLOOR)[: 3 if clean_reference else 2]
        super().__init__(num_classes, optimizer, scheduler, rows, bf16, channels_last, undefended_row=NO_DEFENSE)
        self.save_hyperparameters(ignore=["transform", "optimizer", "scheduler", "black_box"])
        if victim_access not in ("white_box", "query_only"):
            raise ConfigError(
                f"victim_access must be white_box or query_only, got {victim_access!r}: set "
                f"{cli_flag('model', 'victim_access')}."
            )
        if victim_access == "query_only" and self.needs_victim_gradients:
            raise ConfigError(
                f"{type(self).__name__} trains through the victim's gradients, which a query-only victim does not "
                f"give: use {cli_flag('model', 'victim_access')} white_box with the model's weights, or a defense "
                "that only queries the victim."
            )
        self.victim, self.victim_record = self.load_victim(
            victim_checkpoint, num_classes, in_channels, image_size, mean, std, victim_arch
        )
        self.victim.query_only = victim_access == "query_only"
        self.clean_reference: NormalizedClassifier | None = None
        if clean_reference is not None:
            self.clean_reference = load_victim(
                clean_reference, num_classes, in_channels, image_size, mean, std
            ).classifier
        if channels_last:
            for model in self._frozen_models().values():
                model.to(memory_format=torch.channels_last)

    def load_victim(
        self,
        victim_checkpoint: str,
        num_classes: int,
        in_channels: int,
        image_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        victim_arch: str | None,
    ) -> tuple[nn.Module, VictimRecord]:
        """The frozen victim and its record (:func:`~refine_pl.victims.load_victim`).

        A defense of a model that can only be queried builds its black box here instead.
        """
        if str(victim_checkpoint).lower().endswith(".onnx"):
            raise ConfigError(
                f"{victim_checkpoint} is an ONNX file, which {type(self).__name__} cannot train through: defend it as "
                "a model you can only query, with --config configs/refine/black_box.yaml (or refine-pl defend "
                "MODEL.onnx IMAGES); see docs/black-box.md."
            )
        return load_victim(victim_checkpoint, num_classes, in_channels, image_size, mean, std, victim_arch)

    def repairable_copy(self) -> NormalizedClassifier:
        """A trainable copy of the victim, in train mode, for a defense that repairs the model it deploys.

        Lightning keeps each module's mode through the fit (it switches to eval for validation and back), so the copy
        must leave the victim's eval mode here: fine-tuned in it, batch norm runs on frozen statistics (Neural
        Cleanse's unlearning diverged to NaN within 5 steps so). The victim itself stays frozen.
        """
        repaired = copy.deepcopy(self.victim)
        repaired.query_only = False
        return repaired.requires_grad_(True).train()

    def _frozen_models(self) -> dict[str, nn.Module]:
        """The models that never train, by every ``state_dict`` prefix they appear under.

        The victim appears twice once :attr:`defended` holds it too (``victim.`` and, say, ``defended.victim.``).
        """
        frozen = [model for model in (self.victim, self.clean_reference) if model is not None]
        return {
            f"{name}.": module
            for name, module in self.named_modules(remove_duplicate=False)
            if any(module is model for model in frozen)
        }

    def train(self, mode: bool = True) -> "DefendedLitModule":
        """Switches the defense's own networks; the frozen models stay in eval mode (their BN statistics never move)."""
        super().train(mode)
        for model in self._frozen_models().values():
            model.eval()
        return self

    def forward(self, images: Tensor) -> Tensor:
        """Defended logits ``[B, num_classes]`` for images ``[B, C, H, W]`` in [0, 1]."""
        return self.defended(images)

    def evaluated_classifiers(self) -> tuple[nn.Module, ...]:
        reference = (self.clean_reference,) if self.clean_reference is not None else ()
        return (self.defended, self.victim, *reference)

    def findings(self) -> dict[str, Any] | None:
        """What the defense itself found about the victim, for ``report.json``.

        A dict with a ``summary`` sentence, under :data:`~refine_pl.metric_names.FINDINGS`; None (the default) for a
        defense that finds nothing of its own.
        """
        return None

    def on_test_start(self) -> None:
        if self.victim_record.attack is not None and getattr(self.trainer.datamodule, "attack", None) is None:
            rank_zero_warn(
                f"The victim records the attack {self.victim_record.attack.get('name')!r} but the datamodule has "
                "none, so ASR is not measured: call datamodule.use_recorded_attack(module.victim_record)."
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The victim is the user's file: the checkpoint names it by digest instead of holding a second copy (and
        # the clean reference is read from its own file at every job).
        frozen = tuple(self._frozen_models())
        checkpoint["state_dict"] = {
            key: value for key, value in checkpoint["state_dict"].items() if not key.startswith(frozen)
        }
        checkpoint[VICTIM_KEY] = {"sha256": self.victim_record.sha256, "path": self.victim_record.path}
        checkpoint[DATA_FACTS_KEY] = self._data_facts()
        checkpoint[LABEL_FREE] = self.label_free_estimate

    def _data_facts(self) -> dict[str, Any]:
        """This module's :data:`DATA_FACTS`, as plain ints and lists of floats."""
        facts = {fact: self.hparams[fact] for fact in DATA_FACTS}
        return {fact: [float(v) for v in value] if fact in ("mean", "std") else value for fact, value in facts.items()}

    def _check_data_facts(self, recorded: Any) -> None:
        """Refuses a checkpoint fitted with other data facts than this module's.

        A checkpoint that records none (written before they were recorded) is taken as it is.
        """
        if not isinstance(recorded, dict):
            return
        for fact, value in self._data_facts().items():
            if fact in recorded and recorded[fact] != value:
                raise ConfigError(
                    f"The checkpoint was fitted with {fact}={recorded[fact]} but this run has {fact}={value}: pass "
                    f"{cli_flag('data', 'source', fact)} {recorded[fact]} as the run was fitted with, or fit anew "
                    "for the new value."
                )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        recorded = checkpoint.get(VICTIM_KEY)
        if not isinstance(recorded, dict) or "sha256" not in recorded:
            raise ConfigError(
                "The checkpoint does not come from a refine-pl defense run (it names no victim): pass a checkpoint "
                "of this run's checkpoints/ folder with --ckpt_path."
            )
        if recorded["sha256"] != self.victim_record.sha256:
            raise ConfigError(
                f"The checkpoint was trained in front of the victim {recorded.get('path')} (sha256 "
                f"{str(recorded['sha256'])[:12]}...), but {self.victim_record.path} holds another model (sha256 "
                f"{self.victim_record.sha256[:12]}...): pass the victim the run was trained with in "
                f"{cli_flag('model', 'victim_checkpoint')}."
            )
        self._check_data_facts(checkpoint.get(DATA_FACTS_KEY))
        estimate = checkpoint.get(LABEL_FREE)
        valid = isinstance(estimate, dict) and isinstance(estimate.get(AGREEMENT), float)
        self.label_free_estimate = dict(estimate) if valid else None
        for prefix, model in self._frozen_models().items():
            checkpoint["state_dict"].update({prefix + key: value for key, value in model.state_dict().items()})
        problem = describe_key_mismatch(self.state_dict(), checkpoint["state_dict"])
        if problem is not None:
            raise ConfigError(
                f"The checkpoint's {self.trained_part} does not fit this run's: {problem}. Use the "
                f"{self.trained_part} settings of the run that wrote it ({cli_flag('model', self.trained_part)})."
            )
