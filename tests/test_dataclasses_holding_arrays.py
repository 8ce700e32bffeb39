"""No object holding arrays or tensors is compared by value by accident.

A dataclass gets a field-by-field `__eq__` by default; on a numpy array or a torch tensor that
comparison raises ("the truth value of an array ... is ambiguous") or, worse, costs a full pass over
the data. `deque.remove(item)` and `list.index(item)` call it, and that is how the mic reader died
under overload (server/feed.py dropping a window). So every dataclass of the project that holds arrays
or tensors, directly or through another such dataclass, must be declared with `eq=False` (identity).
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import re
from collections import deque

import numpy as np
import pytest

ARRAY_TYPES = re.compile(r"\b(ndarray|Tensor|KV)\b")


def _project_dataclasses() -> dict[str, type]:
    found: dict[str, type] = {}
    for package in ("server", "liveavatar", "engines"):
        pkg = importlib.import_module(package)
        for info in pkgutil.walk_packages(pkg.__path__, prefix=f"{package}."):
            try:
                module = importlib.import_module(info.name)
            except ImportError:  # an optional backend (tensorrt) that is not installed here
                continue
            for obj in vars(module).values():
                if dataclasses.is_dataclass(obj) and isinstance(obj, type) and obj.__module__ == module.__name__:
                    found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return found


def _holding_arrays(classes: dict[str, type]) -> set[type]:
    """Dataclasses whose field annotations name an array type, or another such dataclass (fixpoint)."""
    holding: set[type] = set()
    changed = True
    while changed:
        changed = False
        names = "|".join(re.escape(c.__name__) for c in holding) or "(?!)"
        pattern = re.compile(rf"\b({names})\b")
        for cls in classes.values():
            if cls in holding:
                continue
            for f in dataclasses.fields(cls):
                text = f.type if isinstance(f.type, str) else repr(f.type)
                if ARRAY_TYPES.search(text) or pattern.search(text):
                    holding.add(cls)
                    changed = True
                    break
    return holding


def test_every_dataclass_that_holds_arrays_compares_by_identity():
    classes = _project_dataclasses()
    holding = _holding_arrays(classes)
    assert len(holding) >= 10, "the scan found too few array-holding dataclasses: it is broken"
    by_value = sorted(f"{c.__module__}.{c.__qualname__}" for c in holding if c.__eq__ is not object.__eq__)
    assert not by_value, f"declare these with @dataclass(eq=False): {by_value}"


@pytest.mark.parametrize("position", [0, 1, 2])
def test_a_queued_window_is_removed_by_identity_wherever_it_sits(position):
    from liveavatar.generator import AudioWindow
    from server.feed import WindowItem

    items = deque(WindowItem(AudioWindow(np.zeros(7680, np.float32), index=i), i * 7680, 0, None, []) for i in range(3))
    target = items[position]
    items.remove(target)
    assert target not in items and len(items) == 2
