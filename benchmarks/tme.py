#!/usr/bin/env python3
""" TME micro-benchmark: the fused Triton TME against the PyTorch path at every TME shape of CabViT-H models

For each distinct TME of the chosen models (token grid, channels, with or without the merge branch), both paths,
forward (eval: BN on running statistics, inference mode) and forward + backward (train: BN on batch statistics),
under autocast in bf16 by default. Times are medians over runs of CUDA-event timed loops. Bandwidth counts the
compulsory traffic, each input and output tensor once (forward: read tokens, write tokens and digests; backward:
read the two output gradients and the tokens, write the token gradient), against the device's copy bandwidth.

    python benchmarks/tme.py                    # batch 256 inference, 128 training, bf16
    python benchmarks/tme.py --json             # also writes benchmarks/results/tme-<device>-<date>.json
    python benchmarks/tme.py --sweep            # fused kernels' channel block and warps, per shape
    python benchmarks/tme.py --device cpu --batch 2 --train-batch 2 --iters 1 --runs 1   # smoke (interpreter)
"""
import argparse
import contextlib
import math
import os
from typing import Dict, List, Tuple

import timm
import torch
from bench_utils import (
    RESULTS_DIR,
    copy_bandwidth_gbps,
    environment,
    markdown_table,
    resolve_device,
    result_path,
    time_ms,
    write_json,
)

import timm_cabvit  # noqa: F401  registers the models
from timm_cabvit.cabvit import CabViTBlock
from timm_cabvit.tme import TokenMergeEnhance

DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp32': torch.float32}


def tme_shapes(model_names: List[str]) -> List[Dict]:
    """Distinct TMEs of the models: grid, channels, merge branch, prefix tokens, and which blocks use each."""
    shapes: Dict[Tuple, Dict] = {}
    for name in model_names:
        model = timm.create_model(name)
        for block in model.modules():
            if isinstance(block, CabViTBlock):
                tme = block.tme
                key = (block.attn.pos_bias.grid_size, tme.enhance.conv.in_channels, tme.merge is not None,
                       tme.num_prefix_tokens)
                shape = shapes.setdefault(key, dict(
                    grid=key[0], dim=key[1], merge=key[2], prefix=key[3], blocks={}))
                shape['blocks'][name] = shape['blocks'].get(name, 0) + 1
    return list(shapes.values())


def shape_label(shape: Dict) -> str:
    """e.g. '14x14 C320 (h_l2 x6)': grid, channels, no-merge / prefix tokens where so, and the blocks using it."""
    label = f'{shape["grid"][0]}x{shape["grid"][1]} C{shape["dim"]}'
    if not shape['merge']:
        label += ' no-merge'
    if shape['prefix']:
        label += f' +{shape["prefix"]} prefix'
    used = ', '.join(f'{name.removeprefix("cabvit_")} x{n}' for name, n in shape['blocks'].items())
    return f'{label} ({used})'


def traffic_bytes(shape: Dict, batch_size: int, element_size: int) -> Tuple[int, int]:
    """Compulsory bytes of forward and of forward + backward."""
    tokens = batch_size * (shape['prefix'] + shape['grid'][0] * shape['grid'][1]) * shape['dim'] * element_size
    num_digest = math.ceil(shape['grid'][0] / 4) * math.ceil(shape['grid'][1] / 4) if shape['merge'] else 0
    digests = batch_size * num_digest * shape['dim'] * element_size
    fwd = 2 * tokens + digests
    return fwd, fwd + 3 * tokens + digests


def build(shape: Dict, device: torch.device, param_dtype: torch.dtype) -> TokenMergeEnhance:
    tme = TokenMergeEnhance(shape['dim'], merge=shape['merge'], num_prefix_tokens=shape['prefix'])
    return tme.to(device=device, dtype=param_dtype)


def measure(shape: Dict, impl: str, args, device: torch.device) -> Tuple[float, float]:
    """(forward ms at the inference batch, forward + backward ms at the training batch) of one path."""
    act_dtype = DTYPES[args.dtype]
    autocast = torch.autocast(device.type, dtype=act_dtype) if act_dtype != torch.float32 else contextlib.nullcontext()
    tme = build(shape, device, torch.float32)
    tme.set_impl(impl)
    seq = shape['prefix'] + shape['grid'][0] * shape['grid'][1]
    timing = dict(device=device, iters=args.iters, runs=args.runs, warmup=args.warmup)

    tme.eval()
    x = torch.randn(args.batch, seq, shape['dim'], device=device, dtype=act_dtype)
    with torch.inference_mode(), autocast:
        fwd_ms = time_ms(lambda: tme(x, shape['grid']), **timing)

    tme.train()
    x = torch.randn(args.train_batch, seq, shape['dim'], device=device, dtype=act_dtype, requires_grad=True)
    params = list(tme.parameters())
    with autocast:
        z, d = tme(x, shape['grid'])
    grads = [torch.randn_like(z)] + ([torch.randn_like(d)] if d is not None else [])

    def step():
        with autocast:
            z, d = tme(x, shape['grid'])
        torch.autograd.grad([z] + ([d] if d is not None else []), [x] + params, grads)

    return fwd_ms, time_ms(step, **timing)


def run_table(args, device: torch.device) -> None:
    shapes = tme_shapes(args.models)
    element_size = torch.empty((), dtype=DTYPES[args.dtype]).element_size()
    copy_gbps = copy_bandwidth_gbps(device, size_mib=1024 if device.type == 'cuda' else 64)
    print(f'device copy bandwidth: {copy_gbps:.0f} GB/s (read + write of a large copy)')
    rows, records = [], []
    for shape in shapes:
        fwd_bytes = traffic_bytes(shape, args.batch, element_size)[0]
        fwdbwd_bytes = traffic_bytes(shape, args.train_batch, element_size)[1]
        times = {impl: measure(shape, impl, args, device) for impl in ('torch', 'triton')}
        for impl, (fwd_ms, fwdbwd_ms) in times.items():
            fwd_gbps = fwd_bytes / (fwd_ms * 1e-3) / 1e9
            fwdbwd_gbps = fwdbwd_bytes / (fwdbwd_ms * 1e-3) / 1e9
            record = dict(
                shape=shape_label(shape), grid=list(shape['grid']), dim=shape['dim'], merge=shape['merge'],
                prefix=shape['prefix'], blocks=shape['blocks'], path='fused' if impl == 'triton' else 'pytorch',
                fwd_ms=fwd_ms, fwd_gbps=fwd_gbps, fwdbwd_ms=fwdbwd_ms, fwdbwd_gbps=fwdbwd_gbps)
            if impl == 'triton':
                record['fwd_speedup'] = times['torch'][0] / fwd_ms
                record['fwdbwd_speedup'] = times['torch'][1] / fwdbwd_ms
            records.append(record)
            rows.append([
                record['shape'], record['path'],
                f'{fwd_ms * 1e3:.1f}', f'{fwd_gbps:.0f} ({100 * fwd_gbps / copy_gbps:.0f}%)',
                f'{fwdbwd_ms * 1e3:.1f}', f'{fwdbwd_gbps:.0f} ({100 * fwdbwd_gbps / copy_gbps:.0f}%)',
                f'{record["fwd_speedup"]:.2f}x / {record["fwdbwd_speedup"]:.2f}x' if impl == 'triton' else '',
            ])
    header = ['TME (blocks)', 'path', f'fwd us (B={args.batch})', 'fwd GB/s (% copy)',
              f'fwd+bwd us (B={args.train_batch})', 'fwd+bwd GB/s (% copy)', 'fused speed-up fwd / fwd+bwd']
    table = markdown_table(header, rows)
    print(f'\n{args.dtype}, autocast{"" if args.dtype != "fp32" else " off"}, median of {args.runs} runs '
          f'of {args.iters} iterations\n')
    print(table)
    if args.json:
        path = result_path(args.results_dir, 'tme-', device, '.json')
        write_json(path, dict(
            environment=environment(device), copy_gbps=copy_gbps, settings=vars(args), table=table, rows=records))
        print(f'\nwritten: {path}')


def run_sweep(args, device: torch.device) -> None:
    """Time the fused path per channel block and warp count, to tune `tme_triton.kernel_config`."""
    from timm_cabvit import tme_triton

    default_config = tme_triton.kernel_config
    rows = []
    try:
        for shape in tme_shapes(args.models):
            for block_c in (16, 32, 64, 128):
                if block_c > max(16, shape['dim']):
                    continue
                for fwd_warps, bwd_warps in ((1, 2), (2, 4), (4, 8), (8, 8)):
                    config = tme_triton.KernelConfig(block_c, fwd_warps, bwd_warps)
                    tme_triton.kernel_config = lambda num_channels, config=config: config
                    fwd_ms, fwdbwd_ms = measure(shape, 'triton', args, device)
                    rows.append([shape_label(shape), str(block_c), f'{fwd_warps} / {bwd_warps}',
                                 f'{fwd_ms * 1e3:.1f}', f'{fwdbwd_ms * 1e3:.1f}'])
                    print(' | '.join(rows[-1]), flush=True)
    finally:
        tme_triton.kernel_config = default_config
    print()
    print(markdown_table(['TME', 'block_c', 'warps fwd / bwd', 'fwd us', 'fwd+bwd us'], rows))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=['cabvit_h_l1', 'cabvit_h_l2'])
    parser.add_argument('--batch', type=int, default=256, help='batch of the forward (inference) timing')
    parser.add_argument('--train-batch', type=int, default=128, help='batch of the forward + backward timing')
    parser.add_argument('--dtype', choices=list(DTYPES), default=None,
                        help='autocast dtype, fp32 for none (default: bf16; fp32 on CPU, where bf16 is emulated)')
    parser.add_argument('--iters', type=int, default=50, help='calls per timed run')
    parser.add_argument('--runs', type=int, default=10, help='timed runs; the median is reported')
    parser.add_argument('--warmup', type=int, default=10)
    parser.add_argument('--device', default='cuda', help="'cuda', or 'cpu' for a smoke run under Triton's interpreter")
    parser.add_argument('--json', action='store_true', help='write the results as JSON under --results-dir')
    parser.add_argument('--results-dir', default=RESULTS_DIR)
    parser.add_argument('--sweep', action='store_true', help='tune the fused kernels instead of the table')
    args = parser.parse_args()

    device = resolve_device(args.device)
    args.dtype = args.dtype or ('bf16' if device.type == 'cuda' else 'fp32')
    if device.type == 'cpu':
        os.environ.setdefault('TRITON_INTERPRET', '1')  # before the fused path first imports its kernels
    if args.sweep:
        run_sweep(args, device)
    else:
        run_table(args, device)


if __name__ == '__main__':
    main()
