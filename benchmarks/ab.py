"""A/B of a code change on the CPU: the CabViT models of this checkout against the same models at a git revision.

Both versions run in one process with the same weights: the revision's `timm_cabvit/` is extracted with
`git archive` and imported under another name (`timm_cabvit_at_rev`), each model is built from each version's own
entry point (timm's registry holds only one), and the revision's copy loads the state dict of this checkout's. The
BatchNorm statistics are calibrated first, as in cpu_latency.py: timings depend on the values, and a change
measured 0.90x on models at their initial statistics measured 0.96x calibrated. Batch 1, eval mode,
inference_mode; the two versions of each model take turns call by call, and each ratio is the median of the
per-round ratios (below 1: this checkout is faster). Other processes' CPU use during the rounds goes with it.
`--compile` times both versions under `torch.compile` (inductor, default arguments, as cpu_latency.py): each
version's ops of the package are registered under its own name, so each graph calls its own.

    python benchmarks/ab.py --against HEAD~1 --models cabvit_h_l1 cabvit_h_l2 --rounds 60 --threads 2
    python benchmarks/ab.py --against HEAD~1 --models cabvit_h_l1 --compile
"""
import argparse
import importlib
import io
import statistics
import subprocess
import sys
import tarfile
import tempfile
import warnings
from pathlib import Path
from types import ModuleType
from typing import Dict, List, Optional, Sequence

import torch
from bench_utils import markdown_table, num_cores
from cpu_latency import paired_ratio, time_rounds

import timm_cabvit.cabvit as current
from timm_cabvit.tools.deploy import calibrate_batchnorm
from timm_cabvit.tools.reports import OtherCpuUse, contention_note

REPO = Path(__file__).resolve().parents[1]
PACKAGE_AT_REV = 'timm_cabvit_at_rev'


def package_at(rev: str, workdir: Path) -> ModuleType:
    """The model module (`cabvit.py`) of `rev`'s timm_cabvit, imported as PACKAGE_AT_REV from `workdir`."""
    archive = subprocess.run(['git', 'archive', '--format=tar', rev, 'timm_cabvit'], cwd=REPO, capture_output=True)
    if archive.returncode:
        sys.exit(f'git archive {rev} timm_cabvit failed in {REPO}: {archive.stderr.decode().strip()}')
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(workdir, filter='data')
    (workdir / 'timm_cabvit').rename(workdir / PACKAGE_AT_REV)
    sys.path.insert(0, str(workdir))
    with warnings.catch_warnings():  # its register_model calls take over timm's registry: no timm.create_model here
        warnings.filterwarnings('ignore', message='Overwriting')
        return importlib.import_module(f'{PACKAGE_AT_REV}.cabvit')


def model_pair(name: str, at_rev: ModuleType, img_size: int) -> List[torch.nn.Module]:
    """`name` from the revision and from this checkout, with this checkout's calibrated weights."""
    for module in (at_rev, current):
        if not hasattr(module, name):
            sys.exit(f'{name} is not a model of {module.__name__} (CabViT models: cabvit_p_l0, cabvit_h_l1, ...)')
    torch.manual_seed(0)
    model = getattr(current, name)(img_size=img_size)
    calibrate_batchnorm(model, img_size=img_size)
    before = getattr(at_rev, name)(img_size=img_size)
    try:
        before.load_state_dict(model.state_dict())
    except RuntimeError as e:
        sys.exit(f'{name}: the revision\'s model takes other weights than this checkout\'s, so no A/B: {e}')
    return [before.eval(), model.eval()]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--against', default='HEAD', help='git revision to compare with (default: %(default)s)')
    parser.add_argument('--models', nargs='+', default=['cabvit_h_l1', 'cabvit_h_l2'], metavar='NAME',
                        help='CabViT model names (default: %(default)s)')
    parser.add_argument('--rounds', type=int, default=60, help='timed rounds (default: %(default)s)')
    parser.add_argument('--warmup', type=int, default=3, help='untimed calls of each model first (default: 3)')
    parser.add_argument('--threads', type=int, default=num_cores(), help='PyTorch threads (default: %(default)s)')
    parser.add_argument('--img-size', type=int, default=224, help='input size (default: %(default)s)')
    parser.add_argument('--compile', action='store_true', help='time both versions under torch.compile')
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, float]:
    """Prints the table; returns each model's ratio, this checkout's time over the revision's."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as workdir:
        at_rev = package_at(args.against, Path(workdir))
        runners = {}
        for name in args.models:
            runners[f'{name}@{args.against}'], runners[name] = model_pair(name, at_rev, args.img_size)
        if args.compile:
            runners = {name: torch.compile(model) for name, model in runners.items()}
        x = torch.randn(1, 3, args.img_size, args.img_size)
        with torch.inference_mode():
            differences = {name: (runners[name](x) - runners[f'{name}@{args.against}'](x)).abs().max().item()
                           for name in args.models}
        with OtherCpuUse() as other:
            times = time_rounds(runners, x, args.warmup, args.rounds)
    ratios = {name: paired_ratio(times, name, f'{name}@{args.against}') for name in args.models}
    rows = [[name, f'{statistics.median(times[f"{name}@{args.against}"]):.2f}', f'{statistics.median(times[name]):.2f}',
             f'{ratios[name]:.3f}', f'{differences[name]:.1e}'] for name in args.models]
    print(markdown_table(['model', f'{args.against} ms', 'this checkout ms', 'ratio', 'max output difference'],
                         rows, right=[False, True, True, True, True]))
    cores = 'unknown' if other.cores is None else f'{other.cores:.2f}'
    mode = 'torch.compile' if args.compile else 'eager'
    print(f'\n{mode}, {args.rounds} rounds, {args.threads} thread(s), batch 1, {args.img_size}x{args.img_size}; '
          f'cores kept busy by other processes while timing: {cores}')
    note = contention_note([other.cores], args.threads)
    if note:
        print(f'**{note}**')
    return ratios


if __name__ == '__main__':
    main()
