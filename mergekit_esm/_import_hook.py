"""Plug ESM into stock mergekit without importing torch at interpreter start.

mergekit has no plugin discovery. The `mergekit_esm.pth` file in site-packages imports this
module (stdlib only) at start-up; it adds a meta-path finder that waits for two mergekit
modules and, right after each has executed:
  - mergekit.merge_methods.registry → registers `merge_method: esm`;
  - mergekit.merge → wraps run_merge with ESM's preflight, pre-pass and staged output
    (the only place that sees the recipe and the output path before tensors are written).
`mergekit-yaml` binds run_merge with `from mergekit.merge import run_merge`, which runs
after mergekit.merge has executed, so it gets the wrapped function.
"""

import importlib.abc
import importlib.util
import sys


def _on_registry(module) -> None:
    from mergekit_esm.integration.registration import register_methods

    register_methods(module)


def _on_merge(module) -> None:
    from mergekit_esm.integration.run import wrap_run_merge

    if not getattr(module.run_merge, "__wrapped_by_esm__", False):
        module.run_merge = wrap_run_merge(module.run_merge)


_CALLBACKS = {"mergekit.merge_methods.registry": _on_registry, "mergekit.merge": _on_merge}


class _Loader(importlib.abc.Loader):
    def __init__(self, loader, callback):
        self._loader, self._callback = loader, callback

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._callback(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        callback = _CALLBACKS.get(fullname)
        if callback is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader, callback)
                return spec
        return None


def install() -> None:
    """Idempotent; also applies the callbacks to modules that were imported already."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
    for name, callback in _CALLBACKS.items():
        if name in sys.modules:
            callback(sys.modules[name])


install()
