#!/usr/bin/env python3
""" Whole-model throughput in one process: CabViT-H on the fused and the PyTorch TME beside reference models

Per model (and, for CabViT, per TME path): inference images/s (batch 256), training images/s (batch 128, SGD
step included) and batch-1 latency, each eager and under torch.compile, with bf16 autocast and channels_last
inputs. Each number is the median of several CUDA-event timed runs. Every row comes from the same process and
device, so ratios between rows are meaningful. Results go to benchmarks/results/<device>-<date>.json and .md.

    python benchmarks/models.py                          # the full table
    python benchmarks/models.py --models cabvit_h_l2 convnext_tiny --no-compile
    python benchmarks/models.py --device cpu --batch 2 --models cabvit_h_l1 convnext_pico --iters 2 --no-compile
"""
import argparse
import contextlib
import gc
import traceback
from typing import Dict, List, Optional

import timm
import torch
import torch.nn.functional as F
from bench_utils import (
    RESULTS_DIR,
    environment,
    markdown_table,
    report_markdown,
    resolve_device,
    result_path,
    time_ms,
    write_result,
)
from timm.data import resolve_model_data_config

import timm_cabvit  # noqa: F401  registers the models
from timm_cabvit.tools.flops import num_params

DEFAULT_MODELS = [
    'cabvit_h_l1', 'cabvit_h_l2', 'convnext_pico', 'convnext_tiny', 'efficientformer_l1', 'efficientformer_l3',
    'swin_tiny_patch4_window7_224', 'deit_tiny_patch16_224', 'nextvit_small',
]
DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp32': torch.float32}
TME_LABELS = {'triton': 'fused', 'torch': 'PyTorch'}
COLUMNS = [
    ('infer_eager', 'infer img/s eager'), ('infer_compiled', 'infer img/s compiled'),
    ('train_eager', 'train img/s eager'), ('train_compiled', 'train img/s compiled'),
    ('latency_eager_ms', 'batch-1 ms eager'), ('latency_compiled_ms', 'batch-1 ms compiled'),
]


def measure(model: torch.nn.Module, args, device: torch.device, compiled: bool) -> Dict[str, float]:
    """Inference and training throughput and batch-1 latency of one model, eager or compiled."""
    mode = 'compiled' if compiled else 'eager'
    run = torch.compile(model, dynamic=False, mode=args.compile_mode) if compiled else model
    autocast = torch.autocast(device.type, dtype=DTYPES[args.dtype]) if args.dtype != 'fp32' \
        else contextlib.nullcontext()
    timing = dict(device=device, iters=args.iters, runs=args.runs, warmup=args.warmup)
    input_size = resolve_model_data_config(model)['input_size']
    results = {}

    def images(batch_size: int) -> torch.Tensor:
        x = torch.randn(batch_size, *input_size, device=device)
        return x.contiguous(memory_format=torch.channels_last)

    model.eval()
    x, x1 = images(args.batch), images(1)
    with torch.inference_mode(), autocast:
        results[f'infer_{mode}'] = args.batch / (time_ms(lambda: run(x), **timing) * 1e-3)
        results[f'latency_{mode}_ms'] = time_ms(lambda: run(x1), **timing)

    model.train()
    x = images(args.train_batch)
    target = torch.randint(0, model.num_classes, (args.train_batch,), device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.9)

    def step():
        with autocast:
            loss = F.cross_entropy(run(x), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    results[f'train_{mode}'] = args.train_batch / (time_ms(step, **timing) * 1e-3)
    return results


def model_rows(name: str, args, device: torch.device) -> List[Dict]:
    """Rows of one model: one per TME path for CabViT (fused only on CUDA), one otherwise."""
    model = timm.create_model(name).to(device).to(memory_format=torch.channels_last)
    impls: List[Optional[str]] = [None]
    if hasattr(model, 'set_tme_impl'):
        impls = [impl for impl in (['triton', 'torch'] if args.tme == 'both' else [args.tme])]
        if device.type != 'cuda' and 'triton' in impls:
            print(f'{name}: skipping the fused TME, it needs a CUDA device (the interpreter is for tests)')
            impls.remove('triton')
    rows = []
    for impl in impls:
        if impl is not None:
            model.set_tme_impl(impl)
        row = dict(model=name, tme=TME_LABELS.get(impl, ''), params_m=num_params(model) / 1e6)
        for compiled in ([False, True] if args.compile else [False]):
            try:
                row.update(measure(model, args, device, compiled))
            except Exception as e:  # a failing model or mode (e.g. out of memory) leaves its cells empty
                row.setdefault('errors', []).append(f'{"compiled" if compiled else "eager"}: {e!r}')
                traceback.print_exc()
            finally:
                torch._dynamo.reset()
                gc.collect()
                if device.type == 'cuda':
                    torch.cuda.empty_cache()
        print(' '.join(f'{k}={v:.1f}' if isinstance(v, float) else f'{k}={v}' for k, v in row.items()), flush=True)
        rows.append(row)
    return rows


def ratios(rows: List[Dict], model: str, reference: str) -> Optional[str]:
    """Fused CabViT row against a reference row, per column: the issue's acceptance compares these."""
    ours = next((r for r in rows if r['model'] == model and r['tme'] == 'fused'), None)
    ref = next((r for r in rows if r['model'] == reference), None)
    if ours is None or ref is None:
        return None
    parts = []
    for key, title in COLUMNS:
        if key in ours and key in ref:
            ratio = ours[key] / ref[key] if not key.endswith('_ms') else ref[key] / ours[key]
            parts.append(f'{title}: {ratio:.2f}x')
    return f'{model} (fused TME) vs {reference}, >1 means faster: ' + ', '.join(parts)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=DEFAULT_MODELS)
    parser.add_argument('--tme', choices=['both', 'triton', 'torch'], default='both', help='TME paths of CabViT')
    parser.add_argument('--batch', type=int, default=256, help='inference batch')
    parser.add_argument('--train-batch', type=int, default=None, help='training batch (default: half --batch)')
    parser.add_argument('--dtype', choices=list(DTYPES), default=None,
                        help='autocast dtype, fp32 for none (default: bf16; fp32 on CPU, where bf16 is emulated)')
    parser.add_argument('--iters', type=int, default=20, help='steps per timed run')
    parser.add_argument('--runs', type=int, default=None, help='timed runs, the median is reported (default: 5, CPU 2)')
    parser.add_argument('--warmup', type=int, default=None,
                        help='untimed steps first, compilation included (default: 5, CPU 1)')
    parser.add_argument('--no-compile', dest='compile', action='store_false', help='eager only')
    parser.add_argument('--compile-mode', default=None, help='torch.compile mode, e.g. max-autotune-no-cudagraphs')
    parser.add_argument('--device', default='cuda', help="'cuda', or 'cpu' for a smoke run at tiny sizes")
    parser.add_argument('--results-dir', default=RESULTS_DIR)
    parser.add_argument('--tag', default='', help='suffix of the result file names, e.g. eager')
    args = parser.parse_args()
    args.train_batch = args.train_batch or max(1, args.batch // 2)

    device = resolve_device(args.device)
    on_gpu = device.type == 'cuda'
    args.dtype = args.dtype or ('bf16' if on_gpu else 'fp32')
    args.runs = args.runs or (5 if on_gpu else 2)
    args.warmup = args.warmup if args.warmup is not None else (5 if on_gpu else 1)
    if on_gpu:
        torch.backends.cudnn.benchmark = True
    rows = []
    for name in args.models:
        rows.extend(model_rows(name, args, device))

    header = ['model', 'TME', 'params (M)'] + [title for key, title in COLUMNS if args.compile or 'eager' in key]
    table_rows = []
    for row in rows:
        cells = [row['model'], row['tme'], f'{row["params_m"]:.1f}']
        for key, _ in COLUMNS:
            if args.compile or 'eager' in key:
                cells.append(f'{row[key]:.2f}' if key.endswith('_ms') and key in row else
                             f'{row[key]:.0f}' if key in row else 'error')
        table_rows.append(cells)
    env = environment(device)
    notes = [n for n in (ratios(rows, m, 'convnext_tiny') for m in ('cabvit_h_l2', 'cabvit_h_l1')) if n]
    markdown = report_markdown([
        f'# Throughput on {env["device"]}',
        '',
        f'{"fp32 (no autocast)" if args.dtype == "fp32" else args.dtype + " autocast"}, channels_last, '
        f'inference batch {args.batch}, training batch {args.train_batch} '
        f'(SGD step included), batch-1 latency; median of {args.runs} runs of {args.iters} steps. '
        f'torch {env["torch"]}, CUDA {env["cuda"]}, triton {env["triton"]}, timm {env["timm"]}, '
        f'timm_cabvit {env["timm_cabvit"]} (commit {env["git_commit"]}).',
        '',
        markdown_table(header, table_rows),
        '',
        *notes,
    ], env)
    print('\n' + markdown)
    json_path = result_path(args.results_dir, '', device, f'-{args.tag}.json' if args.tag else '.json')
    print(write_result(json_path, markdown, env, vars(args), rows=rows, notes=notes))


if __name__ == '__main__':
    main()
