"""Packages whose public names are imported on first use, so that importing one light
submodule (a config) does not import torch."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any


def lazy_exports(package: str, submodules: Sequence[str], names: Sequence[str]
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A package's ``__getattr__`` and ``__dir__`` for names defined in its submodules.

    Parameters
    ----------
    package
        The package's ``__name__``.
    submodules
        Its submodules, searched in order for a name.
    names
        The public names (the package's ``__all__``).
    """
    namespace = vars(importlib.import_module(package))

    def get_attribute(name: str) -> Any:
        if name in names:
            for module in submodules:
                found = vars(importlib.import_module(f"{package}.{module}"))
                if name in found:
                    namespace[name] = found[name]
                    return found[name]
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def list_names() -> list[str]:
        return sorted(set(namespace) | set(names))

    return get_attribute, list_names
