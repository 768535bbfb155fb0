"""Typed JSON objects: each block is a dataclass whose fields say what JSON type they hold.

Reading checks every known field and names the first bad one (``timing.median_ms is 'fast' (str), expected a
number``), its value too where a rule says what a run can produce (``timing.median_ms is nan (float), expected a
finite number``); keys a block does not know are kept in ``extra`` and written back, so a record read and written
again is unchanged. Fields marked ``omit_none`` are left out of the JSON when they are None (keys that only some
records have, e.g. ``distributed``); every other field is always written, null or not.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class FieldError(ValueError):
    """A field of a record is missing, holds the wrong JSON type or a value no run can produce; the message names
    the field."""


class Kind:
    """A JSON value type: the Python types that may hold it, and its name in error messages."""

    def __init__(self, types: tuple[type, ...], name: str):
        self.types, self.name = types, name

    def check(self, value: Any, where: str) -> Any:
        """``value`` if it has this type (True is not a number here), else FieldError naming ``where``."""
        if not isinstance(value, self.types) or (isinstance(value, bool) and bool not in self.types):
            raise _wrong(value, where, self.name)
        return value

    def dump(self, value: Any) -> Any:
        return value


class Checked(Kind):
    """A value of ``kind`` that must also be ``what`` (``holds``): a well-typed value no run can produce (a NaN
    time, a negative batch, a compile mode that does not exist) is refused like a wrongly typed one."""

    def __init__(self, kind: Kind, what: str, holds: Callable[[Any], bool]):
        super().__init__(kind.types, kind.name)
        self.kind, self.what, self.holds = kind, what, holds

    def check(self, value: Any, where: str) -> Any:
        self.kind.check(value, where)
        if not self.holds(value):
            raise _wrong(value, where, self.what)
        return value


def one_of(values: tuple[str, ...]) -> Kind:
    """A string that is one of ``values``."""
    return Checked(STR, "one of " + ", ".join(values), lambda v: v in values)


INT = Kind((int,), "an integer")
STR = Kind((str,), "a string")
BOOL = Kind((bool,), "true/false")
OBJECT = Kind((dict,), "an object")
LIST = Kind((list,), "a list")
# JSON has no NaN or infinity (writers store null and say why beside it): a record holding one was not written here
NUMBER = Checked(Kind((int, float), "a number"), "a finite number", math.isfinite)
NON_NEGATIVE = Checked(NUMBER, "a finite number >= 0", lambda v: v >= 0)
POSITIVE_INT = Checked(INT, "a positive integer", lambda v: v > 0)


class ListOf(Kind):
    """A list whose items are each of ``item`` (null items allowed when ``nullable``)."""

    def __init__(self, item: Kind, nullable: bool = False):
        super().__init__((list,), f"a list of {item.name.removeprefix('a ').removeprefix('an ')}s")
        self.item, self.nullable = item, nullable

    def check(self, value: Any, where: str) -> Any:
        super().check(value, where)
        return [v if v is None and self.nullable else self.item.check(v, f"{where}[{i}]") for i, v in enumerate(value)]

    def dump(self, value: Any) -> Any:
        return [v if v is None else self.item.dump(v) for v in value]


class MapOf(Kind):
    """An object whose values are each of ``item`` or null."""

    def __init__(self, item: Kind):
        super().__init__((dict,), "an object")
        self.item = item

    def check(self, value: Any, where: str) -> Any:
        super().check(value, where)
        return {k: v if v is None else self.item.check(v, f"{where}.{k}") for k, v in value.items()}

    def dump(self, value: Any) -> Any:
        return {k: v if v is None else self.item.dump(v) for k, v in value.items()}


class Nested(Kind):
    """An object read into the Block class ``block``."""

    def __init__(self, block: type):
        super().__init__((dict,), "an object")
        self.block = block

    def check(self, value: Any, where: str) -> Any:
        super().check(value, where)
        return self.block.from_dict(value, where)

    def dump(self, value: Any) -> Any:
        return value.to_dict()


def _wrong(value: Any, where: str, expected: str) -> FieldError:
    return FieldError(f"{where} is {value!r:.40} ({type(value).__name__}), expected {expected}")


def spec(kind: Kind, *, required: bool = False, omit_none: bool = False, default: Any = None):
    """A dataclass field holding a JSON value of ``kind``."""
    meta = {"kind": kind, "required": required, "omit_none": omit_none}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def extra_keys():
    """The field that keeps keys a block does not know (written back unchanged)."""
    return field(default_factory=dict, metadata={"extra": True}, compare=False)


@dataclass(frozen=True)
class Block:
    """Base of every typed JSON object; subclasses are frozen dataclasses of ``spec`` fields plus ``extra``."""

    @classmethod
    def _json_fields(cls):
        return [f for f in dataclasses.fields(cls) if "kind" in f.metadata]

    @classmethod
    def from_dict(cls, data: dict, path: str = ""):
        """Read ``data`` (checked); FieldError names the first missing or wrongly typed field."""
        if not isinstance(data, dict):
            raise _wrong(data, path or cls.__name__, "an object")
        values, known = {}, set()
        for f in cls._json_fields():
            known.add(f.name)
            where = f"{path}.{f.name}" if path else f.name
            raw = data.get(f.name)
            if raw is None:
                if f.metadata["required"]:
                    raise FieldError(f"{where} is missing")
                continue  # the dataclass default
            values[f.name] = f.metadata["kind"].check(raw, where)
        extra = {k: v for k, v in data.items() if k not in known}
        return cls._upgraded(values, extra, data)

    @classmethod
    def _upgraded(cls, values: dict, extra: dict, data: dict):
        """Hook for defaults that depend on other fields (older schema versions); the plain constructor here."""
        return cls(**values, extra=extra) if "extra" in {f.name for f in dataclasses.fields(cls)} else cls(**values)

    def to_dict(self) -> dict:
        """The JSON object: known fields in declaration order (``omit_none`` ones only when set), then ``extra``."""
        out = {}
        for f in self._json_fields():
            value = getattr(self, f.name)
            if value is None:
                if not f.metadata["omit_none"]:
                    out[f.name] = None
                continue
            out[f.name] = f.metadata["kind"].dump(value)
        out.update(getattr(self, "extra", {}) or {})
        return out

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)
