""" The TME (token merge and enhancement) of a CabViT block, and the choice of its implementation

Two implementations compute the same function: the PyTorch one in `TokenMergeEnhance.forward`, the reference that
runs everywhere and that TorchScript and FX tracing see, and the fused Triton kernels of `tme_triton` for CUDA
tensors. As timm's `use_fused_attn` / `set_fused_attn`, one module-level setting chooses (`set_tme_impl`, read at
forward time, from the environment variable TIMM_CABVIT_TME at import), and a model or module may override it.
Every setting is checked when it is made: an unknown name, or 'triton' without Triton installed, is refused by the
setters and, in TIMM_CABVIT_TME, ignored with a warning at import (see `_impl_from_environment`).
"""
import importlib.util
import os
import warnings
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import FoldableConvNormAct, channels_last_parameter

__all__ = ['FUSED_TME_MIN_BATCH', 'TME_IMPLS', 'TokenMergeEnhance', 'get_tme_impl', 'set_tme_impl']

Grid = Tuple[int, int]

MERGE_STRIDE = 4
HAS_TRITON = importlib.util.find_spec('triton') is not None
TME_IMPLS = ('auto', 'triton', 'torch')
# 'auto' picks the fused kernel only where it was measured faster: one H100, bf16 autocast, channels-last, eager
# (../shared/perf-notes.md, 2026-11-27). Inference without gradients at batch 256: cabvit_h_l2 8,115 img/s fused
# against 7,707 with the PyTorch TME (+5 %), cabvit_h_l1 12,574 against 12,024 (+5 %). Slower everywhere else that
# was measured: training at batch 128 (h_l2 1,657 against 1,792 img/s, h_l1 1,751 against 2,307) and batch-1 fp32
# inference (h_l2 17.2 against 8.3 ms). Batches between 1 and 256 were not measured: they take the PyTorch path.
FUSED_TME_MIN_BATCH = 256


def _check_tme_impl(impl: str) -> str:
    """`impl` if it names an implementation that can run here, else a ValueError or ImportError saying why not."""
    if impl not in TME_IMPLS:
        raise ValueError(f"TME implementation must be 'auto', 'triton' or 'torch', got {impl!r}")
    if impl == 'triton' and not HAS_TRITON:
        raise ImportError(
            "TME implementation 'triton' needs Triton, which is not installed: pip install triton (CUDA builds of "
            "torch on Linux bring it), or use 'auto' or 'torch'", name='triton')
    return impl


def _impl_from_environment() -> str:
    """TIMM_CABVIT_TME, or 'auto' with a warning that names the variable where it names no implementation that can
    run here.

    A warning, not an error: timm's scripts import this package through the `timm.models` entry-point hook on
    `import timm`, which would turn an error into unregistered models, over a setting of speed only (both
    implementations compute the same function).
    """
    impl = os.environ.get('TIMM_CABVIT_TME') or 'auto'
    try:
        return _check_tme_impl(impl)
    except (ValueError, ImportError) as e:
        warnings.warn(
            f"TIMM_CABVIT_TME={impl!r} is ignored, the TME implementation is 'auto': {e}", RuntimeWarning, stacklevel=2)
        return 'auto'


_TME_IMPL = _impl_from_environment()


def get_tme_impl() -> str:
    """The TME implementation of modules that were not given their own: TIMM_CABVIT_TME, or `set_tme_impl`'s."""
    return _TME_IMPL


def set_tme_impl(impl: Optional[str], model: Optional[nn.Module] = None) -> None:
    """Select the TME implementation: 'auto' (the measured rule of `TokenMergeEnhance._use_triton`), 'triton'
    (fused kernel) or 'torch'.

    As timm's `set_fused_attn`, one setting for every model, read at forward time; with `model`, only for the
    TME modules of that model, overriding the setting, which None gives back to them. An unknown name is a
    ValueError and 'triton' without Triton installed an ImportError, here rather than at a forward pass.
    """
    global _TME_IMPL
    if impl is None and model is None:
        raise ValueError(
            "None gives a model's TME modules back to the module-level setting: pass the model, or set the "
            "module-level setting to 'auto', 'triton' or 'torch'")
    if impl is not None:
        _check_tme_impl(impl)
    if model is None:
        _TME_IMPL = impl
        return
    for module in model.modules():
        if isinstance(module, TokenMergeEnhance):
            module.set_impl(impl)


class TokenMergeEnhance(nn.Module):
    """TME: a depthwise 7x7 stride-4 conv merges the tokens into digests; a depthwise 3x3 conv + BN enhances them.

    The enhanced map replaces the input (no residual). Prefix tokens (a class token) bypass both branches.
    `enhance=False` leaves the enhance branch out (the paper's ablation without it).

    Two implementations compute it: the PyTorch one in `forward`, the reference and all that TorchScript and FX
    tracing see, and a fused Triton kernel (`tme_triton`) that works on the tokens in place. `tme_impl` picks one:
    'torch', 'triton', 'auto' (Triton where it was measured faster: CUDA inference without gradients in batches of
    at least FUSED_TME_MIN_BATCH), or None for the module-level setting (`set_tme_impl`, from the environment
    variable TIMM_CABVIT_TME, default 'auto').
    """
    tme_impl: Optional[str]

    def __init__(
            self,
            dim: int,
            merge: bool = True,
            enhance: bool = True,
            num_prefix_tokens: int = 0,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.merge = nn.Conv2d(
            dim, dim, 7, stride=MERGE_STRIDE, padding=3, groups=dim, bias=False, **dd) if merge else None
        self.enhance = FoldableConvNormAct(
            dim, dim, 3, padding=1, groups=dim, apply_act=False, **dd) if enhance else None
        for conv in (self.merge, self.enhance.conv if enhance else None):
            if conv is not None:
                conv.weight = channels_last_parameter(conv.weight)
        self.tme_impl = None

    @torch.jit.ignore
    def set_impl(self, impl: Optional[str]) -> None:
        """This module's implementation: 'auto', 'triton', 'torch', or None for the module-level setting."""
        self.tme_impl = impl if impl is None else _check_tme_impl(impl)

    def remove_merge(self) -> None:
        """Drop the merge branch: a block whose digests no later block reads (DDP wants every parameter used)."""
        self.merge = None

    @torch.jit.unused
    def _use_triton(self, x: torch.Tensor) -> bool:
        """Triton when asked for; for 'auto', where it was measured faster (see FUSED_TME_MIN_BATCH): CUDA
        tensors, Triton installed, eval mode, no gradient and batches of FUSED_TME_MIN_BATCH or more. Never for FX
        proxies.

        The kernel computes conv and BatchNorm itself, so a TME without its enhance branch, or with the BatchNorm
        already folded (`timm.utils.reparameterize_model`), runs the PyTorch path.
        """
        impl = self.tme_impl or _TME_IMPL  # both checked when they were set
        if impl == 'torch' or isinstance(x, torch.fx.Proxy) or not isinstance(self.enhance, FoldableConvNormAct):
            return False
        if impl == 'triton':
            return True
        return (x.is_cuda and HAS_TRITON and not self.training and not x.requires_grad
                and x.shape[0] >= FUSED_TME_MIN_BATCH)

    @torch.jit.unused
    def _narrow_on_cpu(self, x_map: torch.Tensor, grid: Grid) -> bool:
        return not isinstance(x_map, torch.fx.Proxy) and grid[1] < MERGE_STRIDE and x_map.device.type == 'cpu'

    @torch.jit.unused
    def _merge_float32(self, x_map: torch.Tensor) -> torch.Tensor:
        """The merge conv in float32, whatever the model's dtype or autocast: for maps narrower than the stride.

        There oneDNN's bfloat16 depthwise convolution (channels-last, as the TME's maps are, and under CPU autocast
        in either layout) leaves uninitialised memory, often NaN or inf, in the weight gradient of taps that lie in
        the padding (torch 2.14; the reproduction is in the CHANGELOG). Such maps have at most 3 columns: the
        float32 conv costs nothing measurable.
        """
        conv = self.merge
        with torch.autocast(x_map.device.type, enabled=False):
            digest = F.conv2d(x_map.float(), conv.weight.float(), None, conv.stride, conv.padding, groups=conv.groups)
        return digest.to(x_map.dtype)

    @torch.jit.unused
    def _forward_triton(self, x: torch.Tensor, grid_size: Grid) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        from .tme_triton import token_merge_enhance  # on first use: importing it defines the Triton kernels

        return token_merge_enhance(
            x, self.enhance.conv.weight, self.merge.weight if self.merge is not None else None, self.enhance.bn,
            grid_size, self.num_prefix_tokens)

    def forward(self, x: torch.Tensor, grid_size: Grid) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Enhanced tokens and digests of tokens on `grid_size` (the TME holds no grid: any grid, no resizing)."""
        if not torch.jit.is_scripting() and self._use_triton(x):
            return self._forward_triton(x, grid_size)
        B, N, C = x.shape
        prefix, tokens = x[:, :self.num_prefix_tokens], x[:, self.num_prefix_tokens:]
        x_map = tokens.transpose(1, 2).reshape(B, C, grid_size[0], grid_size[1])
        digest = None
        if self.merge is not None:
            narrow = not torch.jit.is_scripting() and self._narrow_on_cpu(x_map, grid_size)
            digest = (self._merge_float32(x_map) if narrow else self.merge(x_map)).flatten(2).transpose(1, 2)
        if self.enhance is None:
            return x, digest
        x = self.enhance(x_map).flatten(2).transpose(1, 2)
        if self.num_prefix_tokens:
            x = torch.cat([prefix, x], dim=1)
        return x, digest
