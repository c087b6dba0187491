"""CabViT vision transformers as timm models: importing this package registers them with timm.

An older timm than TIMM_MINIMUM is refused with an ImportError that names both versions, before any model
registers (the start-up hook, timm_cabvit_autoload.py, turns it into one warning).
"""
__version__ = '0.1.0'

# The oldest timm the package works with; setup.cfg's install_requires says the same (a test checks) and why.
TIMM_MINIMUM = '1.0.29'


def _check_timm_version() -> None:
    import os
    from importlib.metadata import PackageNotFoundError, version

    import timm
    from packaging.version import Version

    if Version(timm.__version__) >= Version(TIMM_MINIMUM):
        return
    message = (f'timm-cabvit {__version__} needs timm>={TIMM_MINIMUM}, but the timm imported is {timm.__version__} '
               f'(from {os.path.dirname(timm.__file__)})')
    try:
        installed = version('timm')
    except PackageNotFoundError:
        installed = None
    if installed is not None and installed != timm.__version__:
        message += (f'; it shadows the installed timm {installed}, as the timm/ of a checkout of timm\'s repository '
                    f'does for its scripts: update that copy to timm>={TIMM_MINIMUM}')
    else:
        message += f'; upgrade it: pip install -U "timm>={TIMM_MINIMUM}"'
    raise ImportError(message, name='timm')


_check_timm_version()

from .cabvit import (  # noqa: E402  (after the version check: nothing registers with a timm too old)
    CabViT,
    CabViTBlock,
    CabViTPlain,
    cabvit_h_l1,
    cabvit_h_l2,
    cabvit_h_l3,
    cabvit_p_l0,
)

__all__ = [
    'CabViT', 'CabViTBlock', 'CabViTPlain', 'MissingExtraError', 'TIMM_MINIMUM', '__version__',
    'cabvit_h_l1', 'cabvit_h_l2', 'cabvit_h_l3', 'cabvit_p_l0', 'import_extra', 'import_tme_triton',
]


class MissingExtraError(ImportError):
    """A tool's dependency that the package's core does not install; the message names the extra that does."""


def import_extra(module: str, extra: str, purpose: str):
    """`module`, imported, or a MissingExtraError saying that `purpose` needs it and which extra installs it.

    The models need torch and timm only; the tools' heavier dependencies (fvcore for FLOP counts, matplotlib for
    figures, onnx for exports) come with extras, so that `timm.create_model` pulls in nothing more.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtraError(
            f'{purpose} needs {module.split(".")[0]}, which is not installed: pip install "timm-cabvit[{extra}]"',
            name=module) from e


def import_tme_triton():
    """The fused TME module, `timm_cabvit.tme_triton`, its kernels defined for Triton's interpreter without a GPU.

    Triton fixes whether a kernel is interpreted when the module defining it is imported: with TRITON_INTERPRET=1
    then, the kernels run on CPU tensors. Without CUDA this imports the module with that variable set for the import
    only; a module already imported is returned as it is. Models import it themselves, on their first fused forward.
    """
    import importlib
    import os
    import sys

    import torch

    name = f'{__name__}.tme_triton'
    if torch.cuda.is_available() or name in sys.modules:
        return importlib.import_module(name)
    previous = os.environ.get('TRITON_INTERPRET')
    os.environ['TRITON_INTERPRET'] = '1'
    try:
        return importlib.import_module(name)
    finally:
        if previous is None:
            del os.environ['TRITON_INTERPRET']
        else:
            os.environ['TRITON_INTERPRET'] = previous
