"""FLOP counting with fvcore, the way the paper counts (one multiply-add is one FLOP), whole and by component.

fvcore has no handle for fused attention, so without one it silently drops the attention products; the
handle below counts them as the two batched matrix products they replace.
"""
import warnings
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.models.convnext import ConvNeXtBlock

from .. import import_extra
from ..cabvit import CabViTBlock


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
        FlopCountAnalysis = import_extra('fvcore.nn', 'tools', 'Counting FLOPs').FlopCountAnalysis
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


def num_params(model: nn.Module) -> int:
    """Parameter count of `model`: the one count beside its FLOPs that reports, exports and benchmarks share."""
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, input_size: Union[int, Tuple[int, int]] = 224, in_chans: int = 3) -> int:
    """Total fvcore FLOPs (multiply-adds) of one image."""
    return int(flop_analysis(model, input_size, in_chans).total())


COMPONENTS = ('stem', 'ConvNeXt blocks', 'downsample', 'attention', 'TME', 'FFN', 'head')


def _component(name: str, module: nn.Module, parent: nn.Module) -> Optional[str]:
    """The component a module belongs to wholly, or None when its children are classified instead."""
    leaf = name.rsplit('.', 1)[-1]
    if name in ('stem', 'patch_embed'):
        return 'stem'
    if name in ('head', 'norm'):
        return 'head'
    if isinstance(module, ConvNeXtBlock):
        return 'ConvNeXt blocks'
    if leaf == 'downsample':
        return 'downsample'
    if isinstance(parent, CabViTBlock):
        return {'norm1': 'attention', 'attn': 'attention', 'digest_calib': 'attention', 'ls1': 'attention',
                'tme': 'TME', 'norm2': 'FFN', 'mlp': 'FFN', 'ls2': 'FFN'}.get(leaf)
    return None


def component_modules(model: nn.Module) -> Dict[str, List[str]]:
    """Names of the outermost modules of each component (stem, ConvNeXt blocks, ..., head)."""
    parents = {name: model.get_submodule(name.rsplit('.', 1)[0]) if '.' in name else model
               for name, _ in model.named_modules() if name}
    found: Dict[str, List[str]] = {c: [] for c in COMPONENTS}
    for name, module in model.named_modules():
        if not name or any(name.startswith(n + '.') for names in found.values() for n in names):
            continue
        component = _component(name, module, parents[name])
        if component:
            found[component].append(name)
    found['stem'] += [n for n, _ in model.named_parameters(recurse=False)]  # class token
    return found


def flops_by_component(
        model: nn.Module, input_size: Union[int, Tuple[int, int]] = 224,
) -> Dict[str, Dict[str, int]]:
    """Parameters and fvcore FLOPs of each component, the paper's Fig. 5 decomposition for a whole model.

    Every parameter belongs to exactly one component; FLOPs not inside any (none in the CabViT models) go to
    'other', so the components always sum to the total.
    """
    by_module = flop_analysis(model, input_size, getattr(model, 'in_chans', 3)).by_module()
    params = dict(model.named_parameters())
    out = {}
    assigned = set()
    for component, names in component_modules(model).items():
        names_params = [p for p in params if any(p == n or p.startswith(n + '.') for n in names)]
        assigned.update(names_params)
        out[component] = dict(
            params=sum(params[p].numel() for p in names_params),
            flops=sum(int(by_module.get(n, 0)) for n in names),
        )
    total_flops = int(by_module[''])
    out['other'] = dict(
        params=sum(p.numel() for n, p in params.items() if n not in assigned),
        flops=total_flops - sum(c['flops'] for c in out.values()),
    )
    return out
