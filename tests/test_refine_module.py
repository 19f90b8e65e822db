from functools import partial
from pathlib import Path

import pytest
import torch
from pytorch_lightning import Trainer, seed_everything

from datamodules import EmbeddedMNIST, RefineDataModule
from refine_pl import ConfigError, RefineLitModule
from refine_pl.transform import UNet
from tests.conftest import MNIST_FACTS, benign_data, quiet_trainer, tiny_refine_module


def _fit(module: RefineLitModule, datamodule: RefineDataModule, steps: int, root: Path) -> Trainer:
    trainer = quiet_trainer(root, max_steps=steps, limit_val_batches=0, enable_checkpointing=False)
    trainer.fit(module, datamodule=datamodule)
    return trainer


def _refine_data() -> RefineDataModule:
    return RefineDataModule(EmbeddedMNIST(), batch_size=32, horizontal_flip=False)


def test_training_changes_only_the_transform(untrained_victim: Path, tmp_path: Path) -> None:
    module = tiny_refine_module(untrained_victim)
    victim_before = {k: v.clone() for k, v in module.victim.state_dict().items()}
    bn_before = module.victim.net[0][1].running_mean.clone()
    transform_before = {k: v.clone() for k, v in module.transform.state_dict().items()}
    permutation_before = module.remap.permutation.clone()

    trainer = _fit(module, _refine_data(), steps=3, root=tmp_path)

    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in module.transform.parameters()}
    for key, value in module.victim.state_dict().items():
        assert torch.equal(value, victim_before[key]), f"victim tensor {key} changed"
    assert torch.equal(module.victim.net[0][1].running_mean, bn_before)
    assert not module.victim.training
    assert any(not torch.equal(v, transform_before[k]) for k, v in module.transform.state_dict().items())
    assert torch.equal(module.remap.permutation, permutation_before)


def test_benign_labels_never_influence_training(untrained_victim: Path, tmp_path: Path) -> None:
    """Two runs whose benign sets differ only in their labels end with bit-identical transforms."""
    weights = []
    for shuffled_labels in (False, True):
        seed_everything(0)
        datamodule = benign_data(shuffled_labels)
        module = tiny_refine_module(untrained_victim)
        _fit(module, datamodule, steps=2, root=tmp_path)
        weights.append(module.transform.state_dict())
    for key, value in weights[0].items():
        assert torch.equal(value, weights[1][key]), key


def _restored(module: RefineLitModule, checkpoint: dict) -> RefineLitModule:
    """``module`` after loading ``checkpoint`` the way Lightning restores one: the hook, then the weights."""
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"])
    return module


@pytest.mark.parametrize(
    ("facts", "message"),
    [
        ({"image_size": 32}, r"fitted with image_size=28 but this run has image_size=32: pass "
         r"--data\.init_args\.source\.init_args\.image_size 28"),
        ({"mean": (0.5,)}, r"fitted with mean=\[0\.1307\] but this run has mean=\[0\.5\]: pass "
         r"--data\.init_args\.source\.init_args\.mean \[0\.1307\]"),
        ({"std": (0.5,)}, r"fitted with std=\[0\.3081\] but this run has std=\[0\.5\]"),
    ],
)  # fmt: skip
def test_a_checkpoint_is_refused_with_data_facts_other_than_it_was_fitted_with(
    untrained_victim: Path, tmp_path: Path, facts: dict, message: str
) -> None:
    # Bare weights: a victim that records no data facts of its own, so that only the checkpoint can tell.
    weights = tmp_path / "suspect.pt"
    torch.save(torch.load(untrained_victim, weights_only=True)["state_dict"], weights)

    def module(**changed) -> RefineLitModule:
        return tiny_refine_module(weights, victim_arch="small_cnn", **{**MNIST_FACTS, **changed})

    trainer = _fit(module(), _refine_data(), steps=1, root=tmp_path)
    trainer.save_checkpoint(tmp_path / "refine.ckpt")
    with pytest.raises(ConfigError, match=message) as error:
        module(**facts).on_load_checkpoint(torch.load(tmp_path / "refine.ckpt", weights_only=True))
    assert "\n" not in str(error.value)
    _restored(module(), torch.load(tmp_path / "refine.ckpt", weights_only=True))


def test_remap_survives_a_checkpoint_round_trip(untrained_victim: Path, tmp_path: Path) -> None:
    module = tiny_refine_module(untrained_victim, remap_seed=0)
    trainer = _fit(module, _refine_data(), steps=1, root=tmp_path)
    path = tmp_path / "refine.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)["state_dict"]
    assert torch.equal(saved["defended.remap.permutation"], module.remap.permutation)

    restored = tiny_refine_module(untrained_victim, remap_seed=123)  # would draw a different derangement
    assert not torch.equal(restored.remap.permutation, module.remap.permutation)
    _restored(restored, torch.load(path, weights_only=True))
    assert torch.equal(restored.remap.permutation, module.remap.permutation)
    images = torch.rand(4, 1, 28, 28)
    module.eval(), restored.eval()
    torch.testing.assert_close(restored(images), module(images))


def test_a_checkpoint_names_its_victim_instead_of_copying_it(
    untrained_victim: Path, victim_checkpoint: Path, tmp_path: Path
) -> None:
    module = tiny_refine_module(untrained_victim)
    trainer = _fit(module, _refine_data(), steps=1, root=tmp_path)
    trainer.save_checkpoint(tmp_path / "refine.ckpt")
    checkpoint = torch.load(tmp_path / "refine.ckpt", weights_only=True)
    assert not any(key.startswith(("victim.", "defended.victim.")) for key in checkpoint["state_dict"])
    assert checkpoint["victim"] == {"sha256": module.victim_record.sha256, "path": str(untrained_victim)}
    assert any(key.startswith("defended.transform.") for key in checkpoint["state_dict"])

    with pytest.raises(ConfigError, match="trained in front of the victim .* holds another model"):
        _restored(tiny_refine_module(victim_checkpoint), checkpoint)
    with pytest.raises(ConfigError, match="transform does not fit this run's: .*size mismatch"):
        _restored(tiny_refine_module(untrained_victim, transform=partial(UNet, base_width=8)), checkpoint)


def test_defended_prediction_is_the_remapped_victim_prediction_on_transformed_images(
    untrained_victim: Path,
) -> None:
    module = tiny_refine_module(untrained_victim).eval()
    images = torch.rand(6, 1, 28, 28)
    with torch.no_grad():
        victim_on_transformed = module.victim(module.transform(images)).argmax(1)
        assert torch.equal(module(images).argmax(1), module.remap.permutation[victim_on_transformed])


def test_an_optimizer_setting_torch_refuses_is_one_config_error_naming_the_flag(untrained_victim: Path) -> None:
    module = tiny_refine_module(untrained_victim, optimizer=partial(torch.optim.SGD, lr=-0.1))
    with pytest.raises(
        ConfigError,
        match=r"The optimizer refuses its settings \(Invalid learning rate: -0\.1\).*"
        r"--model\.init_args\.optimizer",
    ):
        module.configure_optimizers()
