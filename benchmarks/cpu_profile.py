"""Where CPU inference time goes beside the peers: matrix work (GEMMs, convolutions, attention), GELU and everything
else, and the lowest time ratio a CabViT model could reach against a peer with everything else gone.

Why: issue 17 asks some CabViT models for less batch-1 latency than peers of about their multiply-adds. Whether
work on the model can get there depends on what its function costs at least: where its matrix ops and GELUs alone
take longer than the target allows the whole model, and the matrix ops run at the peer's rate per multiply-add, no
work on the other ops (norms, attention's softmax and bias, residual arithmetic, layout) reaches the target; only
faster GEMM, convolution or GELU kernels (which the peer would get as well) or fewer multiply-adds would.

How: the models of benchmarks/cpu_latency.py, prepared as there (random weights, BatchNorm statistics calibrated,
eval mode, inference_mode, batch 1, 224x224; ONNX Runtime on the graph of `export_onnx`, spinning off; compiled:
`torch.compile`, default arguments), are profiled for `--iters` passes each, the models taking turns, for `--rounds`
rounds, one runtime after the other; an op's time is its median over the rounds, a model's time the sum of its
ops'. PyTorch eager and compiled: torch.profiler's self CPU time per op (the profiler's own cost falls on the ops,
more on a model with more ops); compiled, the self time of the compiled graph's call is inductor's generated kernels
and its wrapper, where the GELUs of the peers and of CabViT's stem and downsampling run (no GELU op of their own).
ONNX Runtime: the session profile's kernel time per op type (time between kernels is not counted). Matrix ops are
MATRIX_OPS, their multiply-adds fvcore's count of the model's linears, convolutions, matrix products and attention
(`timm_cabvit.tools.flops`), the same in every runtime; GELU ops are GELU_OPS. In PyTorch, eager and compiled, the
GELUs of CabViT's MLPs run inside oneDNN's linear (`layers.FusedGeluMlp`) and count as matrix time, which lowers its
matrix rate beside peers whose GELU is an op of its own.

The floor table, for each CabViT model against each peer in the run, per runtime: the ratio of their profiled
times; `matrix only`: the model's matrix-op time over the peer's whole time, the ratio it would have with every other
op gone and today's kernels; `matrix and GELU only`: the same with its GELUs kept. Results go to
benchmarks/results/cpu-profile-<cpu>-<date>.md and .json.

    python benchmarks/cpu_profile.py                    # cpu_latency.py's models: h_l1, h_l2 and their peers
    python benchmarks/cpu_profile.py --models cabvit_h_l2 efficientformer_l3 --runtimes onnxruntime
    python benchmarks/cpu_profile.py --models cabvit_h_l1 convnext_pico --runtimes compiled
"""
import argparse
import bisect
import datetime
import json
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import timm
import torch
from bench_utils import (
    RESULTS_DIR,
    busy_cores_summary,
    cpu_model,
    dated_result_path,
    gemm_gflops,
    markdown_table,
    num_cores,
    slug,
    write_json,
)
from cpu_latency import DEFAULT_MODELS, IMG_SIZE, LABELS, PEERS, OnnxRuntimeModel
from torch.profiler import ProfilerActivity, profile

from timm_cabvit.tools.deploy import calibrate_batchnorm
from timm_cabvit.tools.flops import flop_analysis
from timm_cabvit.tools.reports import OtherCpuUse, contention_note, other_cpu_use

RUNTIMES = ('pytorch', 'onnxruntime', 'compiled')
ATEN_MATRIX_OPS = frozenset({
    'mkldnn::_linear_pointwise', 'mkl::_mkl_linear', 'aten::mkldnn_convolution', 'aten::_slow_conv2d_forward',
    'aten::addmm', 'aten::mm', 'aten::bmm', 'aten::baddbmm', 'aten::_scaled_dot_product_flash_attention_for_cpu',
})
MATRIX_OPS = {
    'pytorch': ATEN_MATRIX_OPS,
    'compiled': ATEN_MATRIX_OPS,
    'onnxruntime': frozenset({
        'Conv', 'FusedConv', 'NhwcFusedConv', 'MatMul', 'FusedMatMul', 'Gemm', 'FusedGemm', 'Attention',
        'MultiHeadAttention',
    }),
}
GELU_OPS = {
    'pytorch': frozenset({'aten::gelu'}), 'compiled': frozenset(), 'onnxruntime': frozenset({'Gelu', 'BiasGelu'})}
COMPILED_GRAPH_CALL = '## Call CompiledFxGraph'  # torch.profiler's name of a compiled graph's call, then its hash
COMPILED_GRAPH = 'compiled graph'  # that call's self time: inductor's generated kernels and its Python wrapper
FVCORE_MATRIX_OPS = ('conv', 'linear', 'matmul', 'bmm', 'einsum', 'scaled_dot_product_attention')
TOP_OTHER_OPS = 4

OpTimes = Dict[str, float]  # op -> ms per pass


def matrix_macs(model: torch.nn.Module) -> int:
    """fvcore's multiply-adds of the model's matrix work on one image."""
    by_operator = flop_analysis(model, IMG_SIZE).by_operator()
    return int(sum(by_operator.get(op, 0) for op in FVCORE_MATRIX_OPS))


def pytorch_op_ms(model: torch.nn.Module, x: torch.Tensor, iters: int) -> OpTimes:
    """Self CPU ms per pass of each op over `iters` passes."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            model(x)
    times: OpTimes = defaultdict(float)
    for event in prof.key_averages():
        name = COMPILED_GRAPH if event.key.startswith(COMPILED_GRAPH_CALL) else event.key
        times[name] += event.self_cpu_time_total / 1e3 / iters
    return times


def onnxruntime_rounds(profile_path: str, skip: int, iters: int, rounds: int) -> List[OpTimes]:
    """Kernel ms per pass of each op type, per round, from a session profile: the runs after the first `skip`,
    `iters` runs a round."""
    events = json.loads(Path(profile_path).read_text())
    starts = sorted(e['ts'] for e in events if e.get('name') == 'model_run')
    per_round: List[OpTimes] = [defaultdict(float) for _ in range(rounds)]
    for event in events:
        if event.get('cat') != 'Node' or not event['name'].endswith('_kernel_time'):
            continue
        run = bisect.bisect_right(starts, event['ts']) - 1 - skip
        if 0 <= run < iters * rounds:
            per_round[run // iters][event['args']['op_name']] += event['dur'] / 1e3 / iters
    return per_round


def take_turns(runs: Dict[str, Callable[[], object]], rounds: int) -> Dict[str, List[object]]:
    """What each call returns over `rounds` rounds, the calls taking turns."""
    results: Dict[str, List[object]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            results[name].append(run())
    return results


def profile_runtime(
        runtime: str, models: Dict[str, torch.nn.Module], workdir: Path, threads: int, warmup: int, iters: int,
        rounds: int) -> Dict[str, List[OpTimes]]:
    """Per model, the op times of each round: `warmup` passes each (compiled: the first compiles), then rounds of
    `iters` passes each in turn."""
    x = torch.randn(1, 3, *IMG_SIZE)
    if runtime == 'onnxruntime':
        runners: Dict[str, Callable[[torch.Tensor], object]] = {
            name: OnnxRuntimeModel(model, workdir / f'{name}.onnx', threads, profile=True)
            for name, model in models.items()}
        profiled = {name: (lambda s=session: [s(x) for _ in range(iters)]) for name, session in runners.items()}
    else:
        runners = {name: torch.compile(model) if runtime == 'compiled' else model for name, model in models.items()}
        profiled = {name: (lambda m=run: pytorch_op_ms(m, x, iters)) for name, run in runners.items()}
    with torch.inference_mode():
        for run in runners.values():
            for _ in range(warmup):
                run(x)
        per_round = take_turns(profiled, rounds)
    if runtime == 'onnxruntime':  # the sessions recorded every run, the warm-up passes first
        per_round = {name: onnxruntime_rounds(session.session.end_profiling(), warmup, iters, rounds)
                     for name, session in runners.items()}
    return per_round


def summary(per_round: List[OpTimes], runtime: str, macs: int) -> Dict[str, object]:
    """Median ms per op over the rounds, the model's total, matrix, GELU and other time, and the matrix rate."""
    ops = {op: statistics.median(r.get(op, 0.) for r in per_round) for op in set().union(*per_round)}
    ops = dict(sorted(ops.items(), key=lambda kv: -kv[1]))
    matrix = sum(ms for op, ms in ops.items() if op in MATRIX_OPS[runtime])
    gelu = sum(ms for op, ms in ops.items() if op in GELU_OPS[runtime])
    total = sum(ops.values())
    return {'total_ms': total, 'matrix_ms': matrix, 'gelu_ms': gelu, 'other_ms': total - matrix - gelu,
            'matrix_macs': macs, 'matrix_gmacs_per_s': macs / matrix / 1e6 if matrix else None, 'ops_ms': ops}


def short_op(op: str) -> str:
    return op.split('::')[-1]


def time_table(names: Sequence[str], results: Dict[str, Dict[str, Dict[str, object]]]) -> str:
    header = ['model', 'runtime', 'ms', 'matrix ms', 'GELU ms', 'other ms', 'matrix GMAC', 'matrix GMAC/s',
              'largest other ops (ms)']
    rows = []
    for runtime, by_model in results.items():
        for name in names:
            s = by_model[name]
            others = [f'{short_op(op)} {ms:.1f}' for op, ms in s['ops_ms'].items()
                      if op not in MATRIX_OPS[runtime] | GELU_OPS[runtime]][:TOP_OTHER_OPS]
            times = [f'{s[key]:.1f}' for key in ('total_ms', 'matrix_ms', 'gelu_ms', 'other_ms')]
            rows.append([name, LABELS[runtime], *times, f"{s['matrix_macs'] / 1e9:.3f}",
                         f"{s['matrix_gmacs_per_s']:.1f}", ', '.join(others)])
    return markdown_table(header, rows, right=[False, False] + [True] * 6)


def floor_rows(names: Sequence[str], results: Dict[str, Dict[str, Dict[str, object]]]) -> List[Dict[str, object]]:
    rows = []
    for runtime, by_model in results.items():
        for name in names:
            for peer in PEERS.get(name, []):
                if peer not in names:
                    continue
                own, other = by_model[name], by_model[peer]
                rows.append({
                    'model': name, 'peer': peer, 'runtime': runtime,
                    'ratio': own['total_ms'] / other['total_ms'],
                    'matrix_only': own['matrix_ms'] / other['total_ms'],
                    'matrix_and_gelu_only': (own['matrix_ms'] + own['gelu_ms']) / other['total_ms'],
                })
    return rows


def floor_table(rows: List[Dict[str, object]]) -> str:
    header = ['model / peer', 'runtime', 'profiled time ratio', 'matrix only', 'matrix and GELU only']
    return markdown_table(
        header, [[f"{r['model']} / {r['peer']}", LABELS[r['runtime']], f"{r['ratio']:.2f}", f"{r['matrix_only']:.2f}",
                  f"{r['matrix_and_gelu_only']:.2f}"] for r in rows], right=[False, False, True, True, True])


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=DEFAULT_MODELS, metavar='NAME',
                        help='timm model names (default: %(default)s)')
    parser.add_argument('--runtimes', nargs='+', choices=RUNTIMES, default=['pytorch', 'onnxruntime'],
                        help='what to profile (default: %(default)s; compiled adds a compile of each model, about '
                             'a minute each on two cores)')
    parser.add_argument('--iters', type=int, default=10, help='profiled passes per model and round (default: 10)')
    parser.add_argument('--rounds', type=int, default=3, help='rounds (default: %(default)s)')
    parser.add_argument('--warmup', type=int, default=3, help='unprofiled passes of each model first (default: 3)')
    parser.add_argument('--threads', type=int, default=num_cores(),
                        help='threads of PyTorch and ONNX Runtime (default: the cores available, %(default)s)')
    parser.add_argument('--out-dir', type=Path, default=Path(RESULTS_DIR), help='where to write the result files')
    args = parser.parse_args(argv)
    for option in ('iters', 'rounds', 'threads'):
        if getattr(args, option) < 1:
            parser.error(f'--{option} must be at least 1, got {getattr(args, option)}')
    unknown = [name for name in args.models if not timm.is_model(name)]
    if unknown:
        parser.error(f"--models: no timm model named {', '.join(unknown)} (timm.list_models() names them)")
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """Prints and writes the tables; returns the result (per runtime and model, the summary; the floor rows)."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    gemm = gemm_gflops(args.threads)
    models, macs = {}, {}
    for name in args.models:
        print(f'  preparing {name}', file=sys.stderr, flush=True)
        torch.manual_seed(0)
        models[name] = calibrate_batchnorm(timm.create_model(name), 1).eval()
        macs[name] = matrix_macs(models[name])
    results, notes, others = {}, [], {}
    with tempfile.TemporaryDirectory() as workdir:
        for runtime in args.runtimes:
            print(f'  profiling {runtime}', file=sys.stderr, flush=True)
            before = other_cpu_use()
            with OtherCpuUse() as during:
                per_round = profile_runtime(
                    runtime, models, Path(workdir), args.threads, args.warmup, args.iters, args.rounds)
            others[runtime] = [before, during.cores]
            notes += [n for n in [contention_note(others[runtime], args.threads)] if n]
            results[runtime] = {name: summary(per_round[name], runtime, macs[name]) for name in args.models}
    floors = floor_rows(args.models, results)
    date = datetime.datetime.now().isoformat(timespec='seconds')
    command = ' '.join(['python', 'benchmarks/cpu_profile.py', *(argv if argv is not None else sys.argv[1:])])
    busy = busy_cores_summary({LABELS[runtime]: cores for runtime, cores in others.items()})
    text = '\n'.join([
        f'# Where CPU inference time goes, {date}', '',
        f'{args.iters} profiled passes per model and round, {args.rounds} rounds (medians), after {args.warmup} '
        f'unprofiled passes; batch 1, {IMG_SIZE[0]}x{IMG_SIZE[1]}, {args.threads} threads, calibrated random weights, '
        f'all models in one process. Method: the docstring of `benchmarks/cpu_profile.py`.', '',
        time_table(args.models, results), '',
        'Time over each peer\'s, profiled, and with every op but the matrix work (and the GELUs) gone (below 1: '
        'faster):', '',
        floor_table(floors), '',
        *[f'**{n}**' for n in notes],
        f'- cores kept busy by other processes (most before or during each runtime): {busy}',
        f'- CPU: {cpu_model()}, {num_cores()} cores; fp32 GEMM 1024^3 at {args.threads} threads: {gemm:.0f} GFLOP/s',
        f'- torch {torch.__version__}, timm {timm.__version__}',
        f'- command: `{command}`', '',
    ])
    result = {'date': date, 'command': command, 'threads': args.threads, 'gemm_gflops': gemm, 'other_cores': others,
              'notes': notes, 'results': results, 'floors': floors}
    json_path = Path(dated_result_path(str(args.out_dir), f'cpu-profile-{slug(cpu_model())}', '.json'))
    write_json(str(json_path), result, indent=1)
    json_path.with_suffix('.md').write_text(text)
    print(text)
    print(f'written: {json_path} and {json_path.with_suffix(".md")}')
    return result


if __name__ == '__main__':
    main()
