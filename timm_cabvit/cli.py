"""The `timm-cabvit` command line, kept importable here: it lives in `timm_cabvit_cli`, outside this package,
because importing `timm_cabvit` imports timm and torch, which `--help` and usage errors should not wait for."""
import sys

from timm_cabvit_cli import CommandError, UsageError, build_parser, main, recipe_path

__all__ = ['CommandError', 'UsageError', 'build_parser', 'main', 'recipe_path']

if __name__ == '__main__':
    sys.exit(main())
