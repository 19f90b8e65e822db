"""The detector of triggered inputs: its score and label-free threshold, STRIP's entropy, and where the threshold goes
(the defended file, ``refine-pl-predict``'s CSV, the report).
"""

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import Tensor, nn

from callbacks import DefenseReport, ExportDefendedClassifier
from refine_pl.detection import (
    SCORE,
    calibrate_detector,
    detection_metrics,
    detection_score,
    flag,
    label_free_threshold,
    prediction_entropy,
    strip_entropy,
    superimpose,
)
from refine_pl.export import export_defended, read_detector
from refine_pl.predict import main as predict_main
from tests.conftest import benign_data, quiet_trainer, tiny_refine_module


def _logits(classes: Tensor, confidence: float, num_classes: int = 10) -> Tensor:
    """Logits whose softmax puts ``confidence`` on ``classes`` and the rest evenly on the other classes."""
    rest = (1 - confidence) / (num_classes - 1)
    probabilities = torch.full((len(classes), num_classes), rest)
    probabilities[torch.arange(len(classes)), classes] = confidence
    return probabilities.log()


def test_the_score_is_near_zero_where_both_models_agree_and_high_where_the_victim_is_sure_of_another_class() -> None:
    truth = torch.arange(20) % 10
    clean = detection_score(_logits(truth, 0.95), _logits(truth, 0.9))
    target = torch.zeros(20, dtype=torch.long)
    triggered = detection_score(_logits(target, 0.99), _logits(truth.clamp(min=1), 0.9))
    # KL(p_f || p_D) by hand for one triggered row: victim 0.99 on class 0, defended 0.1/9 on it.
    victim, defended = _logits(target, 0.99)[0].exp(), _logits(truth.clamp(min=1), 0.9)[0].exp()
    assert triggered[0] == pytest.approx(float((victim * (victim / defended).log()).sum()), rel=1e-5)
    assert clean.max() < 0.05 < 3 < triggered.min()
    threshold = label_free_threshold(clean, 0.05)
    assert not flag(clean, threshold).any() and flag(triggered, threshold).all()
    # A victim that is unsure of its class scores lower than a sure one with the same defended answer.
    unsure = detection_score(_logits(target, 0.3), _logits(truth.clamp(min=1), 0.9))
    assert bool((unsure < triggered).all())
    with pytest.raises(ValueError, match="logits"):
        detection_score(torch.zeros(3, 10), torch.zeros(3, 9))


def test_the_label_free_threshold_holds_its_false_positive_rate_on_new_benign_images_within_sampling_error() -> None:
    generator = torch.Generator().manual_seed(0)
    fresh = torch.empty(200_000).exponential_(generator=generator)
    rates = []
    for _ in range(300):  # 300 calibrations on 400 benign scores each, like a run's held-out images
        benign = torch.empty(400).exponential_(generator=generator)
        rates.append(float(flag(fresh, label_free_threshold(benign, 0.01)).double().mean()))
    mean = sum(rates) / len(rates)
    # The 4th largest of 400 is exceeded with probability 4 / 401 = 0.00998 on average (one calibration: sd 0.005);
    # the 5th largest (the naive 99th percentile's neighbour) would give 0.0125, outside this band.
    assert 0.0090 < mean < 0.0110
    assert label_free_threshold(torch.tensor([3.0, 1.0, 2.0]), 0.01) == 3.0  # too few images: the largest
    with pytest.raises(ValueError, match="false-positive rate"):
        label_free_threshold(torch.ones(5), 0.0)
    with pytest.raises(ValueError, match="finite"):
        label_free_threshold(torch.tensor([1.0, math.nan]))


class _Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.randn(4, 2 * 3 * 3, generator=torch.Generator().manual_seed(3)) * 3

    def forward(self, images: Tensor) -> Tensor:
        return images.flatten(1) @ self.weight.T


def test_strip_entropy_equals_the_hand_computation() -> None:
    victim = _Linear()
    generator = torch.Generator().manual_seed(1)
    images, benign = torch.rand(3, 2, 3, 3, generator=generator), torch.rand(5, 2, 3, 3, generator=generator)
    expected = []
    for image in images:
        entropies = []
        for overlay in benign:
            blended = torch.clamp(image + overlay, 0, 1)  # both at weight 1, as STRIP's cv2.addWeighted(., 1, ., 1)
            p = victim(blended[None])[0].double().softmax(0)
            entropies.append(-sum(float(q) * math.log2(float(q)) for q in p if q > 0))
        expected.append(sum(entropies) / len(entropies))
    assert strip_entropy(victim, images, benign, chunk=7).tolist() == pytest.approx(expected, rel=1e-4)
    assert superimpose(images, benign).shape == (3, 5, 2, 3, 3)
    assert prediction_entropy(torch.zeros(1, 8)).item() == pytest.approx(3.0)  # uniform over 8 classes: 3 bits


def test_the_metrics_are_torchmetrics_auroc_and_the_best_tpr_within_the_false_positive_rate() -> None:
    clean = torch.arange(100, dtype=torch.float32)  # 0..99
    triggered = torch.tensor([97.5, 150.0, 200.0, 50.5])
    metrics = detection_metrics(clean, triggered)
    # AUROC: pairs (triggered > clean) / all pairs = (98 + 100 + 100 + 51) / 400; scores far above 1, which
    # torchmetrics alone would squash through a sigmoid into ties.
    assert metrics["auroc"] == pytest.approx(349 / 400)
    assert metrics["tpr_at_1"] == pytest.approx(0.5)  # 2 clean images above 97.5: only 150 and 200 within 1 %
    assert metrics["tpr_at_5"] == pytest.approx(0.75)


@pytest.fixture
def calibrated_file(untrained_victim: Path, tmp_path: Path) -> tuple[Path, dict]:
    module = tiny_refine_module(untrained_victim).eval()
    benign = torch.rand(150, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    calibration = calibrate_detector(module.defended, [benign[:70], benign[70:]], fpr=0.05)
    return export_defended(module.defended, 28, tmp_path / "defended.safetensors", detector=calibration), calibration


def _images(folder: Path, count: int) -> Path:
    generator = torch.Generator().manual_seed(4)
    folder.mkdir()
    for index in range(count):
        pixels = (torch.rand(28, 28, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels, mode="L").save(folder / f"{index}.png")
    return folder


def test_the_threshold_travels_in_the_defended_file_and_flags_the_predict_csv(
    calibrated_file: tuple[Path, dict], untrained_victim: Path, tmp_path: Path
) -> None:
    path, calibration = calibrated_file
    assert calibration["score"] == SCORE and calibration["benign_images"] == 150
    assert calibration["benign_fpr"] <= 0.05 and read_detector(path) == calibration
    images = _images(tmp_path / "images", 12)
    predict_main([str(path), str(images), "--output", str(tmp_path / "p.csv")])
    with (tmp_path / "p.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {"score", "flagged", "disagree"} <= set(rows[0]) and len(rows) == 12
    assert all(r["flagged"] == str(float(r["score"]) > calibration["threshold"]).lower() for r in rows)
    median = sorted(float(r["score"]) for r in rows)[6]
    predict_main([str(path), str(images), "--output", str(tmp_path / "q.csv"), "--threshold", str(median)])
    with (tmp_path / "q.csv").open(newline="") as handle:
        assert sum(r["flagged"] == "true" for r in csv.DictReader(handle)) == 5  # 12 distinct scores: 5 above the 7th
    # A file without a calibration (or with one for another score) predicts with an empty flagged column.
    module = tiny_refine_module(untrained_victim).eval()
    bare = export_defended(module.defended, 28, tmp_path / "bare.safetensors", detector={**calibration, "score": "x"})
    assert read_detector(bare) is None
    predict_main([str(bare), str(images), "--output", str(tmp_path / "r.csv")])
    with (tmp_path / "r.csv").open(newline="") as handle:
        assert {r["flagged"] for r in csv.DictReader(handle)} == {""}


def test_a_run_records_the_threshold_chosen_on_its_held_out_images_in_the_file_and_the_report(
    victim_checkpoint: Path, tmp_path: Path
) -> None:
    module, data = tiny_refine_module(victim_checkpoint), benign_data(shuffled_labels=False)
    data.use_recorded_attack(module.victim_record)
    callbacks = [DefenseReport(), ExportDefendedClassifier()]
    trainer = quiet_trainer(tmp_path, max_steps=1, limit_val_batches=0, callbacks=callbacks)
    trainer.fit(module, datamodule=data)
    trainer.test(module, datamodule=data)
    report = json.loads((tmp_path / "report.json").read_text())
    detector = report["detector"]
    assert detector["benign_images"] == len(data.val_set) == 400 and detector["target_fpr"] == 0.01
    assert detector["benign_fpr"] <= 0.01 and detector["test_images"] == len(data.test_set)
    assert detector["test_triggered_images"] == len(trainer.test_dataloaders[1].dataset)
    assert 0 <= detector["test_fpr"] <= 1 and 0 <= detector["test_tpr"] <= 1
    assert read_detector(tmp_path / "defended.safetensors")["threshold"] == detector["threshold"]
    assert "Detector of triggered inputs" in (tmp_path / "report.md").read_text()
