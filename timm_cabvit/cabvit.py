""" CabViT: Cross Attention among Blocks for Vision Transformer

Paper: `CabViT: Cross Attention among Blocks for Vision Transformer` - https://arxiv.org/abs/2211.07198

A CabViT block attends not only to its own tokens but also to "digest" tokens: each earlier block of the
same stage leaves a few tokens behind, merged from its output by a strided depthwise convolution (the token
merge of the TME module). Queries stay the block's own N tokens, so the extra keys cost N * i * S per head.

CabViT-H (hybrid): ConvNeXt stages 1-2, CabViT stages 3-4, the same function as the authors' reference
implementation (its checkpoints load through `checkpoint_filter_fn`). CabViT-P: DeiT-Tiny with CabViT blocks.
ARCHITECTURE.md in the repository states the function precisely and maps the package.

The position biases, depth biases and digest scales are tables over token grids, sized for the model's
`img_size` as in timm's LeViT; `set_input_size()` and checkpoint loading resample them for another size.
"""
import math
import os
from contextlib import nullcontext
from functools import partial
from typing import Any, Callable, Dict, Final, Iterable, Iterator, List, Optional, Sequence, Set, Tuple, Type, Union

import huggingface_hub.constants
import torch
import torch.nn as nn
import torch.nn.functional as F
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import validate_repo_id
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (
    DropPath,
    LayerNorm2d,
    LayerScale,
    NormMlpClassifierHead,
    PatchEmbed,
    calculate_drop_path_rates,
    get_act_layer,
    get_device_dtype,
    use_fused_attn,
)
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, resolve_pretrained_cfg
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint, checkpoint_seq
from timm.models.convnext import ConvNeXtBlock

from .layers import (
    ClassTokenRelPosBias,
    FoldableConvNormAct,
    FusedGeluMlp,
    GridPosBias,
    batchnorm_momentum,
    called_as_is,
    check_img_size,
    check_input,
    compiled_inference,
    compiled_inference_op,
    relative_position_bias,
    resize_token_grid,
    resized_parameter,
    run_linear,
    trunc_normal_,
    window_row_index,
)
from .tme import TokenMergeEnhance, set_tme_impl
from .weights import (
    check_fits,
    checkpoint_metadata,
    fits_grids,
    resample_tables,
    saved_img_size,
    unwrap_checkpoint,
)

__all__ = ['CabViT', 'CabViTPlain', 'CabViTBlock']

Grid = Tuple[int, int]

# The largest attention bias (heads x queries x keys) built at once: 64 MB in float32. Larger inputs take their
# queries in chunks (CrossBlockAttention.query_chunks); at 224x224 no CabViT model comes near it.
MAX_BIAS_ELEMENTS = 2 ** 24
# Keys per attention mask row are padded to a multiple of this (CUDA's memory-efficient attention's alignment).
MASK_ALIGNMENT = 8


@torch.jit.unused
def _exporting_onnx() -> bool:
    return torch.onnx.is_in_onnx_export()


@torch.jit.unused
def _gather_whole_bias(table: torch.Tensor) -> bool:
    """Whether to gather the bias by one index of it: in eager mode (two ops instead of about fifteen: on CPU
    cabvit_h_l1 takes 0.96-0.98x the time, h_l2 0.99-1.0x, batch 1 at 2 threads; a backward of two ops) and under
    torch.compile (one simple gather kernel per block instead of a fused layout kernel to compile). Traces
    without gradients (jit.trace, the ONNX export) and FX proxies take the row-table layout, which gives the same
    bias from an O(N W) index."""
    if not isinstance(table, torch.Tensor):
        return False
    return not torch.jit.is_tracing() or (table.requires_grad and torch.is_grad_enabled())


@torch.jit.unused
def _in_func_transform(x: torch.Tensor) -> bool:
    """Inside torch.func's vmap or jvp, whose wrapped tensors PyTorch's fused CPU attention kernel has no batching
    or forward-mode rule for (torch 2.14): the attention is then written out."""
    if torch.compiler.is_compiling() or not isinstance(x, torch.Tensor):
        return False
    return torch._C._functorch.is_functorch_wrapped_tensor(x)


def gather_bias(table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(heads, queries, keys) entries of `table` (heads, entries) at `positions` (queries, keys).

    Without gradients by torch.gather with the index broadcast over the heads: PyTorch's CPU index_select along
    the entries runs on one thread (the bias of cabvit_h_l1's block stages.2.blocks.5, 6 x 196 x 280: 417 against
    243 us at 2 threads, 421 against 395 at 1, the index's conversion to int64 included). With gradients by
    index_select, whose backward (index_add) training has always taken.
    """
    if table.requires_grad and torch.is_grad_enabled():
        return table.index_select(1, positions.flatten()).view(table.shape[0], -1, positions.shape[1])
    index = positions.flatten().long().expand(table.shape[0], -1)
    return table.gather(1, index).view(table.shape[0], -1, positions.shape[1])


def _fake_bias_gather(tables: List[torch.Tensor], positions: torch.Tensor, num_heads: int) -> torch.Tensor:
    return tables[0].new_empty((num_heads, positions.shape[0], positions.shape[1]))


@compiled_inference_op('gather_bias(Tensor[] tables, Tensor positions, int num_heads) -> Tensor', _fake_bias_gather)
def _compiled_bias_gather(tables: List[torch.Tensor], positions: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The attention bias gathered from its tables as an op that torch.compile calls as it is. Written out,
    inductor makes the tables' concatenation and the gather one C++ kernel per block, as the sizes grow with the
    digests, at about a second of compile time each: cabvit_h_l2 compiles 32 kernels instead of 41, in 0.87x the
    time; compiled runtime 1.006x (h_l2) and 1.023x (h_l1) in one process."""
    table = torch.cat(tables, dim=1) if len(tables) > 1 else tables[0]
    return gather_bias(table, positions)


def _fake_cat_tokens(tensors: List[torch.Tensor]) -> torch.Tensor:
    first = tensors[0]
    return first.new_empty((first.shape[0], sum(t.shape[1] for t in tensors), first.shape[2]))


@compiled_inference_op('cat_tokens(Tensor[] tensors) -> Tensor', _fake_cat_tokens)
def _cat_tokens_op(tensors: List[torch.Tensor]) -> torch.Tensor:
    return torch.cat(tensors, dim=1)


@torch.jit.unused
def _compiled_cat_tokens(tensors: List[torch.Tensor]) -> torch.Tensor:
    return _cat_tokens_op(tensors)


def cat_tokens(tensors: List[torch.Tensor]) -> torch.Tensor:
    """Token sequences (B, N_i, C) joined along the tokens.

    In compiled inference as one op of the package that inductor calls as it is, as the digest calibration
    (`DigestCalibration`): written out, the digests' sequence, which grows block by block, makes inductor generate
    and compile C++ kernels of their own for each block. With both ops cabvit_h_l1 compiles 26 kernels instead of 32
    in 0.86x the time, cabvit_h_l2 26 instead of 33 in 0.88x (medians of 5 fresh-process pairs, caches off), at a
    compiled runtime of 1.018x and 1.012x (one process, interleaved).
    """
    if torch.jit.is_scripting() or not compiled_inference():
        return torch.cat(tensors, dim=1)
    return _compiled_cat_tokens(tensors)


def _fake_calibrate_digests(digests: torch.Tensor, scale: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                            bias: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    return torch.empty_like(digests)


@compiled_inference_op(
    'calibrate_digests(Tensor digests, Tensor? scale, Tensor? weight, Tensor? bias, float eps) -> Tensor',
    _fake_calibrate_digests)
def _calibrate_digests_op(
        digests: torch.Tensor, scale: Optional[torch.Tensor], weight: Optional[torch.Tensor],
        bias: Optional[torch.Tensor], eps: float,
) -> torch.Tensor:
    if scale is not None:
        digests = digests * scale.reshape(1, -1, 1)
    return F.layer_norm(digests, digests.shape[-1:], weight, bias, eps)


def digest_grid_size(grid_size: Grid) -> Grid:
    """Grid of digest tokens left by one block: the 7x7 stride-4 merge conv (pad 3) gives ceil(H/4) x ceil(W/4)."""
    return (grid_size[0] + 3) // 4, (grid_size[1] + 3) // 4  # tme.MERGE_STRIDE, a literal for TorchScript


class RelativeDepthBias(nn.Module):
    """Attention bias of the digest keys: one value per head, relative depth and digest token.

    Block i sees the digests of block j at relative depth i - j. The table is indexed by relative depth
    (index 0: the previous block) and returned in key order, oldest digests first. `grid_size` is the digest grid
    the table is laid out on.
    """

    def __init__(self, num_heads: int, depth: int, grid_size: Grid, device=None, dtype=None):
        super().__init__()
        self.depth = depth
        self.grid_size = tuple(grid_size)
        self.bias = nn.Parameter(torch.zeros(num_heads, depth, grid_size[0] * grid_size[1], device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.bias)

    def set_grid_size(self, grid_size: Grid) -> None:
        self.bias = resized_parameter(self.bias, self.grid_size, grid_size)
        self.grid_size = tuple(grid_size)

    def table(self, grid_size: Grid) -> torch.Tensor:
        """(heads, depth * digests) for digests on `grid_size`, by relative depth (the previous block first)."""
        bias = self.bias if grid_size == self.grid_size else self._resampled(grid_size)
        return bias.flatten(1)

    def key_order_index(self, num_digests: int, device: Optional[torch.device] = None) -> torch.Tensor:
        """The entries of `table()` in key order, the oldest block's digests first."""
        return (torch.arange(self.depth - 1, -1, -1, device=device)[:, None] * num_digests
                + torch.arange(num_digests, device=device)).flatten()

    @torch.jit.unused
    def _resampled(self, grid_size: Grid) -> torch.Tensor:
        return resize_token_grid(self.bias, self.grid_size, grid_size)


class DigestCalibration(nn.Module):
    """Scale each digest token by a learnable scalar, then LayerNorm (the reference's order).

    The LayerNorm after the scale cancels it but for eps; kept for compatibility with the reference weights.
    `scale=False` leaves the scales out (the paper's ablation without them). `grid_size` is the digest grid the
    scales are laid out on.
    """

    def __init__(
            self,
            dim: int,
            depth: int,
            grid_size: Grid,
            norm_layer: Type[nn.Module],
            scale: bool = True,
            device=None,
            dtype=None,
    ):
        super().__init__()
        self.grid_size = tuple(grid_size)
        num_digest = grid_size[0] * grid_size[1]
        self.scale = nn.Parameter(torch.ones(depth, num_digest, device=device, dtype=dtype)) if scale else None
        self.norm = norm_layer(dim, device=device, dtype=dtype)

    def reset_parameters(self) -> None:
        if self.scale is not None:
            nn.init.ones_(self.scale)

    def set_grid_size(self, grid_size: Grid) -> None:
        if self.scale is not None:
            self.scale = resized_parameter(self.scale, self.grid_size, grid_size)
        self.grid_size = tuple(grid_size)

    def forward(self, digests: torch.Tensor, grid_size: Grid) -> torch.Tensor:
        scale: Optional[torch.Tensor] = None
        if self.scale is not None:
            scale = self.scale if grid_size == self.grid_size else self._resampled_scale(grid_size)
        if not torch.jit.is_scripting() and self._as_one_op():
            return self._compiled(digests, scale)
        if scale is not None:
            digests = digests * scale.reshape(1, -1, 1)
        return self.norm(digests)

    @torch.jit.unused
    def _as_one_op(self) -> bool:
        """In compiled inference, for a plain LayerNorm: one op of the package (see `cat_tokens`)."""
        return compiled_inference() and type(self.norm) is nn.LayerNorm and called_as_is(self.norm)

    @torch.jit.unused
    def _compiled(self, digests: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
        return _calibrate_digests_op(digests, scale, self.norm.weight, self.norm.bias, self.norm.eps)

    @torch.jit.unused
    def _resampled_scale(self, grid_size: Grid) -> torch.Tensor:
        return resize_token_grid(self.scale, self.grid_size, grid_size)


# The learned tables laid out on a token grid, by the class that holds them: the parameter's name, and whether it
# lies on the digest grid of the block (depth biases, digest scales) rather than on its token grid (position
# biases). Each holder keeps its table's grid (`grid_size`) and resamples it (`set_grid_size`); the one place that
# names the tables: `table_owners` walks it for `set_input_size`, `table_grids` (checkpoint resampling) and
# `no_weight_decay`.
GRID_TABLES: Dict[Type[nn.Module], Tuple[str, bool]] = {
    GridPosBias: ('attention_biases', False),
    ClassTokenRelPosBias: ('relative_position_bias_table', False),
    RelativeDepthBias: ('bias', True),
    DigestCalibration: ('scale', True),
}


def table_owners(module: nn.Module, grid_size: Grid) -> Iterator[Tuple[str, nn.Module, Grid]]:
    """Each module in `module` that holds a grid-laid table, by name, with the grid its table takes when the tokens
    of `module` lie on `grid_size`."""
    for name, owner in module.named_modules():
        table = GRID_TABLES.get(type(owner))
        if table is not None:
            yield name, owner, digest_grid_size(grid_size) if table[1] else grid_size


def table_names(owners: Iterable[Tuple[str, nn.Module, Grid]]) -> Iterator[Tuple[str, Grid]]:
    """The state-dict name of each owner's table (none for absent digest scales) and its grid."""
    for name, owner, grid in owners:
        param = GRID_TABLES[type(owner)][0]
        if getattr(owner, param) is not None:
            yield f'{name}.{param}' if name else param, grid


def resize_tables(model: nn.Module, owners: Iterable[Tuple[str, nn.Module, Grid]]) -> None:
    """Resample each owner's table to its grid, then rebuild the index buffers that follow the grids."""
    for _, owner, grid in owners:
        owner.set_grid_size(grid)
    for module in model.modules():
        if isinstance(module, CrossBlockAttention):
            module.init_non_persistent_buffers()


class CrossBlockAttention(nn.Module):
    """Multi-head attention whose keys and values are the block's tokens followed by the digest tokens.

    The digests go through the same qkv projection as the tokens. Their queries are unused; projecting them
    anyway is what the reference does and what its FLOP figures count (0.7-1.7 % of the total).

    The position and depth biases are built from their tables on every forward pass; no bias is kept. On the
    position table's own grid one gather with an index of the whole bias (`bias_positions`, int32, built once for
    that grid) gives it: the fewest ops forward and backward. Otherwise (another grid, traces without gradients)
    one gather of O(N W) entries (`bias_index`) gives the position bias's row table and the depth biases in key
    order, and one gather of its rows (`window_rows`, O(N H)) the position bias (`layers.relative_position_bias`),
    with no (N, N) index. Past
    `max_bias_elements` the queries are taken in chunks of grid rows, so that a large input never holds the whole
    (heads, N, N + digests) bias.
    """
    max_bias_elements: Final[int]

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
        self.max_bias_elements = MAX_BIAS_ELEMENTS
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.pos_bias = pos_bias
        self.depth_bias = depth_bias
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.register_buffer('bias_index', self._bias_index(pos_bias.grid_size, device), persistent=False)
        self.register_buffer('window_rows', window_row_index(pos_bias.grid_size, device), persistent=False)
        self.register_buffer('bias_positions', self._bias_positions(), persistent=False)

    def init_non_persistent_buffers(self) -> None:
        """The index buffers for the grid of the position table (after construction on meta, or a resize)."""
        self.bias_index = self._bias_index(self.pos_bias.grid_size, self.bias_index.device)
        self.window_rows = window_row_index(self.pos_bias.grid_size, self.bias_index.device)
        self.bias_positions = self._bias_positions()

    def _table_parts(self, grid_size: Grid) -> List[torch.Tensor]:
        """The position table, then the depth table where there is one, (heads, entries) each."""
        parts = [self.pos_bias.table(grid_size)]
        if self.depth_bias is not None:
            parts.append(self.depth_bias.table(digest_grid_size(grid_size)))
        return parts

    def _tables(self, grid_size: Grid) -> torch.Tensor:
        """(heads, entries): the position table, then the depth table."""
        parts = self._table_parts(grid_size)
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    @torch.jit.unused
    def _compiled_gather(self, grid_size: Grid, positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        parts = [part.to(dtype) for part in self._table_parts(grid_size)]
        return _compiled_bias_gather(parts, positions, self.num_heads)

    @torch.jit.unused
    def _bias_index(self, grid_size: Grid, device: Optional[torch.device]) -> torch.Tensor:
        """Index into `_tables()`: the row table, class token entries, then the key columns after the tokens: the
        depth biases in key order and, up to a multiple of MASK_ALIGNMENT keys, padding (entry 0, never read)."""
        index = [self.pos_bias.bias_index(grid_size, device)]
        if self.depth_bias is not None:
            digests = digest_grid_size(grid_size)
            depth_index = self.depth_bias.key_order_index(digests[0] * digests[1], device)
            index.append(self.pos_bias.num_entries(grid_size) + depth_index)
        padding = -self.num_keys(grid_size) % MASK_ALIGNMENT
        if padding:
            index.append(torch.zeros(padding, dtype=torch.long, device=device))
        return torch.cat(index) if len(index) > 1 else index[0]

    def _bias_positions(self) -> torch.Tensor:
        """(queries, padded keys) entry of `_tables()` at each place of the bias on the position table's grid."""
        grid_size = self.pos_bias.grid_size
        entries = self.pos_bias.num_entries(grid_size)
        if self.depth_bias is not None:
            entries += self.depth_bias.bias[0].numel()
        table = torch.arange(entries, dtype=torch.int32, device=self.bias_index.device)[None]
        return self._layout(table, grid_size, (0, grid_size[0]), self.bias_index, self.window_rows)[0]

    def num_keys(self, grid_size: Grid) -> int:
        """Prefix tokens, tokens on `grid_size` and the digests of the earlier blocks."""
        digests = 0
        if self.depth_bias is not None:
            digest_grid = digest_grid_size(grid_size)
            digests = self.depth_bias.depth * digest_grid[0] * digest_grid[1]
        return self.pos_bias.num_prefix_tokens + grid_size[0] * grid_size[1] + digests

    def query_chunks(self, grid_size: Grid) -> List[Tuple[int, int]]:
        """Grid row ranges whose queries share one bias of at most `max_bias_elements` (at least one row each)."""
        height, width = grid_size
        rows = max(1, self.max_bias_elements // (self.num_heads * width * self.num_keys(grid_size)))
        return [(start, min(start + rows, height)) for start in range(0, height, rows)]

    def query_range(self, rows: Tuple[int, int], width: int) -> Tuple[int, int]:
        """Token positions of the queries in grid rows `rows`: the prefix tokens come with the first rows."""
        prefix = self.pos_bias.num_prefix_tokens
        return 0 if rows[0] == 0 else prefix + rows[0] * width, prefix + rows[1] * width

    def _layout(
            self,
            table: torch.Tensor,
            grid_size: Grid,
            rows: Tuple[int, int],
            index: torch.Tensor,
            window_rows: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """(heads, queries, padded keys) bias of the queries in grid rows `rows` from `table` (heads, entries).

        Queries: the prefix tokens with the first rows, then the tokens. Keys: prefix tokens, tokens, digests in
        key order, padding to a multiple of MASK_ALIGNMENT.
        """
        height, width = grid_size
        entries = table.index_select(1, index)
        num_prefix, num_rows = self.pos_bias.num_prefix_tokens, (rows[1] - rows[0]) * width
        row_entries = (2 * height - 1) * width * width
        num_columns = index.shape[0] - row_entries - 3 * num_prefix
        sizes: List[int] = [row_entries] + [3] * num_prefix
        if num_columns:
            sizes.append(num_columns)
        parts = entries.split(sizes, dim=1) if len(sizes) > 1 else [entries]
        bias = relative_position_bias(
            parts[0].reshape(-1, 2 * height - 1, width, width), grid_size, rows, window_rows)
        if num_prefix:
            to_tokens, from_tokens, to_itself = parts[1].unbind(1)
            bias = torch.cat([from_tokens[:, None, None].expand(-1, num_rows, 1), bias], dim=-1)
            if rows[0] == 0:
                prefix_row = torch.cat([to_itself[:, None], to_tokens[:, None].expand(-1, height * width)], dim=1)
                bias = torch.cat([prefix_row.unsqueeze(1), bias], dim=1)
                num_rows += 1
        if num_columns:
            bias = torch.cat([bias, parts[-1].unsqueeze(1).expand(-1, num_rows, -1)], dim=-1)
        return bias

    def attention_bias(self, grid_size: Grid, rows: Tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        """(1, heads, queries, keys) bias of the queries in grid rows `rows`, prefix tokens with the first rows.

        Its rows start at multiples of MASK_ALIGNMENT keys, which CUDA's memory-efficient attention otherwise pads
        the whole mask to, forward and backward. 4-D, the mask layout of PyTorch's fused CPU attention kernel; 3-D
        in an ONNX export, as the torch.export-based exporter fails to decompose attention with a 4-D mask of batch 1
        (torch 2.14) and ONNX Runtime broadcasts either.
        """
        table = self._tables(grid_size).to(dtype)
        if torch.jit.is_scripting():
            gather = table.requires_grad and torch.is_grad_enabled()
        else:
            gather = _gather_whole_bias(table)
        own_grid = grid_size == self.pos_bias.grid_size
        if own_grid and gather:
            start, end = self.query_range(rows, grid_size[1])
            positions = self.bias_positions[start:end]
            if torch.jit.is_scripting() or not compiled_inference():
                bias = gather_bias(table, positions)
            else:
                bias = self._compiled_gather(grid_size, positions, dtype)
        elif own_grid:
            bias = self._layout(table, grid_size, rows, self.bias_index, self.window_rows)
        else:
            bias = self._layout(table, grid_size, rows, self._bias_index(grid_size, table.device))
        bias = bias[:, :, :self.num_keys(grid_size)]
        return bias if not torch.jit.is_scripting() and _exporting_onnx() else bias.unsqueeze(0)

    def _qkv(
            self, x: torch.Tensor, digests: Optional[torch.Tensor],
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries of the tokens; keys and values of the tokens followed by those of the digests.

        One projection of tokens and digests together: one matmul, and no concatenation of keys and values.
        """
        B, N, C = x.shape
        tokens = x if digests is None else cat_tokens([x, digests])
        qkv = self.qkv(tokens) if torch.jit.is_scripting() else run_linear(self.qkv, tokens)
        qkv = qkv.reshape(B, tokens.shape[1], 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return q[:, :, :N], k, v

    @torch.jit.ignore
    def attention_weights(self, x: torch.Tensor, digests: Optional[torch.Tensor], grid_size: Grid) -> torch.Tensor:
        """Softmax attention of each token over tokens and digests, (B, heads, N, N + digests), for inspection."""
        q, k, _ = self._qkv(x, digests)
        bias = self.attention_bias(grid_size, (0, grid_size[0]), q.dtype)
        return ((q * self.scale) @ k.transpose(-2, -1) + bias).softmax(dim=-1)

    def forward(self, x: torch.Tensor, digests: Optional[torch.Tensor], grid_size: Grid) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self._qkv(x, digests)
        outputs: List[torch.Tensor] = []
        for rows in self.query_chunks(grid_size):
            bias = self.attention_bias(grid_size, rows, q.dtype)
            start, end = self.query_range(rows, grid_size[1])
            q_rows = q[:, :, start:end]
            if self.fused_attn and (torch.jit.is_scripting() or not _in_func_transform(q)):
                out = F.scaled_dot_product_attention(
                    q_rows, k, v, attn_mask=bias, dropout_p=self.attn_drop.p if self.training else 0.)
            else:
                attn = (q_rows * self.scale) @ k.transpose(-2, -1) + bias
                out = self.attn_drop(attn.softmax(dim=-1)) @ v
            outputs.append(out)
        x = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x) if torch.jit.is_scripting() else run_linear(self.proj, x))


class PreNormMlp(FusedGeluMlp):
    """timm's Mlp (its GELU fused on CPU) behind a LayerNorm of its own: the reference applies two LayerNorms
    before the FFN."""

    def __init__(self, dim: int, hidden_dim: int, act_layer: Type[nn.Module], norm_layer: Type[nn.Module],
                 drop: float = 0., device=None, dtype=None):
        super().__init__(dim, hidden_dim, act_layer=act_layer, drop=drop, device=device, dtype=dtype)
        self.pre_norm = norm_layer(dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.norm(self.hidden(self.pre_norm(x))))


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
            grid_size: Grid,
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
            pos_bias = ClassTokenRelPosBias(grid_size, num_heads, **dd)
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
            dim, num_heads, pos_bias, depth_bias, qkv_bias=qkv_bias, attn_drop=attn_drop,
            proj_drop=proj_drop, **dd)
        self.ls1 = LayerScale(dim, ls_init_value, **dd) if ls_init_value is not None else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

        self.tme = TokenMergeEnhance(
            dim, merge=merge and cross_block, enhance=tme_enhance, num_prefix_tokens=num_prefix_tokens, **dd)

        self.norm2 = norm_layer(dim, **dd)
        self.mlp = PreNormMlp(dim, int(dim * mlp_ratio), act_layer, norm_layer, drop=proj_drop, **dd)
        self.ls2 = LayerScale(dim, ls_init_value, **dd) if ls_init_value is not None else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(
            self, x: torch.Tensor, digests: Optional[torch.Tensor], grid_size: Grid,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Tokens on `grid_size` and the digests of the earlier blocks: the tokens and this block's digests."""
        if self.digest_calib is not None and digests is not None:
            digests = self.digest_calib(digests, digest_grid_size(grid_size))
        else:
            digests = None
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), digests, grid_size)))
        x, digest = self.tme(x, grid_size)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, digest


class CabViTBlocks(nn.ModuleList):
    """The CabViT blocks of one stage, threading the growing digest sequence from block to block.

    Shared by both models; block j of the chain attends to the digests of blocks 0..j-1. As a ModuleList its
    blocks keep the state-dict names `blocks.{j}`.
    """

    @classmethod
    def build(
            cls,
            dim: int,
            depth: int,
            num_heads: int,
            grid_size: Grid,
            drop_path: Sequence[float],
            num_prefix_tokens: int = 0,
            **block_kwargs: Any,
    ) -> 'CabViTBlocks':
        """`depth` blocks on one token grid: block j attends to the digests of 0..j-1, the last leaves none."""
        return cls([
            CabViTBlock(
                dim, num_heads, grid_size, block_idx=i, merge=i < depth - 1, num_prefix_tokens=num_prefix_tokens,
                drop_path=drop_path[i], **block_kwargs)
            for i in range(depth)
        ])

    def grid_size(self) -> Grid:
        """The token grid of the blocks, as their position tables hold it."""
        return self[0].attn.pos_bias.grid_size

    def truncate(self, num_blocks: int) -> 'CabViTBlocks':
        """The first `num_blocks` blocks; the last of them leaves no digests, as no later block reads them."""
        blocks = self[:num_blocks]
        blocks[-1].tme.remove_merge()
        return blocks

    def _checkpoint_block(
            self, block: nn.Module, x: torch.Tensor, digests: Optional[torch.Tensor], grid_size: Grid,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Activation checkpointing of a block, digests included; BatchNorm statistics updated once, not twice."""
        return checkpoint(
            block, x, digests, grid_size, use_reentrant=False,
            context_fn=lambda: (nullcontext(), batchnorm_momentum(block, 0.)))

    def forward(
            self,
            x: torch.Tensor,
            grid_size: Grid,
            grad_checkpointing: bool = False,
            take_indices: Optional[List[int]] = None,
            stop_index: int = -1,
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Tokens after blocks 0..stop_index (all if negative), and the outputs of the blocks in take_indices."""
        taken: List[torch.Tensor] = []
        digests: Optional[torch.Tensor] = None
        for i, block in enumerate(self):
            if stop_index < 0 or i <= stop_index:  # no break: TorchScript unrolls loops over a ModuleList
                if grad_checkpointing and not torch.jit.is_scripting():
                    x, digest = self._checkpoint_block(block, x, digests, grid_size)
                else:
                    x, digest = block(x, digests, grid_size)
                if digest is not None:
                    digests = digest if digests is None else cat_tokens([digests, digest])
                if take_indices is not None and i in take_indices:
                    taken.append(x)
        return x, taken


class Downsample(nn.Module):
    """Stride-2 inverted bottleneck between stages: 1x1 conv, depthwise 3x3 stride 2, 1x1 conv, each with BN."""

    def __init__(self, in_chs: int, out_chs: int, act_layer: Type[nn.Module] = nn.GELU, device=None, dtype=None):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.conv1 = FoldableConvNormAct(in_chs, out_chs, 1, act_layer=act_layer, **dd)
        self.conv2 = FoldableConvNormAct(
            out_chs, out_chs, 3, stride=2, padding=1, groups=out_chs, act_layer=act_layer, **dd)
        self.conv3 = FoldableConvNormAct(out_chs, out_chs, 1, apply_act=False, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.conv2(self.conv1(x)))


class ConvStage(nn.Module):
    """Optional downsample, then timm ConvNeXt blocks (their Mlp a `FusedGeluMlp`)."""

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            depth: int,
            downsample: bool = True,
            mlp_ratio: float = 4.,
            ls_init_value: float = 1e-6,
            drop_path: Sequence[float] = (),
            act_layer: Type[nn.Module] = nn.GELU,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = Downsample(in_chs, out_chs, act_layer=act_layer, **dd) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[
            ConvNeXtBlock(
                out_chs, mlp_ratio=mlp_ratio, ls_init_value=ls_init_value, act_layer=act_layer,
                drop_path=drop_path[i], **dd)
            for i in range(depth)
        ])
        for block in self.blocks:  # the same parameters and names as timm's Mlp, its GELU fused on CPU
            block.mlp = FusedGeluMlp(out_chs, block.mlp.fc1.out_features, act_layer=act_layer, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class CabViTStage(nn.Module):
    """Optional downsample, then CabViT blocks on the token sequence.

    Input and output are NCHW maps, so stages and feature taps look alike across the hybrid model.
    """

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            depth: int,
            num_heads: int,
            grid_size: Grid,
            downsample: bool = True,
            drop_path: Sequence[float] = (),
            act_layer: Type[nn.Module] = nn.GELU,
            dynamic_img_size: bool = False,
            device=None,
            dtype=None,
            **block_kwargs: Any,
    ):
        super().__init__()
        self.grad_checkpointing = False
        self.dynamic_img_size = dynamic_img_size
        self.downsample = Downsample(
            in_chs, out_chs, act_layer=act_layer, device=device, dtype=dtype) if downsample else nn.Identity()
        self.blocks = CabViTBlocks.build(
            out_chs, depth, num_heads, grid_size, drop_path, act_layer=act_layer, device=device, dtype=dtype,
            **block_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        B, C, H, W = x.shape
        # the blocks' own grid unless another one comes: static ints for FX and for exports traced at that size
        grid_size = self.blocks.grid_size()
        if self.dynamic_img_size and (H, W) != grid_size:
            grid_size = (H, W)
        x, _ = self.blocks(x.flatten(2).transpose(1, 2), grid_size, self.grad_checkpointing)
        return x.transpose(1, 2).reshape(B, C, H, W)


def _init_weights(module: nn.Module, ls_init_value: Optional[float] = None, needs_reset: bool = True) -> None:
    """Truncated-normal Linear and Conv weights as the reference; other modules reset themselves."""
    if needs_reset and hasattr(module, 'init_non_persistent_buffers'):
        module.init_non_persistent_buffers()
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
            dynamic_img_size: bool = False,
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
            dynamic_img_size: Take any input size per forward, the tables resampled to its grids (as timm's ViT).
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if not len(embed_dims) == len(depths) == len(num_heads):
            raise ValueError('embed_dims, depths and num_heads need one entry per stage')
        self.min_img_size = 2 ** (len(depths) + 1)  # the output stride
        self.img_size = check_img_size(img_size, self.min_img_size, 'CabViT-H')
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.dynamic_img_size = dynamic_img_size
        act_layer = get_act_layer(act_layer)

        self.stem = nn.Sequential(
            FoldableConvNormAct(in_chans, embed_dims[0] // 2, 3, stride=2, padding=1, act_layer=act_layer, **dd),
            FoldableConvNormAct(embed_dims[0] // 2, embed_dims[0], 3, stride=2, padding=1, apply_act=False, **dd),
        )
        grids = self.token_grids(self.img_size, len(depths))
        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        stages = []
        self.feature_info = []
        in_chs = embed_dims[0]
        for i, (dim, depth, heads) in enumerate(zip(embed_dims, depths, num_heads)):
            common = dict(mlp_ratio=mlp_ratio, ls_init_value=ls_init_value, drop_path=dpr[i], act_layer=act_layer, **dd)
            if heads is None:
                stages.append(ConvStage(in_chs, dim, depth, downsample=i > 0, **common))
            else:
                stages.append(CabViTStage(
                    in_chs, dim, depth, heads, grids[i], downsample=i > 0, cross_block=cross_block,
                    digest_scale=digest_scale, tme_enhance=tme_enhance, proj_drop=proj_drop_rate,
                    attn_drop=attn_drop_rate, norm_layer=norm_layer, dynamic_img_size=dynamic_img_size, **common))
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
        self.register_load_state_dict_pre_hook(load_state_dict_pre_hook)

    def init_weights(self, needs_reset: bool = True) -> None:
        """(Re)initialise all weights and index buffers, e.g. after meta-device construction and `to_empty()`."""
        self.apply(partial(_init_weights, ls_init_value=self.ls_init_value, needs_reset=needs_reset))

    @staticmethod
    def token_grids(img_size: Grid, num_stages: int = 4) -> List[Grid]:
        """Feature map size after each stage: every stride-2 conv (kernel 3, pad 1) gives ceil(size / 2)."""
        size, grids = img_size, []
        for i in range(num_stages):
            for _ in range(2 if i == 0 else 1):
                size = (math.ceil(size[0] / 2), math.ceil(size[1] / 2))
            grids.append(size)
        return grids

    @torch.jit.ignore
    def table_owners(self, img_size: Grid) -> Iterator[Tuple[str, nn.Module, Grid]]:
        """Each module holding a grid-laid table, with the grid its table takes at `img_size`."""
        for i, (stage, grid) in enumerate(zip(self.stages, self.token_grids(img_size, len(self.stages)))):
            for name, owner, table_grid in table_owners(stage, grid):
                yield f'stages.{i}.{name}', owner, table_grid

    @torch.jit.ignore
    def table_grids(self, img_size: Optional[Grid] = None) -> Dict[str, Grid]:
        """The grid each bias or scale table is laid out on at `img_size` (the model's own if None), by key."""
        return dict(table_names(self.table_owners(img_size or self.img_size)))

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return set(self.table_grids())

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
    def set_tme_impl(self, impl: Optional[str]) -> None:
        """Select the TME implementation of this model: 'auto', 'triton' (fused kernel), 'torch', or None for the
        module-level setting (`timm_cabvit.tme.set_tme_impl`)."""
        set_tme_impl(impl, self)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.head.reset(num_classes, global_pool, **get_device_dtype(self))
        self.head_hidden_size = self.head.num_features

    def set_input_size(self, img_size: Union[int, Tuple[int, int]]) -> None:
        """Rebuild the bias tables for another input size (bicubic resampling of the learned ones)."""
        self.img_size = check_img_size(img_size, self.min_img_size, 'CabViT-H')
        resize_tables(self, self.table_owners(self.img_size))

    def _stem_input(self, x: torch.Tensor) -> torch.Tensor:
        """The checked input, channels-last: the layout the ConvNeXt blocks leave their maps in anyway, and on CPU
        the stem's convolutions take 1.2-1.6 ms less in it (stem and stage 1 of cabvit_h_l1 / h_l2 at 224, batch 1,
        2 threads: 8.6 against 10.2 ms, 12.8 against 14.0)."""
        dtype = x.dtype if torch.jit.is_scripting() else self._input_dtype()
        x = check_input(x, self.in_chans, self.img_size, dtype, self.min_img_size, self.dynamic_img_size)
        return x.contiguous(memory_format=torch.channels_last)

    @torch.jit.unused
    def _input_dtype(self) -> torch.dtype:
        """The stem's dtype (the first stage may be a CabViT stage, and the stem may be re-parameterised)."""
        return next(self.stem.parameters()).dtype

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
        x = self.stem(self._stem_input(x))
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
            self.head = NormMlpClassifierHead(
                self.num_features, 0, pool_type='', norm_layer=nn.Identity, **get_device_dtype(self))
            self.head.train(self.training)
            self.head_hidden_size = self.head.num_features
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(self._stem_input(x)))

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
            dynamic_img_size: bool = False,
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
            dynamic_img_size: Take any input size per forward, the tables resampled to its patch grid (as timm's
                ViT); pixels past whole patches are dropped, as the fixed-size model's patch embedding drops them.
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if global_pool not in ('', 'avg', 'token'):
            raise ValueError(f"global_pool must be 'token', 'avg' or '', got '{global_pool}'")
        self.min_img_size = patch_size
        self.img_size = check_img_size(img_size, patch_size, 'CabViT-P')
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.grad_checkpointing = False
        self.dynamic_img_size = dynamic_img_size

        dynamic = dict(strict_img_size=False, output_fmt='NHWC') if dynamic_img_size else {}
        self.patch_embed = PatchEmbed(
            img_size=self.img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, **dynamic, **dd)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **dd))
        self.blocks = CabViTBlocks.build(
            embed_dim, depth, num_heads, self.patch_embed.grid_size, calculate_drop_path_rates(drop_path_rate, depth),
            num_prefix_tokens=1, cross_block=cross_block, digest_scale=digest_scale, tme_enhance=tme_enhance,
            mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, ls_init_value=ls_init_value, proj_drop=proj_drop_rate,
            attn_drop=attn_drop_rate, act_layer=act_layer, norm_layer=norm_layer, **dd)
        reduction = self.patch_embed.feat_ratio()
        self.feature_info = [dict(module=f'blocks.{i}', num_chs=embed_dim, reduction=reduction) for i in range(depth)]
        self.norm = norm_layer(embed_dim, **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.init_weights(needs_reset=False)
        self.register_load_state_dict_pre_hook(load_state_dict_pre_hook)

    def init_weights(self, needs_reset: bool = True) -> None:
        """(Re)initialise all weights and index buffers, e.g. after meta-device construction and `to_empty()`."""
        trunc_normal_(self.cls_token, std=.02)
        self.apply(partial(_init_weights, needs_reset=needs_reset))

    def token_grids(self, img_size: Grid) -> List[Grid]:
        """The patch grid, the one token grid of the model."""
        return [(img_size[0] // self.patch_embed.patch_size[0], img_size[1] // self.patch_embed.patch_size[1])]

    @torch.jit.ignore
    def table_owners(self, img_size: Grid) -> Iterator[Tuple[str, nn.Module, Grid]]:
        """Each module holding a grid-laid table, with the grid its table takes at `img_size`."""
        for name, owner, grid in table_owners(self.blocks, self.token_grids(img_size)[0]):
            yield f'blocks.{name}', owner, grid

    @torch.jit.ignore
    def table_grids(self, img_size: Optional[Grid] = None) -> Dict[str, Grid]:
        """The grid each bias or scale table is laid out on at `img_size` (the model's own if None), by key."""
        return dict(table_names(self.table_owners(img_size or self.img_size)))

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return {'cls_token'} | set(self.table_grids())

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Union[str, List]]:
        return dict(stem=r'^cls_token|patch_embed', blocks=[(r'^blocks\.(\d+)', None), (r'^norm', (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def set_tme_impl(self, impl: Optional[str]) -> None:
        """Select the TME implementation of this model: 'auto', 'triton' (fused kernel), 'torch', or None for the
        module-level setting (`timm_cabvit.tme.set_tme_impl`)."""
        set_tme_impl(impl, self)

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
        self.img_size = check_img_size(img_size, self.min_img_size, 'CabViT-P')
        self.patch_embed.set_input_size(img_size=self.img_size)
        resize_tables(self, self.table_owners(self.img_size))

    def _forward_tokens(
            self, x: torch.Tensor, take_indices: Optional[List[int]] = None, stop_index: int = -1,
    ) -> Tuple[torch.Tensor, List[torch.Tensor], Grid]:
        """Run blocks 0..stop_index: the last tokens, the outputs of the blocks in take_indices, the patch grid."""
        x = check_input(x, self.in_chans, self.img_size, self.patch_embed.proj.weight.dtype, self.min_img_size,
                        self.dynamic_img_size)
        if self.dynamic_img_size:  # whole patches: the fixed-size model's strided conv drops the rest too
            patch_h, patch_w = self.patch_embed.patch_size
            x = x[:, :, :x.shape[2] // patch_h * patch_h, :x.shape[3] // patch_w * patch_w]
        x = self.patch_embed(x)
        if self.dynamic_img_size:
            grid_size = (x.shape[1], x.shape[2])
            if grid_size == self.patch_embed.grid_size:  # static ints for exports traced at the model's own size
                grid_size = self.patch_embed.grid_size
            x = x.flatten(1, 2)
        else:
            grid_size = self.patch_embed.grid_size
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x, taken = self.blocks(x, grid_size, self.grad_checkpointing, take_indices, stop_index)
        return x, taken, grid_size

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
        stop_index = max_index if stop_early and not torch.jit.is_scripting() else -1
        x, intermediates, (H, W) = self._forward_tokens(x, take_indices, stop_index)
        if norm:
            intermediates = [self.norm(y) for y in intermediates]
        prefix_tokens = [y[:, :self.num_prefix_tokens] for y in intermediates]
        intermediates = [y[:, self.num_prefix_tokens:] for y in intermediates]
        if output_fmt == 'NCHW':
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
        self.blocks = self.blocks.truncate(max_index + 1)
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x, _, _ = self._forward_tokens(x)
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


# Checkpoints: the reference layout, and the one rule of every load

def is_reference_layout(state_dict: Dict[str, Any]) -> bool:
    """Keys of the authors' reference implementation (its stem, stages and head are named differently)."""
    return any(k.startswith(('patch_embed.seq.', 'layer_', 'norm_head.')) for k in state_dict)


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


def convert_reference(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
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


def fit_tables(
        state_dict: Dict[str, torch.Tensor],
        model: nn.Module,
        img_size: Optional[Grid] = None,
        warn_unrecorded: bool = False,
) -> Dict[str, torch.Tensor]:
    """The state dict in our layout with its tables on the model's grids: the one rule of every load.

    The authors' reference layout is converted; tables saved for another input size are resampled from the grids
    of the size the checkpoint was trained at: `img_size` where the checkpoint records it, else as
    `saved_img_size` tells. Tables that fit no size are left for the fit check to report. `warn_unrecorded`: warn
    where tables that fit a non-square model's own grids could be those of the transposed size (a file of unknown
    origin), not for a state dict of the model's own (a resumed run).
    """
    if is_reference_layout(state_dict):
        state_dict = convert_reference(state_dict)
    if img_size is None and not warn_unrecorded and fits_grids(state_dict, model.table_grids()):
        return state_dict
    source_size = saved_img_size(state_dict, model, img_size)
    if source_size is None:
        return state_dict
    return resample_tables(state_dict, model.table_grids(source_size), model.table_grids())


def load_state_dict_pre_hook(model: nn.Module, state_dict: Dict[str, Any], prefix: str, *args: Any) -> None:
    """`load_state_dict` pre-hook of the CabViT models: every path that loads a state dict (timm's
    `checkpoint_path=`, `load_checkpoint`, train.py `--resume`, a plain `model.load_state_dict`) follows
    `fit_tables`, and a state dict with weights of other shapes, or NaN or inf, is refused before any weight is
    copied, with one error that says how to build the model it fits. Missing and unexpected keys are left to
    `load_state_dict` (torch does not tell its hooks whether the load is strict).

    The state dict is edited in place, as torch's own hooks do: a converted or resampled one replaces the model's
    keys under `prefix`.
    """
    own = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    fitted = fit_tables(own, model)
    source = "The state dict loaded into it (load_state_dict; timm's checkpoint_path= and load_checkpoint use it)"
    check_fits(fitted, model, source=source, strict=False, pretrained=False)
    if fitted is not own:
        for k in own:
            del state_dict[prefix + k]
        state_dict.update({prefix + k: v for k, v in fitted.items()})


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Map any checkpoint of a CabViT model to this model's keys and token grids, or say why it does not fit.

    Accepts our own state dict, timm train.py checkpoints (EMA weights first, as timm's `load_state_dict`) with
    DDP / torch.compile prefixes, and the authors' reference layout. Tables saved at another input size are
    resampled from the grids of the size the checkpoint records (`fit_tables`, the rule the models'
    `load_state_dict` follows too). The classifier and first conv are left to timm's `load_pretrained`, which drops
    or adapts them.
    """
    cfg = model.pretrained_cfg
    # a file timm loaded itself is read again for its header or args; a loader that read it passes the state dict
    # with the file's record in the cfg (input_size), as `tools.hub.create_model` does
    metadata = checkpoint_metadata(state_dict) or (
        checkpoint_metadata(cfg.get('file')) if cfg.get('state_dict') is None else {})
    state_dict = fit_tables(unwrap_checkpoint(state_dict), model, metadata.get('img_size'), warn_unrecorded=True)
    return check_fits(state_dict, model)


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


# The Hub organisation whose repos ORG/<model>.<tag> hold the weights `pretrained=True` loads. No weights are
# published yet: this becomes the project's organisation once they are. Until then TIMM_CABVIT_HUB_ORG names an
# organisation of one's own (weights written by `timm-cabvit export` and uploaded by `timm-cabvit push`).
WEIGHTS_HUB_ORG: Optional[str] = os.environ.get('TIMM_CABVIT_HUB_ORG') or None


def _hub_id(name: str) -> Dict[str, str]:
    return {'hf_hub_id': f'{WEIGHTS_HUB_ORG}/{name}'} if WEIGHTS_HUB_ORG else {}


default_cfgs = generate_default_cfgs({
    'cabvit_p_l0.in1k': _cfg(**_hub_id('cabvit_p_l0.in1k'), pool_size=None, first_conv='patch_embed.proj',
                             classifier='head'),
    'cabvit_h_l1.in1k': _cfg(**_hub_id('cabvit_h_l1.in1k')),
    'cabvit_h_l2.in1k': _cfg(**_hub_id('cabvit_h_l2.in1k')),
    'cabvit_h_l3.in1k': _cfg(**_hub_id('cabvit_h_l3.in1k')),
})


def _organisation_repo(variant: str, kwargs: Dict[str, Any]) -> Optional[str]:
    """The repo of TIMM_CABVIT_HUB_ORG that `pretrained=True` loads from, None where the cfg names other weights."""
    cfg = resolve_pretrained_cfg(variant, kwargs.get('pretrained_cfg'), kwargs.get('pretrained_cfg_overlay'))
    if not WEIGHTS_HUB_ORG or cfg.file or cfg.url or cfg.state_dict is not None:
        return None
    return cfg.hf_hub_id if (cfg.hf_hub_id or '').startswith(f'{WEIGHTS_HUB_ORG}/') else None


def _check_weights_exist(variant: str, kwargs: Dict[str, Any]) -> None:
    """Refuse `pretrained=True` at once, saying how to load weights, where the cfg names none to load or names
    them by a TIMM_CABVIT_HUB_ORG that is no organisation name."""
    cfg = resolve_pretrained_cfg(variant, kwargs.get('pretrained_cfg'), kwargs.get('pretrained_cfg_overlay'))
    repo = _organisation_repo(variant, kwargs)
    if repo is not None:
        try:
            validate_repo_id(repo)
        except HFValidationError as e:
            raise RuntimeError(
                f"TIMM_CABVIT_HUB_ORG={WEIGHTS_HUB_ORG!r} is not a Hugging Face organisation or user name "
                f"({str(e).splitlines()[0]}): set it to the organisation whose repos hold the weights, e.g. "
                f"TIMM_CABVIT_HUB_ORG=my-org, or unset it.") from None
    if not (cfg.url or cfg.file or cfg.hf_hub_id or cfg.state_dict is not None):
        raise RuntimeError(
            f"No pretrained weights are published for {variant} yet. Load your own: "
            f"timm.create_model('{variant}', pretrained=True, pretrained_cfg_overlay=dict(file='/path/to/weights')) "
            f"for a file, timm.create_model('hf-hub:ORG/NAME', pretrained=True) for a Hub repo written by "
            f"`timm-cabvit export`, or set TIMM_CABVIT_HUB_ORG=ORG to make pretrained=True load ORG/{variant}.in1k.")


def _create(model_cls: Type[nn.Module], variant: str, pretrained: bool = False, **kwargs) -> nn.Module:
    if pretrained:
        _check_weights_exist(variant, kwargs)
    repo = _organisation_repo(variant, kwargs) if pretrained else None
    out_indices = kwargs.pop('out_indices', 4 if model_cls is CabViT else 3)
    try:
        return build_model_with_cfg(
            model_cls, variant, pretrained,
            pretrained_filter_fn=checkpoint_filter_fn,
            feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
            **kwargs,
        )
    except (OSError, HfHubHTTPError) as e:
        if repo is None:
            raise
        offline = 'HF_HUB_OFFLINE is set; ' if huggingface_hub.constants.HF_HUB_OFFLINE else ''
        raise RuntimeError(
            f"Could not load the weights of {variant} from Hugging Face Hub repo '{repo}' (named by "
            f"TIMM_CABVIT_HUB_ORG={WEIGHTS_HUB_ORG}): {offline}{type(e).__name__}: {str(e).splitlines()[0]}. "
            f"Check the repo exists and is reachable (HF_ENDPOINT, HF_TOKEN for a private one); without network "
            f"access set HF_HUB_OFFLINE=1 to load a copy downloaded before, or unset TIMM_CABVIT_HUB_ORG.") from e


@register_model
def cabvit_p_l0(pretrained: bool = False, **kwargs) -> CabViTPlain:
    """CabViT-P-L0: DeiT-Tiny (192 wide, 12 blocks, 3 heads) with CabViT blocks, 5.9 M parameters."""
    model_args = dict(embed_dim=192, depth=12, num_heads=3)
    return _create(CabViTPlain, 'cabvit_p_l0', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def cabvit_h_l1(pretrained: bool = False, **kwargs) -> CabViT:
    """CabViT-H-L1: 6.2 M parameters, 1.4 GFLOPs at 224."""
    model_args = dict(embed_dims=(64, 128, 192, 320), depths=(2, 2, 6, 2), num_heads=(None, None, 6, 10))
    return _create(CabViT, 'cabvit_h_l1', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def cabvit_h_l2(pretrained: bool = False, **kwargs) -> CabViT:
    """CabViT-H-L2: 16.3 M parameters, 3.6 GFLOPs at 224."""
    model_args = dict(embed_dims=(96, 192, 320, 480), depths=(2, 2, 7, 2), num_heads=(None, None, 10, 15))
    return _create(CabViT, 'cabvit_h_l2', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def cabvit_h_l3(pretrained: bool = False, **kwargs) -> CabViT:
    """CabViT-H-L3 of the reference code (not in the paper): 27.9 M parameters, 6.7 GFLOPs at 224."""
    model_args = dict(embed_dims=(96, 192, 320, 512), depths=(3, 6, 12, 3), num_heads=(None, None, 10, 16))
    return _create(CabViT, 'cabvit_h_l3', pretrained=pretrained, **dict(model_args, **kwargs))
