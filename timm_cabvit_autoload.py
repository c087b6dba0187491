"""Register installed packages' timm models (entry point group `timm.models`) when timm is imported.

timm's scripts (train.py, validate.py, ...) and `hf-hub:` configs only ever import timm, and timm reads no
plugin entry points. `timm_cabvit_autoload.pth` imports this module at interpreter start; it imports neither
torch nor timm, and only puts a finder on `sys.meta_path` that waits for `import timm`. Once timm has loaded,
the modules named by the entry points are imported, which registers their models.
Set TIMM_CABVIT_AUTOLOAD=0 to switch it off.
"""
import os
import sys

ENTRY_POINT_GROUP = 'timm.models'


def register_entry_point_models() -> None:
    """Import each module named in the `timm.models` entry points; a broken one gives one warning, no error.

    A module that refuses the imported timm raises ImportError with `name='timm'` and a message that names the
    versions (timm_cabvit does so for a timm older than it supports): the warning is that message.
    """
    import importlib
    import warnings
    from importlib.metadata import entry_points

    modules = {ep.module: ep.dist.name if ep.dist else ep.module for ep in entry_points(group=ENTRY_POINT_GROUP)}
    for module, dist_name in modules.items():
        try:
            importlib.import_module(module)
        except Exception as e:
            if isinstance(e, ImportError) and e.name == 'timm':  # it refuses this timm; its message says why
                reason = f'{e} (or set TIMM_CABVIT_AUTOLOAD=0 to skip)'
            else:
                reason = f'import of {module} failed: {e!r}; reinstall it, or set TIMM_CABVIT_AUTOLOAD=0 to skip'
            warnings.warn(f'{dist_name}: could not register its timm models: {reason}', RuntimeWarning, stacklevel=2)


class _RegisterAfterExec:
    """Loader wrapper: run timm's own loader, then register the entry-point models."""

    def __init__(self, loader):
        self.loader = loader

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        _uninstall()
        self.loader.exec_module(module)
        register_entry_point_models()


class TimmImportFinder:
    """Meta path finder that only notices `import timm`, and steps aside once timm is being loaded.

    It stays on `sys.meta_path` through a mere `importlib.util.find_spec('timm')`, which libraries use to ask
    whether timm is installed (transformers does on import, before it imports timm): only loading timm removes it.
    """

    def __init__(self):
        self._finding = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != 'timm' or self._finding:
            return None
        from importlib.util import find_spec
        self._finding = True  # the spec the other finders give, without this one answering again
        try:
            spec = find_spec('timm')
        finally:
            self._finding = False
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisterAfterExec(spec.loader)
        return spec


def _uninstall() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, TimmImportFinder)]


def install() -> None:
    if os.environ.get('TIMM_CABVIT_AUTOLOAD', '1') == '0' or 'timm' in sys.modules:
        return
    if not any(isinstance(f, TimmImportFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, TimmImportFinder())
