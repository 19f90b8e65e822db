"""The GPU tier (``pytest -m gpu``): REFINE trains and is evaluated on CUDA as on the CPU."""

from pathlib import Path

import pytest
import torch

from datamodules import RefineDataModule
from tests.conftest import SmallDigits, quiet_trainer, tiny_refine_module

pytestmark = pytest.mark.gpu


def test_refine_trains_on_a_gpu_in_bf16_and_its_classes_agree_with_the_cpu(
    victim_checkpoint: Path, tmp_path: Path
) -> None:
    module = tiny_refine_module(victim_checkpoint)
    permutation = module.remap.permutation.clone()
    before = {key: value.clone() for key, value in module.transform.state_dict().items()}
    data = RefineDataModule(SmallDigits(train_per_class=(8,) * 10, test_per_class=(5,) * 10), batch_size=16)
    data.use_recorded_attack(module.victim_record)
    trainer = quiet_trainer(tmp_path, accelerator="gpu", devices=1, max_steps=3, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    assert module.uses_bf16() == torch.cuda.is_bf16_supported(including_emulation=False)
    assert torch.equal(module.remap.permutation.cpu(), permutation)
    transform = module.transform.state_dict()
    assert any(not torch.equal(value.cpu(), before[key]) for key, value in transform.items())
    assert all(torch.isfinite(value).all() for value in transform.values())

    images = torch.stack([data.test_set[i][0] for i in range(len(data.test_set))])
    module.eval()
    with torch.no_grad():
        on_gpu = module.cuda()(images.cuda()).argmax(1).cpu()
        on_cpu = module.cpu()(images).argmax(1)
    assert (on_gpu == on_cpu).float().mean() >= 0.95
