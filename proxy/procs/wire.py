"""The wire format between a supervisor and its workers: JSON lines, and one codec for them all.

Every message is a dataclass: the seam's routing state and outcome report
(proxy/procs/shared.py) and the link's own `Ready` and `Stop` below. Beside its class each one
declares a codec per field (`record`), which is checked against `dataclasses.fields` there and
then, so a field added to a message without a codec fails at import rather than on the wire.
(The codecs are spelled out, not read from the annotations: a class compiled by mypyc keeps
only `dict` of a `dict[int, int]` at run time.) Dataclasses become objects, tuples and lists
arrays, enums their values, mappings objects (int keys in decimal) or, when their keys are
tuples, arrays of [key, value] pairs.

Decoding is strict: a missing field (unless declared `optional`), an unknown one or a value of
the wrong type is refused with a `WireError` (a ValueError) that says where, so a malformed
message costs one clear log line, never a traceback.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, Generic, Literal, TypeVar

T = TypeVar("T")
K = TypeVar("K")
V = TypeVar("V")
S = TypeVar("S", bound=str)
E = TypeVar("E", bound=Enum)

Json = Any  # what json.dumps takes and json.loads gives
Kind = Literal["state", "report", "ready", "stop"]
KINDS: tuple[Kind, ...] = ("state", "report", "ready", "stop")


class WireError(ValueError):
    """A message that does not decode: says where, and what was wrong."""


def _refuse(at: str, expected: str, wire: object) -> WireError:
    shown = repr(wire)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return WireError(f"{at}: expected {expected}, got {shown}")


class Codec(ABC, Generic[T]):
    """Turns a T into a JSON-ready value and back; `at` names the place, for errors."""

    __slots__ = ()

    @abstractmethod
    def encode(self, value: T) -> Json: ...

    @abstractmethod
    def decode(self, wire: object, at: str) -> T: ...


# scalars -------------------------------------------------------------------------------------


class _Int(Codec[int]):
    __slots__ = ()

    def encode(self, value: int) -> Json:
        return value

    def decode(self, wire: object, at: str) -> int:
        if type(wire) is not int:  # a bool is an int to isinstance, not here
            raise _refuse(at, "an integer", wire)
        return wire


class _IntKey(Codec[int]):
    """An int as a JSON object's key: its decimal string, exactly."""

    __slots__ = ()

    def encode(self, value: int) -> Json:
        return str(value)

    def decode(self, wire: object, at: str) -> int:
        if isinstance(wire, str):
            try:
                number = int(wire)
            except ValueError:
                pass
            else:
                if str(number) == wire:
                    return number
        raise _refuse(at, "an integer key", wire)


class _Float(Codec[float]):
    __slots__ = ()

    def encode(self, value: float) -> Json:
        return value

    def decode(self, wire: object, at: str) -> float:
        if type(wire) is float:
            return wire
        if type(wire) is int:
            return float(wire)
        raise _refuse(at, "a number", wire)


class _Str(Codec[str]):
    __slots__ = ()

    def encode(self, value: str) -> Json:
        return value

    def decode(self, wire: object, at: str) -> str:
        if not isinstance(wire, str):
            raise _refuse(at, "a string", wire)
        return wire


class _Bool(Codec[bool]):
    __slots__ = ()

    def encode(self, value: bool) -> Json:
        return value

    def decode(self, wire: object, at: str) -> bool:
        if not isinstance(wire, bool):
            raise _refuse(at, "true or false", wire)
        return wire


INT: Codec[int] = _Int()
INT_KEY: Codec[int] = _IntKey()
FLOAT: Codec[float] = _Float()
STR: Codec[str] = _Str()
BOOL: Codec[bool] = _Bool()


class _OneOf(Codec[S]):
    __slots__ = ("choices",)

    def __init__(self, choices: tuple[S, ...]) -> None:
        self.choices = choices

    def encode(self, value: S) -> Json:
        return value

    def decode(self, wire: object, at: str) -> S:
        for choice in self.choices:
            if wire == choice:
                return choice
        raise _refuse(at, f"one of {', '.join(self.choices)}", wire)


def one_of(*choices: S) -> Codec[S]:
    """One of a closed set of strings (a Literal)."""
    return _OneOf(choices)


class _EnumCodec(Codec[E]):
    __slots__ = ("kind",)

    def __init__(self, kind: type[E]) -> None:
        self.kind = kind

    def encode(self, value: E) -> Json:
        return value.value

    def decode(self, wire: object, at: str) -> E:
        try:
            return self.kind(wire)
        except (ValueError, TypeError):
            raise _refuse(at, f"a {self.kind.__name__}", wire) from None


def enum(kind: type[E]) -> Codec[E]:
    """An Enum member, as its value."""
    return _EnumCodec(kind)


class _Custom(Codec[T]):
    __slots__ = ("_decode", "_encode")

    def __init__(self, encode: Callable[[T], Json], decode: Callable[[object], T]) -> None:
        self._encode = encode
        self._decode = decode

    def encode(self, value: T) -> Json:
        return self._encode(value)

    def decode(self, wire: object, at: str) -> T:
        try:
            return self._decode(wire)
        except WireError:
            raise
        except ValueError as exc:
            raise WireError(f"{at}: {exc}") from None


def custom(encode: Callable[[T], Json], decode: Callable[[object], T]) -> Codec[T]:
    """A value with a format of its own (a configuration); `decode` raises ValueError."""
    return _Custom(encode, decode)


# containers ----------------------------------------------------------------------------------


def _array(wire: object, at: str) -> list[Json]:
    if not isinstance(wire, list):
        raise _refuse(at, "an array", wire)
    return wire


class _TupleOf(Codec[tuple[T, ...]]):
    __slots__ = ("item",)

    def __init__(self, item: Codec[T]) -> None:
        self.item = item

    def encode(self, value: tuple[T, ...]) -> Json:
        return [self.item.encode(v) for v in value]

    def decode(self, wire: object, at: str) -> tuple[T, ...]:
        item = self.item
        return tuple(item.decode(v, f"{at}[{i}]") for i, v in enumerate(_array(wire, at)))


def tuple_of(item: Codec[T]) -> Codec[tuple[T, ...]]:
    """A tuple of any length, as an array."""
    return _TupleOf(item)


class _ListOf(Codec[list[T]]):
    __slots__ = ("item",)

    def __init__(self, item: Codec[T]) -> None:
        self.item = item

    def encode(self, value: list[T]) -> Json:
        return [self.item.encode(v) for v in value]

    def decode(self, wire: object, at: str) -> list[T]:
        item = self.item
        return [item.decode(v, f"{at}[{i}]") for i, v in enumerate(_array(wire, at))]


def list_of(item: Codec[T]) -> Codec[list[T]]:
    """A list, as an array."""
    return _ListOf(item)


class _Pair(Codec[tuple[K, V]]):
    __slots__ = ("first", "second")

    def __init__(self, first: Codec[K], second: Codec[V]) -> None:
        self.first = first
        self.second = second

    def encode(self, value: tuple[K, V]) -> Json:
        return [self.first.encode(value[0]), self.second.encode(value[1])]

    def decode(self, wire: object, at: str) -> tuple[K, V]:
        items = _array(wire, at)
        if len(items) != 2:
            raise _refuse(at, "a pair", wire)
        return self.first.decode(items[0], f"{at}[0]"), self.second.decode(items[1], f"{at}[1]")


def pair(first: Codec[K], second: Codec[V]) -> Codec[tuple[K, V]]:
    """A 2-tuple, as an array of two."""
    return _Pair(first, second)


class _Mapping(Codec[dict[K, V]]):
    __slots__ = ("every", "key", "value")

    def __init__(self, key: Codec[K], value: Codec[V], every: Collection[K]) -> None:
        self.key = key
        self.value = value
        self.every = every

    def encode(self, value: Mapping[K, V]) -> Json:
        key, item = self.key.encode, self.value.encode
        return {key(k): item(v) for k, v in value.items()}

    def decode(self, wire: object, at: str) -> dict[K, V]:
        if not isinstance(wire, dict):
            raise _refuse(at, "an object", wire)
        key, item = self.key.decode, self.value.decode
        decoded = {key(k, f"{at} key"): item(v, f"{at}[{k!r}]") for k, v in wire.items()}
        missing = [k for k in self.every if k not in decoded]
        if missing:
            raise WireError(f"{at}: missing {', '.join(map(repr, missing))}")
        return decoded


def mapping(key: Codec[K], value: Codec[V], *, every: Collection[K] = ()) -> Codec[dict[K, V]]:
    """A mapping whose keys encode to strings (STR, INT_KEY, one_of), as an object; `every`
    names keys that must be present."""
    return _Mapping(key, value, every)


class _Pairs(Codec[dict[K, V]]):
    __slots__ = ("key", "value")

    def __init__(self, key: Codec[K], value: Codec[V]) -> None:
        self.key = key
        self.value = value

    def encode(self, value: Mapping[K, V]) -> Json:
        key, item = self.key.encode, self.value.encode
        return [[key(k), item(v)] for k, v in value.items()]

    def decode(self, wire: object, at: str) -> dict[K, V]:
        decoded: dict[K, V] = {}
        for i, entry in enumerate(_array(wire, at)):
            here = f"{at}[{i}]"
            entry = _array(entry, here)
            if len(entry) != 2:
                raise _refuse(here, "a [key, value] pair", entry)
            k = self.key.decode(entry[0], f"{here}[0]")
            if k in decoded:
                raise WireError(f"{here}: {k!r} twice")
            decoded[k] = self.value.decode(entry[1], f"{here}[1]")
        return decoded


def pairs(key: Codec[K], value: Codec[V]) -> Codec[dict[K, V]]:
    """A mapping with keys a JSON object cannot have (tuples), as an array of [key, value]."""
    return _Pairs(key, value)


# records -------------------------------------------------------------------------------------


class _Optional(Codec[T]):
    """A field the sender may leave out; the dataclass's default stands in for it."""

    __slots__ = ("inner",)

    def __init__(self, inner: Codec[T]) -> None:
        self.inner = inner

    def encode(self, value: T) -> Json:
        return self.inner.encode(value)

    def decode(self, wire: object, at: str) -> T:
        return self.inner.decode(wire, at)


def optional(inner: Codec[T]) -> Codec[T]:
    """A field with a default that the sender may leave out (one added to a message later)."""
    return _Optional(inner)


class Record(Codec[T]):
    """A dataclass, as an object of its fields."""

    __slots__ = ("fields", "kind", "required")

    def __init__(self, kind: type[T], fields: Mapping[str, Codec[Any]]) -> None:
        declared = {f.name: f for f in dataclasses.fields(kind)}  # type: ignore[arg-type]
        if set(fields) != set(declared):
            raise TypeError(
                f"codec of {kind.__name__}: fields {sorted(declared)}, codecs {sorted(fields)}"
            )
        for name, codec in fields.items():
            f = declared[name]
            has_default = (
                f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
            )
            if isinstance(codec, _Optional) and not has_default:
                raise TypeError(f"codec of {kind.__name__}: optional {name} without a default")
        self.kind = kind
        self.fields = dict(fields)
        self.required = frozenset(n for n, c in fields.items() if not isinstance(c, _Optional))

    def encode(self, value: T, *, omit: Collection[str] = ()) -> dict[str, Json]:
        """Every field, but those in `omit` (which the receiver holds already)."""
        return {
            name: codec.encode(getattr(value, name))
            for name, codec in self.fields.items()
            if name not in omit
        }

    def decode(self, wire: object, at: str, *, held: Mapping[str, Any] | None = None) -> T:
        """`held`: decoded values of fields the sender left out because the receiver holds
        them already."""
        if not isinstance(wire, dict):
            raise _refuse(at, "an object", wire)
        fields = self.fields
        unknown = [name for name in wire if name not in fields]
        if unknown:
            raise WireError(f"{at}: unknown field {', '.join(map(repr, unknown))}")
        values = dict(held) if held else {}
        missing = [n for n in self.required if n not in wire and n not in values]
        if missing:
            raise WireError(f"{at}: missing field {', '.join(map(repr, sorted(missing)))}")
        for name, item in wire.items():
            values[name] = fields[name].decode(item, f"{at}.{name}")
        return self.kind(**values)


def record(kind: type[T], /, **fields: Codec[Any]) -> Record[T]:
    """The codec of a dataclass: one codec per field, checked against the class's fields."""
    return Record(kind, fields)


# the link's own messages and its framing -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ready:
    """Worker to supervisor: it serves."""

    pid: int


@dataclass(frozen=True, slots=True)
class Stop:
    """Supervisor to worker: drain within `timeout` seconds (cut at once when 0) and exit."""

    timeout: float


READY = record(Ready, pid=INT)
STOP = record(Stop, timeout=FLOAT)


def encode_message(kind: Kind, body: Mapping[str, Json]) -> bytes:
    """One line of the link: the message's fields and "t", its kind."""
    return json.dumps({"t": kind, **body}, separators=(",", ":")).encode() + b"\n"


async def read_message(reader: asyncio.StreamReader) -> tuple[Kind, dict[str, Json]] | None:
    """The next message's kind and fields, None at the end of the link; WireError on a
    malformed one (ValueError on a line longer than the reader's limit)."""
    line = await reader.readline()
    if not line:
        return None
    try:
        message = json.loads(line)
    except (ValueError, RecursionError):
        raise WireError(f"not JSON: {line[:80]!r}") from None
    if not isinstance(message, dict):
        raise WireError(f"not a message: {line[:80]!r}")
    kind = message.pop("t", None)
    for known in KINDS:
        if kind == known:
            return known, message
    raise WireError(f"unknown message kind {kind!r}: {line[:80]!r}")
