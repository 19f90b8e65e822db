import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from refine_pl.metrics import (
    AnyClassAttackSuccessRate,
    AttackSuccessRate,
    BenignAccuracy,
    DefenseEffectivenessRating,
    RobustAccuracy,
    any_class_attack_counts,
    attack_success_counts,
    benign_accuracy_counts,
    defense_effectiveness_rating,
    robust_accuracy_counts,
)
from tests.conftest import free_port


def test_benign_accuracy_agrees_with_hand_count() -> None:
    preds = torch.tensor([0, 1, 2, 2, 1, 0, 3])
    labels = torch.tensor([0, 1, 1, 2, 0, 0, 3])
    correct, total = benign_accuracy_counts(preds, labels)
    assert (correct.item(), total.item()) == (5, 7)


def test_attack_success_counts_skip_samples_already_of_the_target_class() -> None:
    target = torch.full((6,), 2)
    labels = torch.tensor([0, 1, 2, 3, 2, 1])  # two samples are class 2: not counted
    preds = torch.tensor([2, 2, 2, 0, 1, 1])  # hits among counted: indices 0, 1
    hits, total = attack_success_counts(preds, labels, target)
    assert (hits.item(), total.item()) == (2, 4)


def test_metrics_accumulate_over_batches_like_one_big_batch() -> None:
    generator = torch.Generator().manual_seed(0)
    preds = torch.randint(0, 4, (103,), generator=generator)
    labels = torch.randint(0, 4, (103,), generator=generator)
    targets = torch.full((103,), 1)
    ba, asr = BenignAccuracy(), AttackSuccessRate()
    for start in range(0, 103, 10):
        ba.update(preds[start : start + 10], labels[start : start + 10])
        asr.update(preds[start : start + 10], labels[start : start + 10], targets[start : start + 10])
    hand_ba = sum(int(p == y) for p, y in zip(preds, labels, strict=True)) / 103
    counted = [(p, y) for p, y in zip(preds.tolist(), labels.tolist(), strict=True) if y != 1]
    hand_asr = sum(p == 1 for p, _ in counted) / len(counted)
    assert abs(ba.compute().item() - hand_ba) < 1e-6
    assert abs(asr.compute().item() - hand_asr) < 1e-6


def test_a_rate_over_no_sample_is_nan_not_zero() -> None:
    with pytest.warns(UserWarning, match="called before the ``update``"):
        assert BenignAccuracy().compute().isnan()
    asr = AttackSuccessRate()
    asr.update(torch.tensor([0, 0]), torch.tensor([2, 2]), torch.tensor([2, 2]))  # every image already of the target
    assert asr.total == 0 and asr.compute().isnan()


@pytest.mark.parametrize(
    ("preds", "labels", "message"),
    [
        (torch.zeros(4, 1, dtype=torch.long), torch.zeros(4, dtype=torch.long), r"preds must be a \[N\] tensor"),
        (torch.zeros(4, 10), torch.zeros(4, dtype=torch.long), r"preds must be a \[N\] tensor .*float32"),
        (torch.zeros(4, dtype=torch.long), torch.zeros(3, dtype=torch.long), "different lengths"),
    ],
)
def test_inputs_that_would_broadcast_or_are_not_classes_are_refused(preds, labels, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BenignAccuracy().update(preds, labels)
    with pytest.raises(ValueError, match=message):
        AttackSuccessRate().update(preds, labels, torch.zeros_like(labels))


def test_robust_accuracy_counts_true_classes_of_poisoned_non_target_images() -> None:
    target = torch.full((6,), 2)
    labels = torch.tensor([0, 1, 2, 3, 2, 1])  # two samples are class 2: not counted
    preds = torch.tensor([0, 2, 2, 3, 1, 0])  # counted: 0 right, 1 -> target, 3 right, 1 wrong
    correct, total = robust_accuracy_counts(preds, labels, target)
    assert (correct.item(), total.item()) == (2, 4)


def test_robust_accuracy_of_images_of_unknown_class_is_not_measured_not_zero() -> None:
    # A triggered_root folder gives its images the label UNLABELED (-1): they count for ASR, never for RA.
    preds, labels, target = torch.tensor([0, 2, 1]), torch.full((3,), -1), torch.full((3,), 2)
    ra = RobustAccuracy()
    ra.update(preds, labels, target)
    assert ra.total == 0 and ra.compute().isnan()
    assert attack_success_counts(preds, labels, target)[1].item() == 3
    mixed = robust_accuracy_counts(torch.tensor([0, 1, 0]), torch.tensor([0, -1, 1]), target)
    assert (mixed[0].item(), mixed[1].item()) == (1, 2)


@pytest.mark.parametrize(
    ("rates", "expected"),
    [
        # (undefended BA, undefended ASR, defended BA, defended ASR): (max(0, dASR) - max(0, dBA) + 1) / 2
        ((0.98, 1.00, 0.95, 0.05), (0.95 - 0.03 + 1) / 2),
        ((0.90, 0.80, 0.95, 0.00), (0.80 - 0.00 + 1) / 2),  # a gain in BA counts as 0
        ((0.98, 0.50, 0.88, 0.70), (0.00 - 0.10 + 1) / 2),  # a rise in ASR counts as 0
        ((0.98, 1.00, 0.98, 1.00), 0.5),  # nothing removed, nothing lost
        ((0.98, 1.00, 0.98, 0.00), 1.0),
        ((0.98, 0.00, 0.00, 0.00), 0.01),
    ],
)
def test_defense_effectiveness_rating_agrees_with_hand_values(rates: tuple[float, ...], expected: float) -> None:
    assert defense_effectiveness_rating(*rates).item() == pytest.approx(expected, abs=1e-6)


def test_defense_effectiveness_rating_is_nan_when_a_rate_was_not_measured() -> None:
    assert defense_effectiveness_rating(0.98, float("nan"), 0.97, float("nan")).isnan()
    der = DefenseEffectivenessRating()
    der.update(torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([0, 1]))  # clean images only: no ASR
    assert der.compute().isnan()


def test_der_metric_counts_both_classifiers_on_the_same_batches() -> None:
    """Victim: BA 4/4, ASR 3/3; defended: BA 3/4, ASR 1/3; DER = (2/3 - 1/4 + 1) / 2."""
    der = DefenseEffectivenessRating()
    labels = torch.tensor([0, 1, 2, 3])
    der.update(torch.tensor([0, 1, 2, 0]), labels, labels)
    poisoned_labels, targets = torch.tensor([1, 2, 3, 0]), torch.zeros(4, dtype=torch.long)  # the 0 is not counted
    der.update(torch.tensor([0, 2, 3, 0]), torch.zeros(4, dtype=torch.long), poisoned_labels, targets)
    assert der.compute().item() == pytest.approx((2 / 3 - 1 / 4 + 1) / 2, abs=1e-6)


def _batches(seed: int) -> list[tuple[torch.Tensor, ...]]:
    """Three clean and three poisoned batches of (defended preds, victim preds, labels[, targets]), odd sizes."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for size in (7, 5, 9):
        batches.append(tuple(torch.randint(0, 4, (size,), generator=generator) for _ in range(3)))
    for size in (6, 11, 3):
        preds, victim_preds, labels = (torch.randint(0, 4, (size,), generator=generator) for _ in range(3))
        batches.append((preds, victim_preds, labels, torch.full((size,), 1)))
    return batches


def _rates(batches: list[tuple[torch.Tensor, ...]]) -> dict[str, float]:
    """RA and any-class ASR of the defended predictions and DER, from a fresh metric each, over ``batches``."""
    ra, any_class, der = RobustAccuracy(), AnyClassAttackSuccessRate(4), DefenseEffectivenessRating()
    for batch in batches:
        der.update(*batch)
        if len(batch) == 4:
            ra.update(batch[0], batch[2], batch[3])
            any_class.update(batch[0], batch[2])
    return {"ra": ra.compute().item(), "any_class_asr": any_class.compute().item(), "der": der.compute().item()}


def _metric_worker(rank: int, port: int, batches, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        results[rank] = _rates(batches[rank::2])  # each process sees every other batch
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_give_the_ra_any_class_asr_and_der_of_one_process_that_saw_every_batch() -> None:
    batches = _batches(seed=3)
    single = _rates(batches)
    results = mp.Manager().dict()
    mp.spawn(_metric_worker, args=(free_port(), batches, results), nprocs=2, join=True)
    for rank in range(2):
        assert results[rank] == pytest.approx(single, abs=1e-6)
    # The check has teeth: one process's half alone gives other rates, each of them.
    half = _rates(batches[0::2])
    assert all(half[rate] != pytest.approx(single[rate], abs=1e-6) for rate in single)


def test_any_class_asr_agrees_with_hand_count() -> None:
    # Triggered images of true classes 0, 0, 1, 1, 2, 2, 3 and what a classifier says on them.
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3])
    preds = torch.tensor([2, 0, 2, 2, 2, 1, 2])
    hits, total = any_class_attack_counts(preds, labels, num_classes=4)
    # Class 2 gets 4 of the 5 images not of class 2 (the two of class 2 do not count, one of them said 2);
    # class 0 gets none of its 5 others, class 1 one of 5, class 3 none of 6.
    assert hits.tolist() == [0, 1, 4, 0]
    assert total.tolist() == [5, 5, 5, 6]
    metric = AnyClassAttackSuccessRate(num_classes=4)
    metric.update(preds, labels)
    assert metric.compute().item() == pytest.approx(4 / 5)
    assert metric.per_class().tolist() == pytest.approx([0.0, 0.2, 0.8, 0.0])


def test_a_defense_that_sends_every_triggered_image_to_one_other_class_has_asr_0_and_any_class_asr_1() -> None:
    # The trigger still works, but lands in class 7 where the attack's target is 0 (a remapped target class).
    labels = torch.arange(1, 10).repeat(3)
    sent_to_seven = torch.where(labels == 7, labels, torch.tensor(7))  # images of class 7 say 7 anyway
    asr, any_class = AttackSuccessRate(), AnyClassAttackSuccessRate(num_classes=10)
    asr.update(sent_to_seven, labels, torch.zeros_like(labels))
    any_class.update(sent_to_seven, labels)
    assert asr.compute().item() == 0.0
    assert any_class.compute().item() == 1.0


def test_any_class_asr_is_at_least_the_asr_and_ignores_images_of_unknown_class() -> None:
    generator = torch.Generator().manual_seed(0)
    labels, preds = torch.randint(0, 5, (200,), generator=generator), torch.randint(0, 5, (200,), generator=generator)
    targets = torch.full_like(labels, 3)
    asr, any_class = AttackSuccessRate(), AnyClassAttackSuccessRate(num_classes=5)
    asr.update(preds, labels, targets)
    any_class.update(preds, labels)
    assert any_class.compute().item() >= asr.compute().item()
    unknown = AnyClassAttackSuccessRate(num_classes=5)
    unknown.update(preds, torch.full_like(labels, -1))  # a folder of triggered images: true classes unknown
    assert unknown.compute().isnan()
    with_unknown = AnyClassAttackSuccessRate(num_classes=5)
    with_unknown.update(torch.cat([preds, preds]), torch.cat([labels, torch.full_like(labels, -1)]))
    assert with_unknown.compute().item() == any_class.compute().item()


def test_any_class_asr_refuses_predictions_outside_the_classes() -> None:
    with pytest.raises(ValueError, match=r"classes in \[0, 3\)"):
        any_class_attack_counts(torch.tensor([0, 3]), torch.tensor([1, 1]), num_classes=3)
