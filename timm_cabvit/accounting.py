"""The paper's accounting for our models: FLOPs and parameters by component, and the ablation ladder.

Reproduces what the paper's Fig. 5 (where a block's cost goes) and Table 4 (what each idea adds) report,
for any of the registered models and input sizes.
"""
from typing import Dict, List, Tuple

import timm

from .flops import COMPONENTS, count_flops, flops_by_component
from .paper import PAPER_EXTRA_COMPUTE, PAPER_TABLE4


def flops_report(model_name: str, img_size: tuple) -> dict:
    """Parameters and FLOPs by component, of the model and of the same model without cross-block attention."""
    report = {'model': model_name, 'img_size': list(img_size)}
    for key, kwargs in (('with_cross_block', {}), ('without_cross_block', dict(cross_block=False))):
        components = flops_by_component(timm.create_model(model_name, img_size=img_size, **kwargs), img_size)
        report[key] = dict(
            params=sum(c['params'] for c in components.values()),
            flops=sum(c['flops'] for c in components.values()),
            components=components,
        )
    return report


def _pct(part: float, whole: float) -> str:
    return f'{100 * part / whole:+.1f} %' if whole else '-'


def flops_table(report: dict) -> List[str]:
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


def save_flops_plot(reports: List[dict], path: str) -> None:
    """Stacked bars of GFLOPs by component, each model with and without cross-block attention."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    labels, bars = [], []
    for report in reports:
        for key, suffix in (('with_cross_block', ''), ('without_cross_block', '\nno cross-block')):
            labels.append(report['model'] + suffix)
            bars.append(report[key]['components'])
    fig, ax = plt.subplots(figsize=(1.6 * len(labels) + 3, 4.5))
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
    fig.savefig(path, dpi=120)
    plt.close(fig)


def ablation_ladder(model_name: str, img_size: Tuple[int, int] = (224, 224)) -> List[Dict]:
    """Parameters and FLOPs as the paper's ideas are added one at a time, ending at the registered model."""
    steps = [
        ('global attention, no TME enhance', dict(cross_block=False, tme_enhance=False)),
        ('+ cross-block attention, no digest scales', dict(digest_scale=False, tme_enhance=False)),
        ('+ learnable digest scales', dict(tme_enhance=False)),
        ('+ TME enhance branch (the model)', {}),
    ]
    ladder = []
    for label, kwargs in steps:
        model = timm.create_model(model_name, img_size=img_size, **kwargs)
        ladder.append(dict(
            step=label, kwargs=kwargs, params=sum(p.numel() for p in model.parameters()),
            flops=count_flops(model, img_size)))
    return ladder


def ablation_table(model_name: str, ladder: List[Dict]) -> List[str]:
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
