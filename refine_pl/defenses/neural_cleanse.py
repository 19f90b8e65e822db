"""Neural Cleanse (Wang et al., S&P 2019): reverse a trigger per class, flag outliers, unlearn the flagged ones.

For every class ``t`` a mask ``m`` (one channel, in [0, 1]) and a pattern ``p`` (the image's channels, in [0, 1]) are
optimised so that the stamped images ``(1 - m) * x + m * p`` of benign ``x`` are classified as ``t`` by the frozen
victim, with an L1 penalty on ``m`` whose weight (the *cost*) the schedule of the original work adjusts: raised when
the reversed trigger has reached the attack-success threshold for ``patience`` rounds in a row, lowered when it has
missed it as long, and the class is finished once the cost has moved both ways and the smallest mask norm has not
improved by 1 % for ``early_stop_patience`` rounds (or after ``max_rounds``); a round is ``round_steps`` Adam steps.
A backdoor target needs a much smaller mask than a clean class: a class is flagged when its mask's L1 norm lies below
the median by more than ``anomaly_threshold`` times the median absolute deviation (scaled by 1.4826, the normal
consistency constant).
A copy of the victim is then fine-tuned on the benign images, a share of them stamped with the reversed trigger of a
flagged class, keeping their labels: the copy unlearns the shortcut. With no class flagged the deployed model is the
victim as it is.

Hyperparameters, from the public implementations (numbers only; the code is this project's):

- the original (``bolunwang/backdoor``, ``visualizer.py`` and ``gtsrb_visualize_example.py``): Adam lr 0.1, betas
  (0.5, 0.9); initial cost 1e-3; cost multiplied by 2 up and divided by 2 ** 1.5 down; patience 5 rounds; attack
  success threshold 0.99; early stop after 25 rounds (5 x patience) without a 1 % (threshold 0.99) improvement; a
  round is 31 mini-batches of 32 (``NB_SAMPLE = 1000`` images), at most 1,000 rounds; the outlier rule
  (``mad_outlier_detection.py``): consistency constant 1.4826, anomaly index above 2, only norms below the median;
- BackdoorBench (``defense/nc.py``, ``config/defense/nc/*.yaml``): the same optimiser, costs, multipliers, patience
  and early stop; a round is one epoch over its 2,500 defense images at batch 256 (10 steps), at most 80 per class;
  the mask and pattern start from 1 in tanh space; unlearning: 20 % of the images stamped, SGD lr 0.01, momentum 0.9,
  weight decay 5e-4, cosine annealing, 100 epochs at batch 256 (about 1,000 steps).

How it is scaled to the embedded MNIST (3,600 unlabeled training images after the validation hold-out, REFINE's batch
of 64): the schedule is BackdoorBench's in Adam steps: a round is 10 steps (its epoch), at most 80 rounds per class, the
patience and early stop in rounds as above. Rounds of the original's 1,000 images at most 200 per class (BackdoorBench's
image budget) took about 60 rounds for the BadNets target alone and were still raising the cost of the next class
after 27: too slow for one CPU thread per run. The cost starts at its initial value (BackdoorBench) rather than at 0
(the original), and the attack-success threshold is the original's 0.99 (BackdoorBench's is 0.98). Unlearning
fine-tunes for 10 passes over the images, about 560 steps of 64 (BackdoorBench: about 1,000 steps of 256 on CIFAR-10
victims trained for 100 epochs; the MNIST victims here are trained for 12), the rate annealed on a cosine over them.

Threat model: REFINE's. The defender has the unlabeled benign images REFINE gets; the labels of the unlearning images
are the victim's own predictions on the un-stamped images (``labels: victim``, the default). ``labels: true`` reads
the training set's true labels instead (a side row: what labels are worth).
"""

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pytorch_lightning.cli import OptimizerCallable
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor, nn

from refine_pl.batches import AugmentedViews, IndexedImages
from refine_pl.defended_module import DefendedLitModule
from refine_pl.defenses.registry import DEFENSES, Defense
from refine_pl.errors import ConfigError, cli_flag
from refine_pl.refine_module import reference_sgd

CONSISTENCY_CONSTANT = 1.4826
"""Scales the median absolute deviation to the standard deviation of a normal distribution."""

PROGRESS_KEY = "neural_cleanse"
"""Key of :class:`Progress` (and of the current class's :class:`CostSchedule`) in checkpoints."""

Labels = Literal["victim", "true"]


def anomaly_indices(norms: Tensor) -> Tensor:
    """The anomaly index of each of ``norms`` ``[K]``: its distance from their median in scaled MADs.

    The unit is the median absolute deviation times :data:`CONSISTENCY_CONSTANT`. The median of an even count is the
    mean of the two middle values (NumPy's, as the original). When the MAD is 0 a norm equal to the median has index 0
    and any other an infinite one.
    """
    norms = norms.double()
    median = norms.quantile(0.5)
    deviation = (norms - median).abs()
    mad = CONSISTENCY_CONSTANT * deviation.quantile(0.5)
    if float(mad) == 0.0:
        return torch.where(deviation > 0, torch.inf, 0.0).double()
    return deviation / mad


def flagged_classes(norms: Tensor, threshold: float = 2.0) -> list[int]:
    """The classes whose mask norm lies below the median with an anomaly index above ``threshold``.

    Smallest norm first. A norm above the median is never flagged, however far: a large mask is no sign of a backdoor.
    """
    norms = norms.double()
    below = norms <= norms.quantile(0.5)
    flagged = (below & (anomaly_indices(norms) > threshold)).nonzero().flatten()
    return sorted((int(c) for c in flagged), key=lambda c: float(norms[c]))


@dataclass(frozen=True)
class ScheduleSettings:
    """The cost schedule's hyperparameters (see the module docstring for their sources)."""

    init_cost: float = 1e-3
    multiplier_up: float = 2.0
    multiplier_down: float = 2.0**1.5
    patience: int = 5
    success_threshold: float = 0.99
    early_stop_threshold: float = 0.99
    early_stop_patience: int = 25
    max_rounds: int = 80


@dataclass
class CostSchedule:
    """The state of one class's optimisation between rounds: the L1 cost and the counters that move it.

    Attributes:
        cost: Weight of the mask's L1 norm in the loss.
        rounds: Rounds finished.
        up_rounds: Consecutive rounds at or above the success threshold (since the last raise).
        down_rounds: Consecutive rounds below it (since the last cut).
        raised: The cost has been raised at least once.
        lowered: The cost has been cut at least once.
        best_norm: Smallest mean mask norm of a round at or above the success threshold (inf: none yet).
        stalled_rounds: Consecutive rounds in which ``best_norm`` did not improve by the early-stop threshold.
        reference_norm: The best norm the stall is measured against.
    """

    cost: float
    rounds: int = 0
    up_rounds: int = 0
    down_rounds: int = 0
    raised: bool = False
    lowered: bool = False
    best_norm: float = math.inf
    stalled_rounds: int = 0
    reference_norm: float = math.inf

    def end_round(self, settings: ScheduleSettings, success: float, norm: float) -> tuple[bool, bool]:
        """Closes a round whose stamped images reached the target at rate ``success`` with mean mask norm ``norm``.

        Returns:
            ``(improved, stop)``: whether the round's mask is the best so far (it reached the threshold with a
            smaller norm), and whether the class is finished (early stop, or ``max_rounds`` reached).
        """
        self.rounds += 1
        improved = success >= settings.success_threshold and norm < self.best_norm
        if improved:
            self.best_norm = norm
        if self.best_norm < math.inf:
            stalled = self.best_norm >= settings.early_stop_threshold * self.reference_norm
            self.stalled_rounds = self.stalled_rounds + 1 if stalled else 0
        self.reference_norm = min(self.reference_norm, self.best_norm)
        if self.raised and self.lowered and self.stalled_rounds >= settings.early_stop_patience:
            return improved, True
        if success >= settings.success_threshold:
            self.up_rounds, self.down_rounds = self.up_rounds + 1, 0
        else:
            self.up_rounds, self.down_rounds = 0, self.down_rounds + 1
        if self.up_rounds >= settings.patience:
            self.up_rounds, self.cost, self.raised = 0, self.cost * settings.multiplier_up, True
        elif self.down_rounds >= settings.patience:
            self.down_rounds, self.cost, self.lowered = 0, self.cost / settings.multiplier_down, True
        return improved, self.rounds >= settings.max_rounds


@dataclass
class Progress:
    """Where a Neural Cleanse fit stands; saved in every checkpoint, so a killed fit resumes where it was.

    Attributes:
        phase: ``reverse`` (reversing the trigger of class :attr:`target`), ``unlearn`` or ``done``.
        target: The class being reversed (the number of classes once every class is done).
        round_images: Images seen in the current round.
        round_batches: Batches in the current round.
        round_hits: Stamped images of the current round classified as the target.
        round_norm_sum: Sum over the round's batches of the mask's L1 norm.
        has_best: Whether the current class has a mask that reached the success threshold.
        unlearn_images: Images the unlearning has trained on.
        unlearn_total: Images the unlearning trains on in all (set when it starts).
    """

    phase: str = "reverse"
    target: int = 0
    round_images: int = 0
    round_batches: int = 0
    round_hits: int = 0
    round_norm_sum: float = 0.0
    has_best: bool = False
    unlearn_images: int = 0
    unlearn_total: int = 0


def stamp(images: Tensor, mask: Tensor, pattern: Tensor) -> Tensor:
    """``(1 - mask) * images + mask * pattern``: images ``[B, C, H, W]`` with a trigger.

    The mask is ``[1, 1, H, W]`` or ``[B, 1, H, W]``, the pattern ``[1, C, H, W]`` or ``[B, C, H, W]``, all in [0, 1].
    """
    return (1 - mask) * images + mask * pattern


def _bounded(raw: Tensor) -> Tensor:
    """Maps an unbounded parameter to (0, 1) as the original does (tanh, halved and shifted, a hair inside)."""
    return torch.tanh(raw) / (2 + 1e-7) + 0.5


def _spread(indices: Tensor, multiplier: int) -> Tensor:
    """A fixed pseudo-random value in [0, 1) per dataset index (multiplicative hashing).

    It makes the stamping choices without state, the same on every epoch, process and resume.
    """
    return ((indices.long() * multiplier) % 1_000_003).double() / 1_000_003


class NeuralCleanse(DefendedLitModule):
    """Neural Cleanse as a model-repair defense: the deployed model is a repaired copy of the victim.

    The fit runs one phase after another, each batch of the training loader serving the current one: the trigger of
    class 0, 1, ..., K - 1 is reversed (rounds of ``round_steps`` steps; the cost schedule of
    :class:`CostSchedule`), the classes are tested for outliers (:func:`flagged_classes`), then, if any is flagged, a
    copy of the victim (:attr:`defended`) unlearns their triggers for ``unlearn_epochs`` passes over the training
    images. The fit stops itself when it is done (the config sets no epoch limit: ``trainer.max_epochs -1``). Masks,
    patterns and norms are buffers and the phase, round and schedule are in the checkpoint, so a fit killed at any
    epoch resumes where it was. The frozen victim is never changed, nor is the user's file.

    Optimisation is manual: Adam over the current mask and pattern, and ``optimizer`` (default SGD lr 0.01, momentum
    0.9, weight decay 5e-4) over the copy's weights. Training batches are those REFINE gets (images with indices,
    never labels): the trigger is reversed on the un-augmented images, the copy unlearns on the augmented views when
    the batches have them.

    Args:
        labels: Labels of the unlearning images: ``victim``, the victim's predictions on the un-stamped images (no
            label is read, REFINE's threat model), or ``true``, the training set's labels (read through the batch's
            indices from the datamodule's ``train_set``).
        round_steps: Adam steps per round of the cost schedule.
        max_rounds: Rounds per class at most.
        mask_lr: Adam's learning rate for the mask and pattern.
        betas: Adam's betas.
        init_cost: Initial weight of the mask's L1 norm.
        cost_multiplier: The cost is multiplied by this when raised, divided by its power 1.5 when cut.
        patience: Rounds above (below) the success threshold before the cost is raised (cut).
        attack_success_threshold: Share of stamped images classified as the target that counts as success.
        early_stop_patience: Rounds without improvement (after the cost moved both ways) that finish a class.
        early_stop_threshold: A norm below this times the best so far counts as an improvement.
        anomaly_threshold: Anomaly index above which a class (with a norm below the median) is flagged.
        unlearning_share: Share of the unlearning images stamped with a flagged class's trigger.
        unlearn_epochs: Passes over the training images that the unlearning makes.
        optimizer: Builds the unlearning optimizer from the copy's parameters.
        **kwargs: The arguments every defense takes (:class:`~refine_pl.DefendedLitModule`); ``scheduler`` must be
            None (the unlearning anneals its own rate).
    """

    kind = "model_repair"
    needs_victim_gradients = True

    def __init__(
        self,
        labels: Labels = "victim",
        round_steps: int = 10,
        max_rounds: int = 80,
        mask_lr: float = 0.1,
        betas: tuple[float, float] = (0.5, 0.9),
        init_cost: float = 1e-3,
        cost_multiplier: float = 2.0,
        patience: int = 5,
        attack_success_threshold: float = 0.99,
        early_stop_patience: int = 25,
        early_stop_threshold: float = 0.99,
        anomaly_threshold: float = 2.0,
        unlearning_share: float = 0.2,
        unlearn_epochs: int = 10,
        optimizer: OptimizerCallable = reference_sgd,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("scheduler") is not None:
            raise ConfigError(
                "Neural Cleanse anneals its unlearning rate itself (a cosine over unlearn_epochs): set "
                f"{cli_flag('model', 'scheduler')} null."
            )
        super().__init__(optimizer=optimizer, **kwargs)
        if labels not in ("victim", "true"):
            raise ConfigError(f"labels must be victim or true, got {labels!r}: set {cli_flag('model', 'labels')}.")
        for name, value in (("round_steps", round_steps), ("max_rounds", max_rounds), ("patience", patience)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}: set {cli_flag('model', name)}.")
        if not 0 <= unlearning_share <= 1 or unlearn_epochs < 0:
            raise ConfigError(
                f"unlearning_share must be in [0, 1] and unlearn_epochs >= 0, got {unlearning_share!r} and "
                f"{unlearn_epochs!r}: set {cli_flag('model', 'unlearning_share')} / "
                f"{cli_flag('model', 'unlearn_epochs')}."
            )
        self.automatic_optimization = False
        self.labels = labels
        self.round_steps = round_steps
        self.mask_lr = mask_lr
        self.betas = tuple(betas)
        self.anomaly_threshold = anomaly_threshold
        self.unlearning_share = unlearning_share
        self.unlearn_epochs = unlearn_epochs
        self.settings = ScheduleSettings(
            init_cost=init_cost,
            multiplier_up=cost_multiplier,
            multiplier_down=cost_multiplier**1.5,
            patience=patience,
            success_threshold=attack_success_threshold,
            early_stop_threshold=early_stop_threshold,
            early_stop_patience=early_stop_patience,
            max_rounds=max_rounds,
        )
        # The deployed model: a copy of the victim that the unlearning trains; the victim itself stays frozen.
        self.defended = self.repairable_copy()
        classes, channels, side = (self.hparams[key] for key in ("num_classes", "in_channels", "image_size"))
        self.mask_raw = nn.Parameter(torch.ones(1, 1, side, side))
        self.pattern_raw = nn.Parameter(torch.ones(1, channels, side, side))
        self.register_buffer("masks", torch.zeros(classes, 1, side, side))
        self.register_buffer("patterns", torch.zeros(classes, channels, side, side))
        self.register_buffer("mask_norms", torch.full((classes,), torch.nan))
        self.progress = Progress()
        self.schedule = CostSchedule(cost=init_cost)

    # -- what the fit leaves behind ----------------------------------------------------------------------------

    @property
    def reversed(self) -> int:
        """How many classes have their trigger reversed."""
        return int((~self.mask_norms.isnan()).sum())

    def flagged(self) -> list[int] | None:
        """The flagged classes once every class is reversed, else None."""
        if self.reversed < len(self.mask_norms):
            return None
        return flagged_classes(self.mask_norms, self.anomaly_threshold)

    def findings(self) -> dict[str, Any]:
        """Neural Cleanse's detection and what it deployed, for the report."""
        classes = len(self.mask_norms)
        flagged = self.flagged()
        complete = flagged is not None
        indices = anomaly_indices(self.mask_norms).tolist() if complete else None
        unlearned = complete and bool(flagged) and self.progress.phase == "done" and self.unlearn_epochs > 0
        if not complete:
            summary = (
                f"Neural Cleanse did not finish: {self.reversed} of {classes} classes reversed, so nothing is flagged "
                "and the deployed model is the victim unchanged; fit again to resume."
            )
        elif not flagged:
            summary = (
                f"Neural Cleanse flags no class (largest anomaly index below the median: "
                f"{self._largest_low_index(indices):.2f}, threshold {self.anomaly_threshold}): the deployed model is "
                "the victim unchanged."
            )
        else:
            state = "unlearned" if unlearned else "not yet unlearned (the fit did not finish)"
            summary = (
                f"Neural Cleanse flags class{'es' if len(flagged) > 1 else ''} {', '.join(map(str, flagged))} "
                f"(anomaly index {', '.join(f'{indices[c]:.2f}' for c in flagged)}, threshold "
                f"{self.anomaly_threshold}); the deployed model is a copy of the victim with the reversed "
                f"trigger{'s' if len(flagged) > 1 else ''} {state} (labels: {self.labels})."
            )
        return {
            "method": "neural_cleanse",
            "labels": self.labels,
            "complete": complete,
            "classes_reversed": self.reversed,
            "flagged": bool(flagged) if complete else None,
            "flagged_classes": flagged,
            "anomaly_threshold": self.anomaly_threshold,
            "anomaly_index": [round(v, 6) if math.isfinite(v) else None for v in indices] if indices else None,
            "mask_l1_norm": [None if math.isnan(v) else round(v, 6) for v in self.mask_norms.tolist()],
            "unlearned": unlearned,
            "deployed": "repaired copy of the victim" if unlearned else "the victim unchanged",
            "summary": summary,
        }

    def _largest_low_index(self, indices: list[float]) -> float:
        median = float(self.mask_norms.double().quantile(0.5))
        low = [index for index, norm in zip(indices, self.mask_norms.tolist(), strict=True) if norm <= median]
        return max(low, default=0.0)

    # -- the fit -----------------------------------------------------------------------------------------------

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        trigger = torch.optim.Adam([self.mask_raw, self.pattern_raw], lr=self.mask_lr, betas=self.betas)
        try:
            unlearning = self.optimizer_factory(self.defended.parameters())
        except ValueError as error:
            raise ConfigError(
                f"The unlearning optimizer refuses its settings ({error}): fix {cli_flag('model', 'optimizer')}."
            ) from error
        for group in unlearning.param_groups:
            group.setdefault("initial_lr", group["lr"])
        return [trigger, unlearning]

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.trainer.world_size > 1:
            raise ConfigError(
                "Neural Cleanse runs in one process (its phases and rounds are not shared between processes): fit "
                "it with --trainer.devices 1."
            )

    def on_fit_start(self) -> None:
        if self.progress.phase == "done":  # a finished fit, resumed: nothing left to train
            self.trainer.should_stop = True

    def _split(self, batch: Any) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(originals, views, indices)`` of a training batch; views are the originals when not augmented."""
        if isinstance(batch, AugmentedViews):
            return batch.images, batch.views, batch.indices
        if isinstance(batch, IndexedImages):
            return batch.images, batch.images, batch.indices
        if isinstance(batch, Tensor):
            return batch, batch, None
        raise ConfigError(
            f"Neural Cleanse trains on unlabeled images, but a training batch is a {type(batch).__name__}: give a "
            "DataLoader of image tensors (or IndexedImages, AugmentedViews), never (images, labels), e.g. "
            "RefineDataModule."
        )

    def training_step(self, batch: Any, batch_idx: int) -> None:
        originals, views, indices = self._split(batch)
        if self.progress.phase == "reverse":
            self._reverse_step(self.training_layout(originals))
        elif self.progress.phase == "unlearn":
            self._unlearn_step(self.training_layout(originals), self.training_layout(views), indices)
        if self.progress.phase == "done":
            self.trainer.should_stop = True

    def _reverse_step(self, images: Tensor) -> None:
        trigger_optimizer = self.optimizers()[0]
        target = torch.full((len(images),), self.progress.target, device=images.device)
        mask, pattern = _bounded(self.mask_raw), _bounded(self.pattern_raw)
        norm = mask.abs().sum()
        with self.training_autocast():
            logits = self.victim(stamp(images, mask, pattern))
        cross_entropy = F.cross_entropy(logits.float(), target)
        loss = cross_entropy + self.schedule.cost * norm
        trigger_optimizer.zero_grad()
        self.manual_backward(loss)
        trigger_optimizer.step()
        progress = self.progress
        progress.round_images += len(images)
        progress.round_batches += 1
        progress.round_hits += int((logits.argmax(1) == target).sum())
        progress.round_norm_sum += float(norm.detach())
        if progress.round_batches >= self.round_steps:
            self._end_round()

    @torch.no_grad()
    def _end_round(self) -> None:
        progress, schedule = self.progress, self.schedule
        success = progress.round_hits / progress.round_images
        self.log("train/nc_success", success)
        self.log("train/nc_cost", schedule.cost)
        improved, stop = schedule.end_round(self.settings, success, progress.round_norm_sum / progress.round_batches)
        target = progress.target
        if improved or (stop and not progress.has_best):  # the original keeps the last mask when none succeeded
            self.masks[target] = _bounded(self.mask_raw)[0]
            self.patterns[target] = _bounded(self.pattern_raw)[0]
            progress.has_best = progress.has_best or improved
        progress.round_images = progress.round_batches = progress.round_hits = 0
        progress.round_norm_sum = 0.0
        if not stop:
            return
        self.mask_norms[target] = self.masks[target].abs().sum()
        missed = "" if progress.has_best else " (never reached the success threshold)"
        rank_zero_info(
            f"Neural Cleanse: class {target} reversed in {schedule.rounds} rounds, mask L1 norm "
            f"{float(self.mask_norms[target]):.2f}{missed}."
        )
        self._next_class()

    def _next_class(self) -> None:
        """Starts the next class from the initial mask, pattern and cost with a fresh Adam, or ends the reversal."""
        progress = self.progress
        progress.target += 1
        progress.has_best = False
        self.schedule = CostSchedule(cost=self.settings.init_cost)
        self.mask_raw.fill_(1.0)
        self.pattern_raw.fill_(1.0)
        self.optimizers()[0].optimizer.state.clear()
        if progress.target < len(self.mask_norms):
            return
        flagged = self.flagged()
        if flagged and self.unlearn_epochs > 0:
            progress.phase = "unlearn"
            progress.unlearn_total = self.unlearn_epochs * self._training_images()
        else:
            progress.phase = "done"

    def _training_images(self) -> int:
        """How many images one pass of the training loader gives."""
        try:
            return len(self.trainer.train_dataloader.dataset)
        except (AttributeError, TypeError) as error:
            raise ConfigError(
                "Neural Cleanse counts its unlearning in passes over the training images, but the training loader's "
                "dataset has no length: give a map-style dataset (e.g. RefineDataModule's)."
            ) from error

    def _unlearn_step(self, originals: Tensor, views: Tensor, indices: Tensor | None) -> None:
        unlearning_optimizer = self.optimizers()[1]
        progress = self.progress
        labels = self._unlearning_labels(originals, indices)
        flagged = torch.tensor(self.flagged(), device=views.device)
        if indices is not None:
            chosen = _spread(indices, 2_654_435_761) < self.unlearning_share
            which = (_spread(indices, 40_503) * len(flagged)).long().clamp(max=len(flagged) - 1)
        else:
            chosen = torch.rand(len(views), device=views.device) < self.unlearning_share
            which = torch.randint(len(flagged), (len(views),), device=views.device)
        classes = flagged[which]
        stamped = stamp(views, self.masks[classes], self.patterns[classes])
        inputs = torch.where(chosen[:, None, None, None], stamped, views)
        fraction = progress.unlearn_images / max(progress.unlearn_total, 1)
        for group in unlearning_optimizer.optimizer.param_groups:  # cosine annealing over the unlearning images
            group["lr"] = group["initial_lr"] * 0.5 * (1 + math.cos(math.pi * fraction))
        with self.training_autocast():
            logits = self.defended(self.training_layout(inputs))
        loss = F.cross_entropy(logits.float(), labels)
        unlearning_optimizer.zero_grad()
        self.manual_backward(loss)
        unlearning_optimizer.step()
        self.log("train/nc_unlearning_loss", loss.detach())
        progress.unlearn_images += len(views)
        if progress.unlearn_images >= progress.unlearn_total:
            progress.phase = "done"

    def _unlearning_labels(self, originals: Tensor, indices: Tensor | None) -> Tensor:
        if self.labels == "victim":
            with torch.no_grad():
                return self.victim(originals).argmax(1)
        train_set = getattr(self.trainer.datamodule, "train_set", None) if self.trainer.datamodule else None
        if indices is None or train_set is None or getattr(train_set, "labels", None) is None:
            raise ConfigError(
                f"{cli_flag('model', 'labels')} true reads the training images' labels by index, but the batches carry "
                "no index or the datamodule no labeled train_set: use RefineDataModule, or labels victim."
            )
        labels = train_set.labels[indices.cpu()].to(originals.device)
        if bool((labels < 0).any()):
            raise ConfigError(
                f"{cli_flag('model', 'labels')} true, but the training images have no labels (-1): use labels victim."
            )
        return labels

    # -- checkpoints ---------------------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[PROGRESS_KEY] = {"progress": asdict(self.progress), "schedule": asdict(self.schedule)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get(PROGRESS_KEY)
        if not isinstance(saved, dict):
            raise ConfigError(
                "The checkpoint holds no Neural Cleanse progress: pass a checkpoint of a Neural Cleanse run's "
                "checkpoints/ folder with --ckpt_path."
            )
        self.progress = Progress(**{f.name: saved["progress"][f.name] for f in fields(Progress)})
        self.schedule = CostSchedule(**{f.name: saved["schedule"][f.name] for f in fields(CostSchedule)})


DEFENSES.add(
    Defense(
        "neural_cleanse",
        "Neural Cleanse",
        "a trigger reversed per class, the outlier classes (MAD of the mask norms) unlearned by a copy of the victim",
        NeuralCleanse,
        "configs/defenses/neural_cleanse.yaml",
    )
)
