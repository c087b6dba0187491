""" CabViT: Cross Attention among Blocks for Vision Transformer

Paper: `CabViT: Cross Attention among Blocks for Vision Transformer` - https://arxiv.org/abs/2211.07198

A CabViT block attends not only to its own tokens but also to "digest" tokens: each earlier block of the
same stage leaves a few tokens behind, merged from its output by a strided depthwise convolution (the token
merge of the TME module). Queries stay the block's own N tokens, so the extra keys cost N * i * S per head.

CabViT-H (hybrid): ConvNeXt stages 1-2, CabViT stages 3-4, the same function as the authors' reference
implementation (its checkpoints load through `checkpoint_filter_fn`). CabViT-P: DeiT-Tiny with CabViT blocks.
`ARCHITECTURE.md` of this project states the function precisely.
"""
import importlib.util
import math
import os
from contextlib import contextmanager, nullcontext
from functools import partial
from typing import Callable, Dict, Iterator, List, Optional, Set, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (
    ConvNormAct,
    DropPath,
    LayerNorm2d,
    LayerScale,
    Mlp,
    NormMlpClassifierHead,
    PatchEmbed,
    RelPosBias,
    calculate_drop_path_rates,
    get_device_dtype,
    ndgrid,
    resize_rel_pos_bias_table,
    to_2tuple,
    trunc_normal_,
    use_fused_attn,
)
from timm.layers._fx import register_notrace_function
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint, checkpoint_seq
from timm.models.convnext import ConvNeXtBlock

__all__ = ['CabViT', 'CabViTPlain', 'CabViTBlock']

MERGE_STRIDE = 4
HAS_TRITON = importlib.util.find_spec('triton') is not None


def digest_grid_size(grid_size: Tuple[int, int]) -> Tuple[int, int]:
    """Grid of digest tokens left by one block: the 7x7 stride-4 merge conv (pad 3) gives ceil(H/4) x ceil(W/4)."""
    return math.ceil(grid_size[0] / MERGE_STRIDE), math.ceil(grid_size[1] / MERGE_STRIDE)


def resize_token_grid(table: torch.Tensor, old_size: Tuple[int, int], new_size: Tuple[int, int]) -> torch.Tensor:
    """Resample a table whose last dim is a row-major token grid, e.g. a (heads, H * W) bias.

    LeViT-style position biases, digest scales and depth biases are all laid out this way, so one bicubic
    resampling (as timm's `resize_rel_pos_bias_table_levit`, but for non-square grids too) serves them all.
    """
    old_size, new_size = tuple(old_size), tuple(new_size)
    if old_size == new_size:
        return table
    lead = table.shape[:-1]
    grid = table.float().reshape(-1, 1, *old_size)
    grid = F.interpolate(grid, size=new_size, mode='bicubic', align_corners=False)
    return grid.reshape(*lead, new_size[0] * new_size[1]).to(table.dtype)


@torch.no_grad()
def resized_parameter(param: nn.Parameter, old_size: Tuple[int, int], new_size: Tuple[int, int]) -> nn.Parameter:
    """A grid-laid parameter resampled to another token grid, frozen if the original was (set_input_size)."""
    return nn.Parameter(resize_token_grid(param, old_size, new_size), requires_grad=param.requires_grad)


@register_notrace_function
def check_input(x: torch.Tensor, in_chans: int, img_size: Tuple[int, int]) -> torch.Tensor:
    """Reject input the position and depth bias tables were not built for, with what was expected."""
    if x.ndim != 4 or x.shape[1] != in_chans:
        raise ValueError(
            f'CabViT expects images of shape (B, {in_chans}, H, W), got {list(x.shape)}; '
            f'create the model with another in_chans for images of other channel counts.')
    if x.shape[2] != img_size[0] or x.shape[3] != img_size[1]:
        raise ValueError(
            f'CabViT was built for {img_size[0]}x{img_size[1]} images (its bias tables are sized for that grid), '
            f'got {x.shape[2]}x{x.shape[3]}; create it with img_size=({x.shape[2]}, {x.shape[3]}) '
            f'or call set_input_size().')
    return x


class ConvBnAct(ConvNormAct):
    """timm's ConvNormAct (conv, BatchNorm, activation) that folds the BatchNorm into the conv for inference.

    `timm.utils.reparameterize_model` replaces it with the result of `fuse()`: a biased conv, followed by the
    activation where there is one.
    """

    @torch.no_grad()
    def fuse(self) -> nn.Module:
        conv, bn = self.conv, self.bn
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        fused = nn.Conv2d(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            conv.groups, bias=True, padding_mode=conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype)
        fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
        bias = bn.bias - bn.running_mean * scale
        fused.bias.copy_(bias if conv.bias is None else bias + conv.bias * scale)
        tail = [m for m in (bn.drop, bn.act) if not isinstance(m, nn.Identity)]
        return nn.Sequential(fused, *tail) if tail else fused


class GridPosBias(nn.Module):
    """LeViT-style position bias: one learnable value per head and absolute offset (|dy|, |dx|) on the grid."""

    def __init__(self, num_heads: int, grid_size: Tuple[int, int], device=None, dtype=None):
        super().__init__()
        self.grid_size = grid_size
        num_tokens = grid_size[0] * grid_size[1]
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, num_tokens, device=device, dtype=dtype))
        self.register_buffer(
            'attention_bias_idxs',
            torch.empty((num_tokens, num_tokens), device=device, dtype=torch.long),
            persistent=False,
        )
        self._init_buffers()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.attention_biases)
        self._init_buffers()

    def _init_buffers(self) -> None:
        device = self.attention_bias_idxs.device
        if device.type == 'meta':
            return
        pos = torch.stack(ndgrid(
            torch.arange(self.grid_size[0], device=device),
            torch.arange(self.grid_size[1], device=device),
        )).flatten(1)
        rel_pos = (pos[..., :, None] - pos[..., None, :]).abs()
        self.attention_bias_idxs.copy_(rel_pos[0] * self.grid_size[1] + rel_pos[1])

    def init_non_persistent_buffers(self) -> None:
        self._init_buffers()

    def set_grid_size(self, grid_size: Tuple[int, int]) -> None:
        if tuple(grid_size) == tuple(self.grid_size):
            return
        self.attention_biases = resized_parameter(self.attention_biases, self.grid_size, grid_size)
        self.grid_size = grid_size
        num_tokens = grid_size[0] * grid_size[1]
        self.attention_bias_idxs = self.attention_bias_idxs.new_empty((num_tokens, num_tokens))
        self._init_buffers()

    def get_bias(self) -> torch.Tensor:
        return self.attention_biases[:, self.attention_bias_idxs]


class RelativeDepthBias(nn.Module):
    """Attention bias of the digest keys: one value per head, relative depth and digest token.

    Block i sees the digests of block j at relative depth i - j. The table is indexed by relative depth
    (index 0: the previous block) and returned in key order, oldest digests first.
    """

    def __init__(
            self, num_heads: int, depth: int, digest_grid: Tuple[int, int], device=None, dtype=None):
        super().__init__()
        self.digest_grid = digest_grid
        num_digest = digest_grid[0] * digest_grid[1]
        self.bias = nn.Parameter(torch.zeros(num_heads, depth, num_digest, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.bias)

    def set_grid_size(self, digest_grid: Tuple[int, int]) -> None:
        self.bias = resized_parameter(self.bias, self.digest_grid, digest_grid)
        self.digest_grid = digest_grid

    def get_bias(self) -> torch.Tensor:
        return self.bias.flip(1).flatten(1).unsqueeze(1)  # (heads, 1, depth * num_digest)


class DigestCalibration(nn.Module):
    """Scale each digest token by a learnable scalar, then LayerNorm (the reference's order, see module doc).

    The LayerNorm after the scale cancels it but for eps; kept for compatibility with the reference weights.
    `scale=False` leaves the scales out (the paper's ablation without them).
    """

    def __init__(
            self,
            dim: int,
            depth: int,
            digest_grid: Tuple[int, int],
            norm_layer: Type[nn.Module],
            scale: bool = True,
            device=None,
            dtype=None,
    ):
        super().__init__()
        self.digest_grid = digest_grid
        num_digest = digest_grid[0] * digest_grid[1]
        self.scale = nn.Parameter(torch.ones(depth, num_digest, device=device, dtype=dtype)) if scale else None
        self.norm = norm_layer(dim, device=device, dtype=dtype)

    def reset_parameters(self) -> None:
        if self.scale is not None:
            nn.init.ones_(self.scale)

    def set_grid_size(self, digest_grid: Tuple[int, int]) -> None:
        if self.scale is not None:
            self.scale = resized_parameter(self.scale, self.digest_grid, digest_grid)
        self.digest_grid = digest_grid

    def forward(self, digests: torch.Tensor) -> torch.Tensor:
        if self.scale is not None:
            digests = digests * self.scale.reshape(1, -1, 1)
        return self.norm(digests)


class CrossBlockAttention(nn.Module):
    """Multi-head attention whose keys and values are the block's tokens followed by the digest tokens.

    The digests go through the same qkv projection as the tokens. Their queries are unused; projecting them
    anyway is what the reference does and what its FLOP figures count (0.7-1.7 % of the total).
    """
    attention_bias_cache: Dict[str, Tuple[List[int], torch.Tensor]]

    def __init__(
            self,
            dim: int,
            num_heads: int,
            pos_bias: nn.Module,
            depth_bias: Optional[RelativeDepthBias] = None,
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'dim {dim} must be divisible by num_heads {num_heads}')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fused_attn = use_fused_attn()
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.pos_bias = pos_bias
        self.depth_bias = depth_bias
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.attention_bias_cache = {}

    @torch.no_grad()
    def train(self, mode: bool = True):
        super().train(mode)
        self.attention_bias_cache = {}
        return self

    def _apply(self, fn, *args, **kwargs):
        self.attention_bias_cache = {}
        return super()._apply(fn, *args, **kwargs)

    def _attention_bias(self) -> torch.Tensor:
        bias = self.pos_bias.get_bias()
        bias = bias.view(-1, bias.shape[-2], bias.shape[-1])
        if self.depth_bias is not None:
            bias = torch.cat([bias, self.depth_bias.get_bias().expand(-1, bias.shape[1], -1)], dim=-1)
        return bias

    def get_attention_bias(self, device: torch.device) -> torch.Tensor:
        """Position and depth bias combined, (heads, N, N + digests).

        Cached per device, as LeViT does, but only where no gradient is wanted (eval mode under no_grad or
        inference_mode) and only while the tables are the ones it was built from: the cache is keyed on their
        storage and version counters, which every in-place change (load_state_dict, copy_, an EMA update) bumps.
        """
        if torch.jit.is_scripting() or torch.jit.is_tracing() or self.training or torch.is_grad_enabled():
            return self._attention_bias()
        return self._cached_attention_bias(device)

    @torch.jit.unused
    def _cached_attention_bias(self, device: torch.device) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self._attention_bias()
        tables = [*self.pos_bias.parameters(), *(self.depth_bias.parameters() if self.depth_bias is not None else ())]
        key = [n for t in tables for n in (t.data_ptr(), t._version)]
        cached = self.attention_bias_cache.get(str(device))
        if cached is None or cached[0] != key:
            cached = self.attention_bias_cache[str(device)] = (key, self._attention_bias())
        return cached[1]

    def _qkv(
            self, x: torch.Tensor, digests: Optional[torch.Tensor],
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries of the tokens; keys and values of the tokens followed by those of the digests."""
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if digests is not None:
            _, k_d, v_d = self.qkv(digests).reshape(
                B, -1, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            k = torch.cat([k, k_d], dim=2)
            v = torch.cat([v, v_d], dim=2)
        return q, k, v

    @torch.jit.ignore
    def attention_weights(self, x: torch.Tensor, digests: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Softmax attention of each token over tokens and digests, (B, heads, N, N + digests), for inspection."""
        q, k, _ = self._qkv(x, digests)
        bias = self.get_attention_bias(x.device).to(q.dtype)
        return ((q * self.scale) @ k.transpose(-2, -1) + bias).softmax(dim=-1)

    def forward(self, x: torch.Tensor, digests: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self._qkv(x, digests)
        bias = self.get_attention_bias(x.device).to(q.dtype)

        if self.fused_attn:
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias, dropout_p=self.attn_drop.p if self.training else 0.)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1) + bias
            attn = self.attn_drop(attn.softmax(dim=-1))
            x = attn @ v
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class TokenMergeEnhance(nn.Module):
    """TME: a depthwise 7x7 stride-4 conv merges the tokens into digests; a depthwise 3x3 conv + BN enhances them.

    The enhanced map replaces the input (no residual). Prefix tokens (a class token) bypass both branches.
    `enhance=False` leaves the enhance branch out (the paper's ablation without it).

    Two implementations compute it: the PyTorch one in `forward`, the reference and all that TorchScript and FX
    tracing see, and a fused Triton kernel (`tme_triton`) that works on the tokens in place. `tme_impl` picks one:
    'torch', 'triton', or 'auto' (Triton for CUDA tensors when Triton is installed). It is read from the environment
    variable TIMM_CABVIT_TME when the module is built (default 'auto'); the models' `set_tme_impl()` changes it.
    """
    tme_impl: str

    def __init__(
            self,
            dim: int,
            grid_size: Tuple[int, int],
            merge: bool = True,
            enhance: bool = True,
            num_prefix_tokens: int = 0,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.grid_size = grid_size
        self.num_prefix_tokens = num_prefix_tokens
        self.merge = nn.Conv2d(
            dim, dim, 7, stride=MERGE_STRIDE, padding=3, groups=dim, bias=False, **dd) if merge else None
        self.enhance = ConvBnAct(dim, dim, 3, padding=1, groups=dim, apply_act=False, **dd) if enhance else None
        self.set_impl(os.environ.get('TIMM_CABVIT_TME', 'auto'))

    @torch.jit.ignore
    def set_impl(self, impl: str) -> None:
        """Select the implementation: 'auto', 'triton' or 'torch'."""
        if impl not in ('auto', 'triton', 'torch'):
            raise ValueError(
                f"TME implementation (TIMM_CABVIT_TME, set_tme_impl) must be 'auto', 'triton' or 'torch', got '{impl}'")
        self.tme_impl = impl

    @torch.jit.unused
    def _use_triton(self, x: torch.Tensor) -> bool:
        """Triton when asked for, or for 'auto' on CUDA tensors with Triton installed; never for FX proxies.

        The kernel computes conv and BatchNorm itself, so a TME without its enhance branch, or with the BatchNorm
        already folded (`timm.utils.reparameterize_model`), runs the PyTorch path.
        """
        if self.tme_impl == 'torch' or isinstance(x, torch.fx.Proxy) or not isinstance(self.enhance, ConvBnAct):
            return False
        return self.tme_impl == 'triton' or (x.is_cuda and HAS_TRITON)

    @torch.jit.unused
    def _forward_triton(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        from .tme_triton import token_merge_enhance  # on first use: importing it defines the Triton kernels

        return token_merge_enhance(
            x, self.enhance.conv.weight, self.merge.weight if self.merge is not None else None, self.enhance.bn,
            self.grid_size, self.num_prefix_tokens)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if not torch.jit.is_scripting() and self._use_triton(x):
            return self._forward_triton(x)
        B, N, C = x.shape
        prefix, tokens = x[:, :self.num_prefix_tokens], x[:, self.num_prefix_tokens:]
        x_map = tokens.transpose(1, 2).reshape(B, C, self.grid_size[0], self.grid_size[1])
        digest = self.merge(x_map).flatten(2).transpose(1, 2) if self.merge is not None else None
        if self.enhance is None:
            return x, digest
        x = self.enhance(x_map).flatten(2).transpose(1, 2)
        if self.num_prefix_tokens:
            x = torch.cat([prefix, x], dim=1)
        return x, digest


class PreNormMlp(Mlp):
    """timm's Mlp behind a LayerNorm of its own: the reference applies two LayerNorms before the FFN."""

    def __init__(self, dim: int, hidden_dim: int, act_layer: Type[nn.Module], norm_layer: Type[nn.Module],
                 drop: float = 0., device=None, dtype=None):
        super().__init__(dim, hidden_dim, act_layer=act_layer, drop=drop, device=device, dtype=dtype)
        self.pre_norm = norm_layer(dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop1(self.act(self.fc1(self.pre_norm(x))))
        return self.drop2(self.fc2(self.norm(x)))


class CabViTBlock(nn.Module):
    """Block i of a stage: attention over its tokens and the digests of blocks 0..i-1, TME, FFN.

    Returns the tokens and this block's digest tokens (None for the last block of a stage).
    `cross_block=False` makes it a plain block (no merge, no digest keys, scales, norm or depth bias),
    `digest_scale=False` drops the digest scales and `tme_enhance=False` the TME's 3x3 enhance branch: the paper's
    ablations.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            grid_size: Tuple[int, int],
            block_idx: int,
            merge: bool = True,
            num_prefix_tokens: int = 0,
            cross_block: bool = True,
            digest_scale: bool = True,
            tme_enhance: bool = True,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            ls_init_value: Optional[float] = 1e-6,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            act_layer: Type[nn.Module] = nn.GELU,
            norm_layer: Type[nn.Module] = nn.LayerNorm,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        digest_grid = digest_grid_size(grid_size)
        if num_prefix_tokens:
            pos_bias = RelPosBias(grid_size, num_heads, prefix_tokens=num_prefix_tokens, **dd)
        else:
            pos_bias = GridPosBias(num_heads, grid_size, **dd)
        if block_idx > 0 and cross_block:
            self.digest_calib = DigestCalibration(dim, block_idx, digest_grid, norm_layer, scale=digest_scale, **dd)
            depth_bias = RelativeDepthBias(num_heads, block_idx, digest_grid, **dd)
        else:
            self.digest_calib = None
            depth_bias = None

        self.norm1 = norm_layer(dim, **dd)
        self.attn = CrossBlockAttention(
            dim, num_heads, pos_bias, depth_bias, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop, **dd)
        self.ls1 = LayerScale(dim, ls_init_value, **dd) if ls_init_value is not None else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

        self.tme = TokenMergeEnhance(
            dim, grid_size, merge=merge and cross_block, enhance=tme_enhance, num_prefix_tokens=num_prefix_tokens, **dd)

        self.norm2 = norm_layer(dim, **dd)
        self.mlp = PreNormMlp(dim, int(dim * mlp_ratio), act_layer, norm_layer, drop=proj_drop, **dd)
        self.ls2 = LayerScale(dim, ls_init_value, **dd) if ls_init_value is not None else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def set_grid_size(self, grid_size: Tuple[int, int]) -> None:
        digest_grid = digest_grid_size(grid_size)
        if self.digest_calib is not None:
            self.digest_calib.set_grid_size(digest_grid)
            self.attn.depth_bias.set_grid_size(digest_grid)
        if isinstance(self.attn.pos_bias, RelPosBias):
            self.attn.pos_bias.set_window_size(grid_size)
        else:
            self.attn.pos_bias.set_grid_size(grid_size)
        self.attn.attention_bias_cache = {}
        self.tme.grid_size = grid_size

    def forward(
            self, x: torch.Tensor, digests: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if self.digest_calib is not None and digests is not None:
            digests = self.digest_calib(digests)
        else:
            digests = None
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), digests)))
        x, digest = self.tme(x)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, digest


@contextmanager
def _frozen_batchnorm_stats(module: nn.Module) -> Iterator[None]:
    """Momentum 0 for the BatchNorms of `module`: a checkpointed block's recomputation must not update them twice."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.momentum = 0.
    try:
        yield
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum


def checkpoint_block(
        block: nn.Module, x: torch.Tensor, digests: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Activation checkpointing of a CabViT block, digests included, keeping BatchNorm running stats exact."""
    return checkpoint(
        block, x, digests, use_reentrant=False, context_fn=lambda: (nullcontext(), _frozen_batchnorm_stats(block)))


class Downsample(nn.Module):
    """Stride-2 inverted bottleneck between stages: 1x1 conv, depthwise 3x3 stride 2, 1x1 conv, each with BN."""

    def __init__(self, in_chs: int, out_chs: int, act_layer: Type[nn.Module] = nn.GELU, device=None, dtype=None):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.conv1 = ConvBnAct(in_chs, out_chs, 1, act_layer=act_layer, **dd)
        self.conv2 = ConvBnAct(out_chs, out_chs, 3, stride=2, padding=1, groups=out_chs, act_layer=act_layer, **dd)
        self.conv3 = ConvBnAct(out_chs, out_chs, 1, apply_act=False, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.conv2(self.conv1(x)))


class ConvStage(nn.Module):
    """Optional downsample, then timm ConvNeXt blocks."""

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            depth: int,
            downsample: bool = True,
            mlp_ratio: float = 4.,
            ls_init_value: float = 1e-6,
            drop_path: Union[List[float], Tuple[float, ...]] = (),
            act_layer: Type[nn.Module] = nn.GELU,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = Downsample(in_chs, out_chs, act_layer=act_layer, **dd) if downsample else nn.Identity()
        drop_path = list(drop_path) or [0.] * depth
        self.blocks = nn.Sequential(*[
            ConvNeXtBlock(
                out_chs, mlp_ratio=mlp_ratio, ls_init_value=ls_init_value, act_layer=act_layer,
                drop_path=drop_path[i], **dd)
            for i in range(depth)
        ])

    def set_grid_size(self, grid_size: Tuple[int, int]) -> None:
        """Convolutions work at any size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class CabViTStage(nn.Module):
    """Downsample, then CabViT blocks on the token sequence, threading the growing digest sequence through them.

    Input and output are NCHW maps, so stages and feature taps look alike across the hybrid model.
    """

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            depth: int,
            num_heads: int,
            grid_size: Tuple[int, int],
            cross_block: bool = True,
            digest_scale: bool = True,
            tme_enhance: bool = True,
            mlp_ratio: float = 4.,
            ls_init_value: float = 1e-6,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: Union[List[float], Tuple[float, ...]] = (),
            act_layer: Type[nn.Module] = nn.GELU,
            norm_layer: Type[nn.Module] = nn.LayerNorm,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.grad_checkpointing = False
        self.grid_size = grid_size
        self.downsample = Downsample(in_chs, out_chs, act_layer=act_layer, **dd)
        drop_path = list(drop_path) or [0.] * depth
        self.blocks = nn.ModuleList([
            CabViTBlock(
                out_chs,
                num_heads,
                grid_size,
                block_idx=i,
                merge=i < depth - 1,
                cross_block=cross_block,
                digest_scale=digest_scale,
                tme_enhance=tme_enhance,
                mlp_ratio=mlp_ratio,
                ls_init_value=ls_init_value,
                proj_drop=proj_drop,
                attn_drop=attn_drop,
                drop_path=drop_path[i],
                act_layer=act_layer,
                norm_layer=norm_layer,
                **dd,
            )
            for i in range(depth)
        ])

    def set_grid_size(self, grid_size: Tuple[int, int]) -> None:
        self.grid_size = grid_size
        for block in self.blocks:
            block.set_grid_size(grid_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        B, C, H, W = x.shape
        x = x.flatten(2).transpose(1, 2)
        digests: Optional[torch.Tensor] = None
        for block in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x, digest = checkpoint_block(block, x, digests)
            else:
                x, digest = block(x, digests)
            if digest is not None:
                digests = digest if digests is None else torch.cat([digests, digest], dim=1)
        return x.transpose(1, 2).reshape(B, C, H, W)


def _stage_grids(img_size: Tuple[int, int], num_stages: int) -> List[Tuple[int, int]]:
    """Feature map size after each stage: every stride-2 conv (kernel 3, pad 1) gives ceil(size / 2)."""
    size, grids = img_size, []
    for i in range(num_stages):
        for _ in range(2 if i == 0 else 1):
            size = (math.ceil(size[0] / 2), math.ceil(size[1] / 2))
        grids.append(size)
    return grids


def _init_weights(module: nn.Module, ls_init_value: Optional[float] = None, needs_reset: bool = True) -> None:
    """Truncated-normal Linear and Conv weights as the reference; other modules reset themselves."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        trunc_normal_(module.weight, std=.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, ConvNeXtBlock) and module.gamma is not None and ls_init_value is not None:
        nn.init.constant_(module.gamma, ls_init_value)
    elif needs_reset and hasattr(module, 'reset_parameters'):
        module.reset_parameters()


class CabViT(nn.Module):
    """CabViT-H: ConvNeXt stages, then CabViT stages, a pooled LayerNorm + Linear head."""

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dims: Tuple[int, ...] = (64, 128, 192, 320),
            depths: Tuple[int, ...] = (2, 2, 6, 2),
            num_heads: Tuple[Optional[int], ...] = (None, None, 6, 10),
            cross_block: bool = True,
            digest_scale: bool = True,
            tme_enhance: bool = True,
            mlp_ratio: float = 4.,
            ls_init_value: float = 1e-6,
            act_layer: Union[str, Callable] = nn.GELU,
            norm_layer: Callable = partial(nn.LayerNorm, eps=1e-5),
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            device=None,
            dtype=None,
    ):
        """
        Args:
            img_size: Input image size; sizes the attention bias tables of the CabViT stages.
            in_chans: Number of input image channels.
            num_classes: Number of classes of the classifier (0 for none).
            global_pool: Pooling before the head: 'avg', 'max', 'avgmax', or '' for none.
            embed_dims: Channels of each stage.
            depths: Blocks in each stage.
            num_heads: Attention heads of each stage, None for a ConvNeXt stage.
            cross_block: Cross-block attention; False gives plain global attention with the position bias
                (no digests: no merge conv, digest keys, scales, norm or depth bias).
            digest_scale: The learnable digest scales; False leaves them out.
            tme_enhance: The TME's 3x3 enhance branch; False leaves it out.
            mlp_ratio: Hidden / input width of every MLP.
            ls_init_value: Initial layer scale of every block.
            drop_rate: Dropout before the classifier.
            proj_drop_rate: Dropout after attention and MLP projections.
            attn_drop_rate: Dropout of the attention weights.
            drop_path_rate: Stochastic depth, linear from 0 over all blocks.
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.img_size = to_2tuple(img_size)
        if min(self.img_size) < 32:
            raise ValueError(f'CabViT-H needs images of at least 32x32 (its output stride), got img_size={img_size}')
        if not len(embed_dims) == len(depths) == len(num_heads):
            raise ValueError('embed_dims, depths and num_heads need one entry per stage')
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        self.stem = nn.Sequential(
            ConvBnAct(in_chans, embed_dims[0] // 2, 3, stride=2, padding=1, act_layer=act_layer, **dd),
            ConvBnAct(embed_dims[0] // 2, embed_dims[0], 3, stride=2, padding=1, apply_act=False, **dd),
        )
        grids = _stage_grids(self.img_size, len(depths))
        dpr = [r.tolist() for r in torch.linspace(0, drop_path_rate, sum(depths), device='cpu').split(list(depths))]
        stages = []
        self.feature_info = []
        in_chs = embed_dims[0]
        for i, (dim, depth, heads) in enumerate(zip(embed_dims, depths, num_heads)):
            common = dict(mlp_ratio=mlp_ratio, ls_init_value=ls_init_value, drop_path=dpr[i], act_layer=act_layer, **dd)
            if heads is None:
                stages.append(ConvStage(in_chs, dim, depth, downsample=i > 0, **common))
            else:
                stages.append(CabViTStage(
                    in_chs, dim, depth, heads, grids[i], cross_block=cross_block, digest_scale=digest_scale,
                    tme_enhance=tme_enhance, proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, norm_layer=norm_layer,
                    **common))
            in_chs = dim
            self.feature_info.append(dict(num_chs=dim, reduction=2 ** (i + 2), module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)

        self.num_features = embed_dims[-1]
        self.head = NormMlpClassifierHead(
            self.num_features,
            num_classes,
            pool_type=global_pool,
            drop_rate=drop_rate,
            norm_layer=partial(LayerNorm2d, eps=norm_layer(1).eps),
            **dd,
        )
        self.head_hidden_size = self.head.num_features
        self.ls_init_value = ls_init_value
        self.init_weights(needs_reset=False)

    def init_weights(self, needs_reset: bool = True) -> None:
        """(Re)initialise all weights and index buffers, e.g. after meta-device construction and `to_empty()`."""
        self.apply(partial(_init_weights, ls_init_value=self.ls_init_value, needs_reset=needs_reset))

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return {n for n, _ in self.named_parameters() if n.endswith(('attention_biases', 'depth_bias.bias', '.scale'))}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Union[str, List]]:
        return dict(
            stem=r'^stem',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.downsample', (0,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def set_tme_impl(self, impl: str) -> None:
        """Select the TME implementation of every CabViT block: 'auto', 'triton' (fused kernel) or 'torch'."""
        for module in self.modules():
            if isinstance(module, TokenMergeEnhance):
                module.set_impl(impl)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.head.reset(num_classes, global_pool, in_features=self.num_features, **get_device_dtype(self))
        self.head_hidden_size = self.head.num_features

    def set_input_size(self, img_size: Union[int, Tuple[int, int]]) -> None:
        """Rebuild the bias tables for another input size (bicubic resampling of the learned ones)."""
        img_size = to_2tuple(img_size)
        if min(img_size) < 32:
            raise ValueError(f'CabViT-H needs images of at least 32x32 (its output stride), got img_size={img_size}')
        self.img_size = img_size
        for stage, grid in zip(self.stages, _stage_grids(img_size, len(self.stages))):
            stage.set_grid_size(grid)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward features and the stage outputs at strides 4, 8, 16, 32.

        Args:
            x: Input image tensor.
            indices: Take last n stages if int, all if None, select matching indices if sequence.
            norm: Unused, no stage output has a norm of its own (the head's norm works on pooled features).
            stop_early: Stop iterating over stages when the last desired intermediate is hit.
            output_fmt: Shape of intermediate feature outputs, only 'NCHW'.
            intermediates_only: Only return intermediate features.
        """
        if output_fmt != 'NCHW':
            raise ValueError(f"CabViT-H intermediates are NCHW maps, got output_fmt='{output_fmt}'")
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        x = self.stem(check_input(x, self.in_chans, self.img_size))
        if torch.jit.is_scripting() or not stop_early:
            stages = self.stages
        else:
            stages = self.stages[:max_index + 1]
        for feat_idx, stage in enumerate(stages):
            x = stage(x)
            if feat_idx in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[:max_index + 1]
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.num_classes = 0
            self.global_pool = ''
            self.head.reset(0, '', reset_other=True, in_features=self.num_features, **get_device_dtype(self))
            self.head_hidden_size = self.head.num_features
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(check_input(x, self.in_chans, self.img_size))
        return self.stages(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class CabViTPlain(nn.Module):
    """CabViT-P: DeiT with CabViT blocks (BEiT-style relative position bias with class-token entries)."""

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: int = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'token',
            embed_dim: int = 192,
            depth: int = 12,
            num_heads: int = 3,
            cross_block: bool = True,
            digest_scale: bool = True,
            tme_enhance: bool = True,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            ls_init_value: Optional[float] = None,
            act_layer: Type[nn.Module] = nn.GELU,
            norm_layer: Callable = partial(nn.LayerNorm, eps=1e-6),
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            device=None,
            dtype=None,
    ):
        """
        Args:
            img_size: Input image size; sizes the patch grid and its bias tables.
            patch_size: Patch size of the embedding.
            in_chans: Number of input image channels.
            num_classes: Number of classes of the classifier (0 for none).
            global_pool: 'token' (class token), 'avg' (patch tokens) or '' (no pooling).
            embed_dim: Token width.
            depth: Number of CabViT blocks (one stage).
            num_heads: Attention heads.
            cross_block: Cross-block attention; False gives DeiT with relative position bias and TME.
            digest_scale: The learnable digest scales; False leaves them out.
            tme_enhance: The TME's 3x3 enhance branch; False leaves it out.
            ls_init_value: Layer scale init, None for none (DeiT has none).
            drop_rate: Dropout before the classifier.
            drop_path_rate: Stochastic depth, linear from 0 over the blocks.
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if global_pool not in ('', 'avg', 'token'):
            raise ValueError(f"global_pool must be 'token', 'avg' or '', got '{global_pool}'")
        self.img_size = to_2tuple(img_size)
        if min(self.img_size) < patch_size:
            raise ValueError(f'CabViT-P needs images of at least {patch_size}x{patch_size}, got img_size={img_size}')
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(
            img_size=self.img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, **dd)
        grid_size = self.patch_embed.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **dd))
        dpr = calculate_drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.ModuleList([
            CabViTBlock(
                embed_dim,
                num_heads,
                grid_size,
                block_idx=i,
                merge=i < depth - 1,
                num_prefix_tokens=1,
                cross_block=cross_block,
                digest_scale=digest_scale,
                tme_enhance=tme_enhance,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                ls_init_value=ls_init_value,
                proj_drop=proj_drop_rate,
                attn_drop=attn_drop_rate,
                drop_path=dpr[i],
                act_layer=act_layer,
                norm_layer=norm_layer,
                **dd,
            )
            for i in range(depth)
        ])
        reduction = self.patch_embed.feat_ratio()
        self.feature_info = [dict(module=f'blocks.{i}', num_chs=embed_dim, reduction=reduction) for i in range(depth)]
        self.norm = norm_layer(embed_dim, **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.init_weights(needs_reset=False)

    def init_weights(self, needs_reset: bool = True) -> None:
        """(Re)initialise all weights and index buffers, e.g. after meta-device construction and `to_empty()`."""
        trunc_normal_(self.cls_token, std=.02)
        self.apply(partial(_init_weights, needs_reset=needs_reset))

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return {'cls_token'} | {
            n for n, _ in self.named_parameters()
            if n.endswith(('relative_position_bias_table', 'depth_bias.bias', '.scale'))}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Union[str, List]]:
        return dict(stem=r'^cls_token|patch_embed', blocks=[(r'^blocks\.(\d+)', None), (r'^norm', (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def set_tme_impl(self, impl: str) -> None:
        """Select the TME implementation of every CabViT block: 'auto', 'triton' (fused kernel) or 'torch'."""
        for module in self.modules():
            if isinstance(module, TokenMergeEnhance):
                module.set_impl(impl)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None:
            if global_pool not in ('', 'avg', 'token'):
                raise ValueError(f"global_pool must be 'token', 'avg' or '', got '{global_pool}'")
            self.global_pool = global_pool
        self.num_classes = num_classes
        dd = get_device_dtype(self)
        self.head = nn.Linear(self.embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.head.train(self.training)

    def set_input_size(self, img_size: Union[int, Tuple[int, int]]) -> None:
        """Rebuild the patch grid's bias tables for another input size (resampling the learned ones)."""
        img_size = to_2tuple(img_size)
        patch_size = self.patch_embed.patch_size
        if img_size[0] < patch_size[0] or img_size[1] < patch_size[1]:
            raise ValueError(f'CabViT-P needs images of at least {patch_size}, got img_size={img_size}')
        self.patch_embed.set_input_size(img_size=img_size)
        self.img_size = img_size
        for block in self.blocks:
            block.set_grid_size(self.patch_embed.grid_size)

    def _forward_tokens(
            self, x: torch.Tensor, take_indices: List[int], stop_index: int,
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Run blocks 0..stop_index, returning the last tokens and the outputs of the blocks in take_indices."""
        x = self.patch_embed(check_input(x, self.in_chans, self.img_size))
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        taken: List[torch.Tensor] = []
        digests: Optional[torch.Tensor] = None
        for i, block in enumerate(self.blocks):
            if i <= stop_index:  # no break: TorchScript unrolls loops over a ModuleList
                if self.grad_checkpointing and not torch.jit.is_scripting():
                    x, digest = checkpoint_block(block, x, digests)
                else:
                    x, digest = block(x, digests)
                if digest is not None:
                    digests = digest if digests is None else torch.cat([digests, digest], dim=1)
                if i in take_indices:
                    taken.append(x)
        return x, taken

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward features and the outputs of chosen blocks, as timm's VisionTransformer does.

        Args:
            x: Input image tensor.
            indices: Take last n blocks if int, all if None, select matching indices if sequence.
            return_prefix_tokens: Return (patch tokens, class token) pairs.
            norm: Apply the final norm to the intermediates.
            stop_early: Stop iterating over blocks when the last desired intermediate is hit.
            output_fmt: 'NCHW' maps or 'NLC' token sequences.
            intermediates_only: Only return intermediate features.
        """
        if output_fmt not in ('NCHW', 'NLC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got '{output_fmt}'")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        stop_index = max_index if stop_early and not torch.jit.is_scripting() else len(self.blocks) - 1
        x, intermediates = self._forward_tokens(x, take_indices, stop_index)
        if norm:
            intermediates = [self.norm(y) for y in intermediates]
        prefix_tokens = [y[:, :self.num_prefix_tokens] for y in intermediates]
        intermediates = [y[:, self.num_prefix_tokens:] for y in intermediates]
        if output_fmt == 'NCHW':
            H, W = self.patch_embed.grid_size
            intermediates = [y.reshape(y.shape[0], H, W, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if not torch.jit.is_scripting() and return_prefix_tokens:
            intermediates = list(zip(intermediates, prefix_tokens))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        self.blocks[-1].tme.merge = None  # no later block reads its digests (DDP wants every parameter used)
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self._forward_tokens(x, [], len(self.blocks) - 1)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == 'avg':
            x = x[:, self.num_prefix_tokens:].mean(dim=1)
        elif self.global_pool == 'token':
            x = x[:, 0]
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Map any checkpoint of a CabViT model to this model's keys and token grids, or say why it does not fit.

    Accepts our own state dict, timm train.py checkpoints (EMA weights first, as timm's `load_state_dict`) with
    DDP / torch.compile prefixes, and the authors' reference layout. Position biases, depth biases and digest
    scales saved at another input size are resampled. The classifier and the first conv are left as they are:
    timm's `load_pretrained` drops or adapts them for another num_classes or in_chans. Anything else that does
    not fit raises, as timm's loader turns strict loading off when it drops a classifier.
    """
    state_dict = _unwrap_checkpoint(state_dict)
    if any(k.startswith(('patch_embed.seq.', 'layer_', 'norm_head.')) for k in state_dict):
        state_dict = _convert_reference(state_dict)
    target = model.state_dict()
    token_grids, digest_grids = _source_grids(model)
    out = {}
    for k, v in state_dict.items():
        if k in target and isinstance(v, torch.Tensor) and v.shape != target[k].shape:
            module = model.get_submodule(k.rsplit('.', 1)[0])
            v = _resize_to_grid(module, v, target[k].shape, digest_grids if k.endswith(
                ('depth_bias.bias', 'digest_calib.scale')) else token_grids)
        out[k] = v
    for k, v in target.items():
        if k.endswith('.num_batches_tracked') and k not in out:
            out[k] = v  # a counter, not a weight: older BatchNorm checkpoints lack it
    _check_fits(out, target, model)
    return out


def _unwrap_checkpoint(checkpoint: Dict) -> Dict[str, torch.Tensor]:
    """The model weights of a checkpoint, without the DDP and torch.compile prefixes of their keys."""
    for key in ('state_dict_ema', 'model_ema', 'state_dict', 'model'):
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    out = {}
    for k, v in checkpoint.items():
        while k.startswith(('module.', '_orig_mod.')):
            k = k.split('.', 1)[1]
        out[k] = v
    return out


# Block members of the reference implementation and ours: ConvNeXt blocks (stages 1-2), then CabViT blocks.
_REFERENCE_BLOCK_KEYS = {
    'dwconv': 'conv_dw', 'pwconv1': 'mlp.fc1', 'pwconv2': 'mlp.fc2',
    'gamma_1': 'ls1.gamma', 'gamma_2': 'ls2.gamma',
    'attention_biases': 'attn.pos_bias.attention_biases',
    's_token_bias': 'attn.depth_bias.bias', 's_scale_factors': 'digest_calib.scale', 's_norm': 'digest_calib.norm',
    'qkv': 'attn.qkv', 'proj': 'attn.proj',
    'dw_conv': 'tme.merge', 'local_conv.c': 'tme.enhance.conv', 'local_conv.bn': 'tme.enhance.bn',
    'mlp.norm': 'mlp.pre_norm',
}


def _convert_reference(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename the reference implementation's keys to ours and lay out its digest tables as ours.

    Its downsample layers belong to the stage before them (ours to the stage after). Its block j keeps the depth
    biases (1, heads, 1, j * S) and digest scales (1, j * S, 1) of the digests in key order, oldest block first;
    ours are (heads, j, S) indexed by relative depth, previous block first, and (j, S) oldest first.
    Unknown keys keep their names, so that the fit check reports them.
    """
    out = {}
    for k, v in state_dict.items():
        parts = k.split('.')
        if k.startswith('patch_embed.seq.') and len(parts) == 5 and parts[2].isdigit():
            k = f'stem.{int(parts[2]) // 2}.{"conv" if parts[3] == "c" else parts[3]}.{parts[4]}'
        elif k.startswith('norm_head.'):
            k = 'head.norm.' + k[len('norm_head.'):]
        elif k in ('head.weight', 'head.bias'):
            k = 'head.fc.' + parts[1]
        elif parts[0].startswith('layer_') and parts[0][len('layer_'):].isdigit() and len(parts) > 3:
            stage = int(parts[0][len('layer_'):])
            if parts[1] == 'downsample' and len(parts) == 5:
                k = f'stages.{stage + 1}.downsample.{parts[2]}.{"conv" if parts[3] == "c" else parts[3]}.{parts[4]}'
            elif parts[1] == 'blocks' and parts[2].isdigit():
                k, v = _convert_reference_block(f'stages.{stage}.blocks.{parts[2]}.', int(parts[2]), parts[3:], v)
        out[k] = v
    return out


def _convert_reference_block(
        prefix: str, block_idx: int, member: List[str], value: torch.Tensor) -> Tuple[str, torch.Tensor]:
    """One key of a reference block: the longest known member name is renamed, digest tables laid out as ours."""
    for n in range(len(member), 0, -1):
        name = '.'.join(member[:n])
        if name in _REFERENCE_BLOCK_KEYS:
            member = _REFERENCE_BLOCK_KEYS[name].split('.') + member[n:]
            break
    key = prefix + '.'.join(member)
    if block_idx and key.endswith('attn.depth_bias.bias') and value.ndim == 4 and value.shape[-1] % block_idx == 0:
        value = value.reshape(value.shape[1], block_idx, -1).flip(1)
    elif block_idx and key.endswith('digest_calib.scale') and value.ndim == 3 and value.shape[1] % block_idx == 0:
        value = value.reshape(block_idx, -1)
    return key, value


def _source_grids(model: nn.Module) -> Tuple[List[Tuple[int, int]], List[Tuple[int, int]]]:
    """Token and digest grids of the model at the input size of its pretrained cfg, the checkpoint's size."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    img_size = tuple(cfg.get('input_size') or (3, 224, 224))[-2:]
    if isinstance(model, CabViTPlain):
        token_grids = [tuple(s // p for s, p in zip(img_size, model.patch_embed.patch_size))]
    elif isinstance(model, CabViT):
        token_grids = _stage_grids(img_size, len(model.stages))
    else:
        token_grids = []
    return token_grids, [digest_grid_size(g) for g in token_grids]


def _check_fits(state_dict: Dict[str, torch.Tensor], target: Dict[str, torch.Tensor], model: nn.Module) -> None:
    """Raise, listing keys and shapes, unless the state dict loads completely (classifier and first conv aside)."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    classifiers = cfg.get('classifier') or ()
    classifiers = (classifiers,) if isinstance(classifiers, str) else classifiers
    lenient = {f'{c}.{p}' for c in classifiers for p in ('weight', 'bias')}
    first_convs = cfg.get('first_conv') or ()
    first_convs = {f'{c}.weight' for c in ((first_convs,) if isinstance(first_convs, str) else first_convs)}

    def fits(k: str, v: torch.Tensor) -> bool:
        shape, want = tuple(v.shape), tuple(target[k].shape)
        if shape == want or k in lenient:
            return True
        # another in_chans, adapted by timm's load_pretrained
        return k in first_convs and len(shape) == 4 and shape[:1] + shape[2:] == want[:1] + want[2:]

    missing = [k for k in target if k not in state_dict and k not in lenient]
    unexpected = [k for k in state_dict if k not in target and k not in lenient]
    mismatched = [
        f'{k}: checkpoint {tuple(getattr(v, "shape", ()))}, model {tuple(target[k].shape)}'
        for k, v in state_dict.items()
        if k in target and not (isinstance(v, torch.Tensor) and fits(k, v))]
    if not (missing or unexpected or mismatched):
        return

    def listing(title: str, items: List[str], limit: int = 12) -> str:
        more = f'\n    ... and {len(items) - limit} more' if len(items) > limit else ''
        return f'\n  {title} ({len(items)}):\n    ' + '\n    '.join(items[:limit]) + more if items else ''

    model_desc = (
        f"{cfg.get('architecture') or type(model).__name__} (img_size {tuple(getattr(model, 'img_size', ()))}, "
        f"in_chans {getattr(model, 'in_chans', '?')}, num_classes {getattr(model, 'num_classes', '?')})")
    raise ValueError(
        f'The checkpoint from {_checkpoint_source(cfg)} does not fit {model_desc}: it is a checkpoint of another '
        f'model or size, and loading it would leave weights missing or unused.'
        + listing('missing from the checkpoint', missing)
        + listing('not in the model', unexpected)
        + listing('other shape', mismatched)
        + '\nCreate the model the checkpoint was trained as (its architecture and model_args), or pick the '
          'checkpoint of this model.')


def _checkpoint_source(cfg: Dict) -> str:
    """Where timm's load_pretrained takes the weights from, in its order, for error messages."""
    if cfg.get('source') == 'hf-hub' and cfg.get('hf_hub_id'):
        return f"Hugging Face Hub repo '{cfg['hf_hub_id']}'"
    if cfg.get('state_dict') is not None:
        return 'the state dict given as pretrained_cfg state_dict'
    if cfg.get('file'):
        return f"file '{cfg['file']}'"
    if cfg.get('hf_hub_id'):
        return f"Hugging Face Hub repo '{cfg['hf_hub_id']}'"
    return f"url '{cfg['url']}'" if cfg.get('url') else 'the given state dict'


def _resize_to_grid(
        module: nn.Module,
        value: torch.Tensor,
        shape: torch.Size,
        source_grids: Optional[List[Tuple[int, int]]] = None,
) -> torch.Tensor:
    """Resample a table saved for another token grid to the module's grid.

    The saved grid is the one of `source_grids` (the model's grids at the input size of the pretrained cfg) with
    as many tokens as the table, else a square grid, as timm assumes. Other tables are returned unchanged for the
    fit check to report.
    """
    if isinstance(module, RelPosBias):
        return resize_rel_pos_bias_table(value, new_window_size=module.window_size, new_bias_shape=tuple(shape))
    if isinstance(module, GridPosBias):
        new_grid = module.grid_size
    elif isinstance(module, (RelativeDepthBias, DigestCalibration)):
        new_grid = module.digest_grid
    else:
        return value
    num_tokens = value.shape[-1]
    if value.shape[:-1] != shape[:-1]:
        return value
    old_grid = next((g for g in source_grids or () if g[0] * g[1] == num_tokens), None)
    if old_grid is None:
        side = math.isqrt(num_tokens)
        if side * side != num_tokens:
            return value
        old_grid = (side, side)
    return resize_token_grid(value, old_grid, new_grid)


def _cfg(url: str = '', **kwargs) -> Dict:
    """Pretrained cfg of a CabViT checkpoint; ImageNet-1k at 224 unless overridden."""
    return {
        'url': url,
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7), 'fixed_input_size': True,
        'crop_pct': .9, 'interpolation': 'bicubic',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.0.conv', 'classifier': 'head.fc',
        'license': 'apache-2.0',
        'paper_ids': 'arXiv:2211.07198',
        'paper_name': 'CabViT: Cross Attention among Blocks for Vision Transformer',
        **kwargs,
    }


# Hub repos where ImageNet-1k weights are to be published (none are yet): `pretrained=True` downloads from them.
default_cfgs = generate_default_cfgs({
    'cabvit_p_l0.in1k': _cfg(
        hf_hub_id='timm-cabvit/cabvit_p_l0.in1k', pool_size=None, first_conv='patch_embed.proj', classifier='head'),
    'cabvit_h_l1.in1k': _cfg(hf_hub_id='timm-cabvit/cabvit_h_l1.in1k'),
    'cabvit_h_l2.in1k': _cfg(hf_hub_id='timm-cabvit/cabvit_h_l2.in1k'),
    'cabvit_h_l3.in1k': _cfg(hf_hub_id='timm-cabvit/cabvit_h_l3.in1k'),
})


def _create_cabvit(variant: str, pretrained: bool = False, **kwargs) -> CabViT:
    out_indices = kwargs.pop('out_indices', 4)
    return build_model_with_cfg(
        CabViT, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs,
    )


@register_model
def cabvit_p_l0(pretrained: bool = False, **kwargs) -> CabViTPlain:
    """CabViT-P-L0: DeiT-Tiny (192 wide, 12 blocks, 3 heads) with CabViT blocks, 5.9 M parameters."""
    model_args = dict(embed_dim=192, depth=12, num_heads=3)
    out_indices = kwargs.pop('out_indices', 3)
    return build_model_with_cfg(
        CabViTPlain, 'cabvit_p_l0', pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **dict(model_args, **kwargs),
    )


@register_model
def cabvit_h_l1(pretrained: bool = False, **kwargs) -> CabViT:
    """CabViT-H-L1: 6.2 M parameters, 1.4 GFLOPs at 224."""
    model_args = dict(embed_dims=(64, 128, 192, 320), depths=(2, 2, 6, 2), num_heads=(None, None, 6, 10))
    return _create_cabvit('cabvit_h_l1', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def cabvit_h_l2(pretrained: bool = False, **kwargs) -> CabViT:
    """CabViT-H-L2: 16.3 M parameters, 3.6 GFLOPs at 224."""
    model_args = dict(embed_dims=(96, 192, 320, 480), depths=(2, 2, 7, 2), num_heads=(None, None, 10, 15))
    return _create_cabvit('cabvit_h_l2', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def cabvit_h_l3(pretrained: bool = False, **kwargs) -> CabViT:
    """CabViT-H-L3 of the reference code (not in the paper): 27.9 M parameters, 6.7 GFLOPs at 224."""
    model_args = dict(embed_dims=(96, 192, 320, 512), depths=(3, 6, 12, 3), num_heads=(None, None, 10, 16))
    return _create_cabvit('cabvit_h_l3', pretrained=pretrained, **dict(model_args, **kwargs))
