"""Low-frequency trigger after Zeng et al. (ICCV 2021): a smooth additive pattern that low-pass preprocessing keeps."""

from dataclasses import dataclass

import torch
from torch import Tensor

from refine_pl.attacks.base import Attack
from refine_pl.attacks.registry import ATTACKS
from refine_pl.errors import ConfigError


@ATTACKS.add
@dataclass(eq=False, repr=False, kw_only=True)
class LowFrequency(Attack):
    """Adds a seeded pattern whose spectrum lies below ``cutoff``, at L-infinity amplitude ``epsilon``.

    Zeng et al., "Rethinking the Backdoor Attacks' Triggers: A Frequency Perspective" (ICCV 2021), find that
    most triggers carry high-frequency artefacts, which low-pass preprocessing removes and a frequency-domain
    detector spots; a trigger confined to low frequencies (their "smooth" trigger, BackdoorBench's ``lf``)
    survives such input transformations. Against REFINE, whose U-Net T learns a smooth re-encoding of the
    input, an attacker would pick such a trigger.

    **A simplification of the paper's trigger.** Zeng et al. *optimise* it: a universal adversarial
    perturbation towards the target class (DeepFool steps on a clean model), smoothed by a Gaussian low-pass
    filter after every step and min-max normalised into [0, 0.2] (their ``Sec5_Smooth_Trigger`` code);
    BackdoorBench ships such perturbations per dataset and model (``resource/lowFrequency/``, made with 50
    passes over 100 training images) and poisons 10% of the training set (``pratio: 0.1``, target class 0, in
    ``config/attack/lf/default.yaml``). Here the pattern is *not optimised*: it is Gaussian noise drawn from
    ``seed``, low-pass filtered with a hard window in the Fourier domain, and scaled to max-abs ``epsilon``.
    It needs no clean model and the victim learns it from the poisoned data alone; its frequency constraint
    is the paper's idea, its values are not the paper's. The code is written here, not taken from either.

    The window keeps the Fourier component ``(k_y, k_x)`` of an ``H x W`` image when both
    ``|k_y| / H`` and ``|k_x| / W`` are at most ``cutoff / 2`` cycles per pixel: ``cutoff`` is a fraction of
    the Nyquist frequency (1 keeps every frequency; 0.25 on 28 px keeps at most 3 cycles across the image).
    Each channel gets its own noise; the zero frequency (a constant shift) is kept, as in the paper's
    non-negative trigger. Poisoning is ``clamp(image + pattern, 0, 1)``.

    Args:
        target_label: The class the trigger should force.
        poison_rate: Fraction of the training set that is poisoned (0.1, BackdoorBench's default).
        seed: Seed of the pattern and of the choice of samples.
        cutoff: Highest frequency kept, as a fraction of the Nyquist frequency, in (0, 1].
        epsilon: Largest absolute value of the pattern (its L-infinity norm), in (0, 1].
    """

    name = "low_frequency"

    cutoff: float = 0.25
    epsilon: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.cutoff <= 1.0:
            raise ConfigError(
                f"low_frequency cutoff must be in (0, 1] (a fraction of the Nyquist frequency), got {self.cutoff}."
            )
        if not 0.0 < self.epsilon <= 1.0:
            raise ConfigError(
                f"low_frequency epsilon must be in (0, 1] (the pattern's largest value), got {self.epsilon}."
            )

    def passband(self, height: int, width: int) -> Tensor:
        """``[H, W]`` bool: the Fourier components (in ``torch.fft.fft2``'s order) the pattern may contain."""
        half = self.cutoff / 2 + 1e-9  # cycles per pixel; the tolerance keeps a bin that lies on the cutoff
        rows = torch.fft.fftfreq(height, dtype=torch.float64).abs() <= half
        cols = torch.fft.fftfreq(width, dtype=torch.float64).abs() <= half
        return rows[:, None] & cols[None, :]

    def pattern(self, channels: int, height: int, width: int) -> Tensor:
        """The ``[C, H, W]`` float pattern: seeded noise, low-pass filtered, max-abs ``epsilon``."""
        noise = torch.randn(channels, height, width, generator=torch.Generator().manual_seed(self.seed))
        spectrum = torch.fft.fft2(noise.double()) * self.passband(height, width)
        # the window is symmetric under (k_y, k_x) -> (-k_y, -k_x), so the filtered noise stays real
        smooth = torch.fft.ifft2(spectrum).real
        peak = smooth.abs().max()
        if not peak > 0:  # every cutoff keeps the zero frequency: only noise summing to exactly 0 could get here
            raise ConfigError(f"low_frequency seed {self.seed} drew an all-zero pattern; use another seed.")
        return (smooth * (self.epsilon / peak)).float()

    def apply(self, images: Tensor, indices: Tensor | None = None) -> Tensor:
        return (images + self.pattern(*images.shape[1:]).to(images)).clamp(0.0, 1.0)
