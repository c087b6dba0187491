"""Reports against the paper: our models' parameters, FLOPs and speed beside the figures the paper gives.

- `models_table`: parameters, fvcore FLOPs and measured inference speed of each model beside the paper's
  parameters, FLOPs and ImageNet top-1 (Tables 1 and 2): what `timm-cabvit` prints;
- `flops_report` / `flops_table` / `save_flops_plot`: parameters and FLOPs by component, with and without
  cross-block attention (the paper's Fig. 5 for whole models): `timm-cabvit flops`;
- `ablation_ladder` / `ablation_table`: the paper's ideas added one at a time beside its Table 4 increments:
  `timm-cabvit ablation`.

The counting itself is `timm_cabvit.tools.flops` (fvcore with a handle for fused attention). Functions that take a
while accept a `progress` bar (tqdm's interface: `update()`, `set_postfix_str()`), advanced once per model built
or forward pass timed.
"""
import os
import statistics
import time
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, TypedDict

import timm
import torch

from .. import import_extra
from .flops import COMPONENTS, count_flops, flops_by_component, num_params

__all__ = [
    'PAPER', 'PAPER_EXTRA_COMPUTE', 'PAPER_TABLE4', 'Timing', 'ablation_ladder', 'ablation_table', 'flops_report',
    'BUSY_CORES', 'OtherCpuUse', 'contention_note', 'flops_table', 'measure_throughput', 'models_table',
    'other_cpu_use', 'save_flops_plot',
]


# The paper's figures

class PaperFigures(TypedDict):
    params_m: float
    gflops: Optional[float]
    top1: float


# ImageNet-1k at 224 (Tables 1 and 2); CabViT-P-L0's FLOPs are not given, cabvit_h_l3 is only in the reference code
PAPER: Dict[str, Optional[PaperFigures]] = {
    'cabvit_p_l0': PaperFigures(params_m=5.9, gflops=None, top1=74.3),
    'cabvit_h_l1': PaperFigures(params_m=6.2, gflops=1.5, top1=80.3),
    'cabvit_h_l2': PaperFigures(params_m=16.3, gflops=3.9, top1=83.0),
    'cabvit_h_l3': None,
}

# Table 4 (ImageNet micro setting, ConvViT at 10.5 M parameters): parameters (M) and GFLOPs before and after a step
PAPER_TABLE4 = {
    'cross_block': dict(params_m=(10.5, 10.5), gflops=(1.47, 1.52)),
    'digest_scale': dict(params_m=(10.5, 10.5), gflops=(1.52, 1.52)),
}
PAPER_EXTRA_COMPUTE = 0.13  # Sec. 3.3: "about 13 % extra computational cost" over the reference models


def _pct(part: float, whole: float) -> str:
    return f'{100 * part / whole:+.1f} %' if whole else '-'


def _working_on(progress: Any, what: str) -> None:
    if progress is not None:
        progress.set_postfix_str(what)


def _advance(progress: Any) -> None:
    if progress is not None:
        progress.update()


# The models at a glance, with measured speed

def _synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    elif device.type == 'mps':
        torch.mps.synchronize()


class Timing(NamedTuple):
    """How inference speed is measured: `iters` timed passes of a batch of `batch_size` random images of `img_size`
    on `device`, after `warmup` untimed ones."""
    batch_size: int
    img_size: Tuple[int, int]
    device: torch.device
    warmup: int
    iters: int


def measure_throughput(model: torch.nn.Module, timing: Timing, progress: Any = None) -> List[float]:
    """Images/s of each timed inference pass of `model` (on `timing.device`) over random images."""
    batch_size, img_size, device, warmup, iters = timing
    x = torch.randn(batch_size, model.in_chans, *img_size, device=device)
    rates = []
    with torch.inference_mode():
        for i in range(warmup + iters):
            _synchronize(device)
            start = time.perf_counter()
            model(x)
            _synchronize(device)
            if i >= warmup:
                rates.append(batch_size / (time.perf_counter() - start))
            _advance(progress)
    return rates


# Cores other processes may keep busy, beyond those the timed threads leave free, before a figure is no longer a
# speed: with every core in use (2 threads on 2 cores), one busy core from elsewhere makes OpenMP threads wait on
# each other, up to ~10x slower.
BUSY_CORES = 0.25


def _cpu_seconds() -> Optional[Tuple[float, float, float]]:
    """Busy CPU seconds of the CPUs this process may run on (steal time included: other guests of a virtual
    machine's host), this process's own CPU seconds, and the wall clock; None where /proc/stat is missing."""
    try:
        cpus = {f'cpu{i}' for i in os.sched_getaffinity(0)}
        busy = 0
        with open('/proc/stat') as f:
            for line in f:
                name, *fields = line.split()
                if name in cpus:
                    user, nice, system, _, _, irq, softirq, steal = map(int, fields[:8])
                    busy += user + nice + system + irq + softirq + steal
        return busy / os.sysconf('SC_CLK_TCK'), time.process_time(), time.perf_counter()
    except (AttributeError, OSError, ValueError):
        return None


class OtherCpuUse:
    """The cores other processes kept busy while a block ran (`cores`, None where it cannot be told): the busy time
    of this process's CPUs beyond its own CPU time, per second."""

    cores: Optional[float] = None

    def __enter__(self) -> 'OtherCpuUse':
        self._start = _cpu_seconds()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        end = _cpu_seconds()
        if self._start is not None and end is not None and end[2] > self._start[2]:
            busy, own, wall = (e - s for e, s in zip(end, self._start))
            self.cores = max(0., busy - own) / wall


def other_cpu_use(seconds: float = 0.5) -> Optional[float]:
    """Cores other processes keep busy now, over `seconds` of this process doing nothing."""
    with OtherCpuUse() as other:
        time.sleep(seconds)
    return other.cores


def contention_note(cores: Sequence[Optional[float]], threads: int) -> Optional[str]:
    """A note that the figures measured are not speeds, when other processes kept busy more than the cores the
    `threads` left free, plus BUSY_CORES, before or while measuring; None when they did not, or where that cannot
    be told."""
    known = [c for c in cores if c is not None]
    available = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
    if not known or max(known) <= max(0, available - threads) + BUSY_CORES:
        return None
    return (f'NOT TRUSTWORTHY: other processes kept {max(known):.1f} of the {available} cores busy while measuring '
            f'with {threads} thread{"s" if threads > 1 else ""}; the figures above are slowed by them (with threads '
            f'on every core, up to ~10x), not speeds. Measure on an idle machine, or with fewer --threads while it '
            f'is shared.')


def _fmt(value: Optional[float], width: int, suffix: str = '') -> str:
    return format('-' if value is None else f'{value:.1f}{suffix}', f'>{width}')


def _measure_all(models: Dict[str, torch.nn.Module], timing: Timing, progress: Any) -> Tuple[Dict[str, List[float]],
                                                                                          List[Optional[float]]]:
    """Images/s of every pass of each model, and the cores other processes kept busy before and while measuring."""
    cpu = timing.device.type == 'cpu'
    before = other_cpu_use() if cpu else None
    with OtherCpuUse() as during:
        rates = {}
        for name, model in models.items():
            _working_on(progress, name)
            rates[name] = measure_throughput(model, timing, progress)
    return rates, [before, during.cores if cpu else None]


def models_table(model_names: Sequence[str], timing: Timing, progress: Any = None) -> List[str]:
    """Rows of the overview table: our parameters and FLOPs, the paper's figures, and measured images/s.

    The models are built for `timing.img_size`. The speed is the median over the timed forward passes of a batch
    of random images (after the untimed ones), with the slowest and fastest pass beside it. On the CPU, when other
    processes kept cores busy before or while measuring (`BUSY_CORES`), the speeds are measured again on one thread,
    where sharing costs ~1.5x instead of ~10x, and a note says so; if that is shared too, a note says the figures
    are not speeds. `progress` advances once per pass.
    """
    batch_size, img_size, device, warmup, iters = timing
    models = {name: timm.create_model(name, img_size=img_size).eval() for name in model_names}
    flops = {name: count_flops(model, img_size) / 1e9 for name, model in models.items()}
    models = {name: model.to(device) for name, model in models.items()}
    rates, others = _measure_all(models, timing, progress)
    threads, notes = torch.get_num_threads(), []
    if device.type == 'cpu' and contention_note(others, threads) and threads > 1:
        notes.append(f'note: other processes kept {max(c for c in others if c is not None):.1f} cores busy while '
                     f'measuring with {threads} threads; measured again on 1 thread')
        torch.set_num_threads(1)
        try:
            rates, others = _measure_all(models, timing, None)
        finally:
            torch.set_num_threads(threads)
        threads = 1
    note = contention_note(others, threads) if device.type == 'cpu' else None
    where = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{threads} thread{"s" * (threads > 1)}'
    header = (f"{'model':<12} {'params':>11} {'GFLOPs':>7} | {'paper params':>12} {'paper GFLOPs':>12} "
              f"{'paper top-1':>11} | {'img/s':>7} {'min-max':>13}")
    rows = [f'{img_size[0]}x{img_size[1]} input, batch {batch_size}, {device.type} ({where}); img/s: median of '
            f'{iters} timed passes after {warmup} warm-up, the slowest and fastest beside it',
            header, '-' * len(header)]
    for name, model in models.items():
        paper = PAPER.get(name) or {}
        spread = f'{min(rates[name]):.1f}-{max(rates[name]):.1f}'
        rows.append(
            f"{name:<12} {num_params(model):>11,} {flops[name]:>7.3f} | {_fmt(paper.get('params_m'), 12, ' M')} "
            f"{_fmt(paper.get('gflops'), 12)} {_fmt(paper.get('top1'), 11)} | {statistics.median(rates[name]):>7.1f} "
            f"{spread:>13}")
    return rows + notes + ([note] if note else [])


# FLOPs and parameters by component (Fig. 5)

def flops_report(model_name: str, img_size: Tuple[int, int], progress: Any = None) -> Dict[str, Any]:
    """Parameters and FLOPs by component, of the model and of the same model without cross-block attention."""
    report = {'model': model_name, 'img_size': list(img_size)}
    for key, kwargs in (('with_cross_block', {}), ('without_cross_block', dict(cross_block=False))):
        _working_on(progress, model_name + ('' if kwargs else ' w/o cross-block'))
        components = flops_by_component(timm.create_model(model_name, img_size=img_size, **kwargs), img_size)
        report[key] = dict(
            params=sum(c['params'] for c in components.values()),
            flops=sum(c['flops'] for c in components.values()),
            components=components,
        )
        _advance(progress)
    return report


def flops_table(report: Dict[str, Any]) -> List[str]:
    full, plain = report['with_cross_block'], report['without_cross_block']
    height, width = report['img_size']
    header = (f"{'component':<16} {'params':>11} {'share':>7} {'GFLOPs':>8} {'share':>7} | "
              f"{'w/o cross-block':>15} {'extra':>9}")
    rows = [f"{report['model']} at {height}x{width}: {full['params']:,} parameters, {full['flops'] / 1e9:.3f} GFLOPs",
            header, '-' * len(header)]
    for name in (*COMPONENTS, 'other'):
        c, p = full['components'][name], plain['components'][name]
        if not (c['params'] or c['flops'] or p['flops']):
            continue
        extra = (c['flops'] - p['flops']) / 1e9
        rows.append(
            f"{name:<16} {c['params']:>11,} {100 * c['params'] / full['params']:>6.1f}% {c['flops'] / 1e9:>8.3f} "
            f"{100 * c['flops'] / full['flops']:>6.1f}% | {p['flops'] / 1e9:>15.3f} {extra:>+9.3f}")
    rows.append(
        f"cross-block attention: {(full['flops'] - plain['flops']) / 1e9:+.3f} GFLOPs "
        f"({_pct(full['flops'] - plain['flops'], plain['flops'])}), {full['params'] - plain['params']:+,} parameters "
        f"({_pct(full['params'] - plain['params'], plain['params'])})")
    return rows


def save_flops_plot(reports: List[Dict[str, Any]], path: str) -> None:
    """Stacked bars of GFLOPs by component, each model with and without cross-block attention, as a PNG.

    Drawn on a bare matplotlib Figure (Agg), leaving pyplot's backend and state alone; the folder is created.
    """
    Figure = import_extra('matplotlib.figure', 'tools', 'Plotting the FLOPs').Figure

    labels, bars = [], []
    for report in reports:
        for key, suffix in (('with_cross_block', ''), ('without_cross_block', '\nno cross-block')):
            labels.append(report['model'] + suffix)
            bars.append(report[key]['components'])
    fig = Figure(figsize=(1.6 * len(labels) + 3, 4.5))
    ax = fig.subplots()
    bottom = [0.] * len(labels)
    for name in (*COMPONENTS, 'other'):
        values = [b[name]['flops'] / 1e9 for b in bars]
        if any(values):
            ax.bar(labels, values, bottom=bottom, label=name)
            bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_ylabel('GFLOPs (fvcore, one multiply-add = one FLOP)')
    height, width = reports[0]['img_size']
    ax.set_title(f'FLOPs by component at {height}x{width}')
    ax.legend(loc='upper left', bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


# The ablation ladder (Table 4)

ABLATION_STEPS = (
    ('global attention, no TME enhance', dict(cross_block=False, tme_enhance=False)),
    ('+ cross-block attention, no digest scales', dict(digest_scale=False, tme_enhance=False)),
    ('+ learnable digest scales', dict(tme_enhance=False)),
    ('+ TME enhance branch (the model)', {}),
)


def ablation_ladder(
        model_name: str, img_size: Tuple[int, int] = (224, 224), progress: Any = None) -> List[Dict[str, Any]]:
    """Parameters and FLOPs as the paper's ideas are added one at a time, ending at the registered model."""
    ladder = []
    for label, kwargs in ABLATION_STEPS:
        _working_on(progress, label)
        model = timm.create_model(model_name, img_size=img_size, **kwargs)
        ladder.append(dict(step=label, kwargs=kwargs, params=num_params(model), flops=count_flops(model, img_size)))
        _advance(progress)
    return ladder


def ablation_table(model_name: str, ladder: List[Dict[str, Any]]) -> List[str]:
    header = f"{'step':<44} {'params':>11} {'GFLOPs':>8} | {'d params':>9} {'d FLOPs':>8} | {'paper':>18}"
    paper = {1: PAPER_TABLE4['cross_block'], 2: PAPER_TABLE4['digest_scale']}
    rows = [f'{model_name}: the ideas of the paper added one at a time (paper: Table 4)', header, '-' * len(header)]
    for i, step in enumerate(ladder):
        d_params = _pct(step['params'] - ladder[i - 1]['params'], ladder[i - 1]['params']) if i else ''
        d_flops = _pct(step['flops'] - ladder[i - 1]['flops'], ladder[i - 1]['flops']) if i else ''
        ref = paper.get(i)
        paper_text = ''
        if ref:
            (p0, p1), (f0, f1) = ref['params_m'], ref['gflops']
            paper_text = f'{p1 - p0:+.2f} M, {_pct(f1 - f0, f0)}'
        rows.append(f"{step['step']:<44} {step['params']:>11,} {step['flops'] / 1e9:>8.3f} | "
                    f"{d_params:>9} {d_flops:>8} | {paper_text:>18}")
    first, last = ladder[0], ladder[-1]
    rows.append(f"all steps: {_pct(last['flops'] - first['flops'], first['flops'])} FLOPs, "
                f"{_pct(last['params'] - first['params'], first['params'])} parameters "
                f"(paper: about {PAPER_EXTRA_COMPUTE:.0%} extra compute over the reference models)")
    return rows
