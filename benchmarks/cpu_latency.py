"""CPU inference latency of the CabViT models beside small timm baselines: PyTorch, re-parameterised, ONNX Runtime.

All models run in one process with as many threads as the process has cores (torch.set_num_threads and ONNX
Runtime's intra-op threads), at 224x224 in eval mode, with random weights and BatchNorm statistics calibrated
on random images (`calibrate_batchnorm`). Each figure is the median of `--iters` timed forward
passes after `--warmup` untimed ones. The CabViT models are also timed after `timm.utils.reparameterize_model`
(BatchNorm folded); ONNX graphs come from `timm_cabvit.deploy.export_onnx` (re-parameterised, dynamic batch,
checked against PyTorch). Prints a markdown table and writes it, with the machine description and every
timing, to benchmarks/results/cpu-<cpu>-<date>.md and .json.

    python benchmarks/cpu_latency.py                       # all models, batch 1 and 8
    python benchmarks/cpu_latency.py --models cabvit_h_l1 convnext_pico --batch-sizes 1 --iters 10 --no-onnx
"""
import argparse
import datetime
import functools
import os
import platform
import socket
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import timm
import torch
from bench_utils import (
    RESULTS_DIR,
    cpu_model,
    dated_result_path,
    markdown_table,
    num_cores,
    num_params,
    slug,
    time_interleaved_ms,
    write_json,
)
from timm.utils import reparameterize_model

import timm_cabvit  # noqa: F401  (registers the models)
from timm_cabvit.deploy import calibrate_batchnorm, export_onnx

CABVIT_MODELS = ['cabvit_p_l0', 'cabvit_h_l1', 'cabvit_h_l2', 'cabvit_h_l3']
BASELINES = [
    'deit_tiny_patch16_224', 'convnext_pico', 'efficientformer_l1', 'edgenext_small', 'efficientformer_l3',
    'convnext_tiny',
]
VARIANTS = ('pytorch', 'reparam', 'onnxruntime')
IMG_SIZE = (224, 224)  # every model here was made for it; the CabViT models are built for one size


def machine_description(threads: int) -> Dict[str, object]:
    import onnxruntime

    return {
        'cpu': cpu_model(),
        'cores': num_cores(),
        'threads': threads,
        'hostname': socket.gethostname(),
        'platform': platform.platform(),
        'python': platform.python_version(),
        'torch': torch.__version__,
        'timm': timm.__version__,
        'onnxruntime': onnxruntime.__version__,
        'load_average_start': os.getloadavg(),
    }


class OnnxRuntimeModel:
    """The model exported by `export_onnx` (and checked against PyTorch), run by an ONNX Runtime CPU session."""

    def __init__(self, model: torch.nn.Module, path: Path, img_size: Tuple[int, int], threads: int):
        import onnxruntime

        self.report = export_onnx(model, path, img_size=img_size)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # idle threads that spin between runs would slow the PyTorch runs of the same process
        options.add_session_config_entry('session.intra_op.allow_spinning', '0')
        self.session = onnxruntime.InferenceSession(str(path), options, providers=['CPUExecutionProvider'])

    def __call__(self, x: torch.Tensor) -> object:
        return self.session.run(None, {'input': x.numpy()})


def measure_model(
        name: str,
        batch_sizes: Sequence[int],
        variants: Sequence[str],
        img_size: Tuple[int, int],
        warmup: int,
        iters: int,
        threads: int,
        workdir: Path,
) -> Dict[str, object]:
    """Timings of one model in each variant that applies to it (re-param: CabViT only) and each batch size."""
    model = calibrate_batchnorm(timm.create_model(name), 1, img_size)
    runners: Dict[str, Callable[[torch.Tensor], object]] = {'pytorch': model}
    record: Dict[str, object] = {'model': name, 'params': num_params(model), 'times_ms': {}}
    if 'reparam' in variants and name in CABVIT_MODELS:
        runners['reparam'] = reparameterize_model(model)
        record['params_reparam'] = num_params(runners['reparam'])
    if 'onnxruntime' in variants:
        runners['onnxruntime'] = OnnxRuntimeModel(model, workdir / f'{name}.onnx', img_size, threads)
        record['onnx_max_abs_diff'] = runners['onnxruntime'].report['max_abs_diff']
    with torch.inference_mode():
        for batch_size in batch_sizes:
            x = torch.randn(batch_size, 3, *img_size)
            timed = {}
            # PyTorch variants take turns; ONNX Runtime runs on its own, as the two thread pools slow each other
            for group in ([v for v in runners if v != 'onnxruntime'], [v for v in runners if v == 'onnxruntime']):
                timed.update(time_interleaved_ms({v: functools.partial(runners[v], x) for v in group}, warmup, iters))
            for variant, times in timed.items():
                record['times_ms'][f'{variant}@{batch_size}'] = times
                print(f'  {name:<24} batch {batch_size:<3} {variant:<12} {statistics.median(times):8.1f} ms',
                      file=sys.stderr, flush=True)
    return record


def latency_table(records: List[Dict[str, object]], batch_sizes: Sequence[int], variants: Sequence[str]) -> str:
    """Median ms per model (rows) and batch size x variant (columns); '-' where a variant does not apply."""
    labels = {'pytorch': 'PyTorch', 'reparam': 're-param', 'onnxruntime': 'ORT'}
    columns = [(b, v) for b in batch_sizes for v in variants]
    header = ['model', 'params'] + [f'b{b} {labels[v]}' for b, v in columns]
    rows = []
    for record in records:
        cells = []
        for b, v in columns:
            times = record['times_ms'].get(f'{v}@{b}')
            cells.append('-' if times is None else f'{statistics.median(times):.1f}')
        rows.append([str(record['model']), f"{record['params'] / 1e6:.2f} M"] + cells)
    return markdown_table(header, rows, right=[False] + [True] * (len(header) - 1))


def write_results(
        records: List[Dict[str, object]], machine: Dict[str, object], settings: Dict[str, object], table: str,
        out_dir: Path,
) -> Path:
    """Write the .json (every timing) and .md (table and machine) result files; return the .md path."""
    name = f"cpu-{slug(machine['cpu']) or slug(machine['hostname'])}"
    json_path = Path(dated_result_path(str(out_dir), name, '.json'))
    write_json(str(json_path), {'machine': machine, 'settings': settings, 'results': records}, indent=1)
    onnx_diffs = ', '.join(
        f"{r['model']} {r['onnx_max_abs_diff']:.1e}" for r in records if 'onnx_max_abs_diff' in r)
    load = ', '.join(f'{a:.2f}' for a in machine['load_average_start'])
    load_end = ', '.join(f'{a:.2f}' for a in machine['load_average_end'])
    text = '\n'.join([
        f"# CPU latency, {settings['date']}",
        '',
        f"Median ms per forward pass over {settings['iters']} runs after {settings['warmup']} warm-up runs, "
        f"{settings['img_size']}x{settings['img_size']} input, random weights with BatchNorm statistics "
        'calibrated on random images, eval mode, inference_mode, '
        f"{machine['threads']} threads (PyTorch and ONNX Runtime), all models in one process, the PyTorch variants of "
        'a model taking turns call by call. '
        're-param: `timm.utils.reparameterize_model` (CabViT models only); ORT: ONNX Runtime '
        f"{machine['onnxruntime']} on the CPU execution provider, graphs from `timm_cabvit.deploy.export_onnx`.",
        '',
        table,
        '',
        f'- ONNX Runtime against PyTorch, largest absolute difference of the outputs: {onnx_diffs}'
        if onnx_diffs else '- ONNX Runtime not measured (--no-onnx)',
        f"- CPU: {machine['cpu']}, {machine['cores']} cores available to the process",
        f"- host: {machine['hostname']}, {machine['platform']}, Python {machine['python']}",
        f"- torch {machine['torch']}, timm {machine['timm']}, onnxruntime {machine['onnxruntime']}",
        f'- load average (1, 5, 15 min) at start: {load}; at end: {load_end}. A figure above 0 before the run '
        'means other jobs shared the machine and the timings are slower and noisier than on an idle one.',
        f"- command: `{settings['command']}`",
        '',
    ])
    md_path = json_path.with_suffix('.md')
    md_path.write_text(text)
    return md_path


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=CABVIT_MODELS + BASELINES, metavar='NAME',
                        help='timm model names (default: the four CabViT models and six baselines)')
    parser.add_argument('--batch-sizes', nargs='+', type=int, default=[1, 8], metavar='N',
                        help='batch sizes (default: %(default)s)')
    parser.add_argument('--iters', type=int, default=20, help='timed runs per figure (default: %(default)s)')
    parser.add_argument('--warmup', type=int, default=3, help='untimed runs before them (default: %(default)s)')
    parser.add_argument('--threads', type=int, default=num_cores(),
                        help='threads of PyTorch and ONNX Runtime (default: the cores available, %(default)s)')
    parser.add_argument('--no-onnx', action='store_true', help='skip the ONNX Runtime measurements')
    parser.add_argument('--out-dir', type=Path, default=Path(RESULTS_DIR), help='where to write the result files')
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = [v for v in VARIANTS if not (args.no_onnx and v == 'onnxruntime')]
    machine = machine_description(args.threads)
    records = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.models:
            records.append(measure_model(
                name, args.batch_sizes, variants, IMG_SIZE, args.warmup, args.iters, args.threads, Path(workdir)))
    machine['load_average_end'] = os.getloadavg()
    table = latency_table(records, args.batch_sizes, variants)
    settings = {
        'date': datetime.datetime.now().isoformat(timespec='seconds'),
        'batch_sizes': args.batch_sizes, 'iters': args.iters, 'warmup': args.warmup, 'img_size': IMG_SIZE[0],
        'command': ' '.join(['python', 'benchmarks/cpu_latency.py', *(argv if argv is not None else sys.argv[1:])]),
    }
    path = write_results(records, machine, settings, table, args.out_dir)
    print(table)
    print(f'\nwritten: {path} and {path.with_suffix(".json")}')


if __name__ == '__main__':
    main()
