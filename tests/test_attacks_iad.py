"""IAD, the training-controlled attack: its networks, its training batches, and its life in a victim checkpoint."""

from pathlib import Path

import pytest
import torch
from torch import nn

from datamodules.datasets import ImageTensorDataset, PoisonedTestSet
from refine_pl.attacks import InputAwareDynamic, attack_from_spec, attack_record
from refine_pl.attacks.input_aware import diversity_loss, sharpen
from refine_pl.cli import cli_main
from refine_pl.errors import ConfigError
from refine_pl.weights import read_weights_file
from tests.conftest import QUIET, REFINE_JOB, VICTIM_CONFIG

IAD_CONFIG = "configs/attacks/iad.yaml"


def _prepared(channels: int = 1, **overrides) -> tuple[InputAwareDynamic, ImageTensorDataset]:
    generator = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (256, channels, 12, 12), dtype=torch.uint8, generator=generator)
    data = ImageTensorDataset(images, torch.arange(256) % 4)
    attack = InputAwareDynamic(**{"mask_epochs": 2, "width": 4, "seed": 1, **overrides})
    attack.prepare(data, data.labels, num_classes=4)
    return attack, data


@pytest.mark.parametrize(("channels", "sharp_mask"), [(1, True), (3, True), (1, False)])
def test_every_image_gets_its_own_trigger_inside_its_mask(channels: int, sharp_mask: bool) -> None:
    attack, data = _prepared(channels, sharp_mask=sharp_mask)
    images = torch.stack([data[i][0] for i in range(16)])
    networks = attack.networks()
    optimizer = torch.optim.Adam(networks["pattern"].parameters(), lr=0.01)
    for _ in range(10):  # the diversity loss alone, as in the victim's training steps
        optimizer.zero_grad()
        attack.training_batch(images, data.labels[:16], nn.Identity())[2].backward()
        optimizer.step()
    with torch.no_grad():
        patterns, masks = networks["pattern"](images), networks["mask"](images)
    if sharp_mask:
        masks = sharpen(masks)
    poisoned = attack.apply(images)
    assert torch.allclose(poisoned, images + masks * (patterns - images))
    assert ((poisoned - images).abs() <= masks * 1.0 + 1e-6).all()  # changes only where the mask allows
    assert ((patterns[0] - patterns[1]).abs().mean() > 1e-3) and ((masks[0] - masks[1]).abs().mean() > 1e-4)
    assert masks.mean() < 0.5  # the norm loss pulled the masks down from their initial ~0.5
    assert torch.equal(attack.apply(images), poisoned)  # deterministic


def test_the_sharp_mask_is_a_steep_step_at_one_half() -> None:
    # The authors' form: a mask pixel either takes the pattern's value or keeps the image's (the blends of the test
    # above use the sharpened masks).
    values = sharpen(torch.tensor([0.0, 0.4, 0.45, 0.5, 0.55, 0.6, 1.0]))
    assert values.tolist() == pytest.approx([0.0, 0.018, 0.1192, 0.5, 0.8808, 0.982, 1.0], abs=1e-4)


def test_the_diversity_loss_has_finite_gradients_where_two_masks_are_equal() -> None:
    images = torch.rand(2, 1, 8, 8)
    raw = torch.zeros(2, 1, 8, 8, requires_grad=True)
    masks = sharpen(raw)  # both exactly 0 after the step
    loss = diversity_loss(images[:1], images[1:], masks[:1], masks[1:])
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(raw.grad).all()


def test_same_seed_same_networks_and_training_controlled_flag() -> None:
    first, data = _prepared()
    second, _ = _prepared()
    images = torch.stack([data[i][0] for i in range(4)])
    assert torch.equal(first.apply(images), second.apply(images))
    assert InputAwareDynamic.training_controlled and not attack_from_spec({"name": "badnets"}).training_controlled
    with pytest.raises(ConfigError, match="no trigger networks yet"):
        InputAwareDynamic().apply(images)


def test_training_batch_mixes_own_trigger_cross_trigger_and_clean_samples() -> None:
    attack, data = _prepared(poison_rate=0.25, cross_rate=0.25)
    images = torch.stack([data[i][0] for i in range(16)])
    labels = data.labels[:16]
    inputs, targets, loss = attack.training_batch(images, labels, nn.Identity())
    assert inputs.shape == images.shape and torch.equal(targets[:4], torch.zeros(4, dtype=torch.long))
    assert torch.equal(targets[4:], labels[4:])  # cross samples and clean samples keep their labels
    assert torch.equal(inputs[8:], images[8:]) and not torch.equal(inputs[:8], images[:8])
    with torch.no_grad():
        assert torch.allclose(inputs[:4], attack.apply(images[:4]), atol=1e-6)
        networks = attack.networks()
        others = images.roll(1, 0)[4:8]
        cross = images[4:8] + sharpen(networks["mask"](others)) * (networks["pattern"](others) - images[4:8])
        assert torch.allclose(inputs[4:8], cross, atol=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in networks["pattern"].parameters())
    assert all(p.grad is None and not p.requires_grad for p in networks["mask"].parameters())  # frozen mask
    assert [group["lr"] for group in attack.parameter_groups()] == [attack.generator_lr]


def test_spec_and_learned_networks_round_trip_through_a_checkpoint_state() -> None:
    attack, data = _prepared(channels=3)
    rebuilt = attack_from_spec(attack_record(attack))
    original, copy = PoisonedTestSet(data, attack), PoisonedTestSet(data, rebuilt)
    assert all(torch.equal(original[i][0], copy[i][0]) for i in range(len(original)))
    with pytest.raises(ConfigError, match="do not fit width"):
        attack_from_spec({**attack_record(attack), "init_args": {**attack.spec()["init_args"], "width": 8}})


@pytest.mark.slow
def test_victim_training_with_iad_and_refine_rebuilding_its_poisoned_test_set(tmp_path: Path) -> None:
    # Stopped after its first epoch (max_steps) of a 2-epoch schedule, as an interrupted run, so that it resumes.
    short = [
        "--trainer.max_epochs", "2", "--trainer.max_steps", "3",
        "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1",
        "--data.init_args.attack.init_args.mask_epochs", "1", "--data.init_args.attack.init_args.width", "4",
        "--trainer.default_root_dir", str(tmp_path / "victim"), *QUIET,
    ]  # fmt: skip
    victim = cli_main(["fit", "--config", VICTIM_CONFIG, "--config", IAD_CONFIG, *short])
    attack = victim.datamodule.attack
    generator_group = victim.trainer.optimizers[0].param_groups[1]  # the victim optimised the pattern network
    assert generator_group["initial_lr"] == attack.generator_lr  # before the config's cosine schedule steps it
    assert all(victim.trainer.optimizers[0].state[p]["step"] == 3 for p in generator_group["params"])
    assert victim.model.attack_networks is attack.networks()
    checkpoint = tmp_path / "victim" / "checkpoints" / "last.ckpt"
    content = read_weights_file(checkpoint)  # weights_only=True
    assert not any(key.startswith("attack_networks") for key in content.state_dict)
    assert content.attack_spec["name"] == "iad" and content.attack_spec["state"]["in_channels"] == 1

    refine = cli_main(
        ["fit", *REFINE_JOB, "--model.init_args.victim_checkpoint", str(checkpoint),
         "--trainer.fast_dev_run", "true", "--trainer.default_root_dir", str(tmp_path / "refine"), *QUIET]
    )  # fmt: skip
    ours, theirs = victim.datamodule.test_dataloader()[1].dataset, refine.datamodule.test_dataloader()[1].dataset
    assert len(ours) == len(theirs) == 900
    assert all(torch.equal(ours[i][0], theirs[i][0]) for i in range(0, 900, 37))

    longer = [*short[4:], "--trainer.max_epochs", "2", "--ckpt_path", str(checkpoint)]
    resumed = cli_main(["fit", "--config", VICTIM_CONFIG, "--config", IAD_CONFIG, *longer])
    assert resumed.trainer.current_epoch == 2
