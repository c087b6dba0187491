"""FLOP counting with fvcore, the way the paper counts (one multiply-add is one FLOP), whole and by component.

fvcore has no handle for fused attention, so without one it silently drops the attention products; the
handle below counts them as the two batched matrix products they replace.
"""
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.models.convnext import ConvNeXtBlock

from .. import import_extra


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
# the children of a pre-norm block (CabViT's, and those of timm's ViT, Swin, EfficientFormer, LeViT, NextViT) by
# attribute name: a branch's norm and layer scale belong to its token mixer or FFN, as in the paper's Fig. 5
BLOCK_PARTS = {'norm1': 'attention', 'attn': 'attention', 'digest_calib': 'attention', 'ls1': 'attention',
               'tme': 'TME', 'norm2': 'FFN', 'mlp': 'FFN', 'ls2': 'FFN'}
# the model's own children that are its stem and its head (timm's names)
STEM_NAMES = ('stem', 'patch_embed')
HEAD_NAMES = ('head', 'head_dist', 'norm', 'norm_pre', 'fc_norm')


def _component(name: str, module: nn.Module, parent: nn.Module) -> Optional[str]:
    """The component a module belongs to wholly, or None when its children are classified instead."""
    leaf = name.rpartition('.')[2]
    kind, parent_kind = type(module).__name__, type(parent).__name__
    if name in STEM_NAMES:
        return 'stem'
    if name in HEAD_NAMES:
        return 'head'
    if isinstance(module, ConvNeXtBlock):
        return 'ConvNeXt blocks'
    if leaf == 'downsample':
        return 'downsample'
    if 'Block' in parent_kind and leaf in BLOCK_PARTS:
        return BLOCK_PARTS[leaf]
    if 'Attention' in kind or kind == 'Pooling':  # the token mixers of timm's peers
        return 'attention'
    if 'Mlp' in kind:
        return 'FFN'
    return None


def component_fn(model: nn.Module) -> Callable[[str], str]:
    """Maps a path in `model` (a module's, '' for the model itself, or a parameter's) to its component.

    One taxonomy for FLOP counts (`flops_by_component`, the paper's Fig. 5) and for the op counts and profiles of
    benchmarks/traffic.py and gpu_profile.py, across CabViT and timm peers (convnext, efficientformer, levit,
    nextvit, ...): a module belongs to the component of its outermost classified ancestor (itself included): the
    stem, the head, a whole ConvNeXt block, a downsampling layer, a block's part by name (`BLOCK_PARTS`), else a
    token mixer or MLP by class name. Everything else, such as the residual adds, layout changes and digest
    concatenation of blocks and stages, is 'other'. The model's own parameters (a class token) are the stem's; a
    nested parameter is its module's.
    """
    modules = dict(model.named_modules())
    components = {'': 'other'}
    for name, module in modules.items():
        if name:
            parent = name.rpartition('.')[0]
            found = components[parent]
            components[name] = found if found != 'other' else _component(name, module, modules[parent]) or 'other'
    components.update({name: 'stem' for name, _ in model.named_parameters(recurse=False)})

    def component(path: str) -> str:
        return components[path] if path in components else components[path.rpartition('.')[0]]

    return component


def component_modules(model: nn.Module) -> Dict[str, List[str]]:
    """Names of the outermost modules (and model parameters) of each component (stem, ConvNeXt blocks, ..., head)."""
    component = component_fn(model)
    names = [n for n, _ in model.named_modules() if n] + [n for n, _ in model.named_parameters(recurse=False)]
    found: Dict[str, List[str]] = {c: [] for c in COMPONENTS}
    for name in names:
        if component(name) != 'other' and component(name.rpartition('.')[0]) == 'other':
            found[component(name)].append(name)
    return found


def flops_by_component(
        model: nn.Module, input_size: Union[int, Tuple[int, int]] = 224,
) -> Dict[str, Dict[str, int]]:
    """Parameters and fvcore FLOPs of each component, the paper's Fig. 5 decomposition for a whole model.

    Components as `component_fn` assigns them; parameters and FLOPs outside every component (none in the CabViT
    models; a peer's block-level layers) go to 'other', so the components always sum to the totals.
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
