""" Fused TME (token merge and enhancement) of CabViT blocks in Triton

The PyTorch TME views the (B, N, C) tokens as a (B, C, H, W) map, runs a depthwise 7x7 stride-4 conv (the digests),
a depthwise 3x3 conv and a BatchNorm (the enhanced tokens), and flattens the result back: a chain of memory-bound
kernels forward and more backward. Here one kernel reads the tokens where they are and writes both outputs. A
program walks 4x4 tiles of the grid (the footprint of one digest token) for one block of channels, so token loads
are contiguous along channels and the 3x3 / 7x7 halos come from cache.

Eval: the BatchNorm's running statistics are folded into the 3x3 conv's epilogue, one kernel in all.
Training: normalising needs the statistics of the whole batch first, so the fused kernel writes the raw 3x3 output
u and per-program Welford partials, a small kernel merges them (Chan et al.'s parallel variance), and an
elementwise kernel applies the affine. The running statistics are updated with torch ops as `nn.BatchNorm2d` does.
Backward: one fused kernel gives the input gradient of both convs and per-program weight-gradient partials. In
training the BatchNorm gradient du comes first, as in PyTorch: a row reduction of sum(dz) and sum(dz * (u - mean)),
then an elementwise kernel writes du, so the fused kernel reads one tensor per 3x3 tap instead of recomputing du at
every neighbour. Accumulation is fp32 (fp64 for fp64 input, which gradcheck uses). Partial sums over programs, and
tiny per-channel terms, are left to torch: there Triton would only add launches.

The ops are `torch.library.custom_op`s with fake impls and autograd, so `torch.compile(model, fullgraph=True)`
traces through them. The kernels need CUDA tensors, or CPU tensors under Triton's interpreter (TRITON_INTERPRET=1 set
before this module is imported: Triton reads it when it decorates a kernel), which is how the tests run without GPU.
"""
import functools
import math
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

__all__ = [
    'token_merge_enhance', 'tme_eval', 'tme_train', 'tme_backward', 'tme_bn_backward', 'INTERPRETED', 'KernelConfig',
    'kernel_config', 'LaunchPlan', 'launch_plan', 'num_tiles',
]

TILE = 4  # digest stride: a program's 4x4 tile is the footprint of one digest token
BLOCK_PARTS = 64  # partials merged per step by the statistics kernel
BLOCK_ROWS = 32  # token rows per step of the elementwise and row-reduction kernels
# Kernels use only Triton builtins and their own device functions below, not the @triton.jit helpers of
# triton.language.standard (tl.sum, tl.zeros): those are interpreted only if TRITON_INTERPRET=1 was set when Triton
# itself was imported, this module's functions whenever it is set when this module is imported. The sum combine is
# the one tl.sum uses, which the interpreter runs in numpy.
_SUM = tl.standard._sum_combine
FWD_PROGRAMS_PER_SM = 8
BWD_PROGRAMS_PER_SM = 2  # fewer programs, fewer weight-gradient partials to sum (49 + 9 per channel each)


# Device functions of the two fused kernels, forward and backward: both walk the same 4x4 tiles of the same grid.

@triton.jit
def _tile_layout(W: tl.constexpr, C: tl.constexpr, BLOCK_C: tl.constexpr, EVEN_C: tl.constexpr):
    """The program's block of channels and the layout of a 4x4 tile.

    Returns the channel offsets, their mask, the mask as a (1, BLOCK_C) row (a constant for EVEN_C, which the
    compiler folds away), the row and column in the tile (ph, pw) of each of its 16 positions, and the (16, BLOCK_C)
    offsets of the tile's tokens from its first one.
    """
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    if EVEN_C:
        cmask = tl.full([1, BLOCK_C], 1, tl.int1)
    else:
        cmask = mask_c[None, :]
    idx = tl.arange(0, 16)
    ph = idx // 4
    pw = idx % 4
    tile_off = (ph * W + pw)[:, None] * C + offs_c[None, :]
    return offs_c, mask_c, cmask, ph, pw, tile_off


@triton.jit
def _tile(item, ph, pw, tile_off, H: tl.constexpr, W: tl.constexpr, C: tl.constexpr, P: tl.constexpr):
    """Work item `item`: tile t, at tile row th and column tw, of batch element b.

    Returns b, t, th, tw, the offset of b's tokens, the offsets of the tile's tokens, and which of the rows h - 1, h,
    h + 1 and of the columns w - 1, w, w + 1 around each of its positions (h, w) lie inside the grid.
    """
    TW: tl.constexpr = (W + 3) // 4
    NUM_TILES: tl.constexpr = ((H + 3) // 4) * TW
    SEQ: tl.constexpr = (P + H * W) * C
    b = item // NUM_TILES
    t = item % NUM_TILES
    th = t // TW
    tw = t % TW
    tok_base = b.to(tl.int64) * SEQ
    tile = tok_base + P * C + (th * 4 * W + tw * 4) * C + tile_off
    h = th * 4 + ph
    w = tw * 4 + pw
    rows = ((h >= 1) & (h <= H), h < H, h + 1 < H)
    cols = ((w >= 1) & (w <= W), w < W, w + 1 < W)
    return b, t, th, tw, tok_base, tile, rows, cols


@triton.jit
def _load_shifted(tile_ptr, dh: tl.constexpr, dw: tl.constexpr, rows, cols, cmask,
                  W: tl.constexpr, C: tl.constexpr, ACC: tl.constexpr):
    """The tile's tokens shifted by dh rows and dw columns (each -1, 0 or 1), zero outside the grid, in ACC."""
    m = (rows[dh + 1] & cols[dw + 1])[:, None] & cmask
    return tl.load(tile_ptr + (dh * W + dw) * C, mask=m, other=0.).to(ACC)


@triton.jit
def _copy_prefix(src_ptr, dst_ptr, t, tok_base, offs_c, mask_c, C: tl.constexpr, P: tl.constexpr):
    """Prefix tokens pass through: the program of a batch element's first tile copies them from src to dst."""
    if P > 0:
        if t == 0:
            for p in tl.static_range(P):
                token = tl.load(src_ptr + tok_base + p * C + offs_c, mask=mask_c)
                tl.store(dst_ptr + tok_base + p * C + offs_c, token.to(dst_ptr.dtype.element_ty), mask=mask_c)


@triton.jit
def _merge_welford(cnt, mean, m2):
    """Merge the rows of (count, mean, M2) Welford states, (R, BLOCK_C) each, into one state per channel."""
    merged_cnt = tl.reduce(cnt, 0, _SUM)
    merged_mean = tl.reduce(cnt * mean, 0, _SUM) / tl.maximum(merged_cnt, 1.)
    dev = mean - merged_mean[None, :]
    return merged_cnt, merged_mean, tl.reduce(m2 + cnt * dev * dev, 0, _SUM)


@triton.jit
def _tme_fwd_kernel(
        y_ptr, w3_ptr, w7_ptr, bn_w_ptr, bn_b_ptr, bn_mean_ptr, bn_var_ptr,
        out_ptr, dig_ptr, part_ptr,
        eps, num_items, num_progs,
        H: tl.constexpr, W: tl.constexpr, C: tl.constexpr, P: tl.constexpr,
        BLOCK_C: tl.constexpr, EVEN_C: tl.constexpr, MERGE: tl.constexpr, STATS: tl.constexpr, ACC: tl.constexpr,
):
    """Enhance (3x3) and merge (7x7 stride 4) convs of 4x4 tiles; eval: BN folded in, train: raw output + stats.

    Weights come tap-major, (9, C) and (49, C), so that a tap's weights load as one contiguous vector. The 7x7
    window of a tile's digest token is read as four 4x4 quadrants (rows and columns offset by -3 or +1), in the
    register layout of the tile itself.
    """
    NUM_TILES: tl.constexpr = ((H + 3) // 4) * ((W + 3) // 4)
    pid = tl.program_id(0)
    offs_c, mask_c, cmask, ph, pw, tile_off = _tile_layout(W, C, BLOCK_C, EVEN_C)
    w3_ptrs = w3_ptr + offs_c
    if MERGE:
        # quadrant (a, b) of the window holds taps (ph + 4a, pw + 4b); tap row or column 7 does not exist
        h_in = (ph < 3)[:, None]
        w_in = (pw < 3)[:, None]
        w7_ptrs = w7_ptr + (ph * 7 + pw)[:, None] * C + offs_c[None, :]
        w7_00 = tl.load(w7_ptrs, mask=cmask, other=0.).to(ACC)
        w7_01 = tl.load(w7_ptrs + 4 * C, mask=w_in & cmask, other=0.).to(ACC)
        w7_10 = tl.load(w7_ptrs + 28 * C, mask=h_in & cmask, other=0.).to(ACC)
        w7_11 = tl.load(w7_ptrs + 32 * C, mask=h_in & w_in & cmask, other=0.).to(ACC)
    if STATS:
        # Welford state per tile position, merged across positions once at the end
        w_cnt = tl.full([16, 1], 0, ACC)
        w_mean = tl.full([16, BLOCK_C], 0, ACC)
        w_m2 = tl.full([16, BLOCK_C], 0, ACC)
    else:
        bn_w = tl.load(bn_w_ptr + offs_c, mask=mask_c, other=0.).to(ACC)
        bn_b = tl.load(bn_b_ptr + offs_c, mask=mask_c, other=0.).to(ACC)
        bn_mean = tl.load(bn_mean_ptr + offs_c, mask=mask_c, other=0.).to(ACC)
        bn_var = tl.load(bn_var_ptr + offs_c, mask=mask_c, other=1.).to(ACC)
        scale = (bn_w / tl.sqrt(bn_var + eps))[None, :]
        shift = bn_b[None, :] - bn_mean[None, :] * scale
    for item in range(pid, num_items, num_progs):
        b, t, th, tw, tok_base, tile, rows, cols = _tile(item, ph, pw, tile_off, H, W, C, P)
        y_tile = y_ptr + tile
        acc = tl.full([16, BLOCK_C], 0, ACC)
        for dh in tl.static_range(3):
            for dw in tl.static_range(3):
                v = _load_shifted(y_tile, dh - 1, dw - 1, rows, cols, cmask, W, C, ACC)
                k = tl.load(w3_ptrs + (dh * 3 + dw) * C, mask=mask_c, other=0.).to(ACC)
                acc += v * k[None, :]
        if MERGE:
            r0 = (th * 4 + ph >= 3)[:, None]  # row h - 3 inside the grid (it is never past the end)
            r1 = rows[2][:, None] & h_in
            c0 = (tw * 4 + pw >= 3)[:, None]
            c1 = cols[2][:, None] & w_in
            d = tl.load(y_tile - (3 * W + 3) * C, mask=r0 & c0 & cmask, other=0.).to(ACC) * w7_00
            d += tl.load(y_tile - (3 * W - 1) * C, mask=r0 & c1 & cmask, other=0.).to(ACC) * w7_01
            d += tl.load(y_tile + (W - 3) * C, mask=r1 & c0 & cmask, other=0.).to(ACC) * w7_10
            d += tl.load(y_tile + (W + 1) * C, mask=r1 & c1 & cmask, other=0.).to(ACC) * w7_11
            tl.store(dig_ptr + (b.to(tl.int64) * NUM_TILES + t) * C + offs_c,
                     tl.reduce(d, 0, _SUM).to(dig_ptr.dtype.element_ty), mask=mask_c)
        valid = (rows[1] & cols[1])[:, None]
        if STATS:
            u = acc.to(out_ptr.dtype.element_ty)
            tl.store(out_ptr + tile, u, mask=valid & cmask)
            # statistics of the stored (rounded) u, which the apply and backward kernels read back
            u = u.to(ACC)
            w_cnt += valid.to(ACC)
            delta = u - w_mean
            w_mean += tl.where(valid, delta / tl.maximum(w_cnt, 1.), 0.)
            w_m2 += tl.where(valid, delta * (u - w_mean), 0.)
        else:
            tl.store(out_ptr + tile, (acc * scale + shift).to(out_ptr.dtype.element_ty), mask=valid & cmask)
        _copy_prefix(y_ptr, out_ptr, t, tok_base, offs_c, mask_c, C, P)
    if STATS:
        cnt, mean, m2 = _merge_welford(tl.broadcast_to(w_cnt, [16, BLOCK_C]), w_mean, w_m2)
        part = part_ptr + pid * 3 * C + offs_c
        tl.store(part, cnt, mask=mask_c)
        tl.store(part + C, mean, mask=mask_c)
        tl.store(part + 2 * C, m2, mask=mask_c)


@triton.jit
def _bn_stats_kernel(
        part_ptr, bn_w_ptr, bn_b_ptr, mean_ptr, var_ptr, scale_ptr, shift_ptr,
        eps, C, num_parts,
        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    """Merge (count, mean, M2) partials into the batch mean and biased variance, and the BN scale and shift."""
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    offs_p = tl.arange(0, BLOCK_P)
    cnt = tl.full([BLOCK_C], 0, ACC)
    mean = tl.full([BLOCK_C], 0, ACC)
    m2 = tl.full([BLOCK_C], 0, ACC)
    for p0 in range(0, num_parts, BLOCK_P):
        parts = p0 + offs_p
        m = (parts < num_parts)[:, None] & mask_c[None, :]
        base = part_ptr + parts[:, None] * 3 * C + offs_c[None, :]
        n_i = tl.load(base, mask=m, other=0.)
        mean_i = tl.load(base + C, mask=m, other=0.)
        m2_i = tl.load(base + 2 * C, mask=m, other=0.)
        n_b, mean_b, m2_b = _merge_welford(n_i, mean_i, m2_i)
        n_ab = tl.maximum(cnt + n_b, 1.)
        delta = mean_b - mean
        mean += delta * (n_b / n_ab)
        m2 += m2_b + delta * delta * (cnt * n_b / n_ab)
        cnt += n_b
    var = m2 / tl.maximum(cnt, 1.)
    scale = tl.load(bn_w_ptr + offs_c, mask=mask_c, other=0.).to(ACC) / tl.sqrt(var + eps)
    shift = tl.load(bn_b_ptr + offs_c, mask=mask_c, other=0.).to(ACC) - mean * scale
    tl.store(mean_ptr + offs_c, mean, mask=mask_c)
    tl.store(var_ptr + offs_c, var, mask=mask_c)
    tl.store(scale_ptr + offs_c, scale, mask=mask_c)
    tl.store(shift_ptr + offs_c, shift, mask=mask_c)


@triton.jit
def _bn_apply_kernel(
        x_ptr, u_ptr, scale_ptr, shift_ptr, gamma_ptr, center_ptr, out_ptr,
        num_rows, seq_len, C, P, num_progs,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, CENTERED: tl.constexpr, ACC: tl.constexpr,
):
    """out = x * scale + shift (+ gamma * (u - center)) on grid tokens; prefix tokens are copied from x.

    Forward: x = u, the BN affine. Backward: x = dz, the BN input gradient du.
    """
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    scale = tl.load(scale_ptr + offs_c, mask=mask_c, other=0.)[None, :]
    shift = tl.load(shift_ptr + offs_c, mask=mask_c, other=0.)[None, :]
    if CENTERED:
        gamma = tl.load(gamma_ptr + offs_c, mask=mask_c, other=0.)[None, :]
        center = tl.load(center_ptr + offs_c, mask=mask_c, other=0.)[None, :]
    for r0 in range(tl.program_id(0) * BLOCK_R, num_rows, num_progs * BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        m = (rows < num_rows)[:, None] & mask_c[None, :]
        off = rows.to(tl.int64)[:, None] * C + offs_c[None, :]
        x = tl.load(x_ptr + off, mask=m, other=0.).to(ACC)
        out = x * scale + shift
        if CENTERED:
            out += gamma * (tl.load(u_ptr + off, mask=m, other=0.).to(ACC) - center)
        out = tl.where(((rows % seq_len) >= P)[:, None], out, x)
        tl.store(out_ptr + off, out.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _bn_bwd_reduce_kernel(
        dz_ptr, u_ptr, mean_ptr, part_ptr, num_rows, N, C, P, num_progs,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    """Per-program partials of sum(dz) and sum(dz * (u - mean)) over the grid tokens."""
    pid = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mean = tl.load(mean_ptr + offs_c, mask=mask_c, other=0.)[None, :]
    s_dz = tl.full([BLOCK_R, BLOCK_C], 0, ACC)
    s_dzu = tl.full([BLOCK_R, BLOCK_C], 0, ACC)
    for r0 in range(pid * BLOCK_R, num_rows, num_progs * BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        b = rows // N
        off = (b.to(tl.int64) * (P + N) + P + rows % N)[:, None] * C + offs_c[None, :]
        m = (rows < num_rows)[:, None] & mask_c[None, :]
        dz = tl.load(dz_ptr + off, mask=m, other=0.).to(ACC)
        u = tl.load(u_ptr + off, mask=m, other=0.).to(ACC)
        s_dz += dz
        s_dzu += dz * (u - mean)
    part = part_ptr + pid * 2 * C + offs_c
    tl.store(part, tl.reduce(s_dz, 0, _SUM), mask=mask_c)
    tl.store(part + C, tl.reduce(s_dzu, 0, _SUM), mask=mask_c)


@triton.jit
def _tme_bwd_kernel(
        g_ptr, dd_ptr, y_ptr, w3_ptr, w7_ptr, alpha_ptr,
        dy_ptr, pw3_ptr, pw7_ptr, psum_ptr,
        num_items, num_progs,
        H: tl.constexpr, W: tl.constexpr, C: tl.constexpr, P: tl.constexpr,
        BLOCK_C: tl.constexpr, EVEN_C: tl.constexpr, MERGE: tl.constexpr, EVAL: tl.constexpr, ACC: tl.constexpr,
):
    """dy = conv3x3^T(du) + conv7x7s4^T(dd) of 4x4 tiles, with per-program weight-gradient partials.

    g is du in training; in eval g is dz and du = alpha * dz (alpha the folded BN scale), and the program also sums
    dz. Both weight gradients are gathered at the input position q, sum_q g(q - s) * y(q) for tap offset s, from the
    loads the input gradient needs anyway; y is read once per tile. They accumulate per tap and tile position in
    registers and are reduced across positions once, at the end. In eval the 3x3 partials are of dz, not du.
    """
    TH: tl.constexpr = (H + 3) // 4
    TW: tl.constexpr = (W + 3) // 4
    NUM_TILES: tl.constexpr = TH * TW
    pid = tl.program_id(0)
    offs_c, mask_c, cmask, ph, pw, tile_off = _tile_layout(W, C, BLOCK_C, EVEN_C)
    w3_ptrs = w3_ptr + offs_c
    if EVAL:
        alpha = tl.load(alpha_ptr + offs_c, mask=mask_c, other=0.).to(ACC)
    zero = tl.full([16, BLOCK_C], 0, ACC)
    acc_w3 = (zero, zero, zero, zero, zero, zero, zero, zero, zero)
    acc_dz = zero
    if MERGE:
        # tile position (ph, pw) is tap (ph + 3 - 4i, pw + 3 - 4j) of digest (th + i, tw + j), i, j in {0, 1}
        h_up = (ph >= 1)[:, None]
        w_up = (pw >= 1)[:, None]
        w7_ptrs = w7_ptr + ((ph + 3) * 7 + pw + 3)[:, None] * C + offs_c[None, :]
        w7_00 = tl.load(w7_ptrs, mask=cmask, other=0.).to(ACC)
        w7_01 = tl.load(w7_ptrs - 4 * C, mask=w_up & cmask, other=0.).to(ACC)
        w7_10 = tl.load(w7_ptrs - 28 * C, mask=h_up & cmask, other=0.).to(ACC)
        w7_11 = tl.load(w7_ptrs - 32 * C, mask=h_up & w_up & cmask, other=0.).to(ACC)
        acc_w7 = (zero, zero, zero, zero)
    for item in range(pid, num_items, num_progs):
        b, t, th, tw, tok_base, tile, rows, cols = _tile(item, ph, pw, tile_off, H, W, C, P)
        g_tile = g_ptr + tile
        vmask = (rows[1] & cols[1])[:, None] & cmask
        y = tl.load(y_ptr + tile, mask=vmask, other=0.).to(ACC)
        dy = zero
        taps = ()
        for dh in tl.static_range(3):
            for dw in tl.static_range(3):
                # the gradient at q - s of the output that tap s maps this position q onto
                g = _load_shifted(g_tile, 1 - dh, 1 - dw, rows, cols, cmask, W, C, ACC)
                k = tl.load(w3_ptrs + (dh * 3 + dw) * C, mask=mask_c, other=0.).to(ACC)
                if EVAL:
                    k = k * alpha
                    if dh * 3 + dw == 4:
                        acc_dz += g
                dy += g * k[None, :]
                taps = taps + (acc_w3[dh * 3 + dw] + g * y,)
        acc_w3 = taps
        if MERGE:
            dig = dd_ptr + b.to(tl.int64) * NUM_TILES * C + offs_c
            right = tw + 1 < TW
            down = th + 1 < TH
            d00 = tl.load(dig + t * C, mask=mask_c, other=0.).to(ACC)[None, :]
            d01 = tl.load(dig + (t + 1) * C, mask=mask_c & right, other=0.).to(ACC)[None, :]
            d10 = tl.load(dig + (t + TW) * C, mask=mask_c & down, other=0.).to(ACC)[None, :]
            d11 = tl.load(dig + (t + TW + 1) * C, mask=mask_c & right & down, other=0.).to(ACC)[None, :]
            dy += w7_00 * d00 + w7_01 * d01 + w7_10 * d10 + w7_11 * d11
            acc_w7 = (acc_w7[0] + y * d00, acc_w7[1] + y * d01, acc_w7[2] + y * d10, acc_w7[3] + y * d11)
        tl.store(dy_ptr + tile, dy.to(dy_ptr.dtype.element_ty), mask=vmask)
        _copy_prefix(g_ptr, dy_ptr, t, tok_base, offs_c, mask_c, C, P)

    # partials in the weights' own (C, taps) layout, so that a sum over programs gives the gradient
    for k in tl.static_range(9):
        tl.store(pw3_ptr + (pid * C + offs_c) * 9 + k, tl.reduce(acc_w3[k], 0, _SUM), mask=mask_c)
    if MERGE:
        pw7 = pw7_ptr + (pid * C + offs_c[None, :]) * 49 + ((ph + 3) * 7 + pw + 3)[:, None]
        tl.store(pw7, acc_w7[0], mask=cmask)
        tl.store(pw7 - 4, acc_w7[1], mask=w_up & cmask)
        tl.store(pw7 - 28, acc_w7[2], mask=h_up & cmask)
        tl.store(pw7 - 32, acc_w7[3], mask=h_up & w_up & cmask)
    if EVAL:
        tl.store(psum_ptr + pid * C + offs_c, tl.reduce(acc_dz, 0, _SUM), mask=mask_c)


INTERPRETED = isinstance(_tme_fwd_kernel, InterpretedFunction)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


class KernelConfig(NamedTuple):
    block_c: int
    fwd_warps: int
    bwd_warps: int


def kernel_config(num_channels: int) -> KernelConfig:
    """Channel block and warps; a block that divides C wastes no lanes (480 = 15 x 32).

    Compiled for sm_90, a (16 positions x 64 channels) tile with 4 warps needs 96-128 registers forward; the
    backward holds 9 + 4 weight-gradient accumulators per thread, so twice the warps keep it at 128 without spills.
    Fewer warps issue fewer instructions per element at lower occupancy: `benchmarks/tme.py --sweep` measures that.
    """
    for block in (64, 32):
        if num_channels % block == 0:
            warps = 4 if block == 64 else 2
            return KernelConfig(block, warps, 2 * warps)
    return KernelConfig(min(64, triton.next_power_of_2(num_channels)), 4, 8)


class LaunchPlan(NamedTuple):
    """A kernel launch: `grid` (programs along the work axis, channel blocks), `block_c` channels a block."""
    num_progs: int
    num_cblocks: int
    block_c: int
    num_warps: int

    @property
    def grid(self) -> Tuple[int, int]:
        return self.num_progs, self.num_cblocks


def launch_plan(num_items: int, num_channels: int, sm_count: Optional[int], backward: bool = False) -> LaunchPlan:
    """How a kernel is launched over `num_items` work items (4x4 tiles, or blocks of BLOCK_ROWS token rows) of
    `num_channels` channels, on a GPU with `sm_count` SMs (None: under Triton's interpreter).

    The channels go in blocks of `kernel_config`'s size. Along the work axis a few programs per SM, each looping over
    items and keeping its partials: FWD_PROGRAMS_PER_SM, or BWD_PROGRAMS_PER_SM for the fused backward kernel
    (`backward`, which also takes `kernel_config`'s backward warps); at most one per item, at least one. Under the
    interpreter, whose cost is per program and per op rather than per element, a handful. Every launch of this
    module is sized here; `benchmarks/traffic.py` reports the grids of a GPU from it.
    """
    block_c, fwd_warps, bwd_warps = kernel_config(num_channels)
    num_cblocks = triton.cdiv(num_channels, block_c)
    target = 8 if sm_count is None else (BWD_PROGRAMS_PER_SM if backward else FWD_PROGRAMS_PER_SM) * sm_count
    num_progs = max(1, min(num_items, triton.cdiv(target, num_cblocks)))
    return LaunchPlan(num_progs, num_cblocks, block_c, bwd_warps if backward else fwd_warps)


@functools.cache
def _cuda_sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sm_count(device: torch.device) -> Optional[int]:
    """The SMs of a CUDA device; None for CPU tensors, which run under the interpreter."""
    if device.type != 'cuda':
        return None
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _tap_major(weight: torch.Tensor) -> torch.Tensor:
    """(C, 1, k, k) depthwise weight as (k * k, C): a tap's weights for a block of channels are contiguous."""
    return weight.reshape(weight.shape[0], -1).t().contiguous()


def num_tiles(grid_h: int, grid_w: int) -> int:
    """4x4 tiles of a grid: the fused kernels' work items per image, and its digest tokens."""
    return math.ceil(grid_h / TILE) * math.ceil(grid_w / TILE)


def _check(y: torch.Tensor, grid_h: int, grid_w: int, num_prefix: int) -> None:
    if y.ndim != 3 or y.shape[1] != num_prefix + grid_h * grid_w:
        raise ValueError(f'TME expects tokens (B, {num_prefix} + {grid_h} * {grid_w}, C), got {list(y.shape)}')
    if not y.is_cuda and not INTERPRETED:
        raise RuntimeError(
            'The Triton TME runs on CUDA tensors, or on CPU under Triton\'s interpreter (TRITON_INTERPRET=1 set '
            f'before timm_cabvit.tme_triton is imported); got a tensor on {y.device}. Use the PyTorch path instead: '
            'model.set_tme_impl("torch") or TIMM_CABVIT_TME=torch.')


def _launch_fwd(
        y: torch.Tensor, conv_weight: torch.Tensor, merge_weight: Optional[torch.Tensor], out: torch.Tensor,
        bn: Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], eps: float,
        grid_h: int, grid_w: int, num_prefix: int, stats: bool,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Run the fused forward kernel; returns the digests and, with stats, the (count, mean, M2) partials."""
    B, _, C = y.shape
    tiles = num_tiles(grid_h, grid_w)
    num_items = B * tiles
    plan = launch_plan(num_items, C, _sm_count(y.device))
    digest = y.new_empty((B, tiles if merge_weight is not None else 0, C))
    part = y.new_empty((plan.num_progs, 3, C), dtype=_acc_dtype(y.dtype)) if stats else None
    if num_items:
        _tme_fwd_kernel[plan.grid](
            y, _tap_major(conv_weight), _tap_major(merge_weight) if merge_weight is not None else conv_weight, *bn,
            out, digest, part if part is not None else out,
            eps, num_items, plan.num_progs,
            H=grid_h, W=grid_w, C=C, P=num_prefix,
            BLOCK_C=plan.block_c, EVEN_C=C % plan.block_c == 0, MERGE=merge_weight is not None, STATS=stats,
            ACC=_tl_acc(y.dtype), num_warps=plan.num_warps,
        )
    return digest, part


def _launch_apply(
        x: torch.Tensor, u: Optional[torch.Tensor], scale: torch.Tensor, shift: torch.Tensor,
        gamma: Optional[torch.Tensor], center: Optional[torch.Tensor], num_prefix: int,
) -> torch.Tensor:
    B, T, C = x.shape
    out = torch.empty_like(x)
    plan = launch_plan(triton.cdiv(B * T, BLOCK_ROWS), C, _sm_count(x.device))
    if B * T:
        _bn_apply_kernel[plan.grid](
            x, u if u is not None else x, scale, shift, gamma if gamma is not None else scale,
            center if center is not None else scale, out, B * T, T, C, num_prefix, plan.num_progs,
            BLOCK_R=BLOCK_ROWS, BLOCK_C=plan.block_c, CENTERED=u is not None, ACC=_tl_acc(x.dtype),
            num_warps=plan.num_warps)
    return out


@torch.library.custom_op('timm_cabvit::tme_eval', mutates_args=())
def tme_eval(
        y: torch.Tensor, conv_weight: torch.Tensor, merge_weight: Optional[torch.Tensor],
        bn_weight: torch.Tensor, bn_bias: torch.Tensor, bn_mean: torch.Tensor, bn_var: torch.Tensor, eps: float,
        grid_h: int, grid_w: int, num_prefix: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """TME with the BN on running statistics folded in: (enhanced tokens, digests (B, S, C), S = 0 without merge)."""
    _check(y, grid_h, grid_w, num_prefix)
    y = y.contiguous()
    z = torch.empty_like(y)
    digest, _ = _launch_fwd(
        y, conv_weight, merge_weight, z, (bn_weight, bn_bias, bn_mean, bn_var), eps, grid_h, grid_w, num_prefix,
        stats=False)
    return z, digest


@tme_eval.register_fake
def _tme_eval_fake(y, conv_weight, merge_weight, bn_weight, bn_bias, bn_mean, bn_var, eps, grid_h, grid_w, num_prefix):
    num_digest = num_tiles(grid_h, grid_w) if merge_weight is not None else 0
    return torch.empty_like(y), y.new_empty((y.shape[0], num_digest, y.shape[2]))


@torch.library.custom_op('timm_cabvit::tme_train', mutates_args=())
def tme_train(
        y: torch.Tensor, conv_weight: torch.Tensor, merge_weight: Optional[torch.Tensor],
        bn_weight: torch.Tensor, bn_bias: torch.Tensor, eps: float,
        grid_h: int, grid_w: int, num_prefix: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """TME with BN on batch statistics: (enhanced tokens, digests, raw 3x3 output u, batch mean, biased variance).

    u, mean and var are not differentiable: u is kept for the backward, mean and var update the running stats.
    """
    _check(y, grid_h, grid_w, num_prefix)
    y = y.contiguous()
    C = y.shape[2]
    u = torch.empty_like(y)
    digest, part = _launch_fwd(
        y, conv_weight, merge_weight, u, (bn_weight,) * 4, eps, grid_h, grid_w, num_prefix, stats=True)
    mean, var, scale, shift = (y.new_empty((C,), dtype=_acc_dtype(y.dtype)) for _ in range(4))
    plan = launch_plan(1, C, None)  # one item, whatever the device: a program per channel block reads all partials
    _bn_stats_kernel[(plan.num_cblocks,)](
        part, bn_weight, bn_bias, mean, var, scale, shift, eps, C, part.shape[0],
        BLOCK_P=BLOCK_PARTS, BLOCK_C=plan.block_c, ACC=_tl_acc(y.dtype), num_warps=plan.num_warps)
    z = _launch_apply(u, None, scale, shift, None, None, num_prefix)
    return z, digest, u, mean, var


@tme_train.register_fake
def _tme_train_fake(y, conv_weight, merge_weight, bn_weight, bn_bias, eps, grid_h, grid_w, num_prefix):
    num_digest = num_tiles(grid_h, grid_w) if merge_weight is not None else 0
    stats = y.new_empty((y.shape[2],), dtype=_acc_dtype(y.dtype))
    return (
        torch.empty_like(y), y.new_empty((y.shape[0], num_digest, y.shape[2])), torch.empty_like(y),
        stats, torch.empty_like(stats))


@torch.library.custom_op('timm_cabvit::tme_backward', mutates_args=())
def tme_backward(
        grad: torch.Tensor, ddigest: Optional[torch.Tensor], y: torch.Tensor,
        conv_weight: torch.Tensor, merge_weight: Optional[torch.Tensor], alpha: Optional[torch.Tensor],
        grid_h: int, grid_w: int, num_prefix: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of both convs: (dy, d conv_weight, d merge_weight, sum of grad over the grid tokens).

    grad is du, the gradient of the 3x3 conv's output (training), or dz with du = alpha * dz (eval, alpha given);
    in eval the conv weight gradient is returned unscaled, sum dz * y(q + s) per tap s, for the caller to derive
    both alpha * that and the BN scale's gradient from it. Without merge weight, and in training for the sum,
    those outputs are empty.
    """
    grad = grad.contiguous()
    y = y.contiguous()
    B, _, C = y.shape
    acc_dtype = _acc_dtype(y.dtype)
    tiles = num_tiles(grid_h, grid_w)
    num_items = B * tiles
    plan = launch_plan(num_items, C, _sm_count(y.device), backward=True)
    num_progs = plan.num_progs
    merge = merge_weight is not None
    is_eval = alpha is not None
    new_part = torch.empty if num_items else torch.zeros  # every program stores its partials
    pw3 = new_part((num_progs, C, 9), device=y.device, dtype=acc_dtype)
    pw7 = new_part((num_progs, C, 49) if merge else (0,), device=y.device, dtype=acc_dtype)
    psum = new_part((num_progs, C) if is_eval else (0,), device=y.device, dtype=acc_dtype)
    if ddigest is None and merge:
        ddigest = y.new_zeros((B, tiles, C))
    dy = torch.empty_like(y)
    if num_items:
        _tme_bwd_kernel[plan.grid](
            grad, ddigest.contiguous() if merge else grad, y,
            _tap_major(conv_weight), _tap_major(merge_weight) if merge else conv_weight,
            alpha if is_eval else conv_weight,
            dy, pw3, pw7, psum,
            num_items, num_progs,
            H=grid_h, W=grid_w, C=C, P=num_prefix,
            BLOCK_C=plan.block_c, EVEN_C=C % plan.block_c == 0, MERGE=merge, EVAL=is_eval, ACC=_tl_acc(y.dtype),
            num_warps=plan.num_warps,
        )
    d_conv = pw3.sum(0).view(conv_weight.shape)
    d_merge = pw7.sum(0).view(merge_weight.shape).to(merge_weight.dtype) if merge else pw7
    return dy, d_conv, d_merge, psum.sum(0) if is_eval else psum


@tme_backward.register_fake
def _tme_backward_fake(grad, ddigest, y, conv_weight, merge_weight, alpha, grid_h, grid_w, num_prefix):
    acc_dtype = _acc_dtype(y.dtype)
    d_conv = conv_weight.new_empty(conv_weight.shape, dtype=acc_dtype)
    d_merge = torch.empty_like(merge_weight) if merge_weight is not None else y.new_empty((0,), dtype=acc_dtype)
    sums = y.new_empty((y.shape[2] if alpha is not None else 0,), dtype=acc_dtype)
    return torch.empty_like(y), d_conv, d_merge, sums


@torch.library.custom_op('timm_cabvit::tme_bn_backward', mutates_args=())
def tme_bn_backward(
        dz: torch.Tensor, u: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, bn_weight: torch.Tensor, eps: float,
        grid_h: int, grid_w: int, num_prefix: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BatchNorm backward on batch statistics: (du (prefix tokens carry dz), d bn_weight, d bn_bias)."""
    dz = dz.contiguous()
    B, _, C = u.shape
    num_rows = B * grid_h * grid_w
    acc_dtype = _acc_dtype(u.dtype)
    plan = launch_plan(triton.cdiv(num_rows, BLOCK_ROWS), C, _sm_count(u.device))
    part = (torch.empty if num_rows else torch.zeros)((plan.num_progs, 2, C), device=u.device, dtype=acc_dtype)
    if num_rows:
        _bn_bwd_reduce_kernel[plan.grid](
            dz, u, mean, part, num_rows, grid_h * grid_w, C, num_prefix, plan.num_progs,
            BLOCK_R=BLOCK_ROWS, BLOCK_C=plan.block_c, ACC=_tl_acc(u.dtype), num_warps=plan.num_warps)
    sum_dz, sum_dzu = part.sum(0)
    # du = alpha * (dz - sum_dz / n - (u - mean) * rstd^2 * sum_dzu / n), alpha = weight * rstd
    rstd = (var + eps).rsqrt()
    alpha = bn_weight.to(acc_dtype) * rstd
    count = max(num_rows, 1)
    du = _launch_apply(dz, u, alpha, alpha * sum_dz / -count, alpha * rstd * rstd * sum_dzu / -count, mean, num_prefix)
    return du, (sum_dzu * rstd).to(bn_weight.dtype), sum_dz.to(bn_weight.dtype)


@tme_bn_backward.register_fake
def _tme_bn_backward_fake(dz, u, mean, var, bn_weight, eps, grid_h, grid_w, num_prefix):
    return torch.empty_like(u), torch.empty_like(bn_weight), torch.empty_like(bn_weight)


def _tme_eval_setup(ctx, inputs, output) -> None:
    y, conv_weight, merge_weight, bn_weight, _, bn_mean, bn_var, eps, grid_h, grid_w, num_prefix = inputs
    ctx.save_for_backward(y, conv_weight, merge_weight, bn_weight, bn_mean, bn_var)
    ctx.eps, ctx.grid_size, ctx.num_prefix = eps, (grid_h, grid_w), num_prefix


def _tme_eval_backward(ctx, dz: torch.Tensor, ddigest: torch.Tensor):
    y, conv_weight, merge_weight, bn_weight, bn_mean, bn_var = ctx.saved_tensors
    rstd = (bn_var.to(_acc_dtype(y.dtype)) + ctx.eps).rsqrt()
    scale = bn_weight * rstd
    dy, dz_y, d_merge, sum_dz = tme_backward(
        dz, ddigest if merge_weight is not None else None, y, conv_weight, merge_weight, scale,
        *ctx.grid_size, ctx.num_prefix)
    # z = (u - running mean) * scale + bias with u = conv(y, w). With G_s = sum dz * y(q + s), the kernel's output:
    # d w_s = scale * G_s, and the BN weight's rstd * sum dz * (u - running mean) has sum dz * u = sum_s w_s * G_s.
    dz_y = dz_y.flatten(1)
    sum_dzu = (dz_y * conv_weight.flatten(1)).sum(1) - bn_mean * sum_dz
    d_conv = (dz_y * scale[:, None]).view(conv_weight.shape)
    return (
        dy, d_conv.to(conv_weight.dtype), d_merge if merge_weight is not None else None,
        (sum_dzu * rstd).to(bn_weight.dtype), sum_dz.to(bn_weight.dtype),
        None, None, None, None, None, None,
    )


def _tme_train_setup(ctx, inputs, output) -> None:
    y, conv_weight, merge_weight, bn_weight, _, eps, grid_h, grid_w, num_prefix = inputs
    _, _, u, mean, var = output
    ctx.mark_non_differentiable(u, mean, var)
    ctx.save_for_backward(y, conv_weight, merge_weight, bn_weight, u, mean, var)
    ctx.eps, ctx.grid_size, ctx.num_prefix = eps, (grid_h, grid_w), num_prefix


def _tme_train_backward(ctx, dz: torch.Tensor, ddigest: torch.Tensor, _du, _dmean, _dvar):
    y, conv_weight, merge_weight, bn_weight, u, mean, var = ctx.saved_tensors
    du, d_bn_weight, d_bn_bias = tme_bn_backward(dz, u, mean, var, bn_weight, ctx.eps, *ctx.grid_size, ctx.num_prefix)
    dy, d_conv, d_merge, _ = tme_backward(
        du, ddigest if merge_weight is not None else None, y, conv_weight, merge_weight, None,
        *ctx.grid_size, ctx.num_prefix)
    return (
        dy, d_conv.to(conv_weight.dtype), d_merge if merge_weight is not None else None, d_bn_weight, d_bn_bias,
        None, None, None, None,
    )


torch.library.register_autograd('timm_cabvit::tme_eval', _tme_eval_backward, setup_context=_tme_eval_setup)
torch.library.register_autograd('timm_cabvit::tme_train', _tme_train_backward, setup_context=_tme_train_setup)


def token_merge_enhance(
        x: torch.Tensor,
        conv_weight: torch.Tensor,
        merge_weight: Optional[torch.Tensor],
        bn: nn.BatchNorm2d,
        grid_size: Tuple[int, int],
        num_prefix_tokens: int = 0,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The TME of a CabViT block on tokens x (B, prefix + H * W, C): (enhanced tokens, digests or None).

    The function of `TokenMergeEnhance`'s PyTorch path, BN included: batch statistics and running-stat updates in
    training (as `nn.BatchNorm2d`: momentum, or a cumulative average for momentum None; unbiased running variance),
    running statistics in eval.

    Args:
        x: Tokens, a row-major grid after `num_prefix_tokens` prefix tokens.
        conv_weight: Depthwise 3x3 weight of the enhance conv, (C, 1, 3, 3).
        merge_weight: Depthwise 7x7 weight of the stride-4 merge conv, (C, 1, 7, 7), or None for no digests.
        bn: The enhance conv's BatchNorm (an activation it may carry is not applied).
        grid_size: Token grid (H, W).
        num_prefix_tokens: Leading tokens (e.g. a class token) that pass through unchanged.
    """
    grid_h, grid_w = grid_size
    C = x.shape[-1]
    bn_weight = bn.weight if bn.weight is not None else x.new_ones((C,), dtype=torch.float32)
    bn_bias = bn.bias if bn.bias is not None else x.new_zeros((C,), dtype=torch.float32)
    if not bn.training and bn.running_mean is not None and bn.running_var is not None:
        z, digest = tme_eval(
            x, conv_weight, merge_weight, bn_weight, bn_bias, bn.running_mean, bn.running_var, bn.eps,
            grid_h, grid_w, num_prefix_tokens)
        return z, digest if merge_weight is not None else None

    count = x.shape[0] * grid_h * grid_w
    if bn.training and count <= 1:
        raise ValueError(f'Expected more than 1 value per channel when training, got input size {list(x.shape)}')
    z, digest, _, mean, var = tme_train(
        x, conv_weight, merge_weight, bn_weight, bn_bias, bn.eps, grid_h, grid_w, num_prefix_tokens)
    if bn.training and bn.track_running_stats and bn.running_mean is not None and bn.running_var is not None:
        with torch.no_grad():
            factor = 0. if bn.momentum is None else bn.momentum
            if bn.num_batches_tracked is not None:
                bn.num_batches_tracked.add_(1)
                if bn.momentum is None:
                    factor = 1. / bn.num_batches_tracked
            bn.running_mean.mul_(1 - factor).add_(factor * mean.to(bn.running_mean.dtype))
            bn.running_var.mul_(1 - factor).add_(factor * (var * (count / (count - 1))).to(bn.running_var.dtype))
    return z, digest if merge_weight is not None else None
