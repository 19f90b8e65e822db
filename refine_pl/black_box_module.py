"""REFINE in front of a model that can only be queried: ``T`` trains through a surrogate distilled from its answers.

The deployed classifier is ``M(f_blackbox(T(x)))``: the remap ``M`` behind the black box's own answers to the
transformed images, and BA / ASR are measured on it. The surrogate only carries the gradients ``T`` trains with; the
pseudo-labels are the black box's own answers on the un-augmented training images, asked once and kept.
"""

import contextlib
import copy
import hashlib
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from torch import Tensor, nn

from refine_pl.architectures import build_architecture, import_builder, is_import_path
from refine_pl.architectures.registry import architecture
from refine_pl.batches import AugmentedViews, IndexedImages
from refine_pl.black_box import Answers, BlackBox, ModelAnswers, OnnxBlackBox, check_answers_mode
from refine_pl.classifier import NormalizedClassifier
from refine_pl.errors import ConfigError, cli_flag
from refine_pl.internals import global_seed
from refine_pl.metric_names import AGREEMENT
from refine_pl.metrics import CLEAN_LOADER
from refine_pl.refine_module import RefineLitModule
from refine_pl.victims import VictimRecord, check_victim_accepts, load_victim

SURROGATE_CANDIDATES = ("small_cnn", "resnet18_cifar_narrow", "resnet18")
"""The architectures a default surrogate is chosen from: the one whose native image size is nearest the data's."""

BLACK_BOX_KEY = "black_box"
"""Key of a black-box run's checkpoint that holds the black box's answers, the images it answered and its counts."""

QUERY_PASSES = 5
"""Passes over the training loader that ask the black box about the images it may answer, until each is answered (a
shuffled loader that drops its last partial batch leaves a few images out of each pass)."""

QUERY_EPOCHS = 10_000
DISTILLATION_EPOCHS = 20_000
REFRESH_EPOCHS = 30_000
"""The data epochs (orders and augmentations of the run's seeded loader) of the query passes and the distillation's
epochs: each pass its own, none of them a training epoch of REFINE."""

ROLLBACK_KEY = "agreement_rollback"
"""Key of a black-box run's checkpoint that holds the best label-free agreement's epoch, weights and optimizer state
(:attr:`BlackBoxRefineLitModule.agreement_rollback`)."""

RECORD_FILE = "black_box.json"
"""The run folder's record of the black box: answers mode, surrogate, queries, the surrogate's agreement."""


def default_surrogate_arch(image_size: int) -> str:
    """The surrogate architecture that fits ``image_size`` px images.

    Of :data:`SURROGATE_CANDIDATES`, the one whose native size is nearest (in ratio) the data's: small_cnn for MNIST's
    28 px, the narrow CIFAR ResNet-18 at 32 px, ImageNet's ResNet-18 at 224 px.
    """
    return min(SURROGATE_CANDIDATES, key=lambda name: abs(math.log(architecture(name).native_size / image_size)))


def budget_indices(num_images: int, query_budget: float, seed: int) -> Tensor:
    """The training images the black box may answer: all for a budget of 1, a share in (0, 1), or a number (> 1).

    Drawn uniformly from ``seed``, as the start of one permutation, so a smaller budget's images are part of a
    larger one's.
    """
    count = num_images if query_budget == 1 else (
        round(query_budget * num_images) if query_budget < 1 else min(int(query_budget), num_images)
    )  # fmt: skip
    count = max(1, count)
    return torch.randperm(num_images, generator=torch.Generator().manual_seed(seed))[:count].sort().values


def check_query_budget(query_budget: Any) -> None:
    """Refuses a budget that is neither a share in (0, 1] nor a whole number of images above 1."""
    valid = isinstance(query_budget, (int, float)) and not isinstance(query_budget, bool)
    if valid and query_budget > 1:
        valid = float(query_budget).is_integer()
    if not valid or not query_budget > 0 or not math.isfinite(query_budget):
        raise ConfigError(
            f"query_budget is the share (in (0, 1]) or number (a whole number above 1) of the unlabeled training "
            f"images the black box may answer, got {query_budget!r}: set {cli_flag('model', 'query_budget')}."
        )


def _unanswered(answers: Tensor) -> Tensor:
    """``[N]`` bool: which images ``answers`` holds no answer for yet.

    ``answers`` is probability rows ``[N, K]`` (a NaN row: not asked) or classes ``[N]`` (-1: not asked).
    """
    return answers.isnan().any(1) if answers.ndim == 2 else answers < 0


def _epoch(loader: Any, epoch: int) -> Any:
    """``loader`` set to give the order and augmentations of data epoch ``epoch`` (when its sampler has epochs).

    The loader is the module's own copy of the training loader, detached from the training loop, which would give
    it the loop's epoch and length.
    """
    if hasattr(loader, "trainer"):
        loader.trainer = None
    if hasattr(getattr(loader, "sampler", None), "set_epoch"):
        loader.sampler.set_epoch(epoch)
    return loader


def _first_occurrences(indices: Tensor) -> Tensor:
    """``[B]`` bool: True where an index comes for the first time in the batch.

    A batch that spans two passes over a small set may hold an image twice.
    """
    positions = torch.arange(len(indices))
    _, groups = torch.unique(indices, return_inverse=True)
    first = torch.full((len(indices),), len(indices)).scatter_reduce(0, groups, positions, "amin")
    return positions == first[groups]


def _originals(batch: Any) -> tuple[Tensor, Tensor]:
    """The un-augmented images and dataset indices of a training batch."""
    if isinstance(batch, AugmentedViews):
        return batch.images, batch.indices
    if isinstance(batch, IndexedImages):
        return batch.images, batch.indices
    raise ConfigError(
        "Black-box REFINE asks the black box once per training image, which needs the images' indices: train with "
        f"{cli_flag('data', 'consistency')} true (augmented views with their originals) or "
        f"{cli_flag('data', 'augment')} false."
    )


class BlackBoxRefineLitModule(RefineLitModule):
    """REFINE for a suspect model that only answers queries (classes or class probabilities), through a surrogate.

    The black box (:mod:`refine_pl.black_box`) is an ONNX file (``victim_checkpoint`` ending in ``.onnx``), your own
    query function (``black_box``, from Python), or a refine-pl victim that answers ``answers`` only. It is never
    asked for a gradient. When fitting starts:

    1. The black box answers each training image the ``query_budget`` allows, once, un-augmented (the queries
       counted: :attr:`training_queries`).
    2. A surrogate of ``surrogate_arch`` is distilled from those answers for ``surrogate_epochs`` epochs on the
       training batches' augmented views (soft targets when the black box gives probabilities, its classes
       otherwise), then frozen.
    3. REFINE trains ``T`` as :class:`~refine_pl.RefineLitModule` does, with gradients through the frozen surrogate
       (:attr:`gradient_victim`), and the black box's own classes as pseudo-labels (never the surrogate's guesses),
       on the images the black box answered.

    The deployed and measured classifier is ``M(f_blackbox(T(x)))`` (:attr:`defended`); test also measures the
    surrogate's agreement with the black box on the clean test images (``test/surrogate_agreement``). The run folder's
    ``black_box.json`` records the answers mode, the surrogate, the queries and the agreements. Checkpoints hold ``T``,
    the surrogate and the answers, so a resumed run asks nothing again. Single-process only.

    Args:
        victim_checkpoint: The suspect model: an ``.onnx`` file (run by onnxruntime, checked first:
            :func:`~refine_pl.black_box.check_onnx_file`), or any victim file refine-pl reads, which then answers
            ``answers`` only (for benchmarks). None with ``black_box``.
        black_box: Your own :class:`~refine_pl.black_box.BlackBox` (e.g. a
            :class:`~refine_pl.black_box.QueryFunction`), from Python; None: built from ``victim_checkpoint``.
        answers: What the black box built from ``victim_checkpoint`` answers: ``probabilities`` or ``labels``.
        onnx_outputs: What an ONNX victim's first output is: ``logits`` or ``probabilities``.
        surrogate_arch: The surrogate's architecture: a registered or torchvision name, or ``package.module:function``
            (None: :func:`default_surrogate_arch` of the image size).
        query_budget: The share in (0, 1] or the number (above 1) of the unlabeled training images the black box may
            answer (:func:`budget_indices`); REFINE trains on those.
        surrogate_epochs: Epochs of the surrogate's distillation.
        surrogate_lr: Learning rate of the distillation (Adam, cosine decay).
        surrogate_refresh_epochs: Every this many REFINE epochs, the black box answers ``T``'s output on the answered
            images and the surrogate is fine-tuned on it (:meth:`refresh_surrogate`; each refresh costs as many
            queries as the first pass). Default 1: a 30-epoch run refreshes 29 times, about 30 queries per
            answered image in all. 0: never (one query per image).
        surrogate_label_smoothing: Label smoothing of the distillation on the black box's classes (label-only
            answers; probabilities are taken as they are): the surrogate learns a share of its probability spread
            over the other classes instead of all of it on the answered class.
        surrogate_refresh_lr: Learning rate of the refreshes (Adam); None: ``surrogate_lr``.
        surrogate_refresh_schedule: The refreshes' rate follows ``T``'s schedule: ``surrogate_refresh_lr`` times the
            share of its full rate that ``T``'s optimizer has at the time (after a warmup and a cosine decay the
            surrogate settles with ``T`` instead of moving under it at a constant rate). False: constant.
        surrogate_online: Refresh in every training step instead of every few epochs: before ``T``'s step the black
            box answers ``T``'s output on the step's views and the surrogate takes one step on them (the same
            queries and surrogate steps per epoch as a refresh every epoch, with a surrogate that is never an epoch
            behind ``T``). Needs ``surrogate_refresh_epochs`` 0. The surrogate's optimizer starts anew on resume.
        agreement_rollback: When the label-free agreement (``val/agreement``) falls more than this below its best,
            ``T``, ``T``'s optimizer state and (unless ``rollback_keeps_surrogate``) the surrogate go back to the
            best validation's (:meth:`roll_back`) and training goes on from there, at the schedule's current rate.
            Through a surrogate, ``T`` can find a region of the black box the surrogate does not know, where every
            image gets one class (a backdoor's target): the agreement collapses and does not come back. None: never.
            A fit then never ends more than this below its best agreement. Needs held-out images
            (``data.val_fraction``) and validation every epoch.
        rollback_keeps_surrogate: A rollback takes ``T`` back but keeps the surrogate as it has become: what the
            refreshes since the best epoch taught it about ``T``'s images stays.
        keep_best_agreement: At the last epoch (``max_epochs``), keep the weights of the epoch of the best
            label-free agreement (the first of a tie) if the last epoch's is lower: a choice of the epoch to
            deploy without a label. ``black_box.json`` records the kept epoch (``kept_epoch``).
        **kwargs: What :class:`~refine_pl.RefineLitModule` takes (the transform, the remap, the losses, the optimizer,
            the data facts, ...).
    """

    needs_victim_gradients = False

    def __init__(
        self,
        victim_checkpoint: str | None = None,
        black_box: BlackBox | None = None,
        answers: Answers = "probabilities",
        onnx_outputs: str = "logits",
        surrogate_arch: str | None = None,
        query_budget: float = 1.0,
        surrogate_epochs: int = 20,
        surrogate_lr: float = 1e-3,
        surrogate_refresh_epochs: int = 1,
        surrogate_label_smoothing: float = 0.0,
        surrogate_refresh_lr: float | None = None,
        surrogate_refresh_schedule: bool = False,
        surrogate_online: bool = False,
        agreement_rollback: float | None = None,
        rollback_keeps_surrogate: bool = False,
        keep_best_agreement: bool = False,
        **kwargs: Any,
    ) -> None:
        check_answers_mode(answers)
        check_query_budget(query_budget)
        if (
            not isinstance(surrogate_refresh_epochs, int)
            or isinstance(surrogate_refresh_epochs, bool)
            or surrogate_refresh_epochs < 0
        ):
            raise ConfigError(
                f"surrogate_refresh_epochs must be a whole number of at least 0, got {surrogate_refresh_epochs!r}: set "
                f"{cli_flag('model', 'surrogate_refresh_epochs')}."
            )
        if not isinstance(surrogate_epochs, int) or isinstance(surrogate_epochs, bool) or surrogate_epochs < 1:
            raise ConfigError(
                f"surrogate_epochs must be a whole number of at least 1, got {surrogate_epochs!r}: set "
                f"{cli_flag('model', 'surrogate_epochs')}."
            )
        if isinstance(surrogate_label_smoothing, bool) or not 0 <= surrogate_label_smoothing < 1:
            raise ConfigError(
                f"surrogate_label_smoothing is a share in [0, 1), got {surrogate_label_smoothing!r}: set "
                f"{cli_flag('model', 'surrogate_label_smoothing')} (0: none)."
            )
        if surrogate_refresh_lr is not None and (
            isinstance(surrogate_refresh_lr, bool) or not surrogate_refresh_lr > 0
        ):
            raise ConfigError(
                f"surrogate_refresh_lr must be above 0, got {surrogate_refresh_lr!r}: set "
                f"{cli_flag('model', 'surrogate_refresh_lr')} (or leave it unset: the distillation's rate)."
            )
        if surrogate_online and surrogate_refresh_epochs:
            raise ConfigError(
                f"surrogate_online refreshes the surrogate in every training step, in place of the refreshes every "
                f"{surrogate_refresh_epochs} epoch(s): set {cli_flag('model', 'surrogate_refresh_epochs')} 0 with it."
            )
        if agreement_rollback is not None and (isinstance(agreement_rollback, bool) or not 0 < agreement_rollback < 1):
            raise ConfigError(
                f"agreement_rollback is a fall of the label-free agreement in (0, 1), got {agreement_rollback!r}: "
                f"set {cli_flag('model', 'agreement_rollback')} (or leave it unset: never roll back)."
            )
        self._black_box_spec = (black_box, answers, onnx_outputs)
        kwargs.setdefault("victim_access", "query_only")
        kwargs.pop("pseudo_label_cache", None)
        super().__init__(victim_checkpoint=victim_checkpoint, pseudo_label_cache=False, **kwargs)
        for hparams in (self.hparams, self._hparams_initial):
            hparams.pop("black_box", None)
        num_classes, in_channels, image_size = (self.hparams[k] for k in ("num_classes", "in_channels", "image_size"))
        arch = surrogate_arch or default_surrogate_arch(image_size)
        net = import_builder(arch)(num_classes, in_channels) if is_import_path(arch) else build_architecture(
            arch, num_classes, in_channels
        )  # fmt: skip
        check_victim_accepts(net, in_channels, image_size, arch, num_classes)
        self.surrogate = NormalizedClassifier(net, self.hparams["mean"], self.hparams["std"], arch=arch)
        self.surrogate.requires_grad_(False).eval()
        if self.channels_last:
            self.surrogate.to(memory_format=torch.channels_last)
        self.surrogate_arch = arch
        self.query_budget = query_budget
        self.surrogate_epochs = surrogate_epochs
        self.surrogate_lr = surrogate_lr
        self.surrogate_refresh_epochs = surrogate_refresh_epochs
        self.surrogate_label_smoothing = surrogate_label_smoothing
        self.surrogate_refresh_lr = surrogate_lr if surrogate_refresh_lr is None else surrogate_refresh_lr
        self.surrogate_refresh_schedule = surrogate_refresh_schedule
        self.surrogate_online = surrogate_online
        self._online_optimizer: torch.optim.Optimizer | None = None
        self.agreement_rollback = agreement_rollback
        self.rollback_keeps_surrogate = rollback_keeps_surrogate
        self.keep_best_agreement = keep_best_agreement
        self._best: dict[str, Any] | None = None  # the best agreement's estimate, weights and optimizer states
        self._answers: Tensor | None = None  # [N] long classes (-1: not asked) or [N, K] probabilities (NaN rows)
        self._labels: Tensor | None = None  # [N] long, the black box's class of each answered image, -1 elsewhere
        self.training_queries = 0
        """Images the black box answered for training (the distillation's and REFINE's pseudo-labels), in all runs."""
        self.record: dict[str, Any] = {}
        self._distilling = False
        self._test_agreement = [0, 0]

    # ------------------------------------------------------------------------------------------------- the victim

    def load_victim(
        self,
        victim_checkpoint: str | None,
        num_classes: int,
        in_channels: int,
        image_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        victim_arch: str | None,
    ) -> tuple[nn.Module, VictimRecord]:
        given, answers, outputs = self._black_box_spec
        flag = cli_flag("model", "victim_checkpoint")
        if given is not None:
            if victim_checkpoint is not None:
                raise ConfigError(f"Give the black box or {flag}, not both.")
            if not isinstance(given, BlackBox):
                raise ConfigError(
                    f"black_box must be a refine_pl.black_box.BlackBox (e.g. QueryFunction(your_function, "
                    f"num_classes)), got {type(given).__name__}."
                )
            if given.num_classes != num_classes:
                raise ConfigError(
                    f"The {given.name} answers {given.num_classes} classes but the data has {num_classes}: build it "
                    "with the data's num_classes."
                )
            sha256 = getattr(given, "sha256", None) or hashlib.sha256(f"black-box:{given.name}".encode()).hexdigest()
            return given, VictimRecord(path=given.name, sha256=sha256, arch=type(given).__name__)
        if victim_checkpoint is None:
            raise ConfigError(f"No black box: pass {flag} (an .onnx file or a victim file), or black_box from Python.")
        if str(victim_checkpoint).lower().endswith(".onnx"):
            if victim_arch is not None:
                raise ConfigError(
                    f"{victim_checkpoint} is an ONNX file, which holds its own network: drop "
                    f"{cli_flag('model', 'victim_arch')}."
                )
            box = OnnxBlackBox(victim_checkpoint, num_classes, in_channels, image_size, mean, std, answers, outputs)
            return box, VictimRecord(path=str(victim_checkpoint), sha256=box.sha256, arch="onnx")
        facts = (num_classes, in_channels, image_size, mean, std)
        classifier, record = load_victim(victim_checkpoint, *facts, victim_arch)
        return ModelAnswers(classifier, num_classes, answers), record

    @property
    def black_box(self) -> BlackBox:
        """The suspect model, which only answers queries."""
        return self.victim

    @property
    def gradient_victim(self) -> nn.Module:
        """The frozen surrogate: ``T``'s gradients flow through it, never through the black box."""
        return self.surrogate

    def train(self, mode: bool = True) -> "BlackBoxRefineLitModule":
        super().train(mode)
        if hasattr(self, "surrogate") and not self._distilling:
            self.surrogate.eval()
        return self

    # -------------------------------------------------------------------------------- queries and distillation

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.trainer.world_size > 1:
            raise ConfigError(
                "Black-box REFINE runs in one process (the black box is asked once per image): set "
                f"{cli_flag('trainer', 'devices')} 1."
            )
        if self._answers is None:
            self._query_and_distill()

    def _query(self, images: Tensor) -> Tensor:
        answer = self.black_box.ask(images)
        self.training_queries += len(images)
        return answer

    def _query_and_distill(self) -> None:
        start = time.perf_counter()
        loader = self.trainer.datamodule.train_dataloader()
        num_images = len(loader.dataset)
        allowed = torch.zeros(num_images, dtype=torch.bool)
        allowed[budget_indices(num_images, self.query_budget, global_seed())] = True
        probabilities = self.black_box.answers == "probabilities"
        k = self.hparams["num_classes"]
        answers = torch.full((num_images, k), math.nan) if probabilities else torch.full((num_images,), -1)
        for attempt in range(QUERY_PASSES):  # a loader that drops its last partial batch leaves some to the next pass
            for batch in _epoch(loader, QUERY_EPOCHS + attempt):
                images, indices = _originals(batch)
                ask = allowed[indices] & _unanswered(answers[indices])
                if bool(ask.any()):
                    answers[indices[ask]] = self._query(images[ask].to(self.device)).cpu()
            if not bool((allowed & _unanswered(answers)).any()):
                break
        self._set_answers(answers, allowed)
        self._distill(loader)
        self.record.update(
            surrogate_train_agreement=self._train_agreement(loader),
            distill_seconds=round(time.perf_counter() - start, 3),
        )
        self._write_record()

    def _set_answers(self, answers: Tensor, allowed: Tensor) -> None:
        self._answers = answers
        self._allowed = allowed
        if answers.ndim == 2:  # probabilities; a row of NaN: not answered
            labels = answers.nan_to_num(-1).argmax(1)
            labels[_unanswered(answers)] = -1
        else:
            labels = answers.clone()
        labels[~allowed] = -1
        self._labels = labels.to(self.device)
        self.record.update(
            answers=self.black_box.answers,
            black_box=self.black_box.name,
            surrogate_arch=self.surrogate_arch,
            query_budget=self.query_budget,
            training_images=len(answers),
            answered_images=int((labels >= 0).sum()),
            training_queries=self.training_queries,
        )

    def _targets(self, indices: Tensor) -> Tensor:
        return self._answers[indices.cpu()].to(self.device)

    def _distill(self, loader: Any) -> None:
        """Trains the surrogate to give the black box's answers on the augmented views of the answered images."""
        surrogate = self.surrogate
        self._distilling = True
        surrogate.requires_grad_(True).train()
        optimizer = torch.optim.Adam(surrogate.parameters(), lr=self.surrogate_lr)
        steps = self.surrogate_epochs * max(1, len(loader))
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
        try:
            with torch.enable_grad():
                for epoch in range(self.surrogate_epochs):
                    for batch in _epoch(loader, DISTILLATION_EPOCHS + epoch):
                        _, indices = _originals(batch)
                        views = batch.views if isinstance(batch, AugmentedViews) else batch.images
                        keep = self._allowed[indices]
                        if not bool(keep.any()):
                            continue
                        self._distillation_step(optimizer, views[keep], self._targets(indices[keep]))
                        schedule.step()
        finally:
            self._distilling = False
            surrogate.requires_grad_(False).eval()

    def _distillation_step(self, optimizer: torch.optim.Optimizer, images: Tensor, targets: Tensor) -> None:
        """One step of the surrogate towards the black box's answers: probabilities ``[B, K]`` or classes ``[B]``."""
        with self.training_autocast():
            logits = self.surrogate(self.training_layout(images.to(self.device)))
        if targets.ndim == 2:  # soft targets: the black box's probabilities
            loss = -(targets * logits.float().log_softmax(1)).sum(1).mean()
        else:  # label-only: its classes
            loss = nn.functional.cross_entropy(logits.float(), targets, label_smoothing=self.surrogate_label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def on_train_epoch_start(self) -> None:
        every = self.surrogate_refresh_epochs
        if every and self.current_epoch > 0 and self.current_epoch % every == 0:
            self.refresh_surrogate()

    def refresh_surrogate(self) -> None:
        """Asks the black box about ``T``'s output on the answered images and fine-tunes the surrogate on it.

        Each answered image at most once: the training loader's batches are taken until every answered image has
        come or the epoch ends (an epoch that passes over a small set more than once, ``min_epoch_samples``, is not
        read to its end, and an image met again is skipped). Each batch's views are transformed by the current
        ``T`` (in eval mode, as deployed), the black box answers the transformed images (counted as training
        queries), and the surrogate takes one step on the views with their originals' answers and the transformed
        images with theirs. So the surrogate follows the black box where ``T`` sends the images, the inputs it stands
        in for the black box on, and a refresh costs as many queries as there are answered images. The pseudo-labels
        stay the black box's answers on the original images.
        """
        loader = self.trainer.datamodule.train_dataloader()
        optimizer = torch.optim.Adam(self.surrogate.parameters(), lr=self._refresh_rate())
        with self._surrogate_learning():
            answered = self._labels.cpu() >= 0
            refreshed = torch.zeros_like(answered)
            for batch in _epoch(loader, REFRESH_EPOCHS + self.current_epoch):
                _, indices = _originals(batch)
                views = batch.views if isinstance(batch, AugmentedViews) else batch.images
                listed = indices.cpu()
                new = answered[listed] & ~refreshed[listed] & _first_occurrences(listed)
                if not bool(new.any()):
                    continue
                refreshed[listed[new]] = True
                keep = new.to(indices.device)
                self._follow_black_box(optimizer, views[keep], indices[keep])
                if bool(refreshed[answered].all()):
                    break
        self.record.update(surrogate_refreshes=int(self.record.get("surrogate_refreshes", 0)) + 1)

    def _refresh_rate(self) -> float:
        """The refreshes' rate now: ``surrogate_refresh_lr``, times ``T``'s share of its full rate if it follows."""
        if not self.surrogate_refresh_schedule:
            return self.surrogate_refresh_lr
        group = self.trainer.optimizers[0].param_groups[0]
        full = group.get("initial_lr") or group["lr"]
        return self.surrogate_refresh_lr * group["lr"] / full if full else self.surrogate_refresh_lr

    @contextlib.contextmanager
    def _surrogate_learning(self) -> Iterator[None]:
        """The surrogate trainable (train mode) and ``T`` in eval mode, as deployed, for the surrogate's steps."""
        surrogate, transform = self.surrogate, self.transform
        was_training = transform.training
        self._distilling = True
        surrogate.requires_grad_(True).train()
        transform.eval()
        try:
            yield
        finally:
            self._distilling = False
            surrogate.requires_grad_(False).eval()
            transform.train(was_training)

    def _follow_black_box(self, optimizer: torch.optim.Optimizer, views: Tensor, indices: Tensor) -> None:
        """One surrogate step towards the black box on ``views`` and on ``T``'s output of them.

        The black box answers ``T``'s output now (counted as training queries); the views keep their originals'
        answers. Inside :meth:`_surrogate_learning`.
        """
        views = self.training_layout(views.to(self.device))
        with torch.no_grad(), self.training_autocast():
            transformed = self.transform(views).float().clamp(0, 1)
        answers = self._query(transformed)
        with torch.enable_grad():
            self._distillation_step(
                optimizer, torch.cat([views, transformed]), torch.cat([self._targets(indices), answers])
            )

    def _train_agreement(self, loader: Any) -> float:
        """The surrogate's agreement with the black box's classes on the answered training images (no new query)."""
        agreed = total = 0
        with torch.no_grad():
            for batch in _epoch(loader, QUERY_EPOCHS):
                images, indices = _originals(batch)
                labels = self._labels_on(self.device)[indices.to(self.device)]
                keep = labels >= 0
                if bool(keep.any()):
                    predicted = self.surrogate(self.training_layout(images.to(self.device)[keep])).argmax(1)
                    agreed += int((predicted == labels[keep]).sum())
                    total += int(keep.sum())
        return round(agreed / max(total, 1), 6)

    # --------------------------------------------------------------------------------------------------- REFINE

    def pseudo_labels(self, images: Tensor, indices: Tensor | None = None) -> Tensor:
        """The black box's classes ``[B]``: the kept answers of the images at ``indices``; asked anew without them."""
        if indices is None or self._labels is None:
            return self._ask(images)
        labels = self._labels_on(indices.device)[indices]
        missing = labels < 0
        if bool(missing.any()):
            labels = labels.clone()
            labels[missing] = self._ask(images[missing])
        return labels

    def _labels_on(self, device: torch.device) -> Tensor:
        if self._labels.device != device:
            self._labels = self._labels.to(device)
        return self._labels

    def _ask(self, images: Tensor) -> Tensor:
        answer = self._query(images)
        return answer if answer.ndim == 1 else answer.argmax(1)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        if isinstance(batch, (IndexedImages, AugmentedViews)) and self._labels is not None:
            keep = self._labels_on(batch.indices.device)[batch.indices] >= 0
            if not bool(keep.any()):
                return None
            if not bool(keep.all()):
                batch = type(batch)(*(field[keep] for field in batch))
            if self.surrogate_online:
                if self._online_optimizer is None:
                    self._online_optimizer = torch.optim.Adam(self.surrogate.parameters(), lr=self._refresh_rate())
                for group in self._online_optimizer.param_groups:
                    group["lr"] = self._refresh_rate()
                views = batch.views if isinstance(batch, AugmentedViews) else batch.images
                with self._surrogate_learning():
                    self._follow_black_box(self._online_optimizer, views, batch.indices)
        return super().training_step(batch, batch_idx)

    # ------------------------------------------------------------------------------------------ agreement rollback

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        estimate = self.label_free_estimate
        watched = self.agreement_rollback is not None or self.keep_best_agreement
        if not watched or self.trainer.sanity_checking or estimate is None:
            return
        if estimate["epoch"] != self.current_epoch + 1:
            return  # no agreement measured in this validation
        if self._best is None or estimate[AGREEMENT] > self._best["estimate"][AGREEMENT]:
            self._best = {
                "estimate": dict(estimate),
                "weights": {name: value.detach().cpu().clone() for name, value in self._trained_state().items()},
                "optimizers": [copy.deepcopy(optimizer.state_dict()) for optimizer in self.trainer.optimizers],
            }
        elif self.agreement_rollback is not None and (
            estimate[AGREEMENT] < self._best["estimate"][AGREEMENT] - self.agreement_rollback
        ):
            self.roll_back()
        epochs = self.trainer.max_epochs
        if self.keep_best_agreement and epochs is not None and epochs > 0 and self.current_epoch + 1 >= epochs:
            kept = self._best["estimate"]
            if self.label_free_estimate["epoch"] != kept["epoch"]:
                rank_zero_info(
                    f"The label-free agreement of the last epoch ({estimate[AGREEMENT]}) is below its best "
                    f"({kept[AGREEMENT]}, epoch {kept['epoch']}): that epoch's T and surrogate are kept."
                )
                self._restore_best()
            self.record.update(kept_epoch=kept["epoch"], last_epoch_agreement=estimate[AGREEMENT])

    def _trained_state(self) -> dict[str, Tensor]:
        """The state that training changes: everything but the frozen models (``T``, the surrogate, the remap)."""
        frozen = tuple(self._frozen_models())
        return {name: value for name, value in self.state_dict().items() if not name.startswith(frozen)}

    def _restore_best(self, surrogate: bool = True) -> None:
        """Puts ``T``, its optimizer's per-parameter state and (with ``surrogate``) the surrogate back to the best's.

        The learning rates stay the schedule's current ones; a surrogate taken back starts its online optimizer anew.
        The label-free estimate becomes the best one's.
        """
        best = self._best
        with torch.no_grad():
            for name, value in self._trained_state().items():
                if surrogate or not name.startswith("surrogate."):
                    value.copy_(best["weights"][name])
        for optimizer, saved in zip(self.trainer.optimizers, best["optimizers"], strict=True):
            saved = copy.deepcopy(saved)
            for group, now in zip(saved["param_groups"], optimizer.state_dict()["param_groups"], strict=True):
                group.update({key: value for key, value in now.items() if key != "params"})
            optimizer.load_state_dict(saved)
        if surrogate:
            self._online_optimizer = None
        self._output_spread = None
        self.label_free_estimate = dict(best["estimate"])

    def roll_back(self) -> None:
        """Goes back to the best agreement's weights after a collapse (:attr:`agreement_rollback`) and trains on.

        ``black_box.json`` records each rollback (``agreement_rollbacks``).
        """
        best, fallen = self._best["estimate"], dict(self.label_free_estimate)
        self._restore_best(surrogate=not self.rollback_keeps_surrogate)
        rollbacks = [*self.record.get("agreement_rollbacks", []), {
            "epoch": fallen["epoch"], "agreement": fallen[AGREEMENT],
            "restored_epoch": best["epoch"], "restored_agreement": best[AGREEMENT],
        }]  # fmt: skip
        self.record.update(agreement_rollbacks=rollbacks)
        restored = "T and its optimizer" if self.rollback_keeps_surrogate else "T, its optimizer and the surrogate"
        rank_zero_warn(
            f"The label-free agreement fell to {fallen[AGREEMENT]} in epoch {fallen['epoch']}, more than "
            f"{self.agreement_rollback} below its best ({best[AGREEMENT]} in epoch {best['epoch']}): {restored} go "
            f"back to that epoch's weights and train on (rollback {len(rollbacks)})."
        )

    # ------------------------------------------------------------------------------------------------ evaluation

    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        self._test_agreement = [0, 0]
        self._queries_before_test = self.black_box.queries

    def test_step(self, batch: tuple[Tensor, ...], batch_idx: int, dataloader_idx: int = 0) -> None:
        super().test_step(batch, batch_idx, dataloader_idx)
        if dataloader_idx == CLEAN_LOADER:
            with torch.no_grad():
                surrogate = self.surrogate(batch[0]).argmax(1)
            agreed = surrogate == self.black_box.last_labels(batch[0])
            self._test_agreement[0] += int(agreed.sum())
            self._test_agreement[1] += len(agreed)

    def on_test_epoch_end(self) -> None:
        agreed, total = self._test_agreement
        if total:
            self.log("test/surrogate_agreement", agreed / total)
        self.record.update(
            surrogate_test_agreement=round(agreed / total, 6) if total else None,
            test_queries=self.black_box.queries - self._queries_before_test,
        )

    def on_fit_end(self) -> None:
        self._write_record()

    def on_test_end(self) -> None:
        self._write_record()

    @rank_zero_only
    def _write_record(self) -> None:
        if self._trainer is None:
            return
        path = Path(self.trainer.default_root_dir) / RECORD_FILE
        record = json.loads(path.read_text()) if path.is_file() else {}
        record.update(self.record, training_queries=self.training_queries)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")

    # ----------------------------------------------------------------------------------------------- checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self._answers is not None:
            checkpoint[BLACK_BOX_KEY] = {
                "answers": self._answers,
                "allowed": self._allowed,
                "training_queries": self.training_queries,
                "record": dict(self.record),
            }
        if self._best is not None:
            checkpoint[ROLLBACK_KEY] = self._best

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get(BLACK_BOX_KEY)
        if isinstance(saved, dict) and isinstance(saved.get("answers"), Tensor):
            self.training_queries = int(saved.get("training_queries", 0))
            self.record.update(saved.get("record") or {})
            self._set_answers(saved["answers"], saved["allowed"])
        best = checkpoint.get(ROLLBACK_KEY)
        if isinstance(best, dict) and isinstance(best.get("weights"), dict):
            self._best = best
