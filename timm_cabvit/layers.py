""" Layers of the CabViT models that are not CabViT's own: grid position biases, a foldable conv-BN, input checks

LeViT-style (`GridPosBias`) and BEiT-style (`ClassTokenRelPosBias`) position biases that can be evaluated for any
token grid (resampling their learned tables, for `dynamic_img_size` and checkpoints of other sizes: the geometry
of `resize_token_grid` and `resize_rel_pos_table`), the conv + BatchNorm that `timm.utils.reparameterize_model`
folds, oneDNN's linear for the blocks' linears in CPU inference (`run_linear`; timm's Mlp with its fc1 and GELU as
one op), and the checks that give a wrong input a clear error. Like `timm.layers`, they know nothing of cross-block
attention.
"""
import functools
import math
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import GELU, ConvNormAct, Mlp
from timm.layers import trunc_normal_ as timm_trunc_normal_
from timm.layers._fx import register_notrace_function

__all__ = [
    'ClassTokenRelPosBias', 'FoldableConvNormAct', 'FusedGeluMlp', 'GridPosBias', 'MAX_TOKENS', 'OP_NAMESPACE',
    'batchnorm_momentum', 'channels_last_parameter', 'check_img_size', 'check_input', 'compiled_inference',
    'compiled_inference_op',
    'relative_position_bias', 'resize_rel_pos_table', 'resize_token_grid', 'resized_parameter', 'row_offset_index',
    'run_linear', 'trunc_normal_', 'window_row_index',
]

Grid = Tuple[int, int]

# Global attention over the tokens of a stage needs a (heads, N, N) bias: beyond this many tokens (a 2048x2048
# image at stride 16) it no longer fits in memory, so larger sizes are refused up front.
MAX_TOKENS = 128 * 128
# oneDNN's linear, with a fused activation or none, the op inductor's CPU backend emits; absent from builds without
# oneDNN.
HAS_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, '_linear_pointwise')
# The package's own ops live under its top-level name: a copy imported under another name (benchmarks/ab.py) registers
# its own.
OP_NAMESPACE = __name__.partition('.')[0]
# Set by torch.export, not by torch.compile. Releases before 2.6 lack it, and some set it under torch.compile too
# (pytorch#176347): there oneDNN's op stays out of compiled graphs as well.
_is_exporting = getattr(torch.compiler, 'is_exporting', torch.compiler.is_compiling)


def trunc_normal_(tensor: torch.Tensor, std: float = 1.) -> torch.Tensor:
    """timm's truncated-normal init, but for tensors on the meta device, which have no values to draw: timm samples
    them through PyTorch's reference decompositions, 3/4 of the time of building a CabViT model on meta."""
    return tensor if tensor.is_meta else timm_trunc_normal_(tensor, std=std)


def resize_token_grid(table: torch.Tensor, old_size: Grid, new_size: Grid) -> torch.Tensor:
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


def resize_rel_pos_table(table: torch.Tensor, old_window: Grid, new_window: Grid) -> torch.Tensor:
    """Resample a BEiT-style relative position table, (offsets + class-token entries, heads), to another window.

    The (2H - 1) (2W - 1) offsets are a row-major grid of (dy, dx), resampled as `resize_token_grid` does (for
    non-square windows too); the class-token entries after them stay as they are.
    """
    old_span = (2 * old_window[0] - 1, 2 * old_window[1] - 1)
    new_span = (2 * new_window[0] - 1, 2 * new_window[1] - 1)
    num_offsets = old_span[0] * old_span[1]
    offsets = resize_token_grid(table[:num_offsets].transpose(0, 1), old_span, new_span).transpose(0, 1)
    return torch.cat([offsets, table[num_offsets:]])


@torch.no_grad()
def resized_parameter(
        param: nn.Parameter,
        old_size: Grid,
        new_size: Grid,
        resize: Callable[[torch.Tensor, Grid, Grid], torch.Tensor] = resize_token_grid,
) -> nn.Parameter:
    """A grid-laid parameter resampled by `resize` to another token grid, frozen if the original was
    (set_input_size); the parameter itself for its own grid, so that an optimizer holding it keeps training it."""
    if tuple(old_size) == tuple(new_size):
        return param
    return nn.Parameter(resize(param, old_size, new_size), requires_grad=param.requires_grad)


def channels_last_parameter(weight: torch.Tensor) -> nn.Parameter:
    """A depthwise conv weight (C, 1, k, k) with channels-last strides: the same memory, as its size-1 dim makes
    both layouts one, but PyTorch then convolves channels-last input in that layout.

    The TME's maps are channels-last views of (B, N, C) tokens; with these weights its convolutions keep them so,
    their outputs are tokens again without a copy, and they run 2-2.7x faster on CPU at the TME's sizes.
    """
    out = torch.empty_like(weight, memory_format=torch.channels_last).copy_(weight.detach())
    return nn.Parameter(out, requires_grad=weight.requires_grad)


def check_img_size(img_size: Any, stride: int, model_name: str) -> Grid:
    """The (H, W) a model is built for, after checking it is one: two sizes of at least one output stride, and not
    so large that global attention over the tokens cannot be held in memory."""
    if isinstance(img_size, int) and not isinstance(img_size, bool):
        img_size = (img_size, img_size)
    if (not isinstance(img_size, (tuple, list)) or len(img_size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in img_size)):
        raise ValueError(f'img_size must be an int or a pair of ints (H, W), got {img_size!r}')
    if min(img_size) < stride:
        raise ValueError(f'{model_name} needs images of at least {stride}x{stride} (its output stride), '
                         f'got img_size={tuple(img_size)}')
    tokens = math.ceil(img_size[0] / 16) * math.ceil(img_size[1] / 16)
    if tokens > MAX_TOKENS:
        raise ValueError(
            f'img_size={tuple(img_size)} gives {tokens:,} tokens at stride 16; global attention over them needs a '
            f'(heads, N, N) bias beyond memory. {model_name} takes up to {MAX_TOKENS:,} tokens (2048x2048).')
    return int(img_size[0]), int(img_size[1])


@torch.jit.unused
def _check_dtype_and_size(x: torch.Tensor, dtype: torch.dtype, min_size: int) -> None:
    """Images of the weights' dtype (any floating point type under autocast, which casts them itself), and of a
    size the model takes at all."""
    if x.dtype != dtype and not (x.is_floating_point() and torch.is_autocast_enabled(x.device.type)):
        raise ValueError(
            f'CabViT expects {dtype} images, as its weights, got {x.dtype}; convert them (x.to({dtype}), integer '
            f'images normalised as the model\'s pretrained_cfg mean and std say) or the model (model.to(dtype)).')
    height, width = x.shape[2:]
    if min(height, width) < min_size or math.ceil(height / 16) * math.ceil(width / 16) > MAX_TOKENS:
        raise ValueError(
            f'CabViT takes images from {min_size}x{min_size} up to {MAX_TOKENS:,} tokens at stride 16 (2048x2048), '
            f'got {height}x{width}.')


def _check_traced_input(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    if x.shape[2] != height or x.shape[3] != width:
        raise ValueError(
            f'This torch.jit.trace of a CabViT model takes {height}x{width} images only, got {x.shape[2]}x'
            f'{x.shape[3]}: a trace holds the token grids of the size it was traced at. For {x.shape[2]}x'
            f'{x.shape[3]} images, trace the model at that size (after set_input_size(({x.shape[2]}, {x.shape[3]})) '
            f'unless it has dynamic_img_size=True).')
    return x


@functools.cache
def _scripted_input_check() -> Callable[[torch.Tensor, int, int], torch.Tensor]:
    """`_check_traced_input` compiled by TorchScript, on first use: `torch.jit.trace` records a call to it."""
    return torch.jit.script(_check_traced_input)


@torch.jit.unused
def _check_traced_size(x: torch.Tensor, img_size: Tuple[int, int], dynamic_img_size: bool) -> torch.Tensor:
    """The input size checked in the graph `torch.jit.trace` records, which keeps no Python comparison of sizes:
    without it, a trace of a non-square model fed the transposed input runs and returns wrong logits.

    A trace holds the token grids of the size it was traced at, so a `dynamic_img_size` model's trace takes only
    that size as well. Not in ONNX export, whose graph has the input size in it (ONNX Runtime checks it).
    """
    if torch.onnx.is_in_onnx_export():
        return x
    height, width = (int(x.shape[2]), int(x.shape[3])) if dynamic_img_size else img_size
    return _scripted_input_check()(x, height, width)


@register_notrace_function
def check_input(
        x: torch.Tensor,
        in_chans: int,
        img_size: Tuple[int, int],
        dtype: torch.dtype,
        min_size: int,
        dynamic_img_size: bool = False,
) -> torch.Tensor:
    """Reject input the model and its bias tables were not built for, saying what was expected.

    TorchScript cannot resample the tables, so a scripted `dynamic_img_size` model takes its `img_size` only, as a
    fixed-size one; in `torch.jit.trace` the size check is part of the trace (`_check_traced_size`).
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(f'CabViT expects a torch.Tensor of images (B, {in_chans}, H, W), got {type(x).__name__}')
    if x.ndim != 4 or x.shape[1] != in_chans:
        raise ValueError(
            f'CabViT expects images of shape (B, {in_chans}, H, W), got {list(x.shape)}; '
            f'create the model with another in_chans for images of other channel counts.')
    if not torch.jit.is_scripting():
        _check_dtype_and_size(x, dtype, min_size)
    height, width = x.shape[2], x.shape[3]
    if not dynamic_img_size and (height != img_size[0] or width != img_size[1]):
        raise ValueError(
            f'CabViT was built for {img_size[0]}x{img_size[1]} images (its bias tables are sized for that grid), '
            f'got {height}x{width}; create it with img_size=({height}, {width}) or dynamic_img_size=True, or call '
            f'set_input_size().')
    if torch.jit.is_scripting() and (height != img_size[0] or width != img_size[1]):
        raise ValueError(
            f'A scripted CabViT model takes {img_size[0]}x{img_size[1]} images only, the size it was built for: '
            f'TorchScript cannot resample its bias tables for another size as dynamic_img_size does, got '
            f'{height}x{width}; call set_input_size(({height}, {width})) before torch.jit.script for that size.')
    if not torch.jit.is_scripting() and torch.jit.is_tracing():
        x = _check_traced_size(x, img_size, dynamic_img_size)
    return x


class FoldableConvNormAct(ConvNormAct):
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
        fused.weight = nn.Parameter(torch.empty_like(conv.weight))  # in the conv's layout (see channels_last_parameter)
        fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
        bias = bn.bias - bn.running_mean * scale
        fused.bias.copy_(bias if conv.bias is None else bias + conv.bias * scale)
        tail = [m for m in (bn.drop, bn.act) if not isinstance(m, nn.Identity)]
        return nn.Sequential(fused, *tail) if tail else fused


@torch.jit.unused
def compiled_inference() -> bool:
    """Whether torch.compile (not torch.export) traces a graph without gradients: there an op of the package may
    stand in for aten's ops, as inductor then calls it as it is."""
    return torch.compiler.is_compiling() and not _is_exporting() and not torch.is_grad_enabled()


def onednn_inference(x: Any, linear: nn.Linear) -> bool:
    """Whether a oneDNN fused CPU op may read `linear`'s weights to stand in for it (and what follows it) on `x`.

    It computes the same function but has no autograd, autocast, batching or tracing rules: so only a plain float32
    CPU tensor, no gradient wanted for it or the weights, and no autocast, vmap / jvp, JIT or FX trace, ONNX or
    torch.export export. Under torch.compile it goes in as an op inductor calls as it is (`onednn_linear`).
    """
    return (
        HAS_ONEDNN_LINEAR and not _is_exporting()
        and type(x) is torch.Tensor and x.device.type == 'cpu' and x.dtype == torch.float32
        and not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in linear.parameters())))
        and not torch.is_autocast_enabled('cpu') and not torch.jit.is_tracing() and not torch.onnx.is_in_onnx_export()
        and (torch.compiler.is_compiling() or not torch._C._functorch.is_functorch_wrapped_tensor(x))
    )


def _linear_pointwise(
        x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], activation: str,
) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, activation, [], 'none' if activation == 'gelu' else '')


_OPS = torch.library.Library(OP_NAMESPACE, 'FRAGMENT')


def compiled_inference_op(schema: str, fake: Callable[..., Any]) -> Callable[[Callable[..., Any]], Any]:
    """Registers the decorated function as the package's op `schema` on every device, with `fake` for tracing, and
    returns the op (`torch.ops.<package>.<name>.default`).

    For the ops that compiled inference puts in its graphs, which no gradient reaches: registered without
    `torch.library.custom_op`'s autograd and checking layers, a call costs less of its own (the ~40 oneDNN linears of
    a compiled cabvit_h_l1 took 1.0-1.4 against 2.0-2.4 ms a pass of their own, torch.profiler's self time).
    """
    def register(fn: Callable[..., Any]) -> Any:
        name = schema.partition('(')[0]
        _OPS.define(schema)
        _OPS.impl(name, fn, 'CompositeExplicitAutograd')
        torch.library.register_fake(f'{OP_NAMESPACE}::{name}', fake, lib=_OPS)
        return getattr(getattr(torch.ops, OP_NAMESPACE), name).default
    return register


def _fake_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], activation: str) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@compiled_inference_op('onednn_linear(Tensor x, Tensor weight, Tensor? bias, str activation) -> Tensor', _fake_linear)
def _compiled_onednn_linear(
        x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], activation: str,
) -> torch.Tensor:
    """oneDNN's linear as an op that torch.compile calls as it is: inductor lowers mkldnn's own op only for frozen
    weights, and its own linear is MKL's GEMM (compiled cabvit_h_l1 0.96-0.97x the time with this op, one process)."""
    return _linear_pointwise(x, weight, bias, activation)


def onednn_linear(x: torch.Tensor, linear: nn.Linear, activation: str = 'none') -> torch.Tensor:
    """`linear` on `x` by oneDNN, then `activation` ('none' or 'gelu', the exact GELU), where `onednn_inference`."""
    op = _compiled_onednn_linear if torch.compiler.is_compiling() else _linear_pointwise
    return op(x, linear.weight, linear.bias, activation)


def called_as_is(module: nn.Module) -> bool:
    """Whether calling `module` runs its forward and nothing else: no forward hooks of its own or global ones."""
    return not (module._forward_hooks or module._forward_pre_hooks
                or nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks)


def _plain_linear(module: nn.Module) -> bool:
    """Whether `module` is an nn.Linear whose weights an op may read in its stead: not a subclass (a quantized or
    LoRA-wrapped layer computes something else with them) and called as is."""
    return type(module) is nn.Linear and called_as_is(module)


@torch.jit.unused
def run_linear(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`linear(x)`, by oneDNN's linear op where it may stand in for a plain nn.Linear (`onednn_inference`).

    F.linear's GEMM is MKL's, which on the AMD EPYC machines measured took 1.1-1.8x oneDNN's time at the blocks'
    shapes and batches 1-64 (2 threads; 0.9x only for the smallest square projections at batch 1): with the
    blocks' qkv, proj and fc2 through oneDNN, cabvit_h_l1's and h_l2's batch-1 latency is 5 % lower at 2 threads,
    3-5 % at 1, and 7-12 % at batches 8-32.
    """
    if _plain_linear(linear) and onednn_inference(x, linear):
        return onednn_linear(x, linear)
    return linear(x)


class FusedGeluMlp(Mlp):
    """timm's Mlp through oneDNN in CPU inference (`onednn_inference`): fc1 and exact GELU as one op, fc2 by
    `run_linear`.

    The GELU then takes no pass of its own over the hidden activations, the widest tensor of a block: cabvit_h_l2's
    batch-1 latency 4 % lower at 2 threads (3 % at 1), cabvit_h_l1's 0.5-2 %. Only while fc1 is a plain nn.Linear
    and the activation an exact GELU, neither with forward hooks: a quantized, LoRA-wrapped or hooked fc1 (swapped
    or hooked after construction) runs as it is, through timm's path, as everywhere else.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.norm(self.hidden(x)))

    @torch.jit.unused
    def _fused(self, x: torch.Tensor) -> bool:
        act = self.act
        exact_gelu = type(act) is GELU or type(act) is nn.GELU and act.approximate == 'none'
        return (not self.training and _plain_linear(self.fc1) and exact_gelu and called_as_is(act)
                and onednn_inference(x, self.fc1))

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """fc1, activation and dropout."""
        if not torch.jit.is_scripting() and self._fused(x):
            return onednn_linear(x, self.fc1, 'gelu')
        return self.drop1(self.act(self.fc1(x)))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """fc2 and dropout."""
        return self.drop2(self.fc2(x) if torch.jit.is_scripting() else run_linear(self.fc2, x))


def row_offset_index(grid_size: Grid, device: Optional[torch.device] = None) -> torch.Tensor:
    """(2H - 1, W, W) index into a LeViT-style (heads, H * W) table: at (H - 1 + dy, xi, xj), |dy| W + |xi - xj|.

    Gathered with it, the table becomes the row table of `relative_position_bias`.
    """
    height, width = grid_size
    dy = (torch.arange(2 * height - 1, device=device) - (height - 1)).abs()
    x = torch.arange(width, device=device)
    return dy[:, None, None] * width + (x[:, None] - x[None, :]).abs()


def window_row_index(grid_size: Grid, device: Optional[torch.device] = None) -> torch.Tensor:
    """(H W H,) rows of a row table viewed as (heads, (2H - 1) W, W) that lay out `relative_position_bias`: for the
    query row yi, query column xi and key row yj, in that order, the row (H - 1 + yj - yi) W + xi."""
    height, width = grid_size
    y = torch.arange(height, device=device)
    dy = height - 1 + y[None, :] - y[:, None]
    return (dy[:, None, :] * width + torch.arange(width, device=device)[None, :, None]).flatten()


def relative_position_bias(
        row_table: torch.Tensor, grid_size: Grid, rows: Tuple[int, int], window_rows: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """(heads, n, H * W) position bias of the query tokens in grid rows rows[0]..rows[1] over all tokens.

    `row_table` (heads, 2H - 1, W, W) holds at (H - 1 + dy, xi, xj) the bias between a query in column xi and a
    key in column xj dy rows below it. The bias over a grid is Toeplitz in the rows: materialising it entry by
    entry means an (N, N) index. Gathering whole rows of W entries (`window_row_index`, O(N H), built once per grid
    by the caller or here) lays it out in one copy: on CPU in half the time of the row table's windows reversed by
    `flip` (6 heads on a 14x14 grid, 2 threads: 42-46 against 86 us).
    """
    height, width = grid_size
    if window_rows is None:
        window_rows = window_row_index(grid_size, row_table.device)
    index = window_rows[rows[0] * width * height:rows[1] * width * height]
    heads = row_table.shape[0]
    bias = row_table.reshape(heads, (2 * height - 1) * width, width).index_select(1, index)
    return bias.view(heads, (rows[1] - rows[0]) * width, height * width)


class GridPosBias(nn.Module):
    """LeViT-style position bias: one learnable value per head and absolute offset (|dy|, |dx|) on the grid.

    `grid_size` is the token grid the table is laid out on, the one place it is kept. The attention gathers its row
    table (`relative_position_bias`) from `table()` with `bias_index()`: no (N, N) index.
    """

    def __init__(self, num_heads: int, grid_size: Grid, device=None, dtype=None):
        super().__init__()
        self.num_prefix_tokens = 0
        self.grid_size = tuple(grid_size)
        self.attention_biases = nn.Parameter(
            torch.zeros(num_heads, grid_size[0] * grid_size[1], device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.attention_biases)

    def set_grid_size(self, grid_size: Grid) -> None:
        self.attention_biases = resized_parameter(self.attention_biases, self.grid_size, grid_size)
        self.grid_size = tuple(grid_size)

    def table(self, grid_size: Grid) -> torch.Tensor:
        """(heads, entries) for tokens on `grid_size`; for another grid than the table's, the resampled table."""
        if grid_size == self.grid_size:
            return self.attention_biases
        return self._resampled_table(grid_size)

    @torch.jit.unused
    def _resampled_table(self, grid_size: Grid) -> torch.Tensor:
        return resize_token_grid(self.attention_biases, self.grid_size, grid_size)

    def num_entries(self, grid_size: Grid) -> int:
        return grid_size[0] * grid_size[1]

    def bias_index(self, grid_size: Grid, device: Optional[torch.device] = None) -> torch.Tensor:
        """The entries of `table()` that form the row table of `relative_position_bias`, flattened."""
        return row_offset_index(grid_size, device).flatten()


class ClassTokenRelPosBias(nn.Module):
    """BEiT-style relative position bias with class-token entries (CabViT-P's), for any token grid.

    The table is timm's RelPosBias layout, ((2H - 1) (2W - 1) + 3, heads): offsets (dy + H - 1, dx + W - 1)
    row-major, then class token to tokens, tokens to class token, class token to itself. It is resampled for
    another grid as by timm's `resize_rel_pos_bias_table`, but for non-square grids too. No (N, N) index is kept.
    """

    def __init__(self, grid_size: Grid, num_heads: int, device=None, dtype=None):
        super().__init__()
        self.num_prefix_tokens = 1
        self.grid_size = tuple(grid_size)
        num_offsets = (2 * grid_size[0] - 1) * (2 * grid_size[1] - 1)
        self.relative_position_bias_table = nn.Parameter(
            torch.empty(num_offsets + 3, num_heads, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        trunc_normal_(self.relative_position_bias_table, std=.02)

    def set_grid_size(self, grid_size: Grid) -> None:
        self.relative_position_bias_table = resized_parameter(
            self.relative_position_bias_table, self.grid_size, grid_size, resize_rel_pos_table)
        self.grid_size = tuple(grid_size)

    def table(self, grid_size: Grid) -> torch.Tensor:
        """(heads, entries) for tokens on `grid_size`; for another grid than the table's, the resampled table."""
        if grid_size == self.grid_size:
            return self.relative_position_bias_table.t()
        return self._resampled_table(grid_size).t()

    @torch.jit.unused
    def _resampled_table(self, grid_size: Grid) -> torch.Tensor:
        return resize_rel_pos_table(self.relative_position_bias_table, self.grid_size, grid_size)

    def num_entries(self, grid_size: Grid) -> int:
        return (2 * grid_size[0] - 1) * (2 * grid_size[1] - 1) + 3

    def bias_index(self, grid_size: Grid, device: Optional[torch.device] = None) -> torch.Tensor:
        """The entries of `table()` that form the row table of `relative_position_bias`, flattened, then those of
        the class token: to the tokens, from the tokens, to itself."""
        height, width = grid_size
        dy = torch.arange(2 * height - 1, device=device) - (height - 1)
        x = torch.arange(width, device=device)
        offsets = (height - 1 - dy)[:, None, None] * (2 * width - 1) + (x[:, None] - x[None, :] + width - 1)
        num_offsets = (2 * height - 1) * (2 * width - 1)
        return torch.cat([offsets.flatten(), torch.arange(num_offsets, num_offsets + 3, device=device)])


@contextmanager
def batchnorm_momentum(module: nn.Module, momentum: Optional[float]) -> Iterator[None]:
    """Set the momentum of every BatchNorm in `module` for a while: 0 to leave the running statistics alone, None
    for a cumulative average (re-estimating them)."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.momentum = momentum
    try:
        yield
    finally:
        for norm, saved in zip(norms, momenta):
            norm.momentum = saved
