"""The adaptive poison-only attacks of issue 25: the transform-robust trigger and the low-frequency trigger."""

import pytest
import torch

from refine_pl.attacks import BadNets, LowFrequency, TransformRobustTrigger, attack_from_spec, attack_record
from refine_pl.attacks.robust_trigger import TRANSFORM_KINDS, _affine
from refine_pl.errors import ConfigError
from refine_pl.transform import UNet


def _digits(n: int = 12, channels: int = 1, size: int = 16) -> torch.Tensor:
    """Dark images with a bright bar, like the embedded digits (the patch corner stays dark)."""
    images = torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(0)) * 0.2
    images[..., 4:10, 6:9] = 0.9
    return images


def _patch_region(size: int = 16, patch: int = 5, margin: int = 1) -> torch.Tensor:
    inside = torch.zeros(size, size, dtype=torch.bool)
    inside[size - margin - patch : size - margin, size - margin - patch : size - margin] = True
    return inside


# --- the transform-robust trigger ---------------------------------------------------------------------------------


def test_a_sample_is_always_transformed_alike_and_another_seed_transforms_it_otherwise() -> None:
    images, indices = _digits(), torch.arange(100, 112)
    first = TransformRobustTrigger(seed=3).apply_training(images, indices)
    again = TransformRobustTrigger(seed=3).apply_training(images, indices)
    assert torch.equal(first, again)
    other = TransformRobustTrigger(seed=4).apply_training(images, indices)
    assert all(not torch.equal(a, b) for a, b in zip(first, other, strict=True))
    shuffled = TransformRobustTrigger(seed=3).apply_training(images.flip(0), indices.flip(0))  # batch order is moot
    assert torch.equal(shuffled.flip(0), first)
    kinds = {TransformRobustTrigger(seed=3).transform_of(i)[0] for i in range(200)}
    assert kinds == set(TRANSFORM_KINDS)  # every kind is drawn


def test_cover_samples_carry_the_transform_and_no_trigger_poisoned_ones_both_test_images_the_bare_patch() -> None:
    images, indices = _digits(20), torch.arange(20)
    attack = TransformRobustTrigger(seed=1)
    stamped = BadNets(patch_size=5, margin=1).apply(images)
    assert torch.equal(attack.apply(images), stamped)  # at test: the patch, no transform
    assert torch.equal(attack.apply(images, indices), stamped)
    cover = attack.apply_cover(images, indices)
    poisoned = attack.apply_training(images, indices)
    for i, index in enumerate(indices.tolist()):
        assert torch.equal(cover[i], attack.transform(images[i], index))
        assert torch.equal(poisoned[i], attack.transform(stamped[i], index))
        assert not torch.equal(cover[i], images[i]) and not torch.equal(poisoned[i], stamped[i])
    inside = _patch_region()
    assert cover[..., inside].mean() < 0.3 < 0.7 < poisoned[..., inside].mean()  # the patch is in one of them only


@pytest.mark.parametrize("kind", TRANSFORM_KINDS)
@pytest.mark.parametrize("channels", [1, 3])
def test_every_kind_of_transform_changes_the_image_and_the_patch_survives_it(kind: str, channels: int) -> None:
    images, indices = _digits(8, channels), torch.arange(8)
    attack = TransformRobustTrigger(seed=2, transforms=[kind])
    cover, poisoned = attack.apply_cover(images, indices), attack.apply_training(images, indices)
    assert cover.min() >= 0 and poisoned.max() <= 1
    assert ((cover - images).abs().amax((1, 2, 3)) > 0.01).all()  # the transform does something to every image
    inside = _patch_region()
    trigger = (poisoned - cover)[..., inside].mean((1, 2))
    assert (trigger > 0.3).all(), trigger  # with the same transform, the patched image is bright where the patch is


def test_the_unet_transform_blends_a_seeded_bank_of_refine_s_unets_at_the_strength() -> None:
    images, index = _digits(1), 5
    attack = TransformRobustTrigger(seed=7, transforms=["unet"], unet_count=3, unet_strength=0.25)
    state = torch.get_rng_state()
    bank = attack.unets(1)
    assert torch.equal(torch.get_rng_state(), state)  # built from the attack's seed, the global generator untouched
    assert len(bank) == 3 and all(isinstance(u, UNet) and not u.training and u.base_width == 16 for u in bank)
    assert attack.unets(1) is bank  # built once
    rebuilt = TransformRobustTrigger(seed=7, unet_count=3).unets(1)
    other = TransformRobustTrigger(seed=8, unet_count=3).unets(1)
    assert torch.equal(bank[0].head.weight, rebuilt[0].head.weight)
    assert not torch.equal(bank[0].head.weight, bank[1].head.weight)
    assert not torch.equal(bank[0].head.weight, other[0].head.weight)
    _, draws = attack.transform_of(index)
    unet = bank[int(draws[0] * 3)]
    reencoded = attack.reencode(images[0], unet)
    # the re-encoding has the image's mean and standard deviation, and it is not the image
    assert torch.allclose(reencoded.mean(), images.mean(), atol=1e-5)
    assert torch.allclose(reencoded.std(correction=0), images.std(correction=0), atol=1e-4)
    assert not torch.allclose(reencoded, images[0], atol=0.05)
    expected = (images[0] + 0.25 * (reencoded - images[0])).clamp(0, 1)
    assert torch.allclose(attack.transform(images[0], index), expected)


def test_the_affine_jitter_shifts_rotates_and_leaves_the_identity_alone() -> None:
    image = torch.zeros(1, 16, 16)
    image[0, 6, 6] = 1.0
    assert torch.allclose(_affine(image, 0.0, 1.0, (0.0, 0.0)), image, atol=1e-6)
    shifted = _affine(image, 0.0, 1.0, (1 / 16, 2 / 16))  # a sixteenth of the side: one pixel
    assert torch.allclose(shifted, torch.roll(image, (2, 1), dims=(1, 2)), atol=1e-5)
    quarter = _affine(image, 90.0, 1.0, (0.0, 0.0))
    assert torch.allclose(quarter, torch.rot90(image, 1, dims=(1, 2)), atol=1e-5) or torch.allclose(
        quarter, torch.rot90(image, -1, dims=(1, 2)), atol=1e-5
    )


# --- the low-frequency trigger ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("cutoff", "size"), [(0.25, 28), (0.5, 16), (0.1, 32), (1.0, 8)])
def test_the_low_frequency_pattern_has_no_energy_above_the_cutoff_and_peaks_at_epsilon(
    cutoff: float, size: int
) -> None:
    attack = LowFrequency(cutoff=cutoff, epsilon=0.15, seed=4)
    pattern = attack.pattern(3, size, size)
    assert pattern.shape == (3, size, size) and pattern.dtype == torch.float32
    assert torch.isclose(pattern.abs().max(), torch.tensor(0.15), atol=1e-7)
    power = torch.fft.fft2(pattern.double()).abs() ** 2
    frequencies = torch.fft.fftfreq(size, dtype=torch.float64).abs()
    above = (frequencies[:, None] > cutoff / 2) | (frequencies[None, :] > cutoff / 2)
    assert power[:, above].sum() <= 1e-12 * power.sum()
    kept = ~above
    kept[0, 0] = False
    assert power[:, kept].sum() > 0.1 * power.sum()  # more than a constant shift
    assert torch.equal(attack.passband(size, size), ~above)


def test_the_low_frequency_band_on_the_digits_is_three_cycles_across_the_image() -> None:
    band = LowFrequency(cutoff=0.25).passband(28, 28)
    assert band.sum() == 49 and band[:4, :4].all() and not band[4, 0] and band[-3, 0] and not band[-4, 0]


def test_the_low_frequency_trigger_adds_the_seeded_pattern_and_clamps() -> None:
    images = _digits(4, 3)
    attack = LowFrequency(cutoff=0.25, epsilon=0.2, seed=5)
    pattern = attack.pattern(3, 16, 16)
    assert torch.equal(attack.apply(images), (images + pattern).clamp(0, 1))
    assert torch.equal(LowFrequency(cutoff=0.25, epsilon=0.2, seed=5).pattern(3, 16, 16), pattern)
    assert not torch.allclose(LowFrequency(cutoff=0.25, epsilon=0.2, seed=6).pattern(3, 16, 16), pattern)
    assert not torch.equal(pattern[0], pattern[1])  # each channel its own noise
    assert torch.equal(attack.apply_training(images), attack.apply(images))


# --- both ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "attack",
    [
        TransformRobustTrigger(target_label=2, seed=11, patch_size=4, unet_count=2, unet_strength=0.4, cover_rate=0.2),
        LowFrequency(target_label=3, seed=12, cutoff=0.3, epsilon=0.12),
    ],
    ids=lambda attack: attack.name,
)
def test_the_attacks_round_trip_through_their_record(attack) -> None:
    record = attack_record(attack)
    assert "state" not in record  # rebuilt from the settings alone
    rebuilt = attack_from_spec(record)
    assert type(rebuilt) is type(attack) and rebuilt.spec() == attack.spec()
    images, indices = _digits(6, 3), torch.arange(30, 36)
    assert torch.equal(rebuilt.apply(images, indices), attack.apply(images, indices))
    assert torch.equal(rebuilt.apply_training(images, indices), attack.apply_training(images, indices))
    labels = torch.arange(100) % 5
    poison = attack.select_poison_indices(labels)
    assert torch.equal(rebuilt.select_poison_indices(labels), poison)
    assert torch.equal(rebuilt.select_cover_indices(labels, poison), attack.select_cover_indices(labels, poison))
    if isinstance(attack, TransformRobustTrigger):
        assert len(attack.select_cover_indices(labels, poison)) == 20
        assert torch.equal(rebuilt.apply_cover(images, indices), attack.apply_cover(images, indices))


@pytest.mark.parametrize(
    ("cls", "settings", "named"),
    [
        (TransformRobustTrigger, {"unet_strength": -0.1}, "unet_strength"),
        (TransformRobustTrigger, {"unet_strength": 1.5}, "unet_strength"),
        (TransformRobustTrigger, {"noise_std": -0.01}, "noise_std"),
        (TransformRobustTrigger, {"blur_sigma": -1.0}, "blur_sigma"),
        (TransformRobustTrigger, {"max_rotation": 200.0}, "max_rotation"),
        (TransformRobustTrigger, {"max_shift": 0.5}, "max_shift"),
        (TransformRobustTrigger, {"cover_rate": 1.0}, "cover_rate"),
        (TransformRobustTrigger, {"unet_count": 0}, "unet_count"),
        (TransformRobustTrigger, {"unet_width": 64}, "unet_width"),
        (TransformRobustTrigger, {"transforms": []}, "transforms"),
        (TransformRobustTrigger, {"transforms": ["blur", "blur"]}, "transforms"),
        (TransformRobustTrigger, {"transforms": ["sharpen"]}, "transforms"),
        (TransformRobustTrigger, {"patch_size": 0}, "patch_size"),
        (LowFrequency, {"cutoff": 0.0}, "cutoff"),
        (LowFrequency, {"cutoff": 1.01}, "cutoff"),
        (LowFrequency, {"cutoff": -0.5}, "cutoff"),
        (LowFrequency, {"epsilon": 0.0}, "epsilon"),
        (LowFrequency, {"epsilon": -0.1}, "epsilon"),
    ],
)
def test_bad_settings_are_refused_naming_the_setting(cls: type, settings: dict, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        cls(**settings)
    with pytest.raises(ConfigError, match=named):
        attack_from_spec({"name": cls.name, "init_args": settings})
