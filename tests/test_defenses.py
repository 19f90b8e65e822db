"""The defenses: each transform's geometry or arithmetic, each ablation is what it says, the autoencoder learns from
unlabeled images only, and every registered defense runs through the CLI and reports BA / ASR / RA / DER.
"""

import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pytorch_lightning import seed_everything

from datamodules import RefineDataModule
from refine_pl import ConfigError, RefineLitModule
from refine_pl.cli import checked_ckpt_path, cli_main
from refine_pl.defenses import (
    DEFENSES,
    AutoencoderDefense,
    BitDepthReduction,
    BTIDBFPurification,
    BTIDBFUnlearning,
    ConvAutoencoder,
    MedianFilter,
    ShrinkPad,
    TrainingFreeDefense,
)
from refine_pl.export import export_defended
from refine_pl.pipeline import config_flags
from tests.conftest import MNIST_FACTS, QUIET, REFINE_CONFIGS, benign_data, quiet_trainer, tiny_refine_module


@pytest.mark.parametrize(("side", "pad", "count"), [(28, 4, 200), (32, 4, 200), (8, 1, 200), (224, 28, 20)])
def test_shrinkpad_pads_back_a_resized_copy_at_offsets_up_to_pad(side: int, pad: int, count: int) -> None:
    images = torch.rand(count, 2, side, side, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.5  # no zero pixel
    shrinkpad = ShrinkPad(2)
    assert shrinkpad.padding(side) == pad
    out = shrinkpad(images)
    assert out.shape == images.shape
    small = F.interpolate(images, size=(side - pad, side - pad), mode="bilinear", antialias=True)
    offsets = set()
    for image, resized in zip(out, small, strict=True):
        rows = torch.nonzero(image[0].sum(1)).flatten()
        columns = torch.nonzero(image[0].sum(0)).flatten()
        top, left = int(rows[0]), int(columns[0])
        assert len(rows) == len(columns) == side - pad  # one block of the shrunk size, zeros around it
        torch.testing.assert_close(image[:, top : top + side - pad, left : left + side - pad], resized)
        offsets.add((top, left))
    assert offsets <= {(t, s) for t in range(pad + 1) for s in range(pad + 1)}
    if pad <= 4:  # 200 uniform draws of 0..pad miss a value with probability below 1e-18
        assert {t for t, _ in offsets} == {s for _, s in offsets} == set(range(pad + 1))


def test_shrinkpad_offsets_follow_the_seed() -> None:
    images = torch.rand(16, 1, 28, 28)
    assert torch.equal(ShrinkPad(1, seed=3)(images), ShrinkPad(1, seed=3)(images))
    assert not torch.equal(ShrinkPad(1, seed=3)(images), ShrinkPad(1, seed=4)(images))
    shrinkpad = ShrinkPad(1, seed=3)
    assert not torch.equal(shrinkpad(images), shrinkpad(images))  # the generator moves on: new offsets per batch


def test_bit_depth_reduction_rounds_to_evenly_spaced_levels() -> None:
    images = torch.tensor([0.0, 0.2, 0.49, 0.51, 0.8, 1.0]).view(1, 1, 2, 3)
    assert BitDepthReduction(1, bits=1)(images).flatten().tolist() == [0, 0, 0, 1, 1, 1]
    three = BitDepthReduction(1, bits=2)(images).flatten()
    torch.testing.assert_close(three, torch.tensor([0, 1 / 3, 1 / 3, 2 / 3, 2 / 3, 1]))
    random = torch.rand(4, 3, 8, 8)
    torch.testing.assert_close(BitDepthReduction(3, bits=8)(random), torch.round(random * 255) / 255)
    assert BitDepthReduction(3, bits=5)(random).unique().numel() <= 32
    with pytest.raises(ConfigError, match="1 to 8 bits"):
        BitDepthReduction(1, bits=0)


def _median_reference(image: np.ndarray, k: int) -> np.ndarray:
    """Per-pixel median of the k x k window from row i - (k - 1) // 2, reflected at the borders (lower middle)."""
    before, after = (k - 1) // 2, k // 2
    padded = np.pad(image, ((before, after), (before, after)), mode="reflect")
    out = np.empty_like(image)
    for i in range(image.shape[0]):
        for j in range(image.shape[1]):
            values = np.sort(padded[i : i + k, j : j + k].flatten())
            out[i, j] = values[(len(values) - 1) // 2]
    return out


@pytest.mark.parametrize("k", [2, 3])
def test_median_filter_agrees_with_a_per_pixel_reference(k: int) -> None:
    images = torch.rand(2, 3, 7, 9, generator=torch.Generator().manual_seed(k))
    out = MedianFilter(3, kernel_size=k)(images)
    for b in range(2):
        for c in range(3):
            expected = torch.from_numpy(_median_reference(images[b, c].numpy(), k))
            torch.testing.assert_close(out[b, c], expected)


def test_fixed_transforms_refuse_images_of_another_channel_count() -> None:
    for transform in (ShrinkPad(3), BitDepthReduction(3, bits=4), MedianFilter(3), ConvAutoencoder(3)):
        with pytest.raises(ConfigError, match="built for 3-channel images got a tensor of shape"):
            transform(torch.rand(2, 1, 28, 28))


@pytest.mark.parametrize("side", [28, 30])
def test_autoencoder_keeps_the_shape_and_the_image_range(side: int) -> None:
    out = ConvAutoencoder(1, width=4)(torch.rand(3, 1, side, side))
    assert out.shape == (3, 1, side, side) and bool((out > 0).all() and (out < 1).all())


def _fit(module: RefineLitModule, datamodule: RefineDataModule, steps: int, root: Path) -> None:
    trainer = quiet_trainer(root, max_steps=steps, limit_val_batches=0, enable_checkpointing=False)
    trainer.fit(module, datamodule=datamodule)


def test_the_autoencoder_learns_from_unlabeled_images_only(untrained_victim: Path, tmp_path: Path) -> None:
    """Two runs whose benign sets differ only in their labels end with bit-identical autoencoders; the victim and
    the identity output map stay as they were.
    """
    weights = []
    for shuffled_labels in (False, True):
        seed_everything(0)
        datamodule = benign_data(shuffled_labels)
        module = AutoencoderDefense(
            victim_checkpoint=str(untrained_victim), **MNIST_FACTS, transform=partial(ConvAutoencoder, width=4)
        )
        victim_before = {k: v.clone() for k, v in module.victim.state_dict().items()}
        transform_before = {k: v.clone() for k, v in module.transform.state_dict().items()}
        _fit(module, datamodule, steps=2, root=tmp_path)
        assert any(not torch.equal(v, transform_before[k]) for k, v in module.transform.state_dict().items())
        assert all(torch.equal(v, victim_before[k]) for k, v in module.victim.state_dict().items())
        assert torch.equal(module.remap.permutation, torch.arange(10))
        weights.append(module.transform.state_dict())
    for key, value in weights[0].items():
        assert torch.equal(value, weights[1][key]), key


def test_the_autoencoder_loss_is_the_reconstruction_cross_entropy(untrained_victim: Path) -> None:
    module = AutoencoderDefense(
        victim_checkpoint=str(untrained_victim), **MNIST_FACTS, transform=partial(ConvAutoencoder, width=4)
    )
    images = torch.rand(5, 1, 28, 28)
    out = module.transform(images)
    expected = -(images * out.log() + (1 - images) * (1 - out).log()).mean()
    assert module.reconstruction_loss(images).item() == pytest.approx(expected.item(), rel=1e-5)


def _built(defense: str, victim: Path) -> RefineLitModule:
    """The model the CLI builds from ``defense``'s configs (merged after the MNIST REFINE job), without running."""
    configs = config_flags(DEFENSES[defense].configs(REFINE_CONFIGS))
    return cli_main([*configs, "--model.init_args.victim_checkpoint", str(victim)], run=False).model


def test_the_no_remap_ablation_leaves_every_class_in_place_and_keeps_the_losses(untrained_victim: Path) -> None:
    module, refine = _built("refine_no_remap", untrained_victim), _built("refine", untrained_victim)
    assert type(module) is RefineLitModule and torch.equal(module.remap.permutation, torch.arange(10))
    scores = torch.randn(4, 10)
    assert torch.equal(module.remap(scores), scores)
    images = torch.rand(3, 1, 28, 28)
    module.eval()
    with torch.no_grad():
        assert torch.equal(module(images), module.victim(module.transform(images)))
    assert (module.contrastive_weight, module.contrastive_loss.temperature) == (
        refine.contrastive_weight,
        refine.contrastive_loss.temperature,
    )
    assert not bool((refine.remap.permutation == torch.arange(10)).any())


def test_the_no_contrastive_ablation_has_weight_0_and_the_same_utility_loss(untrained_victim: Path) -> None:
    ablation, refine = _built("refine_no_contrastive", untrained_victim), _built("refine", untrained_victim)
    assert ablation.contrastive_weight == 0 and refine.contrastive_weight == 0.1
    ablation.transform.load_state_dict(refine.transform.state_dict())
    assert torch.equal(ablation.remap.permutation, refine.remap.permutation)
    images = torch.rand(8, 1, 28, 28)
    ablation_losses, refine_losses = ablation.refine_loss(images), refine.refine_loss(images)
    assert ablation_losses["utility"].item() == refine_losses["utility"].item()
    assert ablation_losses["loss"].item() == ablation_losses["utility"].item()
    assert refine_losses["loss"].item() > refine_losses["utility"].item()


def test_the_remap_only_ablation_is_reference_m_without_t(untrained_victim: Path) -> None:
    module, refine = _built("refine_remap_only", untrained_victim), _built("refine", untrained_victim)
    assert type(module) is TrainingFreeDefense and not module.trains
    assert torch.equal(module.remap.permutation, refine.remap.permutation)
    assert not list(module.trainable_parameters())
    images = torch.rand(6, 1, 28, 28)
    module.eval()
    with torch.no_grad():
        assert torch.equal(module(images).argmax(1), module.remap.permutation[module.victim(images).argmax(1)])


def test_export_refuses_a_remap_that_leaves_classes_in_place(untrained_victim: Path, tmp_path: Path) -> None:
    module = tiny_refine_module(untrained_victim, derange=False)
    with pytest.raises(ConfigError, match="leaves classes in place .* remove ExportDefendedClassifier"):
        export_defended(module.defended, 28, tmp_path / "defended.safetensors")
    assert not (tmp_path / "defended.safetensors").exists()


def test_a_training_free_defense_is_tested_without_a_checkpoint_and_never_fitted(tmp_path: Path) -> None:
    assert checked_ckpt_path("test", None, tmp_path, trains=False) is None
    assert checked_ckpt_path("validate", None, tmp_path, trains=False) is None
    with pytest.raises(ConfigError, match="nothing to train .* run `test`"):
        checked_ckpt_path("fit", None, tmp_path, trains=False)
    with pytest.raises(ConfigError, match="`test` without --ckpt_path would use untrained weights"):
        checked_ckpt_path("test", None, tmp_path, trains=True)


def _tiny(defense: str) -> list[str]:
    """Arguments that make ``defense`` small: a narrow U-Net or autoencoder, two training steps, few test batches."""
    module = DEFENSES[defense].module
    width = {
        RefineLitModule: ["transform", "base_width", "4"],
        AutoencoderDefense: ["transform", "width", "4"],
        BTIDBFUnlearning: ["generator", "base_width", "4"],
        BTIDBFPurification: ["generator", "base_width", "4"],
    }.get(module, [])
    settings = ["--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", "--trainer.limit_test_batches", "2"]
    if width:
        settings += [f"--model.init_args.{width[0]}.init_args.{width[1]}", width[2]]
    return [*settings, *QUIET]


@pytest.mark.slow
@pytest.mark.parametrize("defense", list(DEFENSES))
def test_every_defense_runs_through_the_cli_and_reports_every_rate(
    defense: str, victim_checkpoint: Path, tmp_path: Path
) -> None:
    entry = DEFENSES[defense]
    common = [
        *config_flags(entry.configs(REFINE_CONFIGS)),
        "--model.init_args.victim_checkpoint", str(victim_checkpoint),
        "--trainer.default_root_dir", str(tmp_path),
        *_tiny(defense),
    ]  # fmt: skip
    if entry.trains:
        with pytest.raises(ConfigError, match="`test` without --ckpt_path would use untrained weights"):
            cli_main(["test", *common])
        fit = cli_main(["fit", *common])
        assert fit.trainer.global_step == 2 and type(fit.model) is entry.module
        test = cli_main(["test", *common, "--ckpt_path", "last"])
    else:
        with pytest.raises(ConfigError, match="nothing to train"):
            cli_main(["fit", *common])
        assert not (tmp_path / "checkpoints").exists()
        test = cli_main(["test", *common])
        assert type(test.model) is entry.module
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["defense"] == defense and report["attack"] == "badnets"
    assert all(isinstance(report["no_defense"][key], float) for key in ("ba", "asr", "ra"))
    assert all(isinstance(report["defended"][key], float) for key in ("ba", "asr", "ra", "der"))
    logged = test.trainer.callback_metrics
    assert report["defended"]["der"] == pytest.approx(float(logged["test/der"]), abs=1e-6)
    assert report["defended"]["ra"] == pytest.approx(float(logged["test/ra"]), abs=1e-6)
    assert f"| {entry.label} |" in (tmp_path / "report.md").read_text()
