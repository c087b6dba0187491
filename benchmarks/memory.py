"""CPU memory of one eval forward pass at large inputs: the peak beyond weights and input, and what stays after.

Each model and size runs in a fresh process (peak resident memory is a per-process figure, and the allocator keeps
what an earlier run freed). CabViT models are created with `dynamic_img_size=True` at their default size and fed the
larger image, as a detection or segmentation backbone is; ConvNeXt runs beside them as the reference. "kept" is the
memory held by the model after the pass beyond what it held before (0 MB: no bias or index was left behind).

    python benchmarks/memory.py                                   # cabvit_h_l2 and convnext_tiny at 512 and 1024
    python benchmarks/memory.py --models cabvit_p_l0 --sizes 1024 2048
"""
import argparse
import json
import subprocess
import sys
from typing import Dict, List, Optional, Sequence

from bench_utils import markdown_table

CHILD = r'''
import json, sys, timm, torch
import timm_cabvit  # noqa: F401

def rss(field):
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))

def held(model):
    return sum(t.untyped_storage().nbytes() for t in {**model.state_dict(keep_vars=True),
               **{f'{m}.{n}': v for m, mod in model.named_modules() for n, v in vars(mod).items()
                  if isinstance(v, torch.Tensor)}}.values())

name, size, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
kwargs = dict(dynamic_img_size=True) if name.startswith('cabvit') else {}
model = timm.create_model(name, **kwargs).eval()
x = torch.randn(1, 3, size, size)
weights, before = sum(p.numel() * p.element_size() for p in model.parameters()), held(model)
with open('/proc/self/clear_refs', 'w') as f:
    f.write('5')  # resets the peak resident set size (VmHWM) to the current one
base = rss('VmRSS:')
with torch.inference_mode():
    model(x)
print(json.dumps(dict(weights=weights, input=x.numel() * 4, peak=rss('VmHWM:') - base, kept=held(model) - before)))
'''


def measure(name: str, size: int, threads: int) -> Dict[str, int]:
    result = subprocess.run([sys.executable, '-c', CHILD, name, str(size), str(threads)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f'{name} at {size}x{size} failed:\n{result.stderr[-2000:]}')
    return json.loads(result.stdout.strip().splitlines()[-1])


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=['cabvit_h_l2', 'convnext_tiny'], metavar='NAME')
    parser.add_argument('--sizes', nargs='+', type=int, default=[512, 1024], metavar='N', help='square input sizes')
    parser.add_argument('--threads', type=int, default=2, help='torch threads (default: %(default)s)')
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    rows: List[List[str]] = []
    for name in args.models:
        for size in args.sizes:
            r = measure(name, size, args.threads)
            mb = lambda n: f'{n / 2 ** 20:,.0f}'  # noqa: E731
            rows.append([name, f'{size}x{size}', mb(r['weights']), mb(r['input']), mb(r['peak']), mb(r['kept'])])
            print(f'  {name} {size}: {r}', file=sys.stderr, flush=True)
    print(markdown_table(['model', 'input', 'weights MB', 'input MB', 'peak beyond them MB', 'kept MB'], rows,
                         right=[False, False, True, True, True, True]))


if __name__ == '__main__':
    main()
