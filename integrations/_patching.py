"""Reversible attribute patches for the framework adapters, applied when the target module loads.

The adapters patch framework classes inside Ray worker processes through Ray's
``worker_process_setup_hook``, which runs in every worker. Importing the framework's training
modules there would drag heavy imports (DeepSpeed, FSDP engines) into rollout workers that
never use them, so a patch waits until its module is imported by the framework itself.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import ModuleType

_ABSENT = object()


class Patches:
    """Attribute (and registry entry) replacements that :meth:`undo` restores, in reverse order."""

    def __init__(self) -> None:
        self._originals: list[tuple[object, str, object]] = []
        self._pending: dict[str, list[Callable[[ModuleType], None]]] = {}
        self._finder: _PatchOnImport | None = None

    @property
    def active(self) -> bool:
        """Whether any patch is applied or waiting for its module."""
        return bool(self._originals or self._pending)

    def set(self, owner: object, name: str, value: object) -> None:
        """``setattr(owner, name, value)``; an inherited attribute is restored by deletion."""
        self._originals.append((owner, name, vars(owner).get(name, _ABSENT)))
        setattr(owner, name, value)

    def track_item(self, mapping: dict, key: object) -> None:
        """Remember ``mapping[key]`` (or its absence) for :meth:`undo`; the caller then sets it."""
        self._originals.append((mapping, key, mapping.get(key, _ABSENT)))

    def on_import(self, module_name: str, apply: Callable[[ModuleType], None]) -> None:
        """Run ``apply(module)`` now if ``module_name`` is loaded, else right after it loads."""
        module = sys.modules.get(module_name)
        if module is not None:
            apply(module)
            return
        self._pending.setdefault(module_name, []).append(apply)
        if self._finder is None:
            self._finder = _PatchOnImport(self._pending)
            sys.meta_path.insert(0, self._finder)

    def undo(self) -> None:
        if self._finder is not None:
            sys.meta_path.remove(self._finder)
            self._finder = None
        self._pending.clear()
        while self._originals:
            owner, name, original = self._originals.pop()
            if isinstance(owner, dict):
                if original is _ABSENT:
                    owner.pop(name, None)
                else:
                    owner[name] = original
            elif original is _ABSENT:
                delattr(owner, name)
            else:
                setattr(owner, name, original)


class _PatchOnImport:
    """Meta-path finder that lets the other finders locate a module, then wraps its loader so
    the pending patches run once the module body has executed."""

    def __init__(self, pending: dict[str, list[Callable[[ModuleType], None]]]) -> None:
        self._pending = pending

    def find_spec(self, fullname, path, target=None):
        if fullname not in self._pending:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        load = spec.loader.exec_module
        pending = self._pending

        def exec_module(module: ModuleType) -> None:
            load(module)
            for apply in pending.pop(fullname, []):
                apply(module)

        # Loaders such as SourceFileLoader are created per module: shadowing the bound method
        # on this instance touches no other module.
        spec.loader.exec_module = exec_module
        return spec
