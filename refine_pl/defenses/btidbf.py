"""BTI-DBF: backdoor trigger inversion by decoupling benign features (Xu et al., ICLR 2024), and its two defenses.

BTI-DBF inverts a backdoor without knowing its trigger. A *feature mask* ``m`` on the victim's features at one layer
(the output of its last convolutional stage in the original, before the global pooling) is trained so that the
masked features ``m * z`` keep the victim's prediction and the complement ``(1 - m) * z`` loses it: ``m`` marks the
benign features. A U-Net *trigger generator* ``G``, whose output stays within a bounded distance of its input, is
then trained so that ``G(x)`` keeps the benign features of ``x`` and moves its other features as far as it can: what
moves the non-benign features of every image at once is the backdoor's trigger. Two defenses use ``G``:

- **BTI-DBF (U)**, unlearning (:class:`BTIDBFUnlearning`, a ``model_repair`` defense): a copy of the victim is
  fine-tuned on benign batches in which a tenth of the images are passed through ``G``, keeping their labels, with
  their features pulled to the clean images' features. Every round inverts the *repaired* copy again (a new mask, the
  generator trained on) and unlearns what it finds.
- **BTI-DBF (P)**, input purification (:class:`BTIDBFPurification`, an ``input_transform`` defense): a second U-Net
  ``P``, in front of the frozen victim, is trained to map the generated images (and clean ones) back to images the
  victim classifies as their labels, with the clean images' features, close to the clean images. Every round trains
  ``G`` again to get through ``P``.

The procedure, the loss terms and weights, the bounds, the learning rates and the round structure are those of the
authors' code (``xuxiong0214/BTIDBF``: ``pretrain.py``, ``btidbf.py``, ``btidbfu.py``, ``btidbfp.py``, ``cfg.py``);
the code here is refine-pl's own. The defender of the original holds 5% of CIFAR-10's training set (2,500 labeled
images, batch 128: 20 steps an epoch); the epochs of each phase are scaled to the embedded MNIST data in
``configs/defenses/btidbf_*.yaml``, which say how.

The threat model is REFINE's: the defender has unlabeled benign images only. The labels BTI-DBF needs are, by
default, the frozen victim's predictions on the un-augmented training images (``labels: victim``), so no label of the
benign set is ever read; ``labels: true`` takes the training set's true labels instead, for the side row that shows
what labels are worth.
"""

from collections.abc import Callable, Iterator
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pytorch_lightning.cli import OptimizerCallable
from torch import Tensor, nn

from refine_pl.batches import AugmentedViews, IndexedImages
from refine_pl.classifier import NormalizedClassifier
from refine_pl.defended_module import DefendedLitModule
from refine_pl.defenses.registry import DEFENSES, Defense
from refine_pl.errors import ConfigError, cli_flag
from refine_pl.input_transform_module import InputTransformDefense
from refine_pl.transform import UNet

LabelSource = Literal["victim", "true"]

PRETRAIN, MASK, GENERATOR = "pretrain", "mask", "generator"
UNLEARN, PURIFY = "unlearn", "purify"


def original_unet(in_channels: int) -> UNet:
    """The original's U-Net size for its generators: first width 32, 4 stages (refine-pl's U-Net)."""
    return UNet(in_channels, base_width=32, depth=4)


class _StopForwardError(Exception):
    """Raised by a feature hook to end a forward pass once the features it wanted are taken."""


def feature_map_layers(net: nn.Module, in_channels: int, image_size: int) -> list[str]:
    """Names of ``net``'s modules whose output is a feature map ``[B, C, H, W]``, in the order their outputs come.

    Found by running ``net`` once on a blank image with a hook on every module (the network itself aside).
    """
    names: list[str] = []
    handles = [
        module.register_forward_hook(
            lambda _module, _input, output, name=name: (
                names.append(name) if isinstance(output, Tensor) and output.ndim == 4 else None
            )
        )
        for name, module in net.named_modules()
        if name
    ]
    try:
        with torch.no_grad():
            net(torch.zeros(1, in_channels, image_size, image_size, device=next(net.parameters()).device))
    finally:
        for handle in handles:
            handle.remove()
    return names


def default_feature_layer(net: nn.Module, in_channels: int, image_size: int) -> str:
    """The layer BTI-DBF masks by default: the last module whose output is a feature map ``[B, C, H, W]``.

    Last in the order of the forward pass. For the original's ResNet-18 that is ``layer4`` (the last residual stage,
    before the global pooling); for refine-pl's architectures: ``small_cnn`` ``6`` (the 4x4 pooled map of the last
    conv block), ``resnet18_cifar`` / ``resnet50_cifar`` ``layer4``, ``vgg16_bn_cifar`` ``pool``, torchvision's
    ResNets ``avgpool``.

    Raises:
        ConfigError: No module of ``net`` outputs a feature map (an MLP): the layer has to be named.
    """
    names = feature_map_layers(net, in_channels, image_size)
    if not names:
        raise ConfigError(
            "BTI-DBF masks the victim's features at one layer, and no layer of this victim outputs a feature map "
            f"[B, C, H, W] to take by default: name one with {cli_flag('model', 'feature_layer')} (a module name "
            f"of the network, one of: {', '.join(name for name, _ in net.named_modules() if name)})."
        )
    return names[-1]


class FeatureTap:
    """Reads, or edits, a classifier's features at one named layer, through a forward hook that lives for one call.

    Args:
        classifier: The classifier (images in [0, 1] to logits).
        layer: Name of a module of ``classifier.net`` (as ``named_modules`` gives it).

    Raises:
        ConfigError: ``layer`` is no module of the network.
    """

    def __init__(self, classifier: NormalizedClassifier, layer: str) -> None:
        modules = dict(classifier.net.named_modules())
        if layer not in modules or not layer:
            raise ConfigError(
                f"The victim has no layer {layer!r} to mask the features of: set {cli_flag('model', 'feature_layer')} "
                f"to a module name of the network (one of: {', '.join(name for name in modules if name)}), or leave "
                "it unset for the last feature map."
            )
        self.classifier = classifier
        self.module = modules[layer]

    def features(self, images: Tensor) -> Tensor:
        """The features of ``images`` ``[B, C, H, W]`` at the layer (the rest of the network is not run)."""
        taken: list[Tensor] = []

        def take(_module: nn.Module, _input: Any, output: Tensor) -> None:
            taken.append(output)
            raise _StopForwardError

        handle = self.module.register_forward_hook(take)
        try:
            self.classifier(images)
        except _StopForwardError:
            pass
        finally:
            handle.remove()
        return taken[0]

    def features_and_logits(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """The features of ``images`` at the layer and the logits ``[B, num_classes]``."""
        taken: list[Tensor] = []
        handle = self.module.register_forward_hook(lambda _m, _i, output: taken.append(output))
        try:
            logits = self.classifier(images)
        finally:
            handle.remove()
        return taken[0], logits

    def logits_with(self, images: Tensor, edit: Callable[[Tensor], Tensor]) -> Tensor:
        """The logits of ``images`` when the layer's output ``z`` is replaced by ``edit(z)``."""
        handle = self.module.register_forward_hook(lambda _m, _i, output: edit(output))
        try:
            return self.classifier(images)
        finally:
            handle.remove()


class FeatureMask(nn.Module):
    """A soft mask in (0, 1) over one image's features: ``tanh(w) / (2 + 1e-7) + 0.5``, ``w`` trained.

    Args:
        shape: The shape of one image's features (the layer's output without the batch dimension).
    """

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(shape))

    def reset(self, generator: torch.Generator) -> None:
        """Draws ``w`` anew from a standard normal (the original starts every round's mask so)."""
        with torch.no_grad():
            draw = torch.randn(self.weight.shape, generator=generator)
            self.weight.copy_(draw.to(self.weight.device))

    def forward(self) -> Tensor:
        """The mask, of the features' shape, in (0, 1)."""
        return torch.tanh(self.weight) / (2 + 1e-7) + 0.5


def normalised_distance(images: Tensor, other: Tensor, std: Tensor) -> Tensor:
    """Per-image mean squared difference ``[B]`` of two image batches in the victim's normalised space.

    The original measures the generators' distance to their input (and bounds it) on normalised images; dividing by
    the victim's std gives its bounds the same meaning on refine-pl's [0, 1] images.
    """
    return ((images - other) / std).pow(2).flatten(1).mean(1)


class BoundedGenerator(nn.Module):
    """A trigger generator whose output never lies further from its input than ``bound``.

    ``net`` (a U-Net, images in [0, 1] to images in [0, 1]) proposes ``x + d``; the output is
    ``clamp(x + s * d, 0, 1)`` with ``s = min(1, sqrt(bound / D))``, ``D`` the normalised mean squared difference of
    ``d`` (:func:`normalised_distance`), per image. The original bounds its generator by its loss only (minimising the
    distance whenever a batch's mean exceeds the bound); the loss does so here too, and the projection makes the
    bound hold for every image whatever the training did.

    Args:
        net: The U-Net.
        bound: Largest normalised mean squared difference between an image and its generated image (0.3 in the
            original).
        std: Per-channel std of the victim's normalisation.
    """

    std: Tensor

    def __init__(self, net: nn.Module, bound: float, std: tuple[float, ...]) -> None:
        super().__init__()
        if not bound > 0:
            raise ConfigError(
                f"The generator's norm_bound must be positive, got {bound}: set {cli_flag('model', 'norm_bound')}."
            )
        self.net = net
        self.bound = bound
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def proposal(self, images: Tensor) -> Tensor:
        """The U-Net's image before the bound is applied."""
        return self.net(images)

    def bounded(self, images: Tensor, proposal: Tensor) -> Tensor:
        """``proposal`` pulled back within ``bound`` of ``images`` (per image), in [0, 1]."""
        distance = normalised_distance(images, proposal, self.std).detach()
        scale = (self.bound / distance.clamp_min(1e-12)).sqrt().clamp(max=1.0).view(-1, 1, 1, 1)
        return (images + scale * (proposal - images)).clamp(0.0, 1.0)

    def forward(self, images: Tensor) -> Tensor:
        """Generated images ``[B, C, H, W]`` in [0, 1], each within ``bound`` of its input."""
        return self.bounded(images, self.proposal(images))


def soft_cross_entropy(logits: Tensor, target_logits: Tensor) -> Tensor:
    """Cross-entropy of ``logits`` ``[B, K]`` against the softmax of ``target_logits`` (no gradient), batch mean."""
    return -(target_logits.detach().softmax(1) * logits.log_softmax(1)).sum(1).mean()


class BTIDBFTraining(DefendedLitModule):
    """What both BTI-DBF defenses share: the labels, the generator's pretraining, the mask and the generator.

    Training is a schedule of phases, one phase per epoch (so that a checkpoint, written at every epoch's end, always
    falls between phases or inside one, and a resumed run continues the phase and round it was in): first
    ``pretrain_epochs`` of the generator alone, then ``rounds`` rounds of ``mask_epochs`` of the feature mask,
    ``generator_epochs`` of the generator, and ``repair_epochs`` of the defense's own repair (unlearning or
    purification). Each phase has its own Adam (the optimizer of ``optimizer``), at the original's learning rate;
    the mask's is started anew with the mask every round, the others run on. One optimizer steps per training batch.

    The model the mask and the generator invert (:meth:`inverted_classifier`) is in eval mode while they train (the
    original runs its own copy in train mode while training the mask, which only moves that copy's batch-norm
    statistics). The target class is detected after the first round's generator, as the original does: the class
    the victim gives most often to generated images (counted over the first epoch of the first repair phase, while
    the generator stands still); later rounds also ask the generator to reach it.

    Args:
        generator: Builds the trigger generator's U-Net (images in [0, 1] to images in [0, 1]) from the channel
            count; the purifier of BTI-DBF (P) is built by it too (first width 32, 4 stages, as the original's).
        feature_layer: Module name, in the victim's network, of the features the mask acts on; None: the last
            module whose output is a feature map (:func:`default_feature_layer`).
        labels: ``victim``: the frozen victim's prediction on each un-augmented training image (REFINE's threat
            model: no label of the benign set is read); ``true``: the training set's labels (a side row).
        rounds: Rounds of inversion and repair (5 in the original).
        pretrain_epochs: Epochs of the generator's pretraining, towards images the victim sees as the input (50).
        mask_epochs: Epochs of the feature mask per round (20).
        generator_epochs: Epochs of the generator per round (30).
        repair_epochs: Epochs of the repair (unlearning or purification) per round (30).
        norm_bound: Largest normalised mean squared difference between an image and its generated image (0.3).
        feature_bound: Largest mean squared difference of the benign features before the generator only pulls its
            images back (3).
        benign_weight: Weight of the benign features' difference in the generator's loss (0.01).
        pretrain_norm_threshold: Distance above which the pretraining weighs the distance 100 (else 0.01) (0.1).
        poison_fraction: Share of each repair batch passed through the generator: ``int(fraction * B + 1)``
            images (0.1).
        generator_lr: Learning rate of the generator and its pretraining (1e-3).
        mask_lr: Learning rate of the feature mask (0.01).
        seed: Seed of the generator's first weights, of the masks' draws (round ``r`` draws from ``seed + r``) and
            of each step's random draws (the generated share of a batch, the purifier's noise, dropout: drawn from
            ``seed`` and the step's number, so that a resumed run draws what an uninterrupted one does).
        optimizer: Builds each phase's optimizer from its parameter group (which carries its learning rate).
        scheduler: Not supported (the original keeps every rate constant): None.
        **kwargs: The arguments every defense takes (:class:`~refine_pl.DefendedLitModule`).
    """

    needs_victim_gradients: ClassVar[bool] = True
    repair_phase: ClassVar[str]

    def __init__(
        self,
        generator: Callable[[int], nn.Module] = original_unet,
        feature_layer: str | None = None,
        labels: LabelSource = "victim",
        rounds: int = 5,
        pretrain_epochs: int = 50,
        mask_epochs: int = 20,
        generator_epochs: int = 30,
        repair_epochs: int = 30,
        norm_bound: float = 0.3,
        feature_bound: float = 3.0,
        benign_weight: float = 0.01,
        pretrain_norm_threshold: float = 0.1,
        poison_fraction: float = 0.1,
        generator_lr: float = 1e-3,
        mask_lr: float = 0.01,
        seed: int = 0,
        optimizer: OptimizerCallable = torch.optim.Adam,
        scheduler: Any = None,
        **kwargs: Any,
    ) -> None:
        if scheduler is not None:
            raise ConfigError(
                f"BTI-DBF keeps each phase's learning rate constant, as the original does: set "
                f"{cli_flag('model', 'scheduler')} null (the defense's config does)."
            )
        super().__init__(optimizer=optimizer, **kwargs)
        if labels not in ("victim", "true"):
            raise ConfigError(
                f"labels must be victim (the victim's predictions: no label is read) or true (the training set's "
                f"labels), got {labels!r}: set {cli_flag('model', 'labels')}."
            )
        counts = {"rounds": rounds, "mask_epochs": mask_epochs, "generator_epochs": generator_epochs}
        counts.update(repair_epochs=repair_epochs)
        for name, value in {**counts, "pretrain_epochs": pretrain_epochs}.items():
            if not isinstance(value, int) or value < (0 if name == "pretrain_epochs" else 1):
                low = "0 or more" if name == "pretrain_epochs" else "at least 1"
                raise ConfigError(
                    f"{name} must be a whole number, {low}, got {value!r}: set {cli_flag('model', name)}."
                )
        if not 0 <= poison_fraction < 1:
            raise ConfigError(
                f"poison_fraction is a share of each batch, in [0, 1), got {poison_fraction}: set "
                f"{cli_flag('model', 'poison_fraction')}."
            )
        in_channels, image_size = self.hparams["in_channels"], self.hparams["image_size"]
        self.feature_layer = feature_layer or default_feature_layer(self.victim.net, in_channels, image_size)
        self.victim_features = FeatureTap(self.victim, self.feature_layer)
        with torch.no_grad():
            shape = self.victim_features.features(torch.zeros(1, in_channels, image_size, image_size)).shape[1:]
        self.mask = FeatureMask(tuple(shape))
        # The generator's first weights come from the seed alone (not from what was built before it), so both uses
        # start the same inversion from the same seed.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = generator(in_channels)
        self.generator = BoundedGenerator(net, norm_bound, tuple(self.victim.std.flatten().tolist()))
        self.register_buffer("target_label", torch.tensor(-1))
        self.register_buffer("target_votes", torch.zeros(self.hparams["num_classes"], dtype=torch.long))
        self.automatic_optimization = False
        # The generator's builder is a config object, not a fact of the run: checkpoints keep plain values only.
        for hparams in (self._hparams, self._hparams_initial):
            hparams.pop("generator", None)
        self._true_labels: Tensor | None = None
        if self.channels_last:
            self.generator.to(memory_format=torch.channels_last)

    # The schedule ----------------------------------------------------------------------------------------------

    def round_phases(self) -> tuple[tuple[str, int], ...]:
        """Each round's phases and their epochs."""
        h = self.hparams
        return ((MASK, h["mask_epochs"]), (GENERATOR, h["generator_epochs"]), (self.repair_phase, h["repair_epochs"]))

    @property
    def schedule_epochs(self) -> int:
        """Epochs of the whole schedule: the pretraining and every round."""
        return self.hparams["pretrain_epochs"] + self.hparams["rounds"] * sum(n for _, n in self.round_phases())

    def phase_at(self, epoch: int) -> tuple[int, str, int]:
        """The round (-1 in the pretraining), the phase and the epoch within that phase of training epoch ``epoch``."""
        epoch = min(epoch, self.schedule_epochs - 1)  # epochs past the schedule repeat its last phase
        pretrain = self.hparams["pretrain_epochs"]
        if epoch < pretrain:
            return -1, PRETRAIN, epoch
        round_, within = divmod(epoch - pretrain, sum(n for _, n in self.round_phases()))
        for phase, epochs in self.round_phases():
            if within < epochs:
                return round_, phase, within
            within -= epochs
        raise AssertionError("unreachable: within < per_round")

    # Labels ----------------------------------------------------------------------------------------------------

    def on_fit_start(self) -> None:
        super().on_fit_start()
        max_epochs, max_steps = self.trainer.max_epochs, self.trainer.max_steps
        # A step limit (a test's few steps) may end the schedule early on purpose; an epoch limit below it is a mistake.
        if max_epochs is not None and 0 <= max_epochs < self.schedule_epochs and (max_steps is None or max_steps < 0):
            phases = ", ".join(f"{phase} {epochs}" for phase, epochs in self.round_phases())
            raise ConfigError(
                f"BTI-DBF's schedule takes {self.schedule_epochs} epochs (pretraining, then {self.hparams['rounds']} "
                f"rounds of {phases}) but the trainer stops after {max_epochs}: pass --trainer.max_epochs "
                f"{self.schedule_epochs}."
            )
        if self.hparams["labels"] == "true":
            dataset = self.trainer.datamodule.train_set
            self._true_labels = torch.tensor([int(dataset[i][1]) for i in range(len(dataset))], device=self.device)
            if bool((self._true_labels < 0).any()):
                raise ConfigError(
                    f"labels: true reads the training set's labels, and this source has none (label -1): use "
                    f"{cli_flag('model', 'labels')} victim."
                )

    def batch_images_and_labels(self, batch: Tensor | IndexedImages | AugmentedViews) -> tuple[Tensor, Tensor]:
        """The images to train on and their labels.

        The labels are the victim's predictions on the un-augmented images, or (with ``labels: true``) the training
        set's labels of their indices.
        """
        if isinstance(batch, AugmentedViews):
            images, originals, indices = batch.views, batch.images, batch.indices
        elif isinstance(batch, IndexedImages):
            images, originals, indices = batch.images, batch.images, batch.indices
        elif isinstance(batch, Tensor):
            images, originals, indices = batch, batch, None
        else:
            raise ConfigError(
                "BTI-DBF trains on batches of unlabeled images (image tensors, IndexedImages or AugmentedViews), "
                f"got {type(batch).__name__}: use datamodules.RefineDataModule."
            )
        if self.hparams["labels"] == "victim":
            with torch.no_grad():
                labels = self.victim(self.training_layout(originals)).argmax(1)
        else:
            if indices is None or self._true_labels is None:
                raise ConfigError(
                    "labels: true needs each training image's dataset index, which plain augmented batches do not "
                    f"carry: set {cli_flag('data', 'consistency')} true or {cli_flag('data', 'augment')} false."
                )
            labels = self._true_labels[indices]
        return self.training_layout(images), labels

    # The parts each phase trains ----------------------------------------------------------------------------------

    def inverted_classifier(self) -> NormalizedClassifier:
        """The classifier whose backdoor the mask and the generator invert."""
        return self.victim

    def inverted_features(self) -> FeatureTap:
        """The feature tap of :meth:`inverted_classifier`."""
        return self.victim_features

    def repair_parameters(self) -> Iterator[nn.Parameter]:
        """What the repair phase trains."""
        raise NotImplementedError

    def repair_lr(self) -> float:
        """Learning rate of the repair phase."""
        raise NotImplementedError

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        groups = (
            [{"params": list(self.generator.parameters()), "lr": self.hparams["generator_lr"]}],
            [{"params": list(self.mask.parameters()), "lr": self.hparams["mask_lr"]}],
            [{"params": list(self.repair_parameters()), "lr": self.repair_lr()}],
        )
        try:
            return [self.optimizer_factory(group) for group in groups]
        except ValueError as error:
            raise ConfigError(
                f"The optimizer refuses its settings ({error}): fix {cli_flag('model', 'optimizer')}."
            ) from error

    def _phase_optimizer(self, phase: str) -> Any:
        generator, mask, repair = self.optimizers()
        return {PRETRAIN: generator, GENERATOR: generator, MASK: mask}.get(phase, repair)

    def on_train_epoch_start(self) -> None:
        round_, phase, within = self.phase_at(self.current_epoch)
        if phase == MASK and within == 0:  # every round starts from a new mask and a new optimizer for it
            self.mask.reset(torch.Generator().manual_seed(self.hparams["seed"] + round_))
            self._phase_optimizer(MASK).optimizer.state.clear()
        if round_ == 0 and phase == MASK and within == 0:
            self.start_rounds()
        if round_ == 0 and phase == self.repair_phase and within == 0:
            self.target_votes.zero_()

    def start_rounds(self) -> None:
        """Called when the first round starts, after the pretraining."""

    def findings(self) -> dict[str, Any]:
        """The class BTI-DBF took for the backdoor's target, and the votes, for the report.

        The target is the victim's most frequent class on the first round's generated images.
        """
        target = int(self.target_label)
        votes = self.target_votes.tolist()
        if target < 0:
            summary = "BTI-DBF has not detected a target class yet (the first round's repair has not started)."
        else:
            share = votes[target] / max(sum(votes), 1)
            summary = (
                f"BTI-DBF took class {target} for the backdoor's target: the victim gave it to {share:.0%} of the "
                f"first round's generated images (labels: {self.hparams['labels']})."
            )
        return {
            "method": "btidbf",
            "labels": self.hparams["labels"],
            "detected_target": target if target >= 0 else None,
            "target_votes": votes,
            "summary": summary,
        }

    def training_step(self, batch: Tensor | IndexedImages | AugmentedViews, batch_idx: int) -> Tensor:
        round_, phase, within = self.phase_at(self.current_epoch)
        images, labels = self.batch_images_and_labels(batch)
        optimizer = self._phase_optimizer(phase)
        for each in self.optimizers():
            each.zero_grad(set_to_none=True)
        # Every random draw of the step (the unlearned copy's dropout too) comes from the seed and the step's number,
        # so that a resumed run trains as an uninterrupted one does; the global random state is left as it was.
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), self.training_autocast():
            torch.manual_seed(self.hparams["seed"] * 1_000_003 + self.global_step)
            if phase == PRETRAIN:
                loss = self.pretrain_loss(images)
            elif phase == MASK:
                loss = self.mask_loss(images, labels)
            elif phase == GENERATOR:
                loss = self.generator_loss(images, round_)
            else:
                if round_ == 0 and within == 0:
                    self._vote_for_target(images)
                loss = self.repair_loss(images, labels)
        self.manual_backward(loss)
        optimizer.step()
        self.log(f"train/{phase}_loss", loss.detach(), prog_bar=True)
        return loss.detach()

    def on_train_epoch_end(self) -> None:
        round_, phase, within = self.phase_at(self.current_epoch)
        if round_ == 0 and phase == self.repair_phase and within == 0 and int(self.target_votes.sum()) > 0:
            votes = self.target_votes
            if self.trainer.world_size > 1:
                votes = self.trainer.strategy.reduce(votes.clone(), reduce_op="sum")
            self.target_label.fill_(int(votes.argmax()))
            self.log("train/target_label", float(self.target_label))
        if self.current_epoch + 1 >= self.schedule_epochs:
            self.trainer.should_stop = True

    # The losses ----------------------------------------------------------------------------------------------

    def pretrain_loss(self, images: Tensor) -> Tensor:
        """The generator's pretraining: its images keep the victim's prediction and features, close to the input.

        The distance weighs 100 while above ``pretrain_norm_threshold``, 0.01 below (the original's
        ``pretrain.py``); prediction and features weigh 1.
        """
        generated = self.generator.proposal(images)
        with torch.no_grad():
            clean_features, clean_logits = self.victim_features.features_and_logits(images)
        features, logits = self.victim_features.features_and_logits(generated)
        distance = normalised_distance(images, generated, self.generator.std).mean()
        weight = 100.0 if distance.item() > self.hparams["pretrain_norm_threshold"] else 0.01
        return (
            soft_cross_entropy(logits.float(), clean_logits.float())
            + F.mse_loss(features.float(), clean_features.float())
            + weight * distance
        )

    def mask_loss(self, images: Tensor, labels: Tensor) -> Tensor:
        """The feature mask's loss: cross-entropy of the masked features' prediction minus that of the complement's."""
        mask = self.mask()
        tap = self.inverted_features()
        self.inverted_classifier().eval()
        kept = tap.logits_with(images, lambda z: z * mask)
        removed = tap.logits_with(images, lambda z: z * (1 - mask))
        return F.cross_entropy(kept.float(), labels) - F.cross_entropy(removed.float(), labels)

    def generated_for_inversion(self, images: Tensor, round_: int) -> tuple[Tensor, Tensor]:
        """The images whose features the generator's loss compares with the clean ones, and the raw proposal."""
        proposal = self.generator.proposal(images)
        return self.generator.bounded(images, proposal), proposal

    def generator_loss(self, images: Tensor, round_: int) -> Tensor:
        """The generator's loss: push the non-benign features apart, keep the benign ones, stay within the bounds.

        While the proposal's distance to the input exceeds ``norm_bound`` or the benign features' difference exceeds
        ``feature_bound``, the loss is the distance alone; else it is minus the non-benign features' difference plus
        ``benign_weight`` times the benign one. After the first round the cross-entropy of the inverted model's
        prediction on the generated images against the detected target class is added.
        """
        mask = self.mask().detach()
        tap, classifier = self.inverted_features(), self.inverted_classifier()
        classifier.eval()
        generated, proposal = self.generated_for_inversion(images, round_)
        with torch.no_grad():
            clean_features = tap.features(images).float()
        features, logits = tap.features_and_logits(generated)
        features = features.float()
        benign = F.mse_loss(mask * features, mask * clean_features)
        backdoor = F.mse_loss((1 - mask) * features, (1 - mask) * clean_features)
        distance = normalised_distance(images, proposal, self.generator.std).mean()
        if distance.item() > self.generator.bound or benign.item() > self.hparams["feature_bound"]:
            loss = distance
        else:
            loss = -backdoor + self.hparams["benign_weight"] * benign
        if round_ > 0 and int(self.target_label) >= 0:
            target = torch.full_like(logits[:, 0], int(self.target_label), dtype=torch.long)
            loss = loss + F.cross_entropy(logits.float(), target)
        self.log("train/generator_distance", distance.detach())
        return loss

    def _vote_for_target(self, images: Tensor) -> None:
        with torch.no_grad():
            predicted = self.victim(self.generator(images)).argmax(1)
        self.target_votes += torch.bincount(predicted, minlength=self.target_votes.numel())

    def step_generator(self) -> torch.Generator:
        """A CPU random generator seeded from ``seed`` and the step's number (see ``seed``)."""
        return torch.Generator().manual_seed(self.hparams["seed"] * 1_000_003 + self.global_step)

    def poisoned_share(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """``images`` with ``int(poison_fraction * B + 1)`` of them (drawn from ``generator``) passed through ``G``."""
        count = min(int(self.hparams["poison_fraction"] * len(images) + 1), len(images))
        chosen = torch.randperm(len(images), generator=generator)[:count].to(images.device)
        mixed = images.clone()
        with torch.no_grad():
            mixed[chosen] = self.generator(images[chosen]).to(mixed.dtype)
        return mixed

    def repair_loss(self, images: Tensor, labels: Tensor) -> Tensor:
        """The repair phase's loss."""
        raise NotImplementedError


class BTIDBFUnlearning(BTIDBFTraining):
    """BTI-DBF (U): a copy of the victim unlearns the backdoor that BTI-DBF inverts, round after round.

    The repaired copy (:attr:`defended`) starts as the victim's weights and is the deployed classifier; the frozen
    victim stays the user's model (it gives the victim's row of the report) and its file is never written. Each
    round inverts the repaired copy (its mask and the generator's loss use its features), then fine-tunes it on
    batches in which ``poison_fraction`` of the images pass through the generator: the cross-entropy of its
    prediction against the labels plus the mean squared difference of its features on the batch and on the clean
    images (``btidbfu.py``), Adam at ``repair_lr`` (1e-4), the copy in train mode.

    Args:
        repair_lr: Learning rate of the unlearning (1e-4).
        **kwargs: The arguments of :class:`BTIDBFTraining` and of every defense.
    """

    kind = "model_repair"
    trained_part: ClassVar[str] = "generator"
    repair_phase: ClassVar[str] = UNLEARN

    def __init__(self, repair_lr: float = 1e-4, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.defended = self.repairable_copy()
        self.repaired_features = FeatureTap(self.defended, self.feature_layer)

    def inverted_classifier(self) -> NormalizedClassifier:
        return self.defended

    def inverted_features(self) -> FeatureTap:
        return self.repaired_features

    def repair_parameters(self) -> Iterator[nn.Parameter]:
        return self.defended.parameters()

    def repair_lr(self) -> float:
        return self.hparams["repair_lr"]

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return iter([*self.generator.parameters(), *self.mask.parameters(), *self.defended.parameters()])

    def repair_loss(self, images: Tensor, labels: Tensor) -> Tensor:
        """Unlearning: cross-entropy on the partly generated batch plus the feature difference to the clean batch."""
        mixed = self.poisoned_share(images, self.step_generator())
        self.defended.train()
        clean_features = self.repaired_features.features(images)
        features, logits = self.repaired_features.features_and_logits(mixed)
        return F.cross_entropy(logits.float(), labels) + F.mse_loss(features.float(), clean_features.float())


class BTIDBFPurification(BTIDBFTraining, InputTransformDefense):
    """BTI-DBF (P): a purifying U-Net ``P`` in front of the frozen victim, trained against BTI-DBF's generator.

    ``P`` starts from the pretrained generator's weights (the original loads both from one pretrained U-Net) and is
    the input transform of the deployed classifier ``f(P(x))`` (:class:`~refine_pl.InputTransformDefense`, ``M`` the
    identity). Each round inverts the frozen victim, the generator's images passing through ``P`` after the first
    round, then trains ``P`` on batches in which ``poison_fraction`` of the images pass through the generator, with
    Gaussian noise (std 0.03 in the normalised space) added: the cross-entropy of the victim's prediction on ``P``'s
    output against the labels, plus the mean squared difference of its features to the clean images', plus the
    distance of ``P``'s output to the clean images, weighted 100 while above ``purify_norm_bound`` (0.05), else 1
    (``btidbfp.py``), Adam at ``repair_lr`` (1e-3). The original also adds that noise before ``P`` when it tests;
    refine-pl's ``P`` is tested, and exported, deterministic (no noise).

    Args:
        repair_lr: Learning rate of the purifier (1e-3).
        purify_norm_bound: Distance above which the purifier's distance weighs 100 (0.05).
        noise_std: Std of the Gaussian noise added to the purifier's training input, in the normalised space (0.03).
        **kwargs: The arguments of :class:`BTIDBFTraining` and of every defense.
    """

    trained_part: ClassVar[str] = "generator"
    repair_phase: ClassVar[str] = PURIFY

    def __init__(
        self,
        repair_lr: float = 1e-3,
        purify_norm_bound: float = 0.05,
        noise_std: float = 0.03,
        generator: Callable[[int], nn.Module] = original_unet,
        **kwargs: Any,
    ) -> None:
        super().__init__(generator=generator, transform=generator, derange=False, **kwargs)

    def repair_parameters(self) -> Iterator[nn.Parameter]:
        return self.transform.parameters()

    def repair_lr(self) -> float:
        return self.hparams["repair_lr"]

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return iter([*self.generator.parameters(), *self.mask.parameters(), *self.transform.parameters()])

    def start_rounds(self) -> None:
        self.transform.load_state_dict(self.generator.net.state_dict())

    def generated_for_inversion(self, images: Tensor, round_: int) -> tuple[Tensor, Tensor]:
        proposal = self.generator.proposal(images)
        generated = self.generator.bounded(images, proposal)
        if round_ > 0:  # later rounds look for what gets through the purifier
            self.transform.eval()
            generated = self.transform(generated)
            return generated, generated
        return generated, proposal

    def repair_loss(self, images: Tensor, labels: Tensor) -> Tensor:
        """Purification: the victim's cross-entropy and features on ``P``'s output, and its distance to the clean."""
        self.transform.train()
        std = self.generator.std
        draws = self.step_generator()
        mixed = self.poisoned_share(images, draws)
        noisy = mixed + self.hparams["noise_std"] * std * torch.randn(images.shape, generator=draws).to(images)
        purified = self.transform(noisy)
        with torch.no_grad():
            clean_features = self.victim_features.features(images).float()
        features, logits = self.victim_features.features_and_logits(purified)
        distance = normalised_distance(images, purified, std).mean()
        weight = 100.0 if distance.item() > self.hparams["purify_norm_bound"] else 1.0
        return (
            F.cross_entropy(logits.float(), labels)
            + F.mse_loss(features.float(), clean_features.float())
            + weight * distance
        )


DEFENSES.add(
    Defense(
        "btidbf_unlearning",
        "BTI-DBF (U)",
        "BTI-DBF's inverted trigger generator; a copy of the victim unlearns it (victim's labels); M: identity",
        BTIDBFUnlearning,
        "configs/defenses/btidbf_unlearning.yaml",
    )
)
DEFENSES.add(
    Defense(
        "btidbf_purification",
        "BTI-DBF (P)",
        "T: a U-Net purifier trained against BTI-DBF's inverted trigger generator (victim's labels); M: identity",
        BTIDBFPurification,
        "configs/defenses/btidbf_purification.yaml",
    )
)
