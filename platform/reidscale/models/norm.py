"""Batch norm that survives DeepSpeed's bf16 mode.

DeepSpeed's bf16 mode casts a model's parameters to bf16 but leaves its buffers (the running
statistics) in fp32, and ``batch_norm`` refuses bf16 weights beside fp32 statistics. It does
accept a bf16 input with fp32 weights and statistics (that is how autocast runs it), so these
layers cast their weight and bias to the statistics' dtype and leave the input as it is.
In fp32 training they are plain batch norm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _StatsDtypeAffine:
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stats = self.running_mean
        if self.weight is None or stats is None or self.weight.dtype == stats.dtype:
            return super().forward(x)
        self._check_input_dim(x)
        # torch's _BatchNorm.forward, with the affine parameters cast
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        use_batch = self.training or not self.track_running_stats
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight.to(stats.dtype),
                            self.bias.to(stats.dtype), use_batch, factor, self.eps)


class BatchNorm1d(_StatsDtypeAffine, nn.BatchNorm1d):
    pass


class BatchNorm2d(_StatsDtypeAffine, nn.BatchNorm2d):
    pass


def bf16_safe_batchnorm(model: nn.Module) -> nn.Module:
    """Turn every plain BatchNorm1d/2d in ``model`` into the classes above, in place (same
    parameters, buffers and state-dict keys)."""
    for module in model.modules():
        if type(module) is nn.BatchNorm2d:
            module.__class__ = BatchNorm2d
        elif type(module) is nn.BatchNorm1d:
            module.__class__ = BatchNorm1d
    return model
