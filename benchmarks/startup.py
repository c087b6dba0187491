"""Start-up cost of the auto-registration hook: `python -X importtime -c pass`, median of repeated runs.

Prints the import time of timm_cabvit_autoload (the only module the .pth adds) and the interpreter's
total wall time with the hook on and off (TIMM_CABVIT_AUTOLOAD=0), side by side.
"""
import argparse
import os
import statistics
import subprocess
import sys
import time


def importtime_us(env: dict) -> int:
    """Cumulative microseconds of timm_cabvit_autoload in one `-X importtime` run (0 when not imported)."""
    err = subprocess.run([sys.executable, '-X', 'importtime', '-c', 'pass'], capture_output=True, text=True,
                         env=env).stderr
    for line in err.splitlines():
        if line.rstrip().endswith(' timm_cabvit_autoload'):
            return int(line.split('|')[1])
    return 0


def wall_ms(env: dict) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, '-c', 'pass'], check=True, env=env)
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--runs', type=int, default=30, help='runs per setting (default: %(default)s)')
    args = parser.parse_args()
    on = {**os.environ, 'TIMM_CABVIT_AUTOLOAD': '1'}
    off = {**os.environ, 'TIMM_CABVIT_AUTOLOAD': '0'}
    hook = statistics.median(importtime_us(on) for _ in range(args.runs))
    if not hook:
        sys.exit('timm_cabvit_autoload was not imported at start-up: is the package installed (pip install .)?')
    wall_on = statistics.median(wall_ms(on) for _ in range(args.runs))
    wall_off = statistics.median(wall_ms(off) for _ in range(args.runs))
    print(f'{"":<28}{"median":>10}')
    print(f'{"hook import (importtime)":<28}{hook / 1e3:>8.2f} ms')
    print(f'{"python -c pass, hook on":<28}{wall_on:>8.1f} ms')
    print(f'{"python -c pass, hook off":<28}{wall_off:>8.1f} ms')


if __name__ == '__main__':
    main()
