"""REFINE in the loop: its surrogate defense, the victim's extra batch, its schedule and its life in a checkpoint."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from datamodules.datasets import ImageTensorDataset
from refine_pl.architectures import build_architecture
from refine_pl.attacks import BadNets, Blended, RefineInTheLoop, attack_from_spec, attack_record
from refine_pl.attacks import refine_in_loop as loop_module
from refine_pl.cli import cli_main
from refine_pl.configs import resolve_config
from refine_pl.errors import ConfigError
from refine_pl.weights import read_weights_file
from tests.conftest import QUIET, VICTIM_CONFIG

LOOP_CONFIG = "configs/attacks/refine_in_loop.yaml"
TINY = {"transform_steps": 3, "transform_width": 2, "transform_depth": 2, "transform_batch_size": 8}


def _data(num_classes: int = 4) -> ImageTensorDataset:
    images = torch.randint(0, 256, (64, 1, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    return ImageTensorDataset(images, torch.arange(64) % num_classes)


def _victim(num_classes: int = 4) -> nn.Module:
    torch.manual_seed(3)
    return build_architecture("small_cnn", num_classes, 1)  # has batch norm and dropout


def _prepared(num_classes: int = 4, **overrides) -> tuple[RefineInTheLoop, ImageTensorDataset]:
    data = _data(num_classes)
    attack = RefineInTheLoop(**{**TINY, "seed": 1, "clean_share": 0.5, "poison_rate": 0.25, **overrides})
    attack.prepare(data, data.labels, num_classes)
    return attack, data


def _batch(data: ImageTensorDataset, count: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([data[i][0] for i in range(count)]), data.labels[:count]


def test_the_loop_images_train_the_victim_and_never_the_transform() -> None:
    attack, data = _prepared(loop_rate=0.25)
    victim = _victim()
    images, labels = _batch(data)
    before = attack.training_batch(images, labels, victim)  # no T' yet: a plain in-batch backdoor
    assert len(before[0]) == 16 and torch.equal(before[1][:4], torch.zeros(4, dtype=torch.long))
    assert torch.equal(before[0][:4], BadNets(patch_size=3).apply(images[:4])) and torch.equal(
        before[0][4:], images[4:]
    )

    attack.train_round(victim, 0)
    inputs, targets, loss = attack.training_batch(images, labels, victim)
    transform, permutation = attack.transform, attack.remap.permutation
    assert len(inputs) == 16 + 8 and float(loss) == 0.0
    with torch.no_grad():
        expected = transform(torch.cat([attack.apply(images[:4]), images[12:]]))
    assert torch.allclose(inputs[16:], expected)
    # Through the surrogate's remap, the triggered loop images ask for the target and the clean ones for their class.
    remapped = attack.remap(F.one_hot(targets[16:], 4).float()).argmax(1)
    assert torch.equal(remapped, torch.cat([torch.zeros(4, dtype=torch.long), labels[12:]]))
    assert not bool((targets[16:20] == 0).any())  # a derangement moves the target: the victim class differs
    assert not torch.equal(permutation, torch.arange(4))

    victim.train()
    F.cross_entropy(victim(inputs[16:]), targets[16:]).backward()  # the loop images' term alone
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in victim.parameters())
    assert all(p.grad is None and not p.requires_grad for p in transform.parameters())
    assert attack.parameter_groups() == []  # nor does the victim's optimizer ever see T'


def test_the_transform_trains_through_the_frozen_victim_on_its_predictions_with_a_derangement(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    attack, _ = _prepared()
    victim = _victim().train()
    weights = {key: value.clone() for key, value in victim.state_dict().items()}
    calls = []
    objective = loop_module.refine_objective

    def spy(images, pseudo_labels, transform, classifier, remap, *args):
        calls.append((images, pseudo_labels, classifier.training, remap.permutation.clone()))
        assert not any(p.requires_grad for p in classifier.parameters())
        return objective(images, pseudo_labels, transform, classifier, remap, *args)

    monkeypatch.setattr(loop_module, "refine_objective", spy)
    split = {tuple(attack._clean_split[i][0].flatten()[:12].tolist()) for i in range(len(attack._clean_split))}
    with torch.random.fork_rng():
        torch.manual_seed(attack._derived_seed(1, 0))
        initial = loop_module.UNet(1, 2, 2)  # T' as the round drew it, before training
    attack.train_round(victim, 0)
    assert len(calls) == attack.transform_steps
    victim.eval()
    for images, pseudo_labels, was_training, permutation in calls:
        assert not was_training and len(images) == attack.transform_batch_size
        assert all(tuple(image.flatten()[:12].tolist()) in split for image in images)  # from the clean split
        with torch.no_grad():
            assert torch.equal(pseudo_labels, victim(images).argmax(1))  # the victim's, never the data's labels
        assert torch.equal(permutation, attack.remap.permutation)
    assert not bool((attack.remap.permutation == torch.arange(4)).any())  # a derangement: no fixed point
    victim.train()
    assert all(torch.equal(value, weights[key]) for key, value in victim.state_dict().items())  # frozen, BN included
    assert all(p.requires_grad and p.grad is None for p in victim.parameters())  # flags and gradients restored
    trained = attack.transform.state_dict()
    assert any(not torch.equal(trained[key], value) for key, value in initial.state_dict().items() if "weight" in key)
    assert 0.0 <= attack.agreement <= 1.0 and attack.round == 0


def test_the_victim_mode_is_restored_after_a_round() -> None:
    attack, _ = _prepared()
    victim = _victim().train()
    attack.train_round(victim, 0)
    assert victim.training
    victim.eval()
    attack.train_round(victim, 1)
    assert not victim.training


def test_a_fresh_transform_and_remap_on_schedule_and_the_same_ones_for_the_same_seed() -> None:
    attack, _ = _prepared(num_classes=10, warmup_epochs=2, refresh_epochs=3)
    twin, _ = _prepared(num_classes=10, warmup_epochs=2, refresh_epochs=3)
    victim = _victim(10)
    assert [attack.scheduled_round(epoch) for epoch in range(9)] == [None, None, 0, None, None, 1, None, None, 2]
    seen = []
    for epoch in range(7):
        attack.on_train_epoch_start(victim, epoch)
        seen.append((attack.round, attack.transform, None if attack.remap is None else attack.remap.permutation))
    assert [round_number for round_number, _, _ in seen] == [None, None, 0, 0, 0, 1, 1]
    assert seen[2][1] is seen[4][1] and seen[5][1] is not seen[4][1] and seen[6][1] is seen[5][1]
    assert not torch.equal(seen[2][2], seen[5][2])  # a fresh derangement in the next round
    attack.on_train_epoch_start(victim, 5)  # a resumed epoch whose round has trained: kept
    assert attack.transform is seen[5][1]
    for epoch in (2, 5):  # the same seed, round and victim: the same T' and M'
        twin.on_train_epoch_start(victim, epoch)
        _, transform, permutation = seen[epoch]
        assert torch.equal(twin.remap.permutation, permutation)
        ours, theirs = transform.state_dict(), twin.transform.state_dict()
        assert all(torch.equal(ours[key], theirs[key]) for key in ours)
    first, second = seen[2][1].state_dict(), seen[5][1].state_dict()
    assert not all(torch.equal(first[key], second[key]) for key in first)  # a fresh T' in the next round


def test_the_transform_and_remap_round_trip_through_the_attack_record(tmp_path: Path) -> None:
    attack, data = _prepared()
    assert attack_record(attack) == attack.spec()  # nothing to store before the first round
    attack.train_round(_victim(), 3)
    path = tmp_path / "record.pt"
    torch.save(attack_record(attack), path)
    rebuilt = attack_from_spec(torch.load(path, weights_only=True))
    images, labels = _batch(data)
    assert rebuilt.round == 3 and rebuilt.agreement == attack.agreement
    assert torch.equal(rebuilt.remap.permutation, attack.remap.permutation)
    with torch.no_grad():
        assert torch.equal(rebuilt.transform(images), attack.transform(images))
    ours, theirs = attack.training_batch(images, labels, None), rebuilt.training_batch(images, labels, None)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
    assert torch.equal(rebuilt.apply(images), attack.apply(images))


def test_a_damaged_record_is_refused() -> None:
    attack, _ = _prepared()
    attack.train_round(_victim(), 0)
    record = attack_record(attack)
    fixed_point = {**record["state"], "permutation": torch.arange(4)}
    with pytest.raises(ConfigError, match="permutation must be a derangement"):
        attack_from_spec({**record, "state": fixed_point})
    with pytest.raises(ConfigError, match="does not fit transform_width=4"):
        attack_from_spec({**record, "init_args": {**record["init_args"], "transform_width": 4}})
    with pytest.raises(ConfigError, match="refine_in_loop state needs"):
        attack_from_spec({**record, "state": {**record["state"], "round": "0"}})


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("clean_share", 0.0),
        ("warmup_epochs", -1),
        ("refresh_epochs", 0),
        ("loop_rate", 0.6),
        ("transform_steps", 0),
        ("transform_lr", 0.0),
        ("transform_batch_size", 1),
        ("transform_width", 0),
        ("temperature", 0.0),
        ("trigger", "wanet"),
        ("patch_size", 0),
        ("alpha", 1.5),
    ],
)
def test_a_bad_setting_is_a_config_error_that_names_it(setting: str, value: object) -> None:
    with pytest.raises(ConfigError, match=setting):
        RefineInTheLoop(**{setting: value})


def test_the_trigger_is_a_composed_badnets_or_blended() -> None:
    images = torch.rand(3, 1, 12, 12)
    patch = RefineInTheLoop(patch_size=4, location="top_left", pattern="checkerboard", seed=5)
    blend = RefineInTheLoop(trigger="blended", alpha=0.15, seed=5)
    assert torch.equal(
        patch.apply(images), BadNets(patch_size=4, location="top_left", pattern="checkerboard").apply(images)
    )
    assert torch.equal(blend.apply(images), Blended(alpha=0.15, seed=5).apply(images))


def test_the_transform_settings_default_to_the_refine_recipe() -> None:
    recipe = yaml.safe_load(Path(resolve_config("configs/refine/recipe.yaml")).read_text())
    model = recipe["model"]["init_args"]
    attack = RefineInTheLoop()
    assert attack.transform_width == model["transform"]["init_args"]["base_width"]
    assert attack.transform_depth == loop_module.UNet(1).depth  # the recipe keeps the U-Net's depth
    assert (attack.contrastive_weight, attack.temperature) == (model["contrastive_weight"], model["temperature"])
    assert attack.transform_batch_size == recipe["data"]["init_args"]["batch_size"]


@pytest.mark.slow
def test_victim_training_with_the_attack_resumes_with_the_same_transform(tmp_path: Path) -> None:
    # Stopped after its first epoch (max_steps) of a 2-epoch schedule, as an interrupted run, then resumed. Round 0
    # trains at the start of epoch 0; epoch 1 has none (refresh every 2), so the resumed run can only have a T' from
    # the checkpoint.
    tiny = [f"--data.init_args.attack.init_args.{key}={value}" for key, value in {**TINY, "transform_width": 4}.items()]
    short = [
        "--trainer.max_epochs", "2", "--trainer.max_steps", "3",
        "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1",
        "--data.init_args.attack.init_args.warmup_epochs", "0", *tiny,
        "--trainer.default_root_dir", str(tmp_path / "victim"), *QUIET,
    ]  # fmt: skip
    victim = cli_main(["fit", "--config", VICTIM_CONFIG, "--config", LOOP_CONFIG, *short])
    attack = victim.datamodule.attack
    assert attack.round == 0 and victim.model.attack_networks is attack.networks()
    assert victim.trainer.optimizers[0].param_groups[0]["params"] == list(victim.model.model.parameters())
    checkpoint = tmp_path / "victim" / "checkpoints" / "last.ckpt"
    content = read_weights_file(checkpoint)  # weights_only=True
    assert not any(key.startswith("attack_networks") for key in content.state_dict)
    state = content.attack_spec["state"]
    assert content.attack_spec["name"] == "refine_in_loop" and state["round"] == 0
    saved = attack_from_spec(content.attack_spec)
    assert torch.equal(saved.remap.permutation, attack.remap.permutation)

    longer = [*short[4:], "--trainer.max_epochs", "2", "--ckpt_path", str(checkpoint)]  # without max_steps
    resumed = cli_main(["fit", "--config", VICTIM_CONFIG, "--config", LOOP_CONFIG, *longer])
    again = resumed.datamodule.attack
    assert resumed.trainer.current_epoch == 2 and again is not attack and again.round == 0
    weights = again.transform.state_dict()
    assert all(torch.equal(weights[key].cpu(), value) for key, value in state["transform"].items())
    assert torch.equal(again.remap.permutation.cpu(), state["permutation"])
