"""Steps that happen whole or not at all: an undo log of what a step changed.

A step (``schedule()`` or ``commit()``) runs inside :meth:`UndoLog.step`. Before a part
first changes a host object in place during the step it calls :meth:`UndoLog.save` on it
(the object's attributes are kept, containers copied one level deep but for those its
class names in ``UNDO_BY_REFERENCE``, which it only ever replaces); device state it
changes in place it registers a restoring function for with :meth:`UndoLog.on_undo`. If the
step raises, every function runs, latest first, then every saved object gets its attributes
back, and the exception goes on: pools, tree, table and queues are as they were before the
step. Outside a step both calls do nothing, so parts used on their own pay nothing.

Parts record only what the rest of the system can observe: a step also writes into places
nobody reads until it completes (``req_to_token`` past a row's allocated length, a free
page's KV, a free row's token ids), and those need no undo.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import numpy as np

_CONTAINERS = (list, dict, set, deque, np.ndarray)


def _copy(value: object) -> object:
    if isinstance(value, _CONTAINERS):
        return value.copy()
    return value


def _put_back(value: object, copy: object) -> None:
    """Give the container ``value`` the contents of ``copy`` in place (keeping its identity:
    other parts may hold it)."""
    if copy is value:
        return
    if isinstance(value, np.ndarray):
        value[...] = copy
    elif isinstance(value, (list, deque)):
        value.clear()
        value.extend(copy)
    else:
        value.clear()
        value.update(copy)


class UndoLog:
    """What the running step changed, to put back if it fails (see the module doc)."""

    def __init__(self) -> None:
        self._saved: dict[int, tuple[object, dict[str, tuple[object, object]]]] | None = None
        self._undo: list[Callable[[], None]] = []
        self.steps = 0  # steps begun: tells parts apart what the running step did

    @property
    def active(self) -> bool:
        """Whether a step is running (changes are being recorded)."""
        return self._saved is not None

    def save(self, obj: object, *fields: str) -> None:
        """Keep ``obj``'s ``fields`` (default: every attribute; a container: its contents) as
        they are now, unless this step saved them already; call it before changing any of
        them in place."""
        saved = self._saved
        if saved is None:
            return
        kept = saved.get(id(obj))
        if kept is None:
            kept = (obj, {})
            saved[id(obj)] = kept
        values = kept[1]
        if isinstance(obj, _CONTAINERS):
            if "" not in values:
                values[""] = (obj, _copy(obj))
            return
        by_reference = getattr(obj, "UNDO_BY_REFERENCE", ())
        for name in fields or _fields(obj):
            if name not in values:
                value = getattr(obj, name)
                values[name] = (value, value if name in by_reference else _copy(value))

    def saved_value(self, obj: object, name: str) -> object:
        """``obj.name`` as the running step found it (saved by :meth:`save` or unchanged)."""
        kept = None if self._saved is None else self._saved.get(id(obj))
        if kept is not None and name in kept[1]:
            return kept[1][name][1]
        return getattr(obj, name)

    def on_undo(self, restore: Callable[[], None]) -> None:
        """Run ``restore`` if the step fails (after the functions registered later)."""
        if self._saved is not None:
            self._undo.append(restore)

    @contextmanager
    def step(self) -> Iterator[None]:
        """Run the body as one step: on an exception, undo everything it changed."""
        if self._saved is not None:
            raise RuntimeError("a step is already running")
        self._saved = {}
        self.steps += 1
        try:
            yield
        except BaseException:
            self._rollback()
            raise
        finally:
            self._saved = None
            self._undo = []

    def _rollback(self) -> None:
        undo, saved = self._undo, self._saved
        self._saved = None  # what the functions change is not recorded again
        for restore in reversed(undo):
            restore()
        for obj, values in saved.values():
            for name, (value, copy) in values.items():
                if name:
                    setattr(obj, name, value)
                _put_back(value, copy)


_SLOTS: dict[type, tuple[str, ...]] = {}


def _fields(obj: object) -> Iterable[str]:
    if hasattr(obj, "__dict__"):
        return list(vars(obj))
    slots = _SLOTS.get(type(obj))
    if slots is None:
        names = [n for cls in type(obj).__mro__ for n in getattr(cls, "__slots__", ())]
        slots = _SLOTS[type(obj)] = tuple(names)
    return slots
