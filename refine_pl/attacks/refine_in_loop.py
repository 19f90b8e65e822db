"""REFINE in the loop: an adaptive, training-controlled attack by an attacker who knows REFINE and its recipe."""

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from refine_pl.attacks.badnets import BadNets, Corner, Pattern
from refine_pl.attacks.base import Attack, TrainingControlledAttack, draw_indices
from refine_pl.attacks.blended import Blended
from refine_pl.attacks.registry import ATTACKS
from refine_pl.errors import ConfigError
from refine_pl.losses import SupConLoss, UtilityLoss, refine_objective
from refine_pl.remap import OutputRemap
from refine_pl.state_dicts import describe_key_mismatch
from refine_pl.transform import UNet

_STATE_KEYS = {"in_channels", "num_classes", "round", "agreement", "transform", "permutation"}


@ATTACKS.add
@dataclass(eq=False, repr=False, kw_only=True)
class RefineInTheLoop(TrainingControlledAttack):
    """A data trigger whose victim is trained, round after round, to keep its backdoor through a REFINE transform.

    The attacker plays the defender while it trains the victim. It knows REFINE and the project's recipe (the
    transform family and width, the losses, the contrastive weight and temperature: the defaults of the settings
    below are ``configs/refine/recipe.yaml``'s), not the defender's seed, data or remap.

    The trigger is a BadNets patch or a Blended pattern (``trigger``; the attack composes a :class:`BadNets` or
    :class:`Blended` with its own settings and seed, so :meth:`apply`, the test-time poisoning, is theirs). In every
    training batch the first ``poison_rate`` share of the (shuffled) images carries the trigger and the target label,
    so the victim is a plain backdoor too.

    :meth:`prepare` draws the attacker's clean split, a ``clean_share`` of the training set, from ``seed``. From epoch
    ``warmup_epochs`` on (the victim is a usable classifier by then), every ``refresh_epochs`` epochs, a round trains
    a fresh surrogate defense at the start of the epoch: a U-Net ``T'`` (refine-pl's own, ``transform_width``) and a
    fresh derangement ``M'``, both drawn from ``seed`` and the round, with REFINE's objective
    (:func:`~refine_pl.losses.refine_objective`: the utility loss of ``M'(f(T'(x)))`` against the current victim's
    predictions on the clean split, plus ``contrastive_weight`` times SupCon on ``T'(x)``), through the current victim
    frozen in eval mode, for ``transform_steps`` steps of Adam (the recipe's 30 epochs of SGD shortened to what fits
    between two victim epochs; the gradient norm clipped at 5, as in the recipe; no augmentation). ``T'`` is then
    frozen.

    Once a ``T'`` exists, every training batch gets extra images that passed through it (``T'`` in eval mode and
    without gradient: only the victim's weights learn from them): a ``loop_rate`` share of the batch with the trigger,
    labelled with the target, and as many clean images, labelled with their own class, both labels taken through the
    surrogate's remap (the victim class that ``M'`` sends to them). So the surrogate defended classifier
    ``M'(f(T'(.)))`` is asked to send triggered images to the target and clean images to their class:

    - through ``M'``, because the defended model the defender measures is ``M(f(T(x)))``: a victim that gives the
      target class itself on ``T(x + trigger)`` ends, behind a derangement (which moves every class), at ``M(target)``,
      never at the target. Asking ``f(T'(x + trigger))`` for ``M'``'s preimage of the target is asking that ``T'``
      sends triggered images where it sends the target class's clean images: that ``T'`` does not separate triggered
      images from clean images of the target class, whatever the remap;
    - with the clean term, because without it the cheapest answer is to send everything ``T'`` outputs to the target's
      preimage (``T'``'s artefacts, not the trigger, would then carry the backdoor, and the surrogate defense would
      lose its utility, which the defender would notice); its labels are the attacker's own labels, which the warm
      victim predicts on nearly all of its training images;
    - appended to the victim's batch rather than in a separate forward: one forward keeps the batch-norm statistics of
      the victim's training steps, and so its running statistics at evaluation, those of one mixed batch; a separate
      forward of transformed images alone would pull the running statistics halfway towards ``T'``'s outputs. Their
      weight in the victim's cross-entropy is their share of the longer batch (``loop_rate`` sets it).

    ``T'``, ``M'``'s permutation, the round and ``T'``'s agreement with the victim on the clean split are the attack's
    state, stored in the victim checkpoint: a victim resumed mid-training goes on with the same ``T'`` (a round already
    trained is not trained again), and :func:`~refine_pl.attacks.attack_from_spec` rebuilds them.

    Args:
        trigger: ``"badnets"`` (a patch: ``patch_size``, ``location``, ``pattern``) or ``"blended"`` (noise drawn from
            ``seed`` at opacity ``alpha``).
        patch_size: Side of the BadNets patch in pixels.
        location: Corner of the BadNets patch.
        pattern: ``"white"`` or ``"checkerboard"`` BadNets patch.
        alpha: Opacity of the Blended pattern.
        clean_share: Share of the training set the attacker trains each ``T'`` on.
        warmup_epochs: Epoch of the first round (0-based).
        refresh_epochs: Epochs between two rounds.
        loop_rate: Share of each batch passed through ``T'`` with the trigger (and as many without), appended.
        transform_steps: Optimizer steps of each ``T'``.
        transform_lr: Adam learning rate of ``T'``.
        transform_batch_size: Batch size of ``T'``'s training (the recipe's).
        transform_width: First-stage width of the U-Net ``T'`` (the recipe's).
        transform_depth: Down (and up) stages of ``T'``.
        contrastive_weight: Weight of the contrastive loss in ``T'``'s objective (the recipe's).
        temperature: Temperature of the contrastive loss (the recipe's).
    """

    name = "refine_in_loop"

    trigger: Literal["badnets", "blended"] = "badnets"
    patch_size: int = 3
    location: Corner = "bottom_right"
    pattern: Pattern = "white"
    alpha: float = 0.2
    clean_share: float = 0.2
    warmup_epochs: int = 4
    refresh_epochs: int = 2
    loop_rate: float = 0.1
    transform_steps: int = 200
    transform_lr: float = 0.001
    transform_batch_size: int = 64
    transform_width: int = 16
    transform_depth: int = 4
    contrastive_weight: float = 0.1
    temperature: float = 0.07

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = {  # setting: (fine, what it needs)
            "patch_size": (self.patch_size >= 1, ">= 1"),
            "alpha": (0.0 < self.alpha <= 1.0, "in (0, 1]"),
            "clean_share": (0.0 < self.clean_share <= 1.0, "in (0, 1]"),
            "warmup_epochs": (self.warmup_epochs >= 0, ">= 0"),
            "refresh_epochs": (self.refresh_epochs >= 1, ">= 1"),
            "loop_rate": (0.0 <= self.loop_rate <= 0.5, "in [0, 0.5]"),
            "transform_steps": (self.transform_steps >= 1, ">= 1"),
            "transform_lr": (self.transform_lr > 0.0, "> 0"),
            "transform_batch_size": (self.transform_batch_size >= 2, ">= 2"),
            "transform_width": (self.transform_width >= 1, ">= 1"),
            "transform_depth": (self.transform_depth >= 1, ">= 1"),
            "contrastive_weight": (self.contrastive_weight >= 0.0, ">= 0"),
            "temperature": (self.temperature > 0.0, "> 0"),
        }
        bad = [f"{name}={getattr(self, name)!r} (needs {needs})" for name, (fine, needs) in checks.items() if not fine]
        if bad:
            raise ConfigError(f"refine_in_loop: {', '.join(bad)}; fix the attack's settings.")
        shared = {"target_label": self.target_label, "poison_rate": self.poison_rate, "seed": self.seed}
        if self.trigger == "badnets":
            self._trigger: Attack = BadNets(
                **shared, patch_size=self.patch_size, location=self.location, pattern=self.pattern
            )
        elif self.trigger == "blended":
            self._trigger = Blended(**shared, alpha=self.alpha)
        else:
            raise ConfigError(f"refine_in_loop: unknown trigger {self.trigger!r}; use 'badnets' or 'blended'.")
        self._networks = nn.ModuleDict()  # "transform" (T') and "remap" (M') once the first round has trained
        self._clean_split: Dataset | None = None
        self._in_channels: int | None = None
        self._num_classes: int | None = None
        self._round: int | None = None
        self.agreement: float | None = None
        """Agreement of the last ``M'(f(T'(x)))`` with the victim's ``f(x)`` on the clean split, as ``T'`` ended."""

    # -- the trigger ------------------------------------------------------------------------------------------------

    def apply(self, images: Tensor, indices: Tensor | None = None) -> Tensor:
        return self._trigger.apply(images, indices)

    # -- the surrogate defense --------------------------------------------------------------------------------------

    def networks(self) -> nn.ModuleDict:
        return self._networks

    def parameter_groups(self) -> list[dict[str, Any]]:
        return []  # T' is trained in the rounds, never by the victim's optimizer

    @property
    def transform(self) -> UNet | None:
        """The current ``T'`` (frozen, eval mode), None before the first round."""
        return self._networks["transform"] if "transform" in self._networks else None  # noqa: SIM401 (no get)

    @property
    def remap(self) -> OutputRemap | None:
        """The current ``M'``, None before the first round."""
        return self._networks["remap"] if "remap" in self._networks else None  # noqa: SIM401 (no get)

    @property
    def round(self) -> int | None:
        """The number of the round that trained the current ``T'`` (from 0), None before the first."""
        return self._round

    def prepare(self, train_set: Dataset, labels: Tensor, num_classes: int) -> None:
        """Draws the attacker's clean split (``clean_share`` of the training set) from ``seed``."""
        count = max(self.transform_batch_size, round(self.clean_share * len(labels)))
        if count > len(labels):
            raise ConfigError(
                f"refine_in_loop: the clean split needs at least transform_batch_size={self.transform_batch_size} "
                f"images, but the training set has {len(labels)}; lower transform_batch_size or raise clean_share."
            )
        generator = torch.Generator().manual_seed(self._derived_seed(0, 0))
        indices = draw_indices(torch.arange(len(labels)), count, generator)
        self._clean_split = Subset(train_set, indices.tolist())
        self._in_channels = int(train_set[0][0].shape[0])
        self._num_classes = num_classes

    def scheduled_round(self, epoch: int) -> int | None:
        """The round that trains at the start of ``epoch``, None when no round does."""
        since = epoch - self.warmup_epochs
        return since // self.refresh_epochs if since >= 0 and since % self.refresh_epochs == 0 else None

    def _derived_seed(self, purpose: int, round_number: int) -> int:
        state = np.random.SeedSequence([self.seed, purpose, round_number]).generate_state(1, np.uint64)[0]
        return int(state >> np.uint64(1))

    def on_train_epoch_start(self, classifier: nn.Module, epoch: int) -> None:
        """Trains the round scheduled at ``epoch`` unless it has trained (a resumed victim keeps its ``T'``)."""
        round_number = self.scheduled_round(epoch)
        if round_number is not None and round_number != self._round:
            self.train_round(classifier, round_number)

    def train_round(self, classifier: nn.Module, round_number: int) -> None:
        """Trains a fresh ``T'`` and ``M'`` (drawn from ``seed`` and the round) through the frozen ``classifier``.

        The classifier's mode, ``requires_grad`` flags and gradients are left as they were.
        """
        if self._clean_split is None or self._in_channels is None or self._num_classes is None:
            raise ConfigError(
                "refine_in_loop was not prepared: its clean split is drawn by prepare() from the training set "
                "(VictimDataModule does it on setup('fit'))."
            )
        device = next(classifier.parameters()).device
        round_seed = self._derived_seed(1, round_number)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(round_seed)
            transform = UNet(self._in_channels, self.transform_width, self.transform_depth).to(device)
        remap = OutputRemap(self._num_classes, seed=round_seed).to(device)
        loader = DataLoader(
            self._clean_split,
            batch_size=self.transform_batch_size,
            shuffle=True,
            drop_last=True,
            generator=torch.Generator().manual_seed(round_seed),
        )
        utility_loss, contrastive_loss = UtilityLoss(), SupConLoss(self.temperature)
        optimizer = torch.optim.Adam(transform.parameters(), lr=self.transform_lr)
        parameters = list(classifier.parameters())
        was_training, needed_grad = classifier.training, [p.requires_grad for p in parameters]
        saved_grads = [p.grad for p in parameters]
        classifier.eval().requires_grad_(False)
        try:
            step = 0
            while step < self.transform_steps:
                for images, _ in loader:  # the split's labels are never used: the victim's predictions are
                    images = images.to(device)
                    with torch.no_grad():
                        pseudo_labels = classifier(images).argmax(1)
                    terms = refine_objective(
                        images,
                        pseudo_labels,
                        transform,
                        classifier,
                        remap,
                        utility_loss,
                        contrastive_loss,
                        self.contrastive_weight,
                    )
                    optimizer.zero_grad(set_to_none=True)
                    terms.loss.backward()
                    nn.utils.clip_grad_norm_(transform.parameters(), 5.0)
                    optimizer.step()
                    step += 1
                    if step == self.transform_steps:
                        break
            transform.zero_grad(set_to_none=True)
            transform.eval().requires_grad_(False)
            agreement = self._agreement(classifier, transform, remap, device)
        finally:
            classifier.train(was_training)
            for parameter, flag, grad in zip(parameters, needed_grad, saved_grads, strict=True):
                parameter.requires_grad_(flag)
                parameter.grad = grad
        self._networks["transform"], self._networks["remap"] = transform, remap
        self._round, self.agreement = round_number, agreement
        rank_zero_info(
            f"refine_in_loop round {round_number}: T' trained {self.transform_steps} steps; M'(f(T'(x))) agrees with "
            f"f(x) on {agreement:.3f} of the clean split."
        )

    def _agreement(self, classifier: nn.Module, transform: nn.Module, remap: nn.Module, device: torch.device) -> float:
        agree = total = 0
        with torch.no_grad():
            for images, _ in DataLoader(self._clean_split, batch_size=256):
                images = images.to(device)
                defended = remap(classifier(transform(images))).argmax(1)
                agree += int((defended == classifier(images).argmax(1)).sum())
                total += len(images)
        return agree / total

    # -- the victim's batches ---------------------------------------------------------------------------------------

    def training_batch(self, images: Tensor, labels: Tensor, classifier: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
        """The first ``poison_rate`` of the batch triggered with the target label, then the loop images appended.

        Once a ``T'`` exists, the loop images are ``T'`` of the first ``loop_rate`` of the batch with the trigger and
        of the last ``loop_rate`` without, labelled with ``M'``'s preimage of the target and of their labels. ``T'``
        runs without gradient; the ``classifier`` is not run here (the victim's forward covers the loop images with
        the rest of its batch).
        """
        num_poisoned = int(len(images) * self.poison_rate)
        poisoned = self.apply(images[:num_poisoned])
        inputs = [poisoned, images[num_poisoned:]]
        targets = [labels.new_full((num_poisoned,), self.target_label), labels[num_poisoned:]]
        num_loop = int(len(images) * self.loop_rate)
        transform, remap = self.transform, self.remap
        if transform is not None and remap is not None and num_loop > 0:
            clean = images[len(images) - num_loop :]
            with torch.no_grad():  # eval mode: the victim module's train() reaches T' too
                transform = transform.to(images.device).eval()
                through = transform(torch.cat([self.apply(images[:num_loop]), clean]))
            preimage = torch.argsort(remap.permutation.to(labels.device))  # victim class that M' sends to each class
            inputs.append(through)
            targets += [preimage[labels.new_full((num_loop,), self.target_label)], preimage[labels[-num_loop:]]]
        return torch.cat(inputs), torch.cat(targets), images.new_zeros(())

    # -- the state in the victim checkpoint -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        transform, remap = self.transform, self.remap
        if transform is None or remap is None:
            return {}
        return {
            "in_channels": transform.in_channels,
            "num_classes": remap.num_classes,
            "round": self._round,
            "agreement": self.agreement,
            "transform": {key: value.detach().cpu() for key, value in transform.state_dict().items()},
            "permutation": remap.permutation.detach().cpu(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        in_channels, num_classes, round_number = state.get("in_channels"), state.get("num_classes"), state.get("round")
        weights, permutation, agreement = state.get("transform"), state.get("permutation"), state.get("agreement")
        if (
            set(state) != _STATE_KEYS
            or any(type(value) is not int for value in (in_channels, num_classes, round_number))
            or in_channels < 1
            or not 2 <= num_classes <= 100_000
            or round_number < 0
            or not isinstance(agreement, float)
            or not isinstance(weights, dict)
            or not all(isinstance(key, str) and isinstance(value, Tensor) for key, value in weights.items())
            or not isinstance(permutation, Tensor)
        ):
            raise ConfigError(
                f"refine_in_loop state needs {sorted(_STATE_KEYS)} (in_channels, num_classes and round integers, "
                f"agreement a float, transform a dict of tensors, permutation a tensor), got "
                f"{ {key: type(value).__name__ for key, value in state.items()} }: the victim checkpoint is damaged."
            )
        identity = torch.arange(num_classes)
        if (
            permutation.dtype != torch.long
            or permutation.shape != (num_classes,)
            or not torch.equal(permutation.sort().values, identity)
            or bool((permutation == identity).any())
        ):
            raise ConfigError(
                f"refine_in_loop state: permutation must be a derangement of {num_classes} classes, got "
                f"{permutation.dtype} {list(permutation.shape)}: the victim checkpoint is damaged."
            )
        # Built on the meta device first (no memory) and compared with the state, so a damaged checkpoint cannot make
        # refine-pl allocate a network of any size.
        try:
            with torch.device("meta"):
                skeleton = UNet(in_channels, self.transform_width, self.transform_depth)
            problem = describe_key_mismatch(skeleton.state_dict(), weights)
        except (RuntimeError, OverflowError) as error:
            problem = str(error)
        if problem is not None:
            raise ConfigError(
                f"refine_in_loop transform in the checkpoint does not fit transform_width={self.transform_width}, "
                f"transform_depth={self.transform_depth}: {problem}."
            )
        transform = UNet(in_channels, self.transform_width, self.transform_depth)
        transform.load_state_dict(weights)
        remap = OutputRemap(num_classes)
        remap.load_state_dict({"permutation": permutation})
        self._networks["transform"] = transform.eval().requires_grad_(False)
        self._networks["remap"] = remap
        self._round, self.agreement = round_number, agreement
