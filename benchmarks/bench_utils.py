""" Shared helpers of the benchmark scripts: device choice, timing, environment record, result files """
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from timm_cabvit.tools.flops import COMPONENTS, component_fn

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')
# rows of the component tables of traffic.py and gpu_profile.py: the model's components (`flops.component_fn`), then
# the parts of a step outside the model ('<loss>', '<optimizer>' labels; 'untraced': a backward op of traffic.py whose
# autograd node no forward op made) and gpu_profile.py's two buckets across modules
COMPONENT_ORDER = [*COMPONENTS, 'other', 'loss', 'optimizer', 'untraced', 'layout copies', 'dtype casts']


def resolve_device(name: str) -> torch.device:
    """The benchmark device; a clear exit where CUDA is asked for (the default) and missing."""
    if name == 'cuda' and not torch.cuda.is_available():
        sys.exit(
            'No CUDA device: these benchmarks measure GPU throughput (torch.cuda.is_available() is False). '
            'For a functional smoke run at tiny sizes pass --device cpu, e.g. --device cpu --batch 2 --iters 2.')
    return torch.device(name)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what the platform module knows."""
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def num_cores() -> int:
    """Cores this process may run on (its affinity, which containers and taskset narrow), not the host's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()


def device_name(device: torch.device) -> str:
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or 'cpu'


def slug(text: str) -> str:
    return re.sub(r'[^a-z0-9]+', '-', text.lower()).strip('-')


def synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, iters: int, runs: int, warmup: int) -> float:
    """Median over runs of the mean time per call, in ms; CUDA events on GPU, wall clock on CPU."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(runs):
        if device.type == 'cuda':
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / iters)
        else:
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            times.append((time.perf_counter() - t0) * 1e3 / iters)
    return statistics.median(times)


def time_interleaved_ms(fns: Dict[str, Callable[[], object]], warmup: int, iters: int) -> Dict[str, List[float]]:
    """Wall-clock times in ms of `iters` calls of each function after `warmup` untimed ones.

    The functions take turns, call by call, so that a change of load on a shared machine hits all of them alike.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def copy_bandwidth_gbps(device: torch.device, size_mib: int, runs: int = 10) -> float:
    """Measured device copy bandwidth: bytes read plus written by a large tensor copy, per second (median)."""
    src = torch.empty(size_mib * 2 ** 20 // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, iters=5, runs=runs, warmup=3)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def cpu_time_ms(fn: Callable[[], object], threads: int, iters: int, runs: int = 10) -> float:
    """`time_ms` of `fn` on the CPU at `threads` threads, the process's thread count restored after."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return time_ms(fn, torch.device('cpu'), iters=iters, runs=runs, warmup=2)
    finally:
        torch.set_num_threads(saved)


def gemm_gflops(threads: int, size: int = 1024) -> float:
    """fp32 GEMM throughput of the CPU at `threads` threads: a yardstick of the machine's speed at the time, as a
    virtual machine's host can slow it with no process of its own busy."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    return 2 * size ** 3 / (cpu_time_ms(lambda: a @ b, threads, iters=3) * 1e-3) / 1e9


def small_op_us(threads: int) -> float:
    """Microseconds of an elementwise add of a CabViT block's FFN activation (196 x 768 fp32) at `threads` threads:
    the per-op dispatch and thread hand-off that small ops pay, which the GEMM yardstick does not see (on 2026-12-03
    a host ran these models 1.3-1.5x slower while the GEMM ran at full speed)."""
    x = torch.randn(196, 768)
    return cpu_time_ms(lambda: torch.add(x, x), threads, iters=200) * 1e3


def environment(device: torch.device) -> Dict[str, Optional[str]]:
    """Device and software versions a result depends on."""
    import timm

    import timm_cabvit
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        commit = subprocess.run(
            ['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True, check=True,
            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {
        'device': device_name(device),
        'date': datetime.datetime.now().isoformat(timespec='seconds'),
        'torch': torch.__version__,
        'cuda': torch.version.cuda,
        'cudnn': str(torch.backends.cudnn.version()) if device.type == 'cuda' else None,
        'triton': triton_version,
        'timm': timm.__version__,
        'timm_cabvit': timm_cabvit.__version__,
        'git_commit': commit,
        'python': platform.python_version(),
        'command': ' '.join([os.path.basename(sys.executable)] + sys.argv),
    }


def dated_result_path(results_dir: str, name: str, suffix: str) -> str:
    """<results_dir>/<name>-<date><suffix>, the directory created if need be."""
    os.makedirs(results_dir, exist_ok=True)
    return os.path.join(results_dir, f'{name}-{datetime.date.today().isoformat()}{suffix}')


def result_path(results_dir: str, prefix: str, device: torch.device, suffix: str) -> str:
    """<results_dir>/<prefix><device>-<date><suffix>, e.g. results/nvidia-h100-80gb-hbm3-2026-01-31.json."""
    return dated_result_path(results_dir, f'{prefix}{slug(device_name(device))}', suffix)


def busy_cores_summary(cores_by_label: Dict[str, Sequence[Optional[float]]]) -> str:
    """'label N.NN, ...': the most cores other processes kept busy before or during each measured part, 'unknown'
    where /proc/stat could not tell."""
    return ', '.join(f'{label} {max(c for c in cores if c is not None):.2f}' if any(c is not None for c in cores)
                     else f'{label} unknown' for label, cores in cores_by_label.items())


def write_json(path: str, data: Dict, indent: int = 2) -> None:
    with open(path, 'w') as f:
        json.dump(data, f, indent=indent)
        f.write('\n')


def report_markdown(sections: Sequence[str], env: Dict[str, Optional[str]]) -> str:
    """A result's markdown: its sections, then the command that made it (from `environment`)."""
    return '\n'.join([*sections, '', f'`{env["command"]}`', ''])


def write_result(json_path: str, markdown: str, env: Dict[str, Optional[str]], settings: Dict, **data: Any) -> str:
    """A result as JSON at `json_path` (environment, settings, then `data`) and as markdown beside it (.md).

    Returns the line that says so, for the caller to print.
    """
    write_json(json_path, dict(environment=env, settings=settings, **data))
    with open(json_path[:-len('.json')] + '.md', 'w') as f:
        f.write(markdown)
    return f'written: {json_path} and .md'


def markdown_table(header: List[str], rows: List[List[str]], right: Sequence[bool] = ()) -> str:
    """A markdown table; `right` marks the columns to right-align (numbers), the others keep the default."""
    aligns = ['---:' if r else '---' for r in right] + ['---'] * (len(header) - len(right))
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join(aligns) + '|']
    lines += ['| ' + ' | '.join(row) + ' |' for row in rows]
    return '\n'.join(lines)


def label_component(model: torch.nn.Module) -> Callable[[str], str]:
    """Maps an op's label to its component: a module path as `flops.component_fn` does, '<name>' (a part of the
    step outside the model: loss, optimizer, untraced) to the name."""
    component = component_fn(model)
    return lambda label: label[1:-1] if label.startswith('<') else component(label)
