"""Cross-process helpers that keep gradients, for losses computed over the global batch."""

import torch
import torch.distributed as dist
from torch import Tensor


def distributed_world_size() -> int:
    """Number of processes in the default group, or 1 when not running distributed."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sends every rank's gradient for a slice back to the slice's owner.

    Forward concatenates the ``[n_r, ...]`` tensors of all ranks (sizes may differ). Backward sums the
    incoming gradients over ranks (all-reduce) and returns this rank's rows. All-reduce is used instead of
    reduce-scatter because the gloo backend (CPU) has no reduce-scatter.
    """

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:  # type: ignore[override]
        world_size = dist.get_world_size()
        local_size = torch.tensor([tensor.shape[0]], device=tensor.device)
        sizes = [torch.zeros_like(local_size) for _ in range(world_size)]
        dist.all_gather(sizes, local_size)
        sizes_list = [int(s.item()) for s in sizes]
        max_size = max(sizes_list)
        padded = tensor.new_zeros((max_size, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        gathered = [torch.empty_like(padded) for _ in range(world_size)]
        dist.all_gather(gathered, padded.contiguous())
        ctx.sizes = sizes_list
        ctx.rank = dist.get_rank()
        return torch.cat([g[:n] for g, n in zip(gathered, sizes_list, strict=True)])

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]]


def gather_with_grad(tensor: Tensor) -> Tensor:
    """Concatenates ``tensor`` (``[n, ...]``) from every rank along dim 0, keeping the autograd graph.

    Every rank gets the same ``[sum(n_r), ...]`` tensor, rows ordered by rank. Outside a distributed run
    the tensor is returned unchanged.
    """
    if distributed_world_size() == 1:
        return tensor
    return _GatherWithGrad.apply(tensor)


def gather_no_grad(tensor: Tensor) -> Tensor:
    """Like :func:`gather_with_grad`, for tensors without gradients (labels)."""
    if distributed_world_size() == 1:
        return tensor
    with torch.no_grad():
        return _GatherWithGrad.apply(tensor)
