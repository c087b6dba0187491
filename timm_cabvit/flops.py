"""FLOP counting with fvcore, the way the paper counts (one multiply-add is one FLOP).

fvcore has no handle for fused attention, so without one it silently drops the attention products; the
handle below counts them as the two batched matrix products they replace.
"""
import warnings
from typing import Any, List, Tuple, Union

import torch
import torch.nn as nn


def sdpa_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """q @ k^T and attn @ v of `scaled_dot_product_attention`: B * heads * Nq * Nk * (Dqk + Dv)."""
    q_shape, k_shape, v_shape = (x.type().sizes() for x in inputs[:3])
    *batch, num_queries, qk_dim = q_shape
    num_keys, v_dim = k_shape[-2], v_shape[-1]
    batch_size = 1
    for b in batch:
        batch_size *= b
    return batch_size * num_queries * num_keys * (qk_dim + v_dim)


ATTENTION_HANDLES = {
    'aten::scaled_dot_product_attention': sdpa_flop_jit,
}


def flop_analysis(
        model: nn.Module, input_size: Union[int, Tuple[int, int]] = 224, in_chans: int = 3,
) -> 'FlopCountAnalysis':  # noqa: F821
    """fvcore analysis of one image through `model` in eval mode, fused attention included."""
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', category=FutureWarning)  # fvcore scripts a loss with torch.jit on import
        from fvcore.nn import FlopCountAnalysis
    height, width = (input_size, input_size) if isinstance(input_size, int) else input_size
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    inputs = torch.randn(1, in_chans, height, width, device=param.device, dtype=param.dtype)
    analysis = FlopCountAnalysis(model, inputs).set_op_handle(**ATTENTION_HANDLES)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', category=FutureWarning)  # fvcore traces with the deprecated torch.jit
        analysis.total()  # run the trace now, while the model is in eval mode
    model.train(was_training)
    return analysis


def count_flops(model: nn.Module, input_size: Union[int, Tuple[int, int]] = 224, in_chans: int = 3) -> int:
    """Total fvcore FLOPs (multiply-adds) of one image."""
    return int(flop_analysis(model, input_size, in_chans).total())
