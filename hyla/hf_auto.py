"""Registers the hybrid with transformers' Auto classes as soon as those classes load.

`import hyla` stays light (no torch, no transformers): `install()` waits for transformers'
`configuration_auto` and `modeling_auto` modules and, right after each has executed, calls the
matching function of `hyla.runtime.registry`. So `import hyla` followed by
`AutoModelForCausalLM.from_pretrained(converted_dir)` works, whichever was imported first.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import ModuleType

HOOKS = {
    "transformers.models.auto.configuration_auto": "register_config",
    "transformers.models.auto.modeling_auto": "register_model",
}


def _register(module_name: str) -> None:
    registry = importlib.import_module("hyla.runtime.registry")
    getattr(registry, HOOKS[module_name])()


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds a `HOOKS` module through the other finders and registers once it has executed."""

    def __init__(self, pending: set[str]) -> None:
        self.pending = pending

    def find_spec(
        self, fullname: str, path: object, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.pending:
            return None
        self.pending.discard(fullname)
        if not self.pending:
            sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)  # type: ignore[arg-type]
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module: ModuleType) -> None:
            exec_module(module)
            _register(fullname)

        spec.loader.exec_module = exec_then_register  # type: ignore[method-assign]
        return spec


def install() -> None:
    """Register with the Auto modules already loaded; hook the others (once per process)."""
    if any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        return
    for name in HOOKS:
        if name in sys.modules:
            _register(name)
    pending = {name for name in HOOKS if name not in sys.modules}
    if pending:
        sys.meta_path.insert(0, _RegisterAfterImport(pending))
