"""The poison-only attacks: where each changes an image, seeding, poison / cover selection, checkpoint round-trip."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from datamodules.datasets import ImageTensorDataset, PoisonedTestSet, PoisonedTrainingSet
from refine_pl.architectures import build_architecture
from refine_pl.attacks import (
    ATTACKS,
    BATT,
    AdaptivePatch,
    Attack,
    BadNets,
    Blended,
    LabelConsistent,
    PhysicalBA,
    WaNet,
    attack_from_spec,
    attack_record,
)
from refine_pl.errors import ConfigError
from refine_pl.weights import read_weights_file
from tests.conftest import write_victim_checkpoint


def _dataset(n: int = 120, classes: int = 4, channels: int = 1, size: int = 16, seed: int = 1) -> ImageTensorDataset:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 200, (n, channels, size, size), dtype=torch.uint8, generator=generator)
    return ImageTensorDataset(images, torch.arange(n) % classes)


def _prepared_lc(data: ImageTensorDataset, **overrides) -> LabelConsistent:
    attack = LabelConsistent(**{"target_label": 1, **FAST_SETTINGS["lc"], **overrides})
    attack.prepare(data, data.labels, num_classes=4)
    return attack


POISON_ONLY = sorted(name for name, cls in ATTACKS.items() if not cls.training_controlled)
"""Every registered attack that poisons data only: each test below runs on all of them, new ones included."""
# Settings that keep an attack's preparation quick on the tiny data, or give it cover samples to check; an
# attack not named here runs with its defaults.
FAST_SETTINGS = {
    "lc": {"poison_rate": 0.2, "epsilon": 0.1, "pgd_steps": 2, "surrogate_epochs": 1},
    "blended": {"alpha": 0.15},
    "wanet": {"cross_ratio": 2.0},
    "adaptive_patch": {"conservatism_rate": 0.1},
}
SEEDED_TRIGGERS = {"blended", "wanet", "physical_ba", "adaptive_patch", "low_frequency"}
"""Attacks whose trigger is drawn from the seed; the others' triggers are fixed."""


def _build(name: str, data: ImageTensorDataset) -> Attack:
    """The attack ``name`` with target class 1 and seed 3, prepared on ``data``."""
    attack = ATTACKS[name](**{"target_label": 1, "poison_rate": 0.1, "seed": 3, **FAST_SETTINGS.get(name, {})})
    attack.prepare(data, data.labels, num_classes=4)
    return attack


def _training_set(attack: Attack, data: ImageTensorDataset) -> PoisonedTrainingSet:
    poison = attack.select_poison_indices(data.labels)
    return PoisonedTrainingSet(data, attack, poison, cover_indices=attack.select_cover_indices(data.labels, poison))


@pytest.mark.parametrize("name", POISON_ONLY)
def test_poison_rate_target_labels_and_cover_samples_are_as_asked(name: str) -> None:
    data = _dataset()
    attack = _build(name, data)
    poison = attack.select_poison_indices(data.labels)
    cover = attack.select_cover_indices(data.labels, poison)
    assert len(poison) == round(attack.poison_rate * len(data)) == len(set(poison.tolist()))
    expected_cover = {
        "wanet": round(2.0 * len(poison)),
        "adaptive_patch": round(0.1 * len(data)),
        "robust_trigger": round(0.1 * len(data)),
    }.get(name, 0)
    assert len(cover) == expected_cover and not set(cover.tolist()) & set(poison.tolist())
    if name == "lc":  # label-consistent: only the target class, so labels stay correct
        assert (data.labels[poison] == 1).all()
    else:
        assert (data.labels[poison] != 1).all()
    training = _training_set(attack, data)
    labels = torch.tensor([training[i][1] for i in range(len(data))])
    changed = torch.tensor([not torch.equal(training[i][0], data[i][0]) for i in range(len(data))])
    assert (labels[poison] == 1).all()
    untouched = torch.ones(len(data), dtype=torch.bool)
    untouched[poison] = False
    assert torch.equal(labels[untouched], data.labels[untouched])  # cover samples keep their true label
    assert torch.equal(torch.nonzero(changed).flatten(), torch.cat([poison, cover]).sort().values)


@pytest.mark.parametrize("name", POISON_ONLY)
def test_same_seed_same_poisoned_samples(name: str) -> None:
    data = _dataset()
    first, second = _training_set(_build(name, data), data), _training_set(_build(name, data), data)
    for index in range(len(data)):
        assert torch.equal(first[index][0], second[index][0]) and first[index][1] == second[index][1]
    tests = PoisonedTestSet(data, _build(name, data)), PoisonedTestSet(data, _build(name, data))
    for position in range(len(tests[0])):
        assert torch.equal(tests[0][position][0], tests[1][position][0])


@pytest.mark.parametrize("name", POISON_ONLY)
def test_the_seed_changes_the_trigger_of_seeded_triggers_only(name: str) -> None:
    data = _dataset()
    images, indices = torch.stack([data[i][0] for i in range(3)]), torch.arange(3)
    attack, other = _build(name, data), _build(name, data)
    other.seed = 4
    assert torch.equal(attack.apply(images, indices), other.apply(images, indices)) == (name not in SEEDED_TRIGGERS)


@pytest.mark.parametrize("name", POISON_ONLY)
@pytest.mark.parametrize("channels", [1, 3])
def test_spec_and_state_round_trip_through_a_victim_checkpoint(name: str, channels: int, tmp_path: Path) -> None:
    data = _dataset(channels=channels)
    attack = _build(name, data)
    path = write_victim_checkpoint(tmp_path / "victim.ckpt", attack=attack_record(attack))
    rebuilt = attack_from_spec(read_weights_file(path).attack_spec)  # read with weights_only=True
    assert rebuilt.spec() == attack.spec()
    original, copy = PoisonedTestSet(data, attack), PoisonedTestSet(data, rebuilt)
    assert all(torch.equal(original[i][0], copy[i][0]) for i in range(len(original)))
    original, copy = _training_set(attack, data), _training_set(rebuilt, data)
    assert all(torch.equal(original[i][0], copy[i][0]) for i in range(len(data)))


def test_blended_mixes_the_seeded_noise_into_every_pixel() -> None:
    images = torch.rand(2, 3, 8, 8)
    attack = Blended(alpha=0.1, seed=7)
    noise = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(attack.apply(images), 0.9 * images + 0.1 * noise)
    with pytest.raises(ConfigError, match="alpha"):
        Blended(alpha=0.0)


def test_blended_pattern_file_is_read_once_and_travels_in_the_state(tmp_path: Path) -> None:
    pattern = np.zeros((4, 4, 3), dtype=np.uint8)
    pattern[:, :2] = 255  # left half white
    path = tmp_path / "pattern.png"
    Image.fromarray(pattern).save(path)
    attack = Blended(alpha=0.2, pattern_path=str(path))
    gray = attack.apply(torch.zeros(1, 1, 8, 8))
    assert torch.allclose(gray[0, 0, :, :3], torch.full((8, 3), 0.2)) and torch.equal(
        gray[0, 0, :, 5:], torch.zeros(8, 3)
    )
    record = attack_record(attack)
    path.unlink()  # the checkpoint carries the pattern; the file is no longer needed
    assert torch.equal(attack_from_spec(record).apply(torch.zeros(1, 3, 8, 8)), attack.apply(torch.zeros(1, 3, 8, 8)))
    with pytest.raises(ConfigError, match="not found"):
        Blended(pattern_path=str(path)).apply(torch.zeros(1, 1, 8, 8))


def test_an_attack_rebuilt_from_a_record_never_opens_a_path_named_in_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorded = np.zeros((4, 4, 3), dtype=np.uint8)
    recorded[:, :2] = 255  # what the victim's training read: left half white
    on_disk = tmp_path / "pattern.png"
    Image.fromarray(255 - recorded).save(on_disk)  # what the path holds now: the opposite
    opened = []
    real_open = Image.open
    monkeypatch.setattr(
        "refine_pl.attacks.blended.Image.open",
        lambda *args, **kwargs: opened.append(args) or real_open(*args, **kwargs),
    )
    spec = {"name": "blended", "init_args": {"alpha": 0.5, "pattern_path": str(on_disk)}}
    state = {"pattern": torch.from_numpy(recorded).permute(2, 0, 1).contiguous()}

    rebuilt = attack_from_spec({**spec, "state": state})
    poisoned = rebuilt.apply(torch.zeros(1, 3, 4, 4))
    assert torch.allclose(poisoned[0, :, :, :2], torch.full((3, 4, 2), 0.5)) and torch.equal(
        poisoned[0, :, :, 2:], torch.zeros(3, 4, 2)
    )
    assert rebuilt.state_dict()["pattern"] is state["pattern"] and not opened

    for broken in (spec, {**spec, "init_args": {"pattern_path": str(tmp_path / "missing.png")}}):
        with pytest.raises(ConfigError, match=r"never opens a path named in a record.*--data\.init_args\.attack"):
            attack_from_spec(broken)
    with pytest.raises(ConfigError, match=r"pattern must be a uint8 RGB image \[3, H, W\].*got NoneType"):
        attack_from_spec({**spec, "state": {"pattern": None}})
    with pytest.raises(ConfigError, match=r"got \[1, 4, 4\]"):
        attack_from_spec({**spec, "state": {"pattern": torch.zeros(1, 4, 4, dtype=torch.uint8)}})
    assert not opened
    Blended(pattern_path=str(on_disk)).apply(torch.zeros(1, 3, 4, 4))  # from a config, the file is read
    assert len(opened) == 1


def test_wanet_moves_pixels_by_its_warp_field() -> None:
    # On a horizontal ramp bilinear sampling is exact, so the poisoned image minus the ramp is the warp's
    # x-displacement (in pixels) wherever the warped grid stays inside the image.
    size = 32
    ramp = torch.arange(size, dtype=torch.float32).expand(size, size)[None, None] / size
    attack = WaNet(grid_size=4, strength=0.5, seed=5)
    grid = attack.warp_grid(size, size)
    shift_px = (grid[..., 0] + 1) / 2 * (size - 1) - torch.arange(size)
    inside = grid.abs().amax(-1) < 1
    poisoned = attack.apply(ramp)[0, 0]
    assert torch.allclose(
        poisoned[inside] * size - torch.arange(size).expand(size, size)[inside], shift_px[inside], atol=1e-3
    )
    expected_shift = 0.5 * attack.displacement(size, size)[..., 0] * (size - 1) / size / 2
    assert torch.allclose(shift_px[inside], expected_shift[inside], atol=1e-4)
    assert 0.1 < shift_px.abs().mean() < 0.5  # about strength / 2 pixels on average: a subtle trigger
    cover = attack.apply_cover(ramp, torch.tensor([9]))[0, 0]  # noise mode: the warp plus < half a pixel
    assert 0 < (cover - poisoned)[inside].abs().max() * size <= 0.5 + 1e-4


def test_physical_ba_is_the_badnets_patch_then_the_sample_s_transformation() -> None:
    images, indices = torch.rand(3, 1, 16, 16) * 0.5, torch.tensor([4, 8, 15])
    still = PhysicalBA(degrees=0, translate=0, min_scale=1, max_scale=1, brightness=0, contrast=0, flip_prob=0)
    assert torch.allclose(still.apply(images, indices), BadNets().apply(images), atol=1e-6)
    flipped = PhysicalBA(degrees=0, translate=0, min_scale=1, max_scale=1, brightness=0, contrast=0, flip_prob=1)
    assert torch.allclose(
        flipped.apply(images, indices), BadNets(location="bottom_left").apply(images.flip(-1)), atol=1e-6
    )
    attack = PhysicalBA(seed=2)
    poisoned = attack.apply(images, indices)
    for image, index, result in zip(images, indices.tolist(), poisoned, strict=True):
        params = attack.transformation(index, 16, 16)
        expected = TF.affine(
            BadNets().apply(image[None])[0], angle=params["angle"], translate=params["translate"],
            scale=params["scale"], shear=[0.0, 0.0], interpolation=InterpolationMode.BILINEAR,
        )  # fmt: skip
        expected = TF.adjust_contrast(TF.adjust_brightness(expected, params["brightness"]), params["contrast"])
        assert torch.allclose(result, expected.flip(-1) if params["flip"] else expected)
    with pytest.raises(ValueError, match="indices"):
        attack.apply(images)


def test_batt_rotates_or_shifts_and_adds_nothing() -> None:
    images = torch.rand(2, 3, 9, 9)
    rotated = BATT(transformation="rotation", angle=90).apply(images)
    assert torch.allclose(rotated, torch.rot90(images, 1, dims=(-2, -1)), atol=1e-5)
    assert torch.equal(BATT(angle=16).apply(images), TF.rotate(images, 16, interpolation=InterpolationMode.BILINEAR))
    shifted = BATT(transformation="translation", shift_x=2, shift_y=-1).apply(images)
    assert torch.equal(shifted[..., :8, 2:], images[..., 1:, :7])
    assert (shifted[..., :, :2] == 0).all() and (shifted[..., 8, :] == 0).all()
    with pytest.raises(ConfigError, match="identity"):
        BATT(transformation="translation", shift_x=0, shift_y=0)


def _square(size: int, corner: str, patch: int, margin: int, image: int) -> torch.Tensor:
    inside = torch.zeros(image, image, dtype=torch.bool)
    top = margin if corner.startswith("top") else image - margin - patch
    left = margin if corner.endswith("left") else image - margin - patch
    inside[top : top + patch, left : left + patch] = True
    return inside


def test_adaptive_patch_stamps_one_faint_patch_in_training_and_the_test_patches_at_test() -> None:
    attack = AdaptivePatch(seed=1, patch_size=4, margin=1, test_triggers=[0, 3], test_alpha=1.0)
    images, indices = torch.rand(40, 1, 16, 16) * 0.5, torch.arange(40)
    squares = [_square(16, corner, 4, 1, 16) for corner in attack.locations]
    trained = attack.apply_training(images, indices)
    chosen = [attack.trigger_of(i) for i in range(40)]
    assert set(chosen) == {0, 1, 2, 3}  # every trigger is used
    triggers = attack.triggers(1, 16, 16)
    for image, result, j in zip(images, trained, chosen, strict=True):
        assert torch.equal(result[:, ~squares[j]], image[:, ~squares[j]])
        pattern = triggers[j][0][:, squares[j]]
        alpha = attack.train_alphas[j]
        assert torch.allclose(result[:, squares[j]], (1 - alpha) * image[:, squares[j]] + alpha * pattern)
    tested = attack.apply(images)
    both = squares[0] | squares[3]
    assert torch.equal(tested[..., ~both], images[..., ~both])
    assert torch.allclose(tested[..., squares[0]], triggers[0][0][:, squares[0]].expand(40, 1, -1))
    assert torch.equal(attack.apply_cover(images, indices), trained)
    with pytest.raises(ConfigError, match="test_triggers"):
        AdaptivePatch(test_triggers=[4])


def test_lc_perturbs_within_epsilon_then_stamps_the_corner_checkerboards() -> None:
    data = _dataset()
    attack = _prepared_lc(data, epsilon=0.1)
    poison = attack.select_poison_indices(data.labels)
    corners = torch.zeros(16, 16, dtype=torch.bool)
    for corner in ("top_left", "top_right", "bottom_left", "bottom_right"):
        corners |= _square(16, corner, 3, 0, 16)
    clean = torch.stack([data[int(i)][0] for i in poison])
    poisoned = attack.apply_training(clean, poison)
    difference = (poisoned - clean)[..., ~corners]
    assert difference.abs().max() <= 0.1 + 1e-6 and difference.abs().max() > 0.02  # a real, bounded perturbation
    checker = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    assert torch.equal(poisoned[..., :3, :3], checker.expand(len(poison), 1, 3, 3))
    tested = attack.apply(clean)  # at test: the trigger only, no perturbation
    assert torch.equal(tested[..., ~corners], clean[..., ~corners])
    with pytest.raises(ConfigError, match="lower poison_rate to at most 0.250"):
        LabelConsistent(target_label=1, poison_rate=0.3).select_poison_indices(data.labels)
    with pytest.raises(ConfigError, match="no adversarial perturbation"):
        LabelConsistent(target_label=1).apply_training(clean, poison)


def test_lc_blends_its_training_trigger_at_the_amplitude_and_stamps_the_full_one_at_test() -> None:
    data = _dataset()
    attack = _prepared_lc(data, epsilon=1 / 255, trigger_amplitude=0.4)
    poison = attack.select_poison_indices(data.labels)
    clean = torch.stack([data[int(i)][0] for i in poison])
    perturbed = (clean + attack._perturbations.float() / 255).clamp(0, 1)
    checker = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    trained = attack.apply_training(clean, poison)[..., :3, :3]
    assert torch.allclose(trained, 0.6 * perturbed[..., :3, :3] + 0.4 * checker, atol=1e-6)
    assert torch.equal(attack.apply(clean)[..., :3, :3], checker.expand(len(poison), 1, 3, 3))
    with pytest.raises(ConfigError, match="trigger_amplitude"):
        LabelConsistent(trigger_amplitude=0.0)
    with pytest.raises(ConfigError, match="surrogate_epsilon"):
        LabelConsistent(surrogate_epsilon=-0.1)


def test_lc_trains_its_surrogate_on_one_step_attacks_when_asked() -> None:
    data = _dataset()
    torch.manual_seed(0)  # the same initialisation and order in both: only the training images differ
    standard = LabelConsistent(target_label=1, surrogate_epochs=1).train_surrogate(data, 4)
    robust = LabelConsistent(target_label=1, surrogate_epochs=1, surrogate_epsilon=0.1).train_surrogate(data, 4)
    assert not all(
        torch.equal(a, b) for a, b in zip(standard.state_dict().values(), robust.state_dict().values(), strict=True)
    )
    # the attacked batches stay inside the radius and the image range
    images, labels = torch.stack([data[i][0] for i in range(8)]), data.labels[:8]
    attacked = LabelConsistent(surrogate_epsilon=0.1)._fgsm(standard.train(), images, labels)
    assert (attacked - images).abs().max() <= 0.1 + 1e-6 and attacked.min() >= 0 and attacked.max() <= 1


def _tinted(n: int, seed: int) -> ImageTensorDataset:
    """Tiny RGB data: 8x8 grey images (class 0) or tinted in one channel (classes 1-3), with strong noise."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    colours = torch.tensor([[0.5, 0.5, 0.5], [0.6, 0.5, 0.5], [0.5, 0.6, 0.5], [0.5, 0.5, 0.6]])
    images = colours[labels].view(n, 3, 1, 1) + 0.3 * (torch.rand(n, 3, 8, 8, generator=generator) - 0.5)
    return ImageTensorDataset((images * 255).round().clamp(0, 255).to(torch.uint8), labels)


def _victim_ba_asr(attack: LabelConsistent, train: ImageTensorDataset, test: ImageTensorDataset) -> tuple[float, float]:
    attack.prepare(train, train.labels, num_classes=4)
    torch.manual_seed(0)
    model = build_architecture("small_cnn", 4, 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(10):
        for images, labels in DataLoader(_training_set(attack, train), batch_size=64, shuffle=True):
            optimizer.zero_grad()
            F.cross_entropy(model(images), labels).backward()
            optimizer.step()
    model.eval()
    clean = torch.stack([test[i][0] for i in range(len(test))])
    poisoned = PoisonedTestSet(test, attack)
    triggered = torch.stack([poisoned[i][0] for i in range(len(poisoned))])
    with torch.no_grad():
        ba = (model(clean).argmax(1) == test.labels).float().mean().item()
        asr = (model(triggered).argmax(1) == attack.target_label).float().mean().item()
    return ba, asr


@pytest.mark.slow
def test_lc_backdoors_a_tiny_rgb_victim_because_of_its_adversarial_perturbations() -> None:
    # On the 28 px digits LC stays below ASR 0.80 (README); on tiny RGB data whose classes differ by a tint
    # it works: the PGD perturbations (radius = the tint) hide the target class's own evidence, so the
    # victim learns the corner trigger. Without them (radius 1/255) the same clean-label poisoning is weak.
    # Measured: BA 1.0 / ASR 1.0 with the perturbations, BA 0.99 / ASR 0.37 without.
    train, test = _tinted(400, seed=0), _tinted(200, seed=1)
    settings = {"target_label": 0, "poison_rate": 0.2, "pgd_steps": 10, "surrogate_epochs": 10, "trigger_size": 2}
    ba, asr = _victim_ba_asr(LabelConsistent(epsilon=0.1, **settings), train, test)
    assert ba >= 0.9 and asr >= 0.9
    _, asr_without = _victim_ba_asr(LabelConsistent(epsilon=1 / 255, **settings), train, test)
    assert asr_without <= 0.6
