"""Optional packages, imported only by the commands that need them.

The core (every rule, ``check`` and ``audit``) needs jax, jaxlib, optax and numpy only; plotting,
progress bars, the digits data set, notebooks and the PyTorch peer come with the extras named in
``pyproject.toml``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from manualgrad.errors import MissingExtraError


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """``module`` imported, or a :class:`MissingExtraError` saying which extra installs it, e.g.
    ``plotting the curves needs matplotlib: pip install 'manualgrad[train]'``."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        if error.name is None or error.name.split(".")[0] != module.split(".")[0]:
            raise  # the package is there but broken: its own error says more than ours would
        top = module.split(".")[0]
        raise MissingExtraError(f"{purpose} needs {top}: pip install 'manualgrad[{extra}]'") from None
