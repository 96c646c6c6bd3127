"""The wire between the sandbox's judge and worker: framing, the plain-data codec, and the worker's server.

The worker process runs the untrusted program; the judge process runs the tests and decides each verdict.
They talk over two pipes in length-prefixed JSON frames, the judge asking (look up a name, call a handle,
get an attribute, iterate, ...) and the worker answering with a value. Values cross as plain data only
(None, bool, int, float, complex, str, bytes, bytearray, list, tuple, dict, set, frozenset), rebuilt on the
judge's side as the builtin types themselves, so an equality the judge evaluates is the builtin one; any
other object stays in the worker and the judge gets a handle to it. Design and threat model:
docs/sandbox.md.

Standard library only: the harness (``sandbox_child.py``, run under ``python -I``) imports it as a
top-level module.
"""

from __future__ import annotations

import json
import operator
import os
import struct
from collections.abc import Callable

FRAME_CAP = 8 << 20  # bytes of one frame; a bigger one ends the conversation
_HEADER = struct.Struct(">I")
_MAX_DEPTH = 200  # nesting of a value
_EXACT_INT = 1 << 53  # ints beyond travel as hex (linear time, and not subject to int_max_str_digits)
_PLAIN_BASES = (int, float, complex, str, bytes, bytearray, tuple, list, dict, set, frozenset)


class ChannelClosed(Exception):
    """The other side closed its end, sent a malformed frame, or a frame over :data:`FRAME_CAP`."""


class Channel:
    """Length-prefixed JSON frames over a pair of pipe descriptors."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self.read_fd, self.write_fd = read_fd, write_fd

    def send(self, message: dict) -> None:
        data = json.dumps(message, separators=(",", ":")).encode("utf-8", "surrogatepass")
        if len(data) > FRAME_CAP:
            raise ValueError(f"a message of {len(data)} bytes (at most {FRAME_CAP})")
        view = memoryview(_HEADER.pack(len(data)) + data)
        try:
            while view:
                view = view[os.write(self.write_fd, view) :]
        except OSError as exc:  # EPIPE: the other side is gone
            raise ChannelClosed(str(exc)) from None

    def recv(self) -> dict:
        (size,) = _HEADER.unpack(self._read_exactly(_HEADER.size))
        if size > FRAME_CAP:
            raise ChannelClosed(f"a frame of {size} bytes (at most {FRAME_CAP})")
        try:
            message = json.loads(self._read_exactly(size).decode("utf-8", "surrogatepass"))
        except (ValueError, RecursionError) as exc:
            raise ChannelClosed(f"a malformed frame ({type(exc).__name__})") from None
        if type(message) is not dict:
            raise ChannelClosed("a frame that is not an object")
        return message

    def _read_exactly(self, size: int) -> bytes:
        chunks, left = [], size
        while left:
            try:
                chunk = os.read(self.read_fd, min(left, 1 << 20))
            except OSError as exc:
                raise ChannelClosed(str(exc)) from None
            if not chunk:
                raise ChannelClosed("end of stream")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)


def encode(value: object, other: Callable[[object], dict], depth: int = 0) -> object:
    """``value`` as JSON-ready plain data; ``other(obj)`` encodes what is not plain data (a handle).

    Subclasses of the plain types (a namedtuple, an ``OrderedDict``, an ``IntEnum``) travel as their base
    type, so the receiver never holds an object whose methods the sender wrote.
    """
    kind = type(value)
    if value is None or kind is bool or kind is str:
        return value
    if kind is int:
        return value if -_EXACT_INT < value < _EXACT_INT else {"i": hex(value)}
    if kind is float:
        return value
    if depth > _MAX_DEPTH:
        raise ValueError(f"a value nested deeper than {_MAX_DEPTH}")
    down = depth + 1
    if kind is list:
        return [encode(x, other, down) for x in value]
    if kind is tuple:
        return {"t": [encode(x, other, down) for x in value]}
    if kind is dict:
        return {"d": [[encode(k, other, down), encode(v, other, down)] for k, v in value.items()]}
    if kind is set or kind is frozenset:
        return {"s" if kind is set else "f": [encode(x, other, down) for x in value]}
    if kind is bytes or kind is bytearray:
        return {"b" if kind is bytes else "ba": value.hex()}
    if kind is complex:
        return {"c": [value.real, value.imag]}
    for base in _PLAIN_BASES:
        if isinstance(value, base):
            return encode(str.__str__(value) if base is str else base(value), other, depth)
    return other(value)


def decode(data: object, handle: Callable[[dict], object], depth: int = 0) -> object:
    """The value :func:`encode` made, rebuilt from builtin types only; ``handle(obj)`` makes a handle.

    Raises:
      ValueError, TypeError: data no :func:`encode` makes (from a hostile sender).
    """
    kind = type(data)
    if data is None or kind in (bool, int, float, str):
        return data
    if depth > _MAX_DEPTH:
        raise ValueError(f"a value nested deeper than {_MAX_DEPTH}")
    down = depth + 1
    if kind is list:
        return [decode(x, handle, down) for x in data]
    if kind is not dict or len(data) != 1 and "h" not in data:
        raise ValueError("not an encoded value")
    tag, body = next(iter(data.items()))
    if tag == "h":
        return handle(data)
    if tag == "i" and type(body) is str and len(body) <= FRAME_CAP:
        return int(body, 16)
    if tag in ("b", "ba") and type(body) is str:
        return (bytes if tag == "b" else bytearray).fromhex(body)
    if type(body) is not list:
        raise ValueError("not an encoded value")
    if tag == "c" and len(body) == 2 and all(type(x) in (int, float) for x in body):
        return complex(body[0], body[1])
    items = [decode(x, handle, down) for x in body]
    if tag == "t":
        return tuple(items)
    if tag == "s":
        return set(items)
    if tag == "f":
        return frozenset(items)
    if tag == "d" and all(type(x) is list and len(x) == 2 for x in items):
        return {k: v for k, v in items}
    raise ValueError("not an encoded value")


# ------------------------------------------------------------------------------------- the worker's side


def serve(channel: Channel, namespace: dict, describe: Callable[[BaseException], str]) -> None:
    """Answer the judge's requests about the program in ``namespace`` until the judge hangs up.

    Runs in the worker, in the same process as the untrusted program, which can rewrite all of it: nothing
    here is trusted, it only has to work for honest programs.
    """
    handles: list[object] = []

    def keep(obj: object) -> dict:
        handles.append(obj)
        return {"h": len(handles) - 1, "r": type(obj).__name__}

    def lookup(ref: dict) -> object:
        index = ref.get("h")
        if type(index) is not int or not 0 <= index < len(handles):  # (bool is not int here)
            raise ValueError("no such handle")
        return handles[index]

    while True:
        try:
            request = channel.recv()
        except ChannelClosed:
            return
        try:
            reply = _answer(request, namespace, keep, lookup)
        except BaseException as exc:  # the program's exception, SystemExit included
            reply = {"x": [type(exc).__name__, describe(exc).partition(": ")[2]]}
        try:
            channel.send(reply)
        except ValueError as exc:  # an answer over the frame cap
            channel.send({"x": ["ValueError", str(exc)]})
        except ChannelClosed:
            return


def _answer(request: dict, namespace: dict, keep: Callable, lookup: Callable) -> dict:
    op = request.get("op")
    out = lambda value: {"v": encode(value, keep)}  # noqa: E731
    arg = lambda name: decode(request.get(name), lookup)  # noqa: E731
    if op == "ping":
        return out(None)
    if op == "name":
        name = request.get("name")
        if type(name) is not str or name not in namespace:
            return {"missing": True}
        value = namespace[name]
        if type(value).__name__ == "module" and isinstance(getattr(value, "__name__", None), str):
            return {"module": value.__name__}
        return out(value)
    target = lookup({"h": request.get("h")})
    if op == "call":
        args, kwargs = arg("a"), arg("k")
        result = target(*args, **kwargs)
        # Arguments the callee may have changed in place travel back, so that sort_in_place(xs) works.
        changed = [[i, encode(a, keep)] for i, a in enumerate(args) if type(a) in _MUTABLE]
        changed += [[k, encode(a, keep)] for k, a in kwargs.items() if type(a) in _MUTABLE]
        return {"v": encode(result, keep), "changed": changed}
    if op == "next":
        try:
            return out(next(target))
        except StopIteration:
            return {"stop": True}
    if op in _UNARY:
        return out(_UNARY[op](target))
    if op == "getattr":
        return out(getattr(target, str(request.get("name"))))
    if op == "setattr":
        setattr(target, str(request.get("name")), arg("value"))
        return out(None)
    if op == "getitem":
        return out(target[arg("key")])
    if op == "setitem":
        target[arg("key")] = arg("value")
        return out(None)
    if op == "delitem":
        del target[arg("key")]
        return out(None)
    raise ValueError(f"unknown request {op!r}")


_MUTABLE = (list, dict, set, bytearray)
_UNARY = {
    "iter": iter,
    "len": len,
    "bool": bool,
    "str": str,
    "int": int,
    "float": float,
    "index": operator.index,
}
