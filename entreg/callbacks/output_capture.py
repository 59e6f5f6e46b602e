"""Read a tensor that a named submodule produces, without changing the model's code."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from entreg.nn.select import OutputKey, select_output

__all__ = ["OutputCapture", "OutputKey", "find_submodule", "select_output"]


def find_submodule(root: nn.Module, name: str | None) -> nn.Module:
    """``root.get_submodule(name)`` (``root`` itself for ``None`` or ``""``) with an error that lists close names."""
    if not name:
        return root
    try:
        return root.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in root.named_modules() if n]
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
        hint = f"; did you mean {close}?" if close else f"; it has {names[:20]}"
        raise AttributeError(f"{type(root).__name__} has no submodule {name!r}{hint}") from None


class OutputCapture:
    """A forward hook on a named submodule that hands the (detached) output of its first call in
    each batch to ``on_output``. :meth:`bind` finds the submodule once; the hook is attached only
    between :meth:`attach` and :meth:`detach`, so batches nobody monitors pay nothing.

    Args:
        module: dotted submodule name (``"backbone.fc"``); ``None`` hooks the root module itself.
        key: entry of a dict/tuple/object output holding the tensor (see :func:`select_output`).
        on_output: called with the selected tensor, detached.

    Example:
        >>> import torch
        >>> seen = []
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
        >>> capture = OutputCapture("0", None, seen.append)
        >>> capture.bind(net)
        >>> capture.attach()
        >>> _ = net(torch.ones(2, 3)); _ = net(torch.ones(5, 3))  # only the first call counts
        >>> capture.detach()
        >>> [t.shape for t in seen], capture.calls
        ([torch.Size([2, 4])], 2)
    """

    def __init__(self, module: str | None, key: OutputKey, on_output: Callable[[Tensor], None]) -> None:
        self.module, self.key, self.on_output = module, key, on_output
        self.calls = 0
        self._target: nn.Module | None = None
        self._handle: RemovableHandle | None = None
        self._where = f"module {module!r}" if module else "the module's forward"

    def bind(self, root: nn.Module) -> None:
        """Find the submodule of ``root`` to hook (an unknown name raises here, with close names)."""
        self.detach()
        self._target = find_submodule(root, self.module)

    def attach(self) -> None:
        """Hook the bound submodule; the next forward call is captured."""
        if self._target is None:
            raise RuntimeError("OutputCapture.bind(root) must be called before attach()")
        self.detach()
        self.calls = 0
        self._handle = self._target.register_forward_hook(self._hook)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        self.calls += 1
        if self.calls == 1:
            self.on_output(select_output(output, self.key, self._where).detach())
