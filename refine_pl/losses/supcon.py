"""Supervised contrastive loss (Khosla et al., 2020) over the global batch."""

import torch
from torch import Tensor, nn

from refine_pl.distributed import gather_no_grad, gather_with_grad


class SupConLoss(nn.Module):
    """Supervised contrastive loss with one view per sample.

    For anchor ``i`` with positives ``P(i)`` (other samples with the same label) the loss is
    ``-1/|P(i)| * sum_{p in P(i)} log(exp(z_i.z_p / t) / sum_{a != i} exp(z_i.z_a / t))``, averaged over
    the anchors that have at least one positive (0 when none has). The REFINE reference stacks the same
    features twice as two "views", which only adds each sample's copy of itself as an extra positive;
    that constant pair is left out here.

    In a distributed run the features and labels of all processes are gathered (features with their
    gradients), so every process computes the loss of the global batch. Under DDP's gradient averaging
    this yields exactly the single-process gradient of the full batch. The loss is computed in (at least)
    float32, also under autocast.

    Args:
        temperature: Softmax temperature ``t`` (0.07 in the reference).

    Shapes:
        features: ``[B, D]``, L2-normalised rows.
        labels: ``[B]`` long.
        output: scalar.
    """

    def __init__(self, temperature: float = 0.07) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, features: Tensor, labels: Tensor) -> Tensor:
        features = gather_with_grad(features)
        labels = gather_no_grad(labels)
        # Under mixed precision autocast would run this matmul in 16 bits, which rounds the similarities (up to
        # 1/temperature = 14, where bfloat16's spacing is 1/16); the loss is computed in float32 instead.
        with torch.autocast(features.device.type, enabled=False):
            features = features.to(torch.promote_types(features.dtype, torch.float32))
            logits = features @ features.T / self.temperature
        self_mask = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
        logits = logits.masked_fill(self_mask, float("-inf"))
        log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
        positives = (labels[:, None] == labels[None, :]) & ~self_mask
        num_positives = positives.sum(dim=1)
        has_positive = num_positives > 0
        if not bool(has_positive.any()):
            return features.sum() * 0.0
        positive_log_prob = log_prob.masked_fill(~positives, 0.0).sum(dim=1)
        return -(positive_log_prob[has_positive] / num_positives[has_positive]).mean()
