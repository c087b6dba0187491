#!/usr/bin/env python3
""" Aten ops and memory traffic of an inference pass and a training step, counted without a GPU

Why: on a GPU these models are bound by memory traffic and by the number of small kernels, not by FLOPs (issue 10).
Counting what each pass launches and moves, by model component, shows where CabViT's extra cost comes from, and
whether a change removes launches or bytes, on any machine.

How: the model runs on fake CUDA tensors (`FakeTensorMode`: shapes, dtypes and strides without memory, so batch 256
costs what batch 1 does) under CUDA's autocast, so that the casts, the channels_last layouts and the fused TME's
custom ops (`--tme triton`) are those of a GPU run. A `TorchDispatchMode` records every op that reaches the
backends, with the module running it (a stack kept by forward pre/post hooks). Autograd cannot run backward on fake
CUDA tensors without a CUDA driver, so a training step replays the recorded forward ops one by one on `meta`
tensors, where the casts are already explicit ops, and runs backward and the SGD step (foreach, as on CUDA) there; a
backward op belongs to the module whose forward op made the autograd node running it
(`torch._C._current_autograd_node`), a gradient accumulation to the parameter's module; components are the model's
as `timm_cabvit.tools.flops.component_fn` assigns them, the paper's Fig. 5 set of `timm-cabvit flops` (the residual
adds and layout glue of blocks and stages are 'other'), plus the loss, the optimizer, and 'untraced' for a backward
op whose autograd node no forward op made. Without a GPU, `scaled_dot_product_attention` cannot pick its CUDA
kernel, so `--sdpa` routes it as ATen's attention.cpp does: memory-efficient attention (default; the float mask
padded to a multiple of 8 and expanded to the batch), cuDNN (where the mask needs no gradient), or the math path.
Inference counts the second of two passes in one autocast context, as benchmarks/models.py times it: weights cast
once; a training step casts them anew.

Rules: an op is one dispatcher call that does work, reported per pass (a foreach op, a convolution backward or a
fused TME op may launch several kernels; the TME's Triton launches are in the grid table). Views
(`OpOverload.is_view`, `_unsafe_view`) and allocations (`empty*`) launch nothing: they are the metadata ops, with
no bytes. Bytes, reported per image: each distinct input tensor read once plus each output or mutated tensor
written once (`copy_`, `fill_`, `zero_` do not read their destination); a tensor counts the memory it spans, so a
broadcast bias counts once and a strided slice at most its elements. A fused TME op counts at its interface: the
partial sums and small torch ops inside it are not seen.

    python benchmarks/traffic.py                          # default models, bf16, channels_last, batch 256 / 128
    python benchmarks/traffic.py --models cabvit_h_l2 convnext_tiny --tme torch --dtype fp32 --no-optimizer
"""
import argparse
import contextlib
import dataclasses
import functools
import math
import sys
import warnings
from collections import Counter, defaultdict
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import triton
from bench_utils import (
    COMPONENT_ORDER,
    RESULTS_DIR,
    dated_result_path,
    environment,
    label_component,
    markdown_table,
    report_markdown,
    write_result,
)
from tme import tme_shapes
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from timm_cabvit import import_tme_triton  # importing timm_cabvit registers the models

DEFAULT_MODELS = ['cabvit_h_l1', 'cabvit_h_l2', 'cabvit_p_l0', 'convnext_tiny', 'efficientformer_l1']
DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp32': None}
SMALL_BYTES = 10 ** 6  # "small op": moves under 1 MB at the benchmark batch
H100_SMS = 132
aten = torch.ops.aten
ALLOCATIONS = {aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default,
               aten.new_empty.default, aten.new_empty_strided.default}
WRITE_ONLY = {aten.copy_.default, aten.fill_.Scalar, aten.fill_.Tensor, aten.zero_.default}


@contextlib.contextmanager
def cuda_autocast(dtype: Optional[torch.dtype]) -> Iterator[None]:
    """`torch.autocast('cuda', dtype)` without its check for a CUDA device, which fake CUDA tensors do not need."""
    if dtype is None:
        yield
        return
    enabled, previous_dtype = torch.is_autocast_enabled('cuda'), torch.get_autocast_dtype('cuda')
    torch.set_autocast_enabled('cuda', True)
    torch.set_autocast_dtype('cuda', dtype)
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
        torch.set_autocast_enabled('cuda', enabled)
        torch.set_autocast_dtype('cuda', previous_dtype)


class SdpaRoute(TorchFunctionMode):
    """Route `scaled_dot_product_attention` to the CUDA backend op its selector would pick on a GPU.

    The ops are those of `scaled_dot_product_attention` in ATen's attention.cpp for that backend, after autocast's
    cast of the inputs (autocast handles the composite op, which is not called here).
    """

    def __init__(self, backend: str):
        super().__init__()
        self.backend = backend

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention or self.backend == 'math':
            return func(*args, **kwargs)
        return self.attention(*args, **kwargs)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                  dropout_p: float = 0., is_causal: bool = False, scale: Optional[float] = None,
                  enable_gqa: bool = False) -> torch.Tensor:
        if torch.is_autocast_enabled('cuda'):
            dtype = torch.get_autocast_dtype('cuda')
            q, k, v, attn_mask = (
                t.to(dtype) if t is not None and t.is_floating_point() and t.dtype not in (dtype, torch.float64)
                else t for t in (q, k, v, attn_mask))
        logsumexp = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        if self.backend == 'cudnn' and not (attn_mask is not None and attn_mask.requires_grad):
            return aten._scaled_dot_product_cudnn_attention(
                q, k, v, attn_mask, logsumexp, dropout_p, is_causal, False, scale=scale)[0]
        if attn_mask is not None:
            aligned = attn_mask.stride(-1) == 1 and all(s % 8 == 0 for s in attn_mask.stride()[:-1])
            if not aligned:  # attention.cpp pad_bias<8>
                n = attn_mask.shape[-1]
                attn_mask = F.pad(attn_mask, (0, 8 - n % 8))[..., :n]
            attn_mask = attn_mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        return aten._scaled_dot_product_efficient_attention(
            q, k, v, attn_mask, logsumexp, dropout_p, is_causal, scale=scale)[0]


def op_kind(func) -> Optional[str]:
    """'kernel' (does work), 'metadata' (view or allocation) or None (not an op of the model)."""
    if func.namespace in ('prim', 'profiler'):  # fake-tensor queries, the optimizer's record_function
        return None
    if func.is_view or func is aten._unsafe_view.default or func in ALLOCATIONS:
        return 'metadata'
    return 'kernel'


def tensor_bytes(t: torch.Tensor) -> int:
    """Memory a tensor spans: its elements, or less where it is broadcast (stride 0)."""
    if t.numel() == 0:
        return 0
    span = 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
    return min(t.numel(), span) * t.element_size()


def op_bytes(func, args, kwargs, out) -> int:
    """Bytes read (each distinct input tensor) plus written (each distinct output or mutated tensor)."""
    mutated = {a.name for a in func._schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    named = dict(zip((a.name for a in func._schema.arguments), args), **kwargs)
    written = {id(t): t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)}
    for name in mutated:
        written.update({id(t): t for t in tree_flatten(named.get(name))[0] if isinstance(t, torch.Tensor)})
    skip = {id(t) for name in mutated for t in tree_flatten(named.get(name))[0]} if func in WRITE_ONLY else set()
    read = {id(t): t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor) and id(t) not in skip}
    return sum(map(tensor_bytes, read.values())) + sum(map(tensor_bytes, written.values()))


@dataclasses.dataclass
class Op:
    func: object
    label: str  # path of the module running the op, or <loss> / <optimizer> / <other> outside modules
    nbytes: int
    args: tuple = ()  # the tensors themselves, kept for a replay only
    kwargs: dict = dataclasses.field(default_factory=dict)
    out: object = None


class Recorder(TorchDispatchMode):
    """Records every op with the label of the module running it (the top of a stack kept by forward hooks)."""

    def __init__(self, model: Optional[nn.Module] = None, keep_tensors: bool = False):
        super().__init__()
        self.ops: List[Op] = []
        self.keep_tensors = keep_tensors
        self.stack: List[str] = []
        self.outside = '<other>'
        self.label_fn: Callable[[], str] = lambda: self.stack[-1] if self.stack else self.outside
        self.handles = []
        for name, module in (model.named_modules() if model is not None else ()):
            self.handles.append(module.register_forward_pre_hook(functools.partial(self._enter, name)))
            self.handles.append(module.register_forward_hook(self._exit))

    def _enter(self, name: str, module: nn.Module, args: tuple) -> None:
        self.stack.append(name)

    def _exit(self, module: nn.Module, args: tuple, output: object) -> None:
        self.stack.pop()

    def remove_hooks(self) -> None:
        for handle in self.handles:
            handle.remove()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        kind = op_kind(func)
        if kind is not None:
            op = Op(func, self.label_fn(), op_bytes(func, args, kwargs, out) if kind == 'kernel' else 0)
            if self.keep_tensors:
                op.args, op.kwargs, op.out = args, kwargs, out
            self.ops.append(op)
        return out


def summarize(ops: List[Op], component: Callable[[str], str], batch_size: int) -> Dict:
    """Kernel ops, metadata ops, bytes per image, ops under 1 MB, by component and by op name."""
    summary = dict(ops=0, metadata_ops=0, bytes_per_img=0., small_ops=0,
                   components=defaultdict(lambda: dict(ops=0, bytes_per_img=0., small_ops=0)),
                   op_names=Counter())
    for op in ops:
        if op_kind(op.func) == 'metadata':
            summary['metadata_ops'] += 1
            continue
        group = summary['components'][component(op.label)]
        for record in (summary, group):
            record['ops'] += 1
            record['bytes_per_img'] += op.nbytes / batch_size
            record['small_ops'] += op.nbytes < SMALL_BYTES
        summary['op_names'][str(op.func)] += 1
    summary['components'] = dict(summary['components'])
    return summary


def replay(ops: List[Op], leaves: Dict[int, torch.Tensor], result: torch.Tensor) -> Tuple[torch.Tensor, Dict[int, str]]:
    """Run recorded fake-tensor ops again on meta tensors, with autograd; returns the meta tensor of the fake `result`
    and the label of each autograd node (by sequence number). Tensors made before the recording become meta tensors
    of their layout; `leaves` gives those that need gradients (the parameters), by the id of the fake tensor.
    """
    env = dict(leaves)

    def to_meta(t):
        if isinstance(t, torch.device):  # factory ops' device argument
            return torch.device('meta')
        if not isinstance(t, torch.Tensor):
            return t
        if id(t) not in env:
            env[id(t)] = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device='meta')
        return env[id(t)]

    node_labels: Dict[int, str] = {}
    for op in ops:
        args, kwargs = tree_map(to_meta, (op.args, op.kwargs))
        fakes = tree_flatten(op.out)[0]
        # autograd attached its graph to the recorded outputs after the op returned: the op ran with gradients
        # where an output requires one (not so inside an autograd.Function's forward, whatever the grad mode)
        with torch.set_grad_enabled(any(isinstance(t, torch.Tensor) and t.requires_grad for t in fakes)):
            out = op.func(*args, **kwargs)
        for fake, meta in zip(fakes, tree_flatten(out)[0]):
            if isinstance(fake, torch.Tensor):
                env[id(fake)] = meta
                if meta.grad_fn is not None:
                    node_labels.setdefault(meta.grad_fn._sequence_nr(), op.label)
    return env[id(result)], node_labels


@contextlib.contextmanager
def fake_cuda_pass(fake_mode: FakeTensorMode, sdpa: str, dtype: Optional[torch.dtype]) -> Iterator[None]:
    """The context of a pass on fake CUDA tensors: the fake mode, CUDA's attention routing and autocast."""
    with warnings.catch_warnings():
        # a cache keyed on data_ptr() reads 0 for every fake tensor: harmless here, each model is counted afresh
        warnings.filterwarnings('ignore', message='Accessing the data pointer of FakeTensor')
        with fake_mode, SdpaRoute(sdpa), cuda_autocast(dtype):
            yield


def fake_model(model: nn.Module, fake_mode: FakeTensorMode, channels_last: bool) -> nn.Module:
    """The model itself, its parameters and buffers made fake CUDA tensors; the fused TME ops are defined first.

    Without a GPU they are defined for Triton's interpreter (`import_tme_triton`), which keeps a later CPU test run
    in the same process (tests/test_tme_triton.py) on the interpreter. Counting never launches a kernel.
    """
    import_tme_triton()
    with fake_mode:
        return model.to(device='cuda', memory_format=torch.channels_last if channels_last else torch.preserve_format)


def fake_input(fake_mode: FakeTensorMode, input_size: Sequence[int], batch_size: int, channels_last: bool
               ) -> torch.Tensor:
    with fake_mode:
        x = torch.empty(batch_size, *input_size, device='cuda')
        return x.contiguous(memory_format=torch.channels_last) if channels_last and x.ndim == 4 else x


def count_inference(model: nn.Module, input_size: Sequence[int], args) -> Dict:
    """Ops of a steady-state inference pass (eval, no gradients) at batch `args.batch_size`; `model` on the CPU.

    As in benchmarks/models.py, the counted pass follows a first one in the same autocast context: the eval
    caches (the combined attention bias) are filled and autocast has cast the weights. It runs under no_grad, not
    inference_mode, which would show a dispatch mode composite ops (linear, reshape) that CUDA's kernels run as
    several ops or as none; the ops that reach CUDA are the same.
    """
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    model = fake_model(model, fake_mode, args.channels_last).eval()
    x = fake_input(fake_mode, input_size, args.batch_size, args.channels_last)
    with fake_cuda_pass(fake_mode, args.sdpa, DTYPES[args.dtype]), torch.no_grad():
        model(x)
        recorder = Recorder(model)
        try:
            with recorder:
                model(x)
        finally:
            recorder.remove_hooks()
    return summarize(recorder.ops, label_component(model), args.batch_size)


def count_training(model: nn.Module, input_size: Sequence[int], args) -> Dict:
    """Ops of a training step (train mode, cross-entropy against class 0, backward, SGD with momentum if
    `args.optimizer`) at batch `args.train_batch_size`; `model` on the CPU.

    Forward ops are recorded on fake CUDA tensors; backward and optimizer ops are counted on the meta replay.
    """
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    model = fake_model(model, fake_mode, args.channels_last).train()
    x = fake_input(fake_mode, input_size, args.train_batch_size, args.channels_last)
    with fake_mode:
        target = torch.zeros(args.train_batch_size, dtype=torch.long, device='cuda')
    recorder = Recorder(model, keep_tensors=True)
    try:
        with fake_cuda_pass(fake_mode, args.sdpa, DTYPES[args.dtype]), recorder:
            logits = model(x)
            recorder.outside = '<loss>'
            loss = F.cross_entropy(logits, target)
    finally:
        recorder.remove_hooks()
    component = label_component(model)
    forward = summarize(recorder.ops, component, args.train_batch_size)

    names = {id(p): n for n, p in model.named_parameters()}
    leaves = {id(p): torch.empty_strided(p.shape, p.stride(), dtype=p.dtype, device='meta', requires_grad=True)
              for p in model.parameters()}
    param_modules = {id(leaves[i]): names[i].rpartition('.')[0] for i in leaves}
    loss, node_labels = replay(recorder.ops, leaves, loss)

    def backward_label() -> str:
        node = torch._C._current_autograd_node()
        if node is None:
            return '<loss>'  # the seed gradient
        if hasattr(node, 'variable'):  # AccumulateGrad
            return param_modules.get(id(node.variable), '<untraced>')
        return node_labels.get(node._sequence_nr(), '<untraced>')

    counter = Recorder()
    counter.label_fn = backward_label
    with counter:
        loss.backward()
    backward = summarize(counter.ops, component, args.train_batch_size)
    result = dict(forward=forward, backward=backward)
    if args.optimizer:
        params = list(leaves.values())
        optimizer = torch.optim.SGD(params, lr=1e-6, momentum=0.9, foreach=True)  # CUDA's default, not meta's
        optimizer.step()  # creates the momentum buffers: the counted step is a steady-state one
        counter = Recorder()
        counter.outside = '<optimizer>'
        with counter:
            optimizer.step()
        result['optimizer'] = summarize(counter.ops, component, args.train_batch_size)
    result['step'] = merge_summaries(list(result.values()))
    return result


def merge_summaries(summaries: List[Dict]) -> Dict:
    """The summary of consecutive parts of a step (forward, backward, optimizer)."""
    total = dict(ops=0, metadata_ops=0, bytes_per_img=0., small_ops=0, components={}, op_names=Counter())
    for summary in summaries:
        for key in ('ops', 'metadata_ops', 'bytes_per_img', 'small_ops'):
            total[key] += summary[key]
        total['op_names'].update(summary['op_names'])
        for name, group in summary['components'].items():
            merged = total['components'].setdefault(name, dict(ops=0, bytes_per_img=0., small_ops=0))
            for key in merged:
                merged[key] += group[key]
    return total


@dataclasses.dataclass
class Launch:
    kernel: str
    grid: Tuple[int, ...]
    num_warps: int
    work: str  # what one program loops over


def tme_launches(grid_size: Tuple[int, int], dim: int, prefix: int, batch_size: int, train: bool,
                 sm_count: int) -> Dict[str, List[Launch]]:
    """Triton launches of the fused TME ops that a pass runs (eval: forward; train: forward and backward) on a GPU
    with `sm_count` SMs. The merge branch changes no grid.

    The grids and warps are `tme_triton.launch_plan`'s, by which the ops size their launches (from the SM count of
    the CUDA device they run on); this names the kernels each op launches and what one program loops over.
    """
    tt = import_tme_triton()
    tiles = batch_size * tt.num_tiles(*grid_size)
    rows = batch_size * (prefix + grid_size[0] * grid_size[1])
    grid_rows = batch_size * grid_size[0] * grid_size[1]

    def tiled(kernel: str, backward: bool = False) -> Launch:
        plan = tt.launch_plan(tiles, dim, sm_count, backward)
        return Launch(kernel, plan.grid, plan.num_warps, f'{math.ceil(tiles / plan.num_progs)} 4x4 tiles')

    def row_wise(kernel: str, num_rows: int) -> Launch:
        plan = tt.launch_plan(triton.cdiv(num_rows, tt.BLOCK_ROWS), dim, sm_count)
        steps = math.ceil(num_rows / (plan.num_progs * tt.BLOCK_ROWS))
        return Launch(kernel, plan.grid, plan.num_warps, f'{steps} x {tt.BLOCK_ROWS} rows')

    if not train:
        return {'tme_eval': [tiled('_tme_fwd_kernel (BN folded)')]}
    forward = tiled('_tme_fwd_kernel (raw 3x3, Welford partials)')
    stats = tt.launch_plan(1, dim, sm_count)
    return {
        'tme_train': [
            forward,
            Launch('_bn_stats_kernel', (stats.num_cblocks,), stats.num_warps,
                   f'{forward.grid[0]} partials, {tt.BLOCK_PARTS} per step'),
            row_wise('_bn_apply_kernel (BN affine)', rows),
        ],
        'tme_bn_backward': [row_wise('_bn_bwd_reduce_kernel', grid_rows), row_wise('_bn_apply_kernel (du)', rows)],
        'tme_backward': [tiled('_tme_bwd_kernel', backward=True)],
    }


def grid_table(args) -> Tuple[str, List[Dict]]:
    """Launch grids of the fused TME's kernels at every TME shape of the grid models, inference and training."""
    uses: Dict[Tuple, Dict[str, List[int]]] = {}  # (grid, dim, prefix) -> model -> [blocks with, without merge]
    for shape in tme_shapes(args.grid_models):
        key = (tuple(shape['grid']), shape['dim'], shape['prefix'])
        for name, count in shape['blocks'].items():
            uses.setdefault(key, {}).setdefault(name, [0, 0])[0 if shape['merge'] else 1] += count
    rows, records = [], []
    for (grid_size, dim, prefix), models in uses.items():
        label = f'{grid_size[0]}x{grid_size[1]} C{dim}' + (f' +{prefix} prefix' if prefix else '') + ' (' + ', '.join(
            f'{name.removeprefix("cabvit_")}: {n[0]}' + (f' + {n[1]} no-merge' if n[1] else '')
            for name, n in models.items()) + ')'
        for train, batch_size in ((False, args.batch_size), (True, args.train_batch_size)):
            for op, kernels in tme_launches(grid_size, dim, prefix, batch_size, train, args.sm_count).items():
                for launch in kernels:
                    rows.append([label, f'{"train" if train else "eval"} B={batch_size}', op, launch.kernel,
                                 str(launch.grid), f'{math.prod(launch.grid):,}', str(launch.num_warps), launch.work])
                    records.append(dict(shape=label, train=train, batch_size=batch_size, op=op,
                                        **dataclasses.asdict(launch)))
    header = ['TME (blocks)', 'pass', 'op', 'kernel', 'grid', 'programs', 'warps', 'per program']
    return markdown_table(header, rows), records


def variants(name: str, tme: str) -> List[Optional[str]]:
    """TME paths to count for a model: both for CabViT with --tme both, none for other models."""
    if not name.startswith('cabvit_'):
        return [None]
    return ['triton', 'torch'] if tme == 'both' else [tme]


def tme_label(tme: Optional[str]) -> str:
    return {'triton': 'fused', 'torch': 'PyTorch', 'auto': 'auto'}.get(tme, '')


def format_tables(rows: List[Dict], args) -> List[str]:
    """Main table, component tables (training step and inference) and the most frequent ops of a training step."""
    labels = [f"{r['model']}{' (' + tme_label(r['tme']) + ' TME)' if r['tme'] else ''}" for r in rows]
    main = []
    for label, r in zip(labels, rows):
        inf, step = r['inference'], r['training']['step']
        fwd, bwd = r['training']['forward'], r['training']['backward']
        opt = r['training'].get('optimizer')
        split = f"{fwd['ops']:,} + {bwd['ops']:,}" + (f" + {opt['ops']:,}" if opt else '')
        main.append([label, f"{inf['ops']:,}", f"{inf['metadata_ops']:,}", f"{inf['bytes_per_img'] / 1e6:.1f}",
                     f"{inf['small_ops']:,}", f"{step['ops']:,} ({split})", f"{step['metadata_ops']:,}",
                     f"{step['bytes_per_img'] / 1e6:.1f}", f"{step['small_ops']:,}"])
    step_name = 'fwd + bwd' + (' + SGD' if args.optimizer else '')
    header = ['model', f'infer ops (B={args.batch_size})', 'infer metadata ops', 'infer MB/img', 'infer ops < 1 MB',
              f'train ops (B={args.train_batch_size}), {step_name}', 'train metadata ops', 'train MB/img',
              'train ops < 1 MB']
    tables = [markdown_table(header, main)]
    for title, pick in (('training step', lambda r: r['training']['step']), ('inference', lambda r: r['inference'])):
        present = [c for c in COMPONENT_ORDER if any(c in pick(r)['components'] for r in rows)]
        cells = []
        for comp in present:
            row = [comp]
            for r in rows:
                group = pick(r)['components'].get(comp)
                row.append(f"{group['ops']:,} / {group['bytes_per_img'] / 1e6:.1f} / {group['small_ops']:,}"
                           if group else '-')
            cells.append(row)
        tables.append(f'{title}, by component: ops / MB per image / ops < 1 MB\n\n'
                      + markdown_table(['component'] + labels, cells))
    top = [[label, ', '.join(f'{op.replace("aten.", "")} {n}' for op, n in
                             r['training']['step']['op_names'].most_common(args.top_ops))]
           for label, r in zip(labels, rows)]
    tables.append(f'most frequent ops of a training step\n\n{markdown_table(["model", "op count"], top)}')
    return tables


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=DEFAULT_MODELS, metavar='NAME')
    parser.add_argument('--tme', choices=['both', 'triton', 'torch', 'auto'], default='both',
                        help="TME path of the CabViT models: 'auto' is the fused one on CUDA (default: both)")
    parser.add_argument('--batch-size', type=int, default=256, help='inference batch (default: %(default)s)')
    parser.add_argument('--train-batch-size', type=int, default=None, help='training batch (default: half of it)')
    parser.add_argument('--dtype', choices=list(DTYPES), default='bf16', help='autocast dtype, fp32 for none')
    parser.add_argument('--no-channels-last', dest='channels_last', action='store_false',
                        help='contiguous NCHW input and weights instead of channels_last')
    parser.add_argument('--no-optimizer', dest='optimizer', action='store_false',
                        help='training step without the SGD step')
    parser.add_argument('--sdpa', choices=['efficient', 'cudnn', 'math'], default='efficient',
                        help='CUDA attention backend to count (default: %(default)s)')
    parser.add_argument('--grid-models', nargs='*', default=['cabvit_h_l1', 'cabvit_h_l2'], metavar='NAME',
                        help='models whose TME shapes get a launch-grid table; none for no table')
    parser.add_argument('--sm-count', type=int, default=H100_SMS, help='SMs of the GPU the grids are for (H100: 132)')
    parser.add_argument('--top-ops', type=int, default=8, help='ops listed per model in the op-count table')
    parser.add_argument('--results-dir', default=RESULTS_DIR)
    parser.add_argument('--no-write', dest='write', action='store_false', help='print only')
    args = parser.parse_args(argv)
    args.train_batch_size = args.train_batch_size or max(1, args.batch_size // 2)
    return args


def main(argv: Optional[Sequence[str]] = None) -> List[Dict]:
    args = parse_args(argv)
    rows = []
    for name in args.models:
        for tme in variants(name, args.tme):
            counts = {}
            for kind, count in (('inference', count_inference), ('training', count_training)):
                model = timm.create_model(name)
                if tme is not None:
                    model.set_tme_impl(tme)
                counts[kind] = count(model, model.pretrained_cfg['input_size'], args)
            row = dict(model=name, tme=tme, **counts)
            rows.append(row)
            step = row['training']['step']
            print(f"{name} {tme_label(tme)}: inference {row['inference']['ops']} ops, training {step['ops']} ops",
                  file=sys.stderr, flush=True)
    tables = format_tables(rows, args)
    env = environment(torch.device('cpu'))
    settings = ', '.join([
        f'{args.dtype} autocast' if DTYPES[args.dtype] else 'fp32 (no autocast)',
        'channels_last' if args.channels_last else 'NCHW', f'SDPA {args.sdpa}',
        f'inference batch {args.batch_size}', f'training batch {args.train_batch_size}'])
    sections = [
        '# Aten ops and bytes per image, counted on fake CUDA tensors',
        '',
        f'{settings}. An op is one dispatcher call that does work (views and allocations are the metadata ops); '
        'bytes are those it reads plus writes; "< 1 MB" counts the ops that move less than 10^6 bytes at the '
        'batch above. Rules and method: the docstring of `benchmarks/traffic.py`. '
        f'torch {env["torch"]}, timm {env["timm"]}, timm_cabvit {env["timm_cabvit"]} (commit {env["git_commit"]}).',
    ]
    for table in tables:
        sections += ['', table]
    grid_records = []
    if args.grid_models:
        grids, grid_records = grid_table(args)
        sections += ['', f'fused TME launch grids on {args.sm_count} SMs (grid = programs along tiles or rows x '
                         'channel blocks)', '', grids]
    markdown = report_markdown(sections, env)
    print(markdown)
    if args.write:
        json_path = dated_result_path(args.results_dir, 'traffic', '.json')
        print(write_result(json_path, markdown, env, vars(args), rows=rows, tme_grids=grid_records), file=sys.stderr)
    return rows


if __name__ == '__main__':
    main()
