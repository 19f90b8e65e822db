"""Cross-process helpers that keep gradients, for losses computed over the global batch."""

import torch
import torch.distributed as dist
from torch import Tensor, nn


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


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training-mode statistics are those of the global batch of all processes.

    A drop-in for ``nn.BatchNorm1d/2d/3d`` (same parameters, buffers and ``state_dict``) that works on any
    device and backend, gloo on CPU included (``torch.nn.SyncBatchNorm`` needs a GPU). Per-channel sums are
    combined with :func:`gather_with_grad`, so gradients flow to the inputs of every process as if one
    process had normalised the whole batch. Outside a multi-process run, and in eval mode, it is
    ``BatchNorm``. Statistics are computed in at least float32 (mean first, then the centred second moment).
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"GlobalBatchNorm expects [N, C, ...] inputs, got shape {tuple(input.shape)}")

    def forward(self, input: Tensor) -> Tensor:
        if not self.training or distributed_world_size() == 1:
            return super().forward(input)
        self._check_input_dim(input)
        x = input.to(torch.promote_types(input.dtype, torch.float32))
        dims = [d for d in range(x.dim()) if d != 1]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = x.new_tensor([x.numel() / x.shape[1]])
        totals = gather_with_grad(torch.cat([x.sum(dims), count])[None]).sum(0)
        n = totals[-1].detach()
        mean = totals[:-1] / n
        centred = x - mean.view(shape)
        var = gather_with_grad(centred.square().sum(dims)[None]).sum(0) / n
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            with torch.no_grad():
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                unbiased = var * n / (n - 1).clamp_min(1)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        return out.to(input.dtype)


def use_global_batch_norm(module: nn.Module, device_type: str) -> nn.Module:
    """Replaces every batch-norm layer in ``module`` by one that normalises with global-batch statistics.

    On CUDA this is ``torch.nn.SyncBatchNorm`` (fused kernels); on other devices :class:`GlobalBatchNorm`.
    Parameters and buffers are moved over, not copied, so an optimizer built afterwards sees the same
    tensors, and ``state_dict`` keys are unchanged.

    Returns:
        The module (converted in place where possible; a bare batch-norm module is returned replaced).
    """
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
        module, (GlobalBatchNorm, nn.SyncBatchNorm)
    ):
        converted = GlobalBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            setattr(converted, name, tensor)
        return converted.train(module.training)
    for name, child in module.named_children():
        module.add_module(name, use_global_batch_norm(child, device_type))
    return module
