"""The judge: runs the test snippets in a process of its own, against handles on the program in the worker.

The program under test runs in the worker process; the tests, and so the expected values, never enter it.
A test runs here, in a namespace whose free names (those neither builtins nor set by the tests) are looked
up in the program: a function comes back as a :class:`Remote`, and calling it sends the arguments to the
worker and brings back the result as plain data (``sandbox_wire``). So ``assert add(2, 3) == 5`` asks the
worker for ``add(2, 3)`` and compares the ``int`` it answers with ``5`` here, with the builtin ``==``; the
worker never learns the 5, and cannot answer with an object whose ``__eq__`` it wrote. What the program can
still do is compute the right value. Design and residual risk: docs/sandbox.md.

Standard library only: the harness (``sandbox_child.py``, run under ``python -I``) imports it as a
top-level module.
"""

from __future__ import annotations

import builtins
import importlib
import sys
from collections.abc import Callable, Sequence

try:
    from . import sandbox_wire as wire
except ImportError:  # imported by the harness, as a top-level module
    import sandbox_wire as wire  # type: ignore[no-redef]

# Stdlib modules the judge will not import for a program that claims to hold them (side effects on import).
_NO_IMPORT = frozenset({"__main__", "antigravity", "this", "idlelib", "turtledemo", "tkinter", "turtle"})


class ProgramEnded(BaseException):
    """The worker is gone (exited, killed, broke the protocol). A ``BaseException``, so that a test's
    ``except Exception`` does not swallow it; the test fails anyway, and so do those after it."""


class SolutionError(Exception):
    """An exception the program raised whose type is not a builtin one, or an answer that is not plain data."""


def judge(
    channel: wire.Channel, tests: Sequence[str], send: Callable[..., None], describe: Callable, cap: int
) -> None:
    """Load the program in the worker, run each test here, and report each verdict with ``send``."""
    try:
        hello = channel.recv()  # written by the worker's harness before the program runs
    except wire.ChannelClosed:
        send("solution", "exited")
        return
    layers = hello.get("layers")
    if type(layers) is list:
        send("worker", ",".join(x for x in layers if type(x) is str))
    try:
        channel.send({"op": "load"})
        status = channel.recv()
    except wire.ChannelClosed:
        send("solution", "exited")
        return
    if status.get("ok") is not True:
        send("solution", "error " + str(status.get("error") or "the program did not load")[:cap])
        return
    send("solution", "ok")
    rpc = _Rpc(channel)
    names = _Names(rpc)
    for index, test in enumerate(tests):
        try:
            exec(compile(test, f"<test {index}>", "exec"), names)
            rpc.ping()  # a test passes beside a program that still runs (and whose end a test did not catch)
        except ProgramEnded:
            verdict = "fail the program's process ended"
        except BaseException as exc:  # SystemExit and KeyboardInterrupt included
            verdict = "fail " + describe(exc)
        else:
            verdict = "pass"
        send("test", f"{index} {verdict}")
        if rpc.ended is not None:
            return  # the tests after it fail (no record)


class _Rpc:
    """The judge's end of the conversation; every value it returns is plain data or a :class:`Remote`."""

    def __init__(self, channel: wire.Channel) -> None:
        self.channel = channel
        self.ended: str | None = None

    def ask(self, message: dict) -> dict:
        if self.ended is not None:
            raise ProgramEnded(self.ended)
        try:
            self.channel.send(message)
            return self.channel.recv()
        except wire.ChannelClosed as exc:
            self.ended = str(exc)
            raise ProgramEnded(self.ended) from None

    def value(self, reply: dict) -> object:
        if "x" in reply:
            raise _remote_exception(reply["x"])
        if "v" not in reply:
            raise SolutionError("the program answered out of protocol")
        try:
            return wire.decode(reply["v"], self._handle)
        except (ValueError, TypeError, RecursionError, OverflowError, MemoryError) as exc:
            raise SolutionError(f"the program's answer is not plain data ({exc})") from None

    def ping(self) -> None:
        if self.ask({"op": "ping"}).get("v", 0) is not None:
            raise SolutionError("the program answered out of protocol")

    def request(self, op: str, target: Remote, **fields: object) -> object:
        return self.value(self.ask({"op": op, "h": target._ref, **fields}))

    def encode(self, value: object) -> object:
        return wire.encode(value, self._reference)

    def call(self, target: Remote, args: tuple, kwargs: dict) -> object:
        message = {"op": "call", "h": target._ref, "a": self.encode(list(args)), "k": self.encode(kwargs)}
        reply = self.ask(message)
        result = self.value(reply)
        changed = reply.get("changed")
        for slot, data in changed if type(changed) is list else ():
            original = args[slot] if type(slot) is int and 0 <= slot < len(args) else kwargs.get(slot)
            _update_in_place(original, self.value({"v": data}))
        return result

    def name(self, name: str) -> object:
        reply = self.ask({"op": "name", "name": name})
        if reply.get("missing"):
            raise KeyError(name)
        if "module" in reply:
            return _stdlib_module(name, reply["module"])
        return self.value(reply)

    def _handle(self, ref: dict) -> Remote:
        if type(ref.get("h")) is not int:
            raise ValueError("a malformed handle")
        return Remote(self, ref["h"], str(ref.get("r", "object"))[:100])

    def _reference(self, value: object) -> dict:
        if isinstance(value, Remote) and value._rpc is self:
            return {"h": value._ref}
        raise TypeError(f"a {type(value).__name__} cannot be passed to the solution (plain data only)")


class Remote:
    """An object of the program, held by the worker: calls, attributes, items, iteration, ``len``,
    ``bool``, ``str``, ``int``, ``float`` are asked of the worker, and answer plain data or more handles.

    Comparisons are not forwarded: a handle equals only itself. An object of the program cannot decide
    here whether it equals the expected value.
    """

    __slots__ = ("_rpc", "_ref", "_type")

    def __init__(self, rpc: _Rpc, ref: int, type_name: str) -> None:
        object.__setattr__(self, "_rpc", rpc)
        object.__setattr__(self, "_ref", ref)
        object.__setattr__(self, "_type", type_name)

    def _ask(self, op: str, **fields: object) -> object:
        return self._rpc.request(op, self, **fields)

    def __call__(self, *args: object, **kwargs: object) -> object:
        return self._rpc.call(self, args, kwargs)

    def __getattr__(self, name: str) -> object:
        if name.startswith("__") and name.endswith("__"):  # protocol probes (copy, pickle, ...) stay here
            raise AttributeError(name)
        return self._ask("getattr", name=name)

    def __setattr__(self, name: str, value: object) -> None:
        self._ask("setattr", name=name, value=self._rpc.encode(value))

    def __getitem__(self, key: object) -> object:
        return self._ask("getitem", key=self._rpc.encode(key))

    def __setitem__(self, key: object, value: object) -> None:
        self._ask("setitem", key=self._rpc.encode(key), value=self._rpc.encode(value))

    def __delitem__(self, key: object) -> None:
        self._ask("delitem", key=self._rpc.encode(key))

    def __iter__(self):  # noqa: ANN204
        iterator = self._ask("iter")
        return iterator if isinstance(iterator, Remote) else iter(iterator)  # type: ignore[call-overload]

    def __next__(self) -> object:
        reply = self._rpc.ask({"op": "next", "h": self._ref})
        if reply.get("stop") is True:
            raise StopIteration
        return self._rpc.value(reply)

    def __len__(self) -> int:
        return self._ask("len")  # type: ignore[return-value]  (Python checks it is an int)

    def __bool__(self) -> bool:
        return self._ask("bool")  # type: ignore[return-value]

    def __str__(self) -> str:
        return self._ask("str")  # type: ignore[return-value]

    def __int__(self) -> int:
        return self._ask("int")  # type: ignore[return-value]

    def __float__(self) -> float:
        return self._ask("float")  # type: ignore[return-value]

    def __index__(self) -> int:
        return self._ask("index")  # type: ignore[return-value]

    def __repr__(self) -> str:
        return f"<{self._type} of the solution>"

    def __eq__(self, other: object) -> bool:
        return self is other

    def __ne__(self, other: object) -> bool:
        return self is not other

    __hash__ = object.__hash__


class _Names(dict):
    """The tests' globals: what a test does not set and is not a builtin is looked up in the program.

    Builtins come first, so a program that defines ``abs`` or ``sorted`` does not change what a test's
    ``abs(...)`` computes; a module the program imported is imported here instead (standard library only).
    """

    def __init__(self, rpc: _Rpc) -> None:
        super().__init__(__builtins__=builtins, __name__="tests")
        self._rpc = rpc
        self._builtin_names = frozenset(vars(builtins))

    def __missing__(self, name: str) -> object:
        if name in self._builtin_names or (name.startswith("__") and name.endswith("__")):
            raise KeyError(name)
        return self._rpc.name(name)


def _stdlib_module(name: str, module: object) -> object:
    """The judge's own copy of a module the program holds under ``name`` (``import math``, ``import os.path``,
    ``from os import path``); a program cannot hand the tests a module of its choosing under another name."""
    if type(module) is not str or module.partition(".")[0] not in sys.stdlib_module_names:
        raise SolutionError(f"the program holds a module that is not in the standard library: {module!r}")
    parts = module.split(".")
    if name not in (parts[0], parts[-1]) or parts[0] in _NO_IMPORT:
        raise SolutionError(f"the tests cannot use the module {module!r} as {name!r} through the program")
    return importlib.import_module(module)


def _remote_exception(info: object) -> BaseException:
    """The program's exception as the same builtin type where it is one (so ``except ValueError`` in a test
    works), else a :class:`SolutionError`; never a ``SystemExit`` or a ``StopIteration``."""
    name, message = (info + ["", ""])[:2] if type(info) is list else ("Exception", "")
    name, message = str(name)[:100], str(message)[:1000]
    cls = getattr(builtins, name, None)
    if isinstance(cls, type) and issubclass(cls, Exception) and not issubclass(cls, StopIteration):
        if not issubclass(cls, StopAsyncIteration):
            try:
                return cls(message) if message else cls()
            except Exception:  # a builtin exception with required arguments (UnicodeDecodeError)
                pass
    return SolutionError(f"{name}: {message}" if message else name)


def _update_in_place(original: object, new: object) -> None:
    """Give a mutable argument the state the program left it in (a copy crossed the wire)."""
    if type(original) is not type(new):
        return
    if isinstance(original, (list, bytearray)):
        original[:] = new  # type: ignore[index]
    elif isinstance(original, (dict, set)):
        original.clear()
        original.update(new)  # type: ignore[arg-type]
