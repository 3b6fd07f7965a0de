"""torch imported on first use, so that modules holding settings (the attacks are their own settings: PGD's
eps, BERT-Attack's top_k) can be imported by the CLI's --help and its value checks without loading torch.

``torch = lazy_module("torch")`` gives the module object at once and runs torch's import at the first attribute
read (the standard library's ``importlib.util.LazyLoader``); code that runs later sees the real torch. Module-level
uses would defeat it: decorate with :func:`no_grad` instead of ``@torch.no_grad()``, and keep ``torch.*`` out of
module-level expressions.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any


def lazy_module(name: str) -> ModuleType:
    """`name` as a module whose import runs on first attribute access (at once when it is already imported)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ImportError(f"no module named {name!r}")
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def no_grad(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``@torch.no_grad()`` without touching torch when the function is defined."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)

    return run
