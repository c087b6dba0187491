"""A fresh virtual environment with this repository installed into it (as a wheel or editable).

torch and timm come from the test runner's environment through a plain path entry, which is not a site
directory, so none of the runner's own .pth start-up hooks run there; the environment's own ones (this
package's timm_cabvit_autoload.pth) do.
"""
import os
import site
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class FreshEnv:
    """A virtual environment with the package installed, running Python in subprocesses."""

    def __init__(self, root: Path, editable: bool):
        subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(root)], check=True)
        self.root = root
        self.python = str(root / 'bin' / 'python')
        self.purelib = Path(self.run('import sysconfig; print(sysconfig.get_paths()["purelib"])').stdout.strip())
        (self.purelib / '_test_runner_site.pth').write_text('\n'.join(site.getsitepackages()) + '\n')
        self.run_argv(['-m', 'pip', 'install', '--quiet', '--no-deps', '--no-build-isolation',
                       *(['-e'] if editable else []), str(REPO)])

    def run(self, code: str, env: dict = None, check: bool = True, args=(), cwd=None) -> subprocess.CompletedProcess:
        """`python *args -c code` in the environment's root (or `cwd`), without the caller's TIMM_CABVIT* variables
        and PYTHONPATH (a checkout on it would shadow the package installed here; `env` may set one)."""
        return self.run_argv([*args, '-c', code], env=env, check=check, cwd=cwd)

    def run_argv(self, argv, env: dict = None, check: bool = True, cwd=None) -> subprocess.CompletedProcess:
        environ = {k: v for k, v in os.environ.items() if not k.startswith('TIMM_CABVIT') and k != 'PYTHONPATH'}
        result = subprocess.run(
            [self.python, *argv], capture_output=True, text=True, env={**environ, **(env or {})},
            cwd=cwd or self.root)
        if check and result.returncode:
            raise AssertionError(f'subprocess failed ({result.returncode}):\n{result.stderr[-3000:]}')
        return result
