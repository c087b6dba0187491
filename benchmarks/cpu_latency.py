"""CPU inference latency of the CabViT models beside their timm peers: PyTorch eager, ONNX Runtime, torch.compile.

All models run in one process, at 224x224, batch 1 by default, with random weights whose BatchNorm statistics are
calibrated on random images (`calibrate_batchnorm`), in eval mode under `inference_mode`. Within each variant the
models take turns call by call, round after round, so that a change of load or clock hits all of them alike; each
figure is the median of the rounds, and each ratio against a peer the median of the per-round ratios.

- pytorch: the model as `timm.create_model` gives it; reparam (optional): after `timm.utils.reparameterize_model`;
- onnxruntime: the graph of `timm_cabvit.tools.deploy.export_onnx` (its defaults; checked against PyTorch), run by an
  ONNX Runtime CPU session with `--threads` intra-op threads and spinning off (idle threads spinning between calls
  would slow the other sessions and the PyTorch runs of the process);
- compiled: `torch.compile` (inductor, default arguments). Its compile time is the first call's, measured in a
  fresh process per model with inductor's caches off and a small model compiled first: in a shared process a model
  compiled after others took up to 30 % less, and none should pay for the process's one-time set-up.

Other processes' CPU use is measured before and during each variant (`timm_cabvit.tools.reports.OtherCpuUse`): where
they kept cores busy that the threads needed, the figures are marked NOT TRUSTWORTHY and, with more than one
thread, the whole run is repeated on one thread. The machine's own speed, an fp32 GEMM's throughput, a large
copy's bandwidth and a small op's time (an add of 196x768 floats) at the start and the end, goes with the figures:
a virtual machine's host can slow it (1.3-1.9x seen here within a day) while no process on it is busy, which no load
figure shows, and once with the GEMM at full speed. Prints two markdown tables
(latency; ratios against the peers) and writes them, with the machine and every timing, to
benchmarks/results/cpu-<cpu>-<date>.md and .json.

    python benchmarks/cpu_latency.py                  # the acceptance set of issue 17: h_l1, h_l2 and their peers
    python benchmarks/cpu_latency.py --models cabvit_h_l1 convnext_pico --variants pytorch --rounds 20
"""
import argparse
import datetime
import multiprocessing
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import timm
import torch
from bench_utils import (
    RESULTS_DIR,
    busy_cores_summary,
    copy_bandwidth_gbps,
    cpu_model,
    dated_result_path,
    gemm_gflops,
    markdown_table,
    num_cores,
    slug,
    small_op_us,
    write_json,
)
from timm.utils import reparameterize_model

from timm_cabvit.tools.deploy import calibrate_batchnorm, export_onnx
from timm_cabvit.tools.flops import num_params
from timm_cabvit.tools.reports import OtherCpuUse, contention_note, other_cpu_use

# each CabViT model and the timm models it is compared with (the paper's comparators and ConvNeXt of its size)
PEERS = {
    'cabvit_h_l1': ['convnext_pico', 'efficientformer_l1'],
    'cabvit_h_l2': ['convnext_tiny', 'efficientformer_l3', 'nextvit_small'],
    'cabvit_h_l3': ['convnext_small', 'efficientformer_l7'],
    'cabvit_p_l0': ['deit_tiny_patch16_224'],
}
DEFAULT_MODELS = ['cabvit_h_l1', *PEERS['cabvit_h_l1'], 'cabvit_h_l2', *PEERS['cabvit_h_l2']]
VARIANTS = ('pytorch', 'reparam', 'onnxruntime', 'compiled')
LABELS = {'pytorch': 'PyTorch', 'reparam': 're-param', 'onnxruntime': 'ORT', 'compiled': 'compiled'}
IMG_SIZE = (224, 224)  # every model here was made for it; the CabViT models are built for one size

Runner = Callable[[torch.Tensor], object]


class OnnxRuntimeModel:
    """The model exported by `export_onnx` (and checked against PyTorch), run by an ONNX Runtime CPU session;
    with `profile`, the session records its kernels' times (`session.end_profiling()` writes them beside `path`)."""

    def __init__(self, model: torch.nn.Module, path: Path, threads: int, profile: bool = False):
        import onnxruntime

        self.report = export_onnx(model, path, img_size=IMG_SIZE)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry('session.intra_op.allow_spinning', '0')
        options.enable_profiling = profile
        options.profile_file_prefix = str(path.with_suffix(''))
        self.session = onnxruntime.InferenceSession(str(path), options, providers=['CPUExecutionProvider'])

    def __call__(self, x: torch.Tensor) -> object:
        return self.session.run(None, {'input': x.numpy()})


def compile_seconds(name: str, batch_size: int, threads: int) -> float:
    """Seconds of the first call of `torch.compile(model)`, compilation included; run in a fresh process."""
    torch.set_num_threads(threads)
    torch._inductor.config.force_disable_caches = True
    with torch.inference_mode():
        torch.compile(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU()))(torch.randn(2, 8))
    model = calibrate_batchnorm(timm.create_model(name), 1)
    compiled = torch.compile(model)
    x = torch.randn(batch_size, 3, *IMG_SIZE)
    start = time.perf_counter()
    with torch.inference_mode():
        compiled(x)
    return time.perf_counter() - start


def fresh_compile_seconds(name: str, batch_size: int, threads: int) -> float:
    with multiprocessing.get_context('spawn').Pool(1) as pool:
        return pool.apply(compile_seconds, (name, batch_size, threads))


def build_runners(
        names: Sequence[str], variants: Sequence[str], batch_size: int, threads: int, workdir: Path,
) -> Tuple[Dict[str, Dict[str, Runner]], Dict[str, Dict[str, object]]]:
    """Per variant, the callable of each model; per model, its parameters, ONNX check and compile time."""
    runners: Dict[str, Dict[str, Runner]] = {v: {} for v in variants}
    records: Dict[str, Dict[str, object]] = {}
    x = torch.randn(batch_size, 3, *IMG_SIZE)
    for name in names:
        print(f'  preparing {name}', file=sys.stderr, flush=True)
        model = calibrate_batchnorm(timm.create_model(name), 1)
        records[name] = {'model': name, 'params': num_params(model)}
        if 'pytorch' in variants:
            runners['pytorch'][name] = model
        if 'reparam' in variants:
            runners['reparam'][name] = reparameterize_model(model)
        if 'onnxruntime' in variants:
            ort_model = OnnxRuntimeModel(model, workdir / f'{name}.onnx', threads)
            runners['onnxruntime'][name] = ort_model
            records[name]['onnx_max_abs_diff'] = ort_model.report['max_abs_diff']
        if 'compiled' in variants:
            records[name]['compile_s'] = fresh_compile_seconds(name, batch_size, threads)
            runners['compiled'][name] = torch.compile(model)
            with torch.inference_mode():
                runners['compiled'][name](x)
    return runners, records


def time_rounds(runners: Dict[str, Runner], x: torch.Tensor, warmup: int, rounds: int) -> Dict[str, List[float]]:
    """Milliseconds of each model's call in each round; the models take turns, call by call."""
    with torch.inference_mode():
        for run in runners.values():
            for _ in range(warmup):
                run(x)
        times: Dict[str, List[float]] = {name: [] for name in runners}
        for _ in range(rounds):
            for name, run in runners.items():
                start = time.perf_counter()
                run(x)
                times[name].append((time.perf_counter() - start) * 1e3)
    return times


def measure(runners: Dict[str, Dict[str, Runner]], batch_size: int, warmup: int, rounds: int,
            ) -> Tuple[Dict[str, Dict[str, List[float]]], Dict[str, List[Optional[float]]]]:
    """The timings of every variant, and the cores other processes kept busy before and during each."""
    x = torch.randn(batch_size, 3, *IMG_SIZE)
    times, others = {}, {}
    for variant, models in runners.items():
        print(f'  timing {variant}', file=sys.stderr, flush=True)
        before = other_cpu_use()
        with OtherCpuUse() as during:
            times[variant] = time_rounds(models, x, warmup, rounds)
        others[variant] = [before, during.cores]
    return times, others


def paired_ratio(times: Dict[str, List[float]], name: str, peer: str) -> Optional[float]:
    """Median over the rounds of `name`'s time over `peer`'s in the same round."""
    if name not in times or peer not in times:
        return None
    return statistics.median(a / b for a, b in zip(times[name], times[peer]))


def latency_table(names: Sequence[str], records: Dict[str, Dict[str, object]],
                  times: Dict[str, Dict[str, List[float]]]) -> str:
    variants = list(times)
    header = ['model', 'params'] + [f'{LABELS[v]} ms' for v in variants]
    if 'compiled' in variants:
        header.append('compile s')
    rows = []
    for name in names:
        row = [name, f"{records[name]['params'] / 1e6:.2f} M"]
        row += [f'{statistics.median(times[v][name]):.1f}' for v in variants]
        if 'compiled' in variants:
            row.append(f"{records[name]['compile_s']:.1f}")
        rows.append(row)
    return markdown_table(header, rows, right=[False] + [True] * (len(header) - 1))


def ratio_table(names: Sequence[str], records: Dict[str, Dict[str, object]],
                times: Dict[str, Dict[str, List[float]]]) -> str:
    """Each CabViT model's time over each peer's present in the run, per variant (below 1: faster)."""
    variants = list(times)
    header = ['model / peer'] + [LABELS[v] for v in variants]
    if 'compiled' in variants:
        header.append('compile time')
    rows = []
    for name in names:
        for peer in PEERS.get(name, []):
            if peer not in names:
                continue
            cells = [paired_ratio(times[v], name, peer) for v in variants]
            row = [f'{name} / {peer}'] + ['-' if c is None else f'{c:.2f}' for c in cells]
            if 'compiled' in variants:
                row.append(f"{records[name]['compile_s'] / records[peer]['compile_s']:.2f}")
            rows.append(row)
    return markdown_table(header, rows, right=[False] + [True] * (len(header) - 1))


def machine_description(threads: int) -> Dict[str, object]:
    import onnxruntime

    return {
        'cpu': cpu_model(), 'cores': num_cores(), 'threads': threads, 'hostname': socket.gethostname(),
        'platform': platform.platform(), 'python': platform.python_version(), 'torch': torch.__version__,
        'timm': timm.__version__, 'onnxruntime': onnxruntime.__version__, 'load_average_start': os.getloadavg(),
        'gemm_gflops_start': gemm_gflops(threads), 'copy_gbps_start': copy_bandwidth_gbps(torch.device('cpu'), 64),
        'small_op_us_start': small_op_us(threads),
    }


def run(args: argparse.Namespace, threads: int, workdir: Path) -> Dict[str, object]:
    torch.set_num_threads(threads)
    runners, records = build_runners(args.models, args.variants, args.batch_size, threads, workdir)
    times, others = measure(runners, args.batch_size, args.warmup, args.rounds)
    notes = [n for n in (contention_note(others[v], threads) for v in times) if n]
    return dict(threads=threads, records=records, times=times, other_cores=others, notes=notes)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=DEFAULT_MODELS, metavar='NAME',
                        help='timm model names (default: %(default)s)')
    parser.add_argument('--variants', nargs='+', choices=VARIANTS, default=['pytorch', 'onnxruntime', 'compiled'],
                        help='what to time (default: %(default)s)')
    parser.add_argument('--batch-size', type=int, default=1, help='images per call (default: %(default)s)')
    parser.add_argument('--rounds', type=int, default=40, help='timed rounds (default: %(default)s)')
    parser.add_argument('--warmup', type=int, default=3, help='untimed calls of each model first (default: 3)')
    parser.add_argument('--threads', type=int, default=num_cores(),
                        help='threads of PyTorch and ONNX Runtime (default: the cores available, %(default)s)')
    parser.add_argument('--out-dir', type=Path, default=Path(RESULTS_DIR), help='where to write the result files')
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    machine = machine_description(args.threads)
    with tempfile.TemporaryDirectory() as workdir:
        result = run(args, args.threads, Path(workdir))
        if result['notes'] and args.threads > 1:
            print('  other processes slowed the run: measuring again on 1 thread', file=sys.stderr, flush=True)
            first = result
            result = run(args, 1, Path(workdir))
            result['notes'] = [f'Measured on 1 thread: at {args.threads} threads, ' + n[0].lower() + n[1:]
                               for n in first['notes']] + result['notes']
    machine['load_average_end'] = os.getloadavg()
    machine['gemm_gflops_end'] = gemm_gflops(args.threads)
    machine['copy_gbps_end'] = copy_bandwidth_gbps(torch.device('cpu'), 64)
    machine['small_op_us_end'] = small_op_us(args.threads)
    tables = [latency_table(args.models, result['records'], result['times']),
              ratio_table(args.models, result['records'], result['times'])]
    settings = {
        'date': datetime.datetime.now().isoformat(timespec='seconds'), 'batch_size': args.batch_size,
        'rounds': args.rounds, 'warmup': args.warmup, 'img_size': IMG_SIZE[0], 'threads': result['threads'],
        'command': ' '.join(['python', 'benchmarks/cpu_latency.py', *(argv if argv is not None else sys.argv[1:])]),
    }
    others = busy_cores_summary(result['other_cores'])
    text = '\n'.join([
        f"# CPU latency, {settings['date']}", '',
        f"Median ms per call over {args.rounds} rounds (the models taking turns call by call) after {args.warmup} "
        f"warm-up calls, batch {args.batch_size}, {IMG_SIZE[0]}x{IMG_SIZE[1]}, {result['threads']} threads "
        f"(PyTorch and ONNX Runtime), random weights with BatchNorm statistics calibrated, eval mode, inference_mode, "
        f"all models in one process. Method: the docstring of `benchmarks/cpu_latency.py`.", '',
        tables[0], '', 'Time over each peer\'s, median of the per-round ratios (below 1: faster):', '', tables[1], '',
        *[f'**{n}**' for n in result['notes']],
        f'- cores kept busy by other processes (most before or during each variant): {others}',
        f"- CPU: {machine['cpu']}, {machine['cores']} cores available to the process",
        f"- host: {machine['hostname']}, {machine['platform']}, Python {machine['python']}",
        f"- torch {machine['torch']}, timm {machine['timm']}, onnxruntime {machine['onnxruntime']}",
        f"- load average (1, 5, 15 min) at start: {', '.join(f'{a:.2f}' for a in machine['load_average_start'])}; "
        f"at end: {', '.join(f'{a:.2f}' for a in machine['load_average_end'])}",
        f"- machine speed at start and end, to compare runs (a host can slow the machine while no process on it is "
        f"busy): fp32 GEMM 1024x1024x1024 at {args.threads} threads {machine['gemm_gflops_start']:.0f} and "
        f"{machine['gemm_gflops_end']:.0f} GFLOP/s; copy of 64 MiB {machine['copy_gbps_start']:.1f} and "
        f"{machine['copy_gbps_end']:.1f} GB/s read + written; add of 196x768 floats {machine['small_op_us_start']:.1f} "
        f"and {machine['small_op_us_end']:.1f} us",
        f"- command: `{settings['command']}`", '',
    ])
    json_path = Path(dated_result_path(str(args.out_dir), f"cpu-{slug(machine['cpu']) or slug(machine['hostname'])}",
                                       '.json'))
    write_json(str(json_path), {'machine': machine, 'settings': settings, **result}, indent=1)
    json_path.with_suffix('.md').write_text(text)
    print(text)
    print(f'written: {json_path} and {json_path.with_suffix(".md")}')


if __name__ == '__main__':
    main()
