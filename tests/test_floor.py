"""The ASR floor: a clean reference model evaluated on the same poisoned test images as the victim."""

from pathlib import Path

import torch

from datamodules import RefineDataModule
from datamodules.datasets import PoisonedTestSet
from refine_pl.victims import load_victim
from tests.conftest import MNIST_FACTS, SmallDigits, fit_and_test_with_report, tiny_refine_module


def test_the_floor_is_the_clean_models_hand_counted_asr_and_is_kept_out_of_checkpoints(
    victim_checkpoint: Path, untrained_victim: Path, tmp_path: Path
) -> None:
    module = tiny_refine_module(victim_checkpoint, clean_reference=str(untrained_victim))
    data = RefineDataModule(SmallDigits(train_per_class=(4,) * 10, test_per_class=(9,) * 10), batch_size=16)
    trainer, report = fit_and_test_with_report(module, data, tmp_path)

    clean = load_victim(untrained_victim, **MNIST_FACTS).classifier
    poisoned = PoisonedTestSet(data.test_set, data.attack)
    images = torch.stack([poisoned[i][0] for i in range(len(poisoned))])
    with torch.no_grad():
        hits = int((clean(images).argmax(1) == data.attack.target_label).sum())
    assert len(poisoned) == 81  # 9 test images of each class but the target, 0
    assert report.report["clean_floor"]["asr"] == round(hits / 81, 6)
    assert report.report["clean_reference"] == str(untrained_victim)

    trainer.save_checkpoint(tmp_path / "refine.ckpt")
    checkpoint = torch.load(tmp_path / "refine.ckpt", weights_only=True)
    assert not any(
        key.startswith(("clean_reference.", "victim.", "defended.victim.")) for key in checkpoint["state_dict"]
    )
    restored = tiny_refine_module(victim_checkpoint, clean_reference=str(untrained_victim))
    restored.on_load_checkpoint(checkpoint)
    restored.load_state_dict(checkpoint["state_dict"])  # strict: the frozen models were put back from their files


def test_without_a_clean_reference_the_report_has_no_floor(victim_checkpoint: Path, tmp_path: Path) -> None:
    module = tiny_refine_module(victim_checkpoint)
    data = RefineDataModule(SmallDigits(train_per_class=(4,) * 10), batch_size=16)
    _, report = fit_and_test_with_report(module, data, tmp_path, limit_test_batches=1)
    assert report.report["clean_floor"] is None and "floor" not in (tmp_path / "report.md").read_text()
