#!/usr/bin/env python3
""" Where the GPU time of an inference batch and of a training step goes, by model component, and the top kernels

Why: speed work on CabViT-H has to follow a profile of the model beside its peer, not guesses (issue 10). One call,
a few minutes at most on one GPU, profiles cabvit_h_l2 (both TME paths) and convnext_tiny as benchmarks/models.py
runs them: bf16 autocast, channels_last, inference batch 256 in inference_mode, training batch 128 with
cross-entropy, backward and an SGD step.

How: torch.profiler records `--iters` passes of each kind after `--warmup` untimed ones. Forward pre/post hooks put
a `record_function` range `module::<path>` around every module, so a kernel belongs to the innermost module range
around the op that launched it. Backward ops run in the autograd engine (on CUDA in its device thread), outside
those ranges: each runs under an `autograd::engine::evaluate_function` event carrying the autograd node's sequence
number, which the forward op that made the node recorded as well, and takes that op's module. Two buckets cut across
modules and take precedence over them (only the optimizer's range beats them): dtype casts (an `aten::_to_copy` that
the model, autocast or a backward node calls, not a scalar's conversion inside another op) and layout copies (under
`aten::clone` or `aten::contiguous`, or a bare `aten::copy_`). Device time is the sum of kernel durations; kernels
that no op claims are 'other', as is autograd's own work (gradient accumulation, the seed gradient). Wall time per
pass is timed apart, without the profiler; kernel time over wall time says how busy the GPU was: far below 100 %
means the pass waits on launches, not on the GPU. Components are the model's as
`timm_cabvit.tools.flops.component_fn` assigns them, the paper's Fig. 5 set that `timm-cabvit flops` and
benchmarks/traffic.py use (the residual adds and layout glue of blocks and stages are 'other'), plus the loss, the
optimizer and the two buckets. `--device cpu` runs the same code on ops' self CPU time, at tiny sizes, as a smoke
test; the fused TME needs a GPU.

    python benchmarks/gpu_profile.py               # cabvit_h_l2 (fused and PyTorch TME), convnext_tiny
    python benchmarks/gpu_profile.py --device cpu --img-size 64 --batch-size 2 --iters 1 --warmup 1
"""
import argparse
import contextlib
import sys
from collections import defaultdict
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from bench_utils import (
    COMPONENT_ORDER,
    RESULTS_DIR,
    environment,
    label_component,
    markdown_table,
    report_markdown,
    resolve_device,
    result_path,
    synchronize,
    time_ms,
    write_result,
)
from timm.models import get_pretrained_cfg_value
from torch.autograd.profiler import record_function
from torch.autograd.profiler_util import FunctionEvent
from torch.profiler import ProfilerActivity, profile

import timm_cabvit  # noqa: F401  registers the models

DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp32': None}
RANGE = 'module::'
BACKWARD = 'autograd::engine::evaluate_function'
COPIES = {'aten::clone', 'aten::contiguous'}
DEVICE_WORK = {'kernel', 'gpu_memcpy', 'gpu_memset'}  # kineto activity types
TME_LABELS = {'triton': 'fused', 'torch': 'PyTorch', 'auto': 'auto'}


class ModuleRanges:
    """Profiler ranges `module::<path>` around every module's forward, while active."""

    def __init__(self, model: nn.Module):
        self.stack: List[record_function] = []
        self.handles = []
        for name, module in model.named_modules():
            self.handles.append(module.register_forward_pre_hook(lambda m, a, name=name: self._enter(name)))
            self.handles.append(module.register_forward_hook(lambda m, a, o: self._exit()))

    def _enter(self, name: str) -> None:
        scope = record_function(RANGE + name)
        scope.__enter__()
        self.stack.append(scope)

    def _exit(self) -> None:
        self.stack.pop().__exit__(None, None, None)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def lineage(event: Optional[FunctionEvent]) -> Iterator[FunctionEvent]:
    """The event and its enclosing CPU events, innermost first."""
    while event is not None:
        yield event
        event = event.cpu_parent


def forward_modules(events: List[FunctionEvent]) -> Dict[int, str]:
    """Module path of each autograd node, by sequence number, from the forward ops that recorded it.

    An op records the next node's number whether it makes a node or not; events come in start order, so the last
    one with a number is the op that made the node (or an op inside it), in the node's module.
    """
    modules = {}
    for event in events:
        if event.sequence_nr < 0:
            continue
        for outer in lineage(event.cpu_parent):
            if outer.name.startswith(BACKWARD):
                break
            if outer.name.startswith(RANGE):
                modules[event.sequence_nr] = outer.name[len(RANGE):]
                break
    return modules


def is_cast(names: List[str]) -> bool:
    """A dtype cast: a `_to_copy` that the model, autocast or a backward node asks for, not the conversion of a
    scalar argument inside another op."""
    if 'aten::_to_copy' not in names:
        return False
    callers = [n for n in names[names.index('aten::_to_copy') + 1:] if n != 'aten::to']
    return not callers or not callers[0].startswith('aten::')


def bucket(event: FunctionEvent, component: Callable[[str], str], node_modules: Dict[int, str]) -> str:
    """The component an op's time belongs to: the optimizer, else casts and layout copies, else its module's."""
    chain = list(lineage(event))
    names = [e.name for e in chain]
    if RANGE + '<optimizer>' in names:
        return 'optimizer'
    if is_cast(names):
        return 'dtype casts'
    if COPIES & set(names) or names[0] == 'aten::copy_' and not any(n.startswith('aten::') for n in names[1:]):
        return 'layout copies'
    for outer in chain:
        if outer.name.startswith(RANGE):
            return component(outer.name[len(RANGE):])
        if outer.name.startswith(BACKWARD):
            path = node_modules.get(outer.sequence_nr)
            return component(path) if path is not None else 'other'
    return 'other'


def device_times(events: List[FunctionEvent], device: torch.device) -> Iterator[Tuple[FunctionEvent, str, float]]:
    """(launching op, kernel name, us) for every kernel; on CPU (op, op name, self CPU us) for every op."""
    for event in events:
        if event.device_type != torch.autograd.DeviceType.CPU or event.is_user_annotation:
            continue
        if device.type == 'cuda':
            for kernel in event.kernels:
                yield event, kernel.name, kernel.duration
        elif not event.name.startswith(BACKWARD):
            yield event, event.name, event.self_cpu_time_total


def analyse(events: List[FunctionEvent], model: nn.Module, device: torch.device, iters: int) -> Dict:
    """Per-pass device time by component and by kernel name (with the component that spends most of it)."""
    component, node_modules = label_component(model), forward_modules(events)
    by_component: Dict[str, float] = defaultdict(float)
    kernels: Dict[str, Dict] = {}
    for event, name, us in device_times(events, device):
        comp = bucket(event, component, node_modules)
        by_component[comp] += us / iters
        kernel = kernels.setdefault(name, dict(us=0., calls=0., components=defaultdict(float)))
        kernel['us'] += us / iters
        kernel['calls'] += 1 / iters
        kernel['components'][comp] += us / iters
    if device.type == 'cuda':  # device work that no op claimed (none expected); not the GPU spans of ranges
        total = sum(e.time_range.elapsed_us() for e in events if e.activity_type in DEVICE_WORK)
        unclaimed = total / iters - sum(by_component.values())
        if unclaimed > 1:
            by_component['other'] += unclaimed
    top = sorted(kernels.items(), key=lambda kv: -kv[1]['us'])
    return dict(
        components_ms={c: us / 1e3 for c, us in by_component.items()},
        total_ms=sum(by_component.values()) / 1e3,
        kernels=[dict(name=name, ms=k['us'] / 1e3, calls=k['calls'],
                      component=max(k['components'], key=k['components'].get)) for name, k in top],
    )


def passes(model: nn.Module, args, device: torch.device, input_size: Tuple[int, ...]) -> Dict[str, Tuple]:
    """The inference pass and the training step of benchmarks/models.py, each with the context it runs in.

    As there, all inference passes run in one inference_mode and autocast context (autocast casts the weights once
    per context); a training step enters autocast itself. Loss and optimizer get ranges of their own.
    """
    def autocast():
        return torch.autocast(device.type, dtype=DTYPES[args.dtype]) if DTYPES[args.dtype] else contextlib.nullcontext()

    def images(batch_size: int) -> torch.Tensor:
        return torch.randn(batch_size, *input_size, device=device).contiguous(memory_format=torch.channels_last)

    x_infer, x_train = images(args.batch_size), images(args.train_batch_size)
    target = torch.randint(0, model.num_classes, (args.train_batch_size,), device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.9)

    @contextlib.contextmanager
    def inference_context() -> Iterator[None]:
        model.eval()
        with torch.inference_mode(), autocast():
            yield

    @contextlib.contextmanager
    def training_context() -> Iterator[None]:
        model.train()
        yield

    def train() -> None:
        with autocast():
            logits = model(x_train)
            with record_function(RANGE + '<loss>'):
                loss = F.cross_entropy(logits, target)
        loss.backward()
        with record_function(RANGE + '<optimizer>'):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return dict(inference=(inference_context, lambda: model(x_infer)), training=(training_context, train))


def profile_model(name: str, tme: Optional[str], args, device: torch.device) -> Dict:
    """Wall time and profile of each pass of one model (one TME path of a CabViT model)."""
    fixed_size = get_pretrained_cfg_value(name, 'fixed_input_size')
    kwargs = dict(img_size=args.img_size) if args.img_size and fixed_size else {}
    model = timm.create_model(name, **kwargs).to(device).to(memory_format=torch.channels_last)
    if tme is not None:
        model.set_tme_impl(tme)
    input_size = (3, args.img_size, args.img_size) if args.img_size else model.pretrained_cfg['input_size']
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    row = dict(model=name, tme=tme, passes={})
    for kind, (context, step) in passes(model, args, device, input_size).items():
        with context():
            wall_ms = time_ms(step, device, iters=args.iters, runs=3, warmup=args.warmup)
        ranges = ModuleRanges(model)
        try:
            with context():
                step()  # in this context, as in the timing: eval caches and autocast's weight casts are made
                synchronize(device)
                with profile(activities=activities) as prof:
                    for _ in range(args.iters):
                        step()
                    synchronize(device)
        finally:
            ranges.remove()
        result = analyse(prof.events(), model, device, args.iters)
        result['wall_ms'] = wall_ms
        row['passes'][kind] = result
        print(f'{name} {TME_LABELS.get(tme, "")} {kind}: wall {wall_ms:.2f} ms, profiled {result["total_ms"]:.2f} ms',
              file=sys.stderr, flush=True)
    return row


def row_label(row: Dict) -> str:
    return row['model'] + (f' ({TME_LABELS[row["tme"]]} TME)' if row['tme'] else '')


def format_tables(rows: List[Dict], args, device: torch.device) -> List[str]:
    """Per pass: a component table (ms per pass and share) and the top kernels of each model."""
    unit = 'kernel' if device.type == 'cuda' else 'op self CPU'
    tables = []
    for kind, batch in (('inference', args.batch_size), ('training', args.train_batch_size)):
        results = [r['passes'][kind] for r in rows]
        present = [c for c in COMPONENT_ORDER if any(c in res['components_ms'] for res in results)]
        cells = [[comp] + [
            f'{res["components_ms"][comp]:.2f} ({100 * res["components_ms"][comp] / res["total_ms"]:.0f} %)'
            if comp in res['components_ms'] else '-' for res in results] for comp in present]
        cells.append([f'all {unit} time'] + [f'{res["total_ms"]:.2f}' for res in results])
        cells.append(['wall time, unprofiled'] + [f'{res["wall_ms"]:.2f}' for res in results])
        cells.append([f'{unit} time / wall time'] + [f'{100 * res["total_ms"] / res["wall_ms"]:.0f} %'
                                                       for res in results])
        what = 'step (SGD included)' if kind == 'training' else 'pass'
        tables.append(f'{kind}, batch {batch}: {unit} ms per {what} by component\n\n'
                      + markdown_table(['component'] + [row_label(r) for r in rows], cells))
        top = []
        for row, res in zip(rows, results):
            for kernel in res['kernels'][:args.top]:
                name = kernel['name'] if len(kernel['name']) <= 90 else kernel['name'][:87] + '...'
                top.append([row_label(row), name.replace('|', '/'), kernel['component'], f'{kernel["calls"]:.0f}',
                            f'{kernel["ms"]:.3f}', f'{100 * kernel["ms"] / res["total_ms"]:.1f} %'])
        tables.append(f'{kind}: top {args.top} {"kernels" if device.type == "cuda" else "ops"} by time\n\n'
                      + markdown_table(['model', 'kernel' if device.type == 'cuda' else 'op', 'mostly in',
                                        f'calls per {what}', 'ms', 'share'], top))
    return tables


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=['cabvit_h_l2', 'convnext_tiny'], metavar='NAME')
    parser.add_argument('--tme', choices=['both', 'triton', 'torch', 'auto'], default='both',
                        help="TME path of CabViT models (default: both on CUDA; on CPU only 'torch' runs)")
    parser.add_argument('--batch-size', type=int, default=256, help='inference batch (default: %(default)s)')
    parser.add_argument('--train-batch-size', type=int, default=None, help='training batch (default: half of it)')
    parser.add_argument('--img-size', type=int, default=None, help="input size (default: the model's, 224)")
    parser.add_argument('--dtype', choices=list(DTYPES), default=None,
                        help='autocast dtype, fp32 for none (default: bf16 on CUDA, fp32 on CPU)')
    parser.add_argument('--iters', type=int, default=3, help='profiled passes of each kind (default: %(default)s)')
    parser.add_argument('--warmup', type=int, default=5, help='untimed passes first (default: %(default)s)')
    parser.add_argument('--top', type=int, default=12, help='kernels listed per model and pass')
    parser.add_argument('--device', default='cuda', help="'cuda', or 'cpu' for a smoke run at tiny sizes")
    parser.add_argument('--results-dir', default=RESULTS_DIR)
    args = parser.parse_args(argv)
    args.train_batch_size = args.train_batch_size or max(1, args.batch_size // 2)
    return args


def main(argv: Optional[Sequence[str]] = None) -> List[Dict]:
    args = parse_args(argv)
    device = resolve_device(args.device)
    args.dtype = args.dtype or ('bf16' if device.type == 'cuda' else 'fp32')
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    rows = []
    for name in args.models:
        tmes: List[Optional[str]] = [None]
        if name.startswith('cabvit_'):
            tmes = ['triton', 'torch'] if args.tme == 'both' else [args.tme]
            if device.type != 'cuda':
                tmes = ['torch']
        rows.extend(profile_model(name, tme, args, device) for tme in tmes)

    env = environment(device)
    settings = ', '.join([
        f'{args.dtype} autocast' if DTYPES[args.dtype] else 'fp32 (no autocast)', 'channels_last',
        f'inference batch {args.batch_size}', f'training batch {args.train_batch_size}',
        f'{args.iters} profiled passes after {args.warmup} warm-up ones'])
    sections = [
        f'# Profile on {env["device"]}', '',
        f'{settings}. Attribution: the docstring of `benchmarks/gpu_profile.py`. torch {env["torch"]}, CUDA '
        f'{env["cuda"]}, triton {env["triton"]}, timm {env["timm"]}, timm_cabvit {env["timm_cabvit"]} '
        f'(commit {env["git_commit"]}).',
    ]
    for table in format_tables(rows, args, device):
        sections += ['', table]
    markdown = report_markdown(sections, env)
    print(markdown)
    json_path = result_path(args.results_dir, 'profile-', device, '.json')
    print(write_result(json_path, markdown, env, vars(args), rows=rows), file=sys.stderr)
    return rows


if __name__ == '__main__':
    main()
