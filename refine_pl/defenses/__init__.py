"""Backdoor defenses: one module per defense (REFINE and its ablations, the baselines), registered by name."""

# isort: off
# The import order is the registry's order (REFINE and its ablations first, then the baselines), which the
# benchmark's tables follow.
import refine_pl.defenses.refine  # noqa: F401 (registers REFINE and its ablations)
from refine_pl.defenses.autoencoder import AutoencoderDefense, ConvAutoencoder
from refine_pl.defenses.shrinkpad import ShrinkPad
from refine_pl.defenses.bit_depth import BitDepthReduction
from refine_pl.defenses.median import MedianFilter
from refine_pl.defenses.neural_cleanse import NeuralCleanse
from refine_pl.defenses.btidbf import BTIDBFPurification, BTIDBFUnlearning
from refine_pl.defenses.registry import DEFENSES, Defense
from refine_pl.input_transform_module import TrainingFreeDefense

# isort: on

__all__ = [
    "DEFENSES",
    "AutoencoderDefense",
    "BTIDBFPurification",
    "BTIDBFUnlearning",
    "BitDepthReduction",
    "ConvAutoencoder",
    "Defense",
    "MedianFilter",
    "NeuralCleanse",
    "ShrinkPad",
    "TrainingFreeDefense",
]
