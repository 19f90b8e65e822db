"""REFINE and its ablations: which part of ``M(f(T(x)))`` removes the backdoor.

- ``refine``: the U-Net ``T`` trained with the utility and the supervised contrastive loss, the derangement ``M``.
- ``refine_no_remap``: the same training, with the identity as ``M``: ``T`` has no class to move.
- ``refine_no_contrastive``: the derangement, ``T`` trained with the utility loss alone (contrastive weight 0).
- ``refine_remap_only``: the derangement ``M`` alone, no ``T`` (the identity) and nothing trained.
"""

from refine_pl.defenses.registry import DEFENSES, Defense
from refine_pl.input_transform_module import TrainingFreeDefense
from refine_pl.refine_module import RefineLitModule

DEFENSES.add(
    Defense(
        "refine",
        "REFINE",
        "T: U-Net trained by the utility and contrastive losses on unlabeled images; M: derangement",
        RefineLitModule,
        None,
    )
)
DEFENSES.add(
    Defense(
        "refine_no_remap",
        "REFINE, no remap",
        "REFINE with the identity as M (T trained with the same losses)",
        RefineLitModule,
        "configs/defenses/refine_no_remap.yaml",
    )
)
DEFENSES.add(
    Defense(
        "refine_no_contrastive",
        "REFINE, no contrastive",
        "REFINE with contrastive weight 0 (the utility loss alone)",
        RefineLitModule,
        "configs/defenses/refine_no_contrastive.yaml",
    )
)
DEFENSES.add(
    Defense(
        "refine_remap_only",
        "REFINE, remap only",
        "REFINE's derangement M alone: T the identity, nothing trained",
        TrainingFreeDefense,
        "configs/defenses/refine_remap_only.yaml",
    )
)
