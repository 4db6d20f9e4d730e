"""Hypothesis strategies for protobuf messages, built from their descriptors.

``messages(descriptor)`` fills any message generically: a strategy per field type, oneofs with at most one member
set, repeated fields of a few items, nested messages down to a small depth. The scalar strategies lean on the
values that break servers: control characters, NUL, newlines, unicode, very long strings, the extremes of each
integer type, NaN and the infinities. ``near_valid(base)`` changes one field of a valid request (or clears it), so
that the fuzz gets past the first check and reaches the deep validation behind it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

__all__ = ["PAYLOADS", "SPECIAL_STRINGS", "boundary_corpus", "field_values", "leaf_paths", "messages", "near_valid"]

F = FieldDescriptor
_INT_RANGES = {
    F.TYPE_INT32: (-(2**31), 2**31 - 1),
    F.TYPE_SINT32: (-(2**31), 2**31 - 1),
    F.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    F.TYPE_INT64: (-(2**63), 2**63 - 1),
    F.TYPE_SINT64: (-(2**63), 2**63 - 1),
    F.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    F.TYPE_UINT32: (0, 2**32 - 1),
    F.TYPE_FIXED32: (0, 2**32 - 1),
    F.TYPE_UINT64: (0, 2**64 - 1),
    F.TYPE_FIXED64: (0, 2**64 - 1),
}

# Strings that have broken servers before: separators, resource-name lookalikes, path tricks, huge ones.
SPECIAL_STRINGS: tuple[str, ...] = (
    "",
    " ",
    "\x00",
    "a\x00b",
    "\n",
    "x\n",
    "\r\n",
    "\t",
    "\x7f\x1b[31m",
    "💥",
    "ñ",
    "\u202e\u200b",
    "\ufeff",
    "%s%n%x",
    "'; DROP TABLE tuning_jobs; --",
    "..",
    "../../../../etc/passwd",
    "/etc/passwd",
    "/tmp",
    "file:///etc/passwd",
    "~/",
    "builtin:",
    "builtin:tiny",
    "builtin:tiny\n",
    " builtin:tiny",
    "builtin:cipher",
    "builtin:cipher\x00",
    "layerCards/",
    "layerCards/x",
    "layerCards/x/y",
    "tuningJobs/",
    "tuningJobs/a",
    "tuningJobs/a\n",
    "tuningJobs/a/b",
    "adapters/",
    "adapters/a",
    "adapters/a\n",
    "adapters/a/versions/1",
    "a" * 64,
    "a" * 4096,
    "a" * 200_000,
    "é" * 50_000,
    "0",
    "-1",
    "NaN",
    "1e309",
)

# JSONL bodies for inline datasets: valid, malformed, and the numbers and nesting that JSON parsers trip on.
PAYLOADS: tuple[bytes, ...] = (
    b"",
    b"\n",
    b"\x00",
    b"\xff\xfe",
    b"not json\n",
    b'{"prompt": "a", "completion": " b"}\n' * 16,
    b'{"text": "hello"}\n' * 8,
    b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n' * 8,
    b'{"prompt": NaN, "completion": Infinity}\n',
    b'{"prompt": "a", "completion": -Infinity}\n',
    b'{"prompt": 1e999, "completion": "x"}\n',
    b'{"prompt": 123456789012345678901234567890, "completion": "x"}\n',
    b"[" * 100_000 + b"]" * 100_000 + b"\n",
    b'{"a":' * 50_000 + b"1" + b"}" * 50_000 + b"\n",
    b'{"prompt": "\\ud800", "completion": "x"}\n',
    b'{"prompt": "a", "completion": "b"}',  # no final newline
    b'{"prompt": "a"}\n',
    b'{"messages": []}\n',
    b'{"messages": [{"role": 1, "content": null}]}\n',
    b"{}\n" * 3,
    b"[]\n",
    b'"just a string"\n',
    b'{"text": "' + b"x" * 300_000 + b'"}\n',
)

_TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)


def _strings(extra: Sequence[str]) -> st.SearchStrategy[str]:
    specials = st.sampled_from(SPECIAL_STRINGS)
    return st.one_of(specials, st.sampled_from(list(extra)), _TEXT) if extra else st.one_of(specials, _TEXT)


def _ints(lo: int, hi: int) -> st.SearchStrategy[int]:
    edges = [v for v in (0, 1, -1, 2, 3, 7, 8, 16, 64, 1000, 4096, 2**31 - 1, -(2**31), lo, hi) if lo <= v <= hi]
    return st.one_of(st.sampled_from(edges), st.integers(lo, hi))


def _floats(width: int) -> st.SearchStrategy[float]:
    edges = [0.0, -0.0, 1.0, -1.0, 0.5, 1e-3, 2.0, float("nan"), float("inf"), float("-inf")]
    edges += [1e300, -1e300, 5e-324] if width == 64 else [3.4e38, -3.4e38, 1e-45]
    return st.one_of(st.sampled_from(edges), st.floats(allow_nan=True, allow_infinity=True, width=width))


def field_values(
    field: FieldDescriptor, depth: int, strings: Sequence[str] = (), payloads: Sequence[bytes] = ()
) -> st.SearchStrategy:
    """Values for one (non-repeated) field."""
    if field.type == F.TYPE_MESSAGE:
        return messages(field.message_type, depth - 1, strings, payloads)
    if field.type == F.TYPE_STRING:
        return _strings(strings)
    if field.type == F.TYPE_BYTES:
        return st.one_of(st.sampled_from((*PAYLOADS, *payloads)), st.binary(max_size=64))
    if field.type == F.TYPE_BOOL:
        return st.booleans()
    if field.type == F.TYPE_ENUM:
        numbers = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(numbers), st.integers(-3, max(numbers) + 3))  # proto3 enums are open
    if field.type == F.TYPE_DOUBLE:
        return _floats(64)
    if field.type == F.TYPE_FLOAT:
        return _floats(32)
    lo, hi = _INT_RANGES[field.type]
    return _ints(lo, hi)


def _set(message: Message, field: FieldDescriptor, value) -> None:
    if field.is_repeated:
        container = getattr(message, field.name)
        del container[:]
        if field.type == F.TYPE_MESSAGE:
            for item in value:
                container.add().CopyFrom(item)
        else:
            container.extend(value)
    elif field.type == F.TYPE_MESSAGE:
        getattr(message, field.name).CopyFrom(value)
    else:
        setattr(message, field.name, value)


def _field_strategy(field: FieldDescriptor, depth: int, strings, payloads) -> st.SearchStrategy:
    one = field_values(field, depth, strings, payloads)
    if not field.is_repeated:
        return one
    many = st.lists(one, max_size=4)
    # A few long lists too: repeated fields are where unbounded input hides.
    return st.one_of(many, st.lists(one, min_size=50, max_size=300)) if field.type != F.TYPE_MESSAGE else many


@st.composite
def messages(
    draw, descriptor: Descriptor, depth: int = 2, strings: Sequence[str] = (), payloads: Sequence[bytes] = ()
) -> Message:
    """A message of ``descriptor``'s type with any subset of its fields set; nested messages to ``depth``."""
    message = message_factory.GetMessageClass(descriptor)()
    if depth < 0:
        return message
    for oneof in descriptor.oneofs:
        if oneof.name.startswith("_"):  # the synthetic oneof of a proto3 `optional` field: handled below
            continue
        member = draw(st.sampled_from([None, *oneof.fields]))
        if member is not None and (member.type != F.TYPE_MESSAGE or depth > 0):
            _set(message, member, draw(field_values(member, depth, strings, payloads)))
    for field in descriptor.fields:
        real_oneof = field.containing_oneof is not None and not field.containing_oneof.name.startswith("_")
        if real_oneof or (field.type == F.TYPE_MESSAGE and depth == 0):
            continue
        if draw(st.booleans()):
            _set(message, field, draw(_field_strategy(field, depth, strings, payloads)))
    return message


def leaf_paths(descriptor: Descriptor, depth: int = 2, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Dotted paths of every field, nested messages included down to ``depth``."""
    paths = []
    for field in descriptor.fields:
        paths.append((*prefix, field.name))
        if field.type == F.TYPE_MESSAGE and not field.is_repeated and depth > 0:
            paths += leaf_paths(field.message_type, depth - 1, (*prefix, field.name))
    return paths


def _set_paths(message: Message, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Paths of the fields set in ``message``: the ones the server reads on its way to the deep checks."""
    paths = []
    for field, value in message.ListFields():
        paths.append((*prefix, field.name))
        if field.type == F.TYPE_MESSAGE and not field.is_repeated:
            paths += _set_paths(value, (*prefix, field.name))
    return paths


# What turns a valid string into an almost valid one: a separator, a NUL, an escape, a case or length change.
_SUFFIXES = ("\n", "\x00", " ", "\r\n", "\t", "/", "/..", "/x", "%00", "\u2028", "💥", ".")


@st.composite
def _corrupted(draw, value):
    if isinstance(value, bytes):
        how = draw(st.sampled_from(("nul", "cut", "nan", "twice", "bom")))
        return {
            "nul": value + b"\x00",
            "cut": value[: len(value) // 2],
            "nan": value + b'{"prompt": NaN, "completion": "x"}\n',
            "twice": value * 2,
            "bom": b"\xef\xbb\xbf" + value,
        }[how]
    how = draw(st.sampled_from(("suffix", "prefix", "upper", "twice", "cut")))
    if how in ("suffix", "prefix"):
        extra = draw(st.sampled_from(_SUFFIXES))
        return value + extra if how == "suffix" else extra + value
    return {"upper": value.upper(), "twice": value + value, "cut": value[:-1]}[how]


@st.composite
def near_valid(draw, bases: Sequence[Message], strings: Sequence[str] = (), payloads: Sequence[bytes] = ()) -> Message:
    """One of ``bases`` (valid requests) with one field changed at any depth, or cleared. Fields the base sets
    are chosen most often, and a string or bytes value is often the valid one slightly corrupted."""
    base = draw(st.sampled_from(list(bases)))
    message = type(base)()
    message.CopyFrom(base)
    chosen = _set_paths(base) if draw(st.integers(0, 3)) else []
    path = draw(st.sampled_from(chosen or leaf_paths(base.DESCRIPTOR)))
    parent = message
    for name in path[:-1]:
        parent = getattr(parent, name)
    field = parent.DESCRIPTOR.fields_by_name[path[-1]]
    if draw(st.integers(0, 9)) == 0:
        parent.ClearField(field.name)
        return message
    current = getattr(parent, field.name)
    if field.type in (F.TYPE_STRING, F.TYPE_BYTES) and not field.is_repeated and draw(st.booleans()):
        if not current and field.type == F.TYPE_STRING and strings:
            current = draw(st.sampled_from(list(strings)))
        setattr(parent, field.name, draw(_corrupted(current)))
    else:
        _set(parent, field, draw(_field_strategy(field, 1, strings, payloads)))
    return message


_STRING_EDGES: tuple[Callable[[str], str], ...] = (
    lambda v: v + "\n",
    lambda v: v + "\x00",
    lambda v: v + "\x00/../x",
    lambda v: " " + v,
    lambda v: v + "/..",
    lambda v: v.upper(),
    lambda v: v + "💥",
    lambda v: v * 300,
)
_BYTES_EDGES: tuple[Callable[[bytes], bytes], ...] = (
    lambda v: v + b'{"prompt": NaN, "completion": Infinity}\n',
    lambda v: b"[" * 100_000 + b"]" * 100_000 + b"\n",
    lambda v: b'{"prompt": {"a": ' * 20_000 + b"1" + b"}" * 20_000 + b', "completion": "x"}\n',
    lambda v: b'"just a string"\n' + v,
    lambda v: b"[1, 2]\n" + v,
    lambda v: b"null\n" + v,
    lambda v: v + b"\xff\xfe\n",
    lambda v: v[: len(v) // 2],
)


def _number_edges(field: FieldDescriptor) -> list:
    if field.type in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
        return [float("nan"), float("inf"), float("-inf"), -1.0, 0.0, 3.0e38]
    if field.type in (F.TYPE_BOOL, F.TYPE_ENUM, F.TYPE_STRING, F.TYPE_BYTES, F.TYPE_MESSAGE):
        return []
    lo, hi = _INT_RANGES[field.type]
    return sorted({lo, -1, 0, hi, hi // 2 + 1} & set(range(lo, hi + 1)) if hi < 2**16 else {lo, max(lo, -1), 0, hi})


def boundary_corpus(bases: Sequence[Message]) -> list[Message]:
    """The classic edge cases, one field at a time, of every field each base sets: a separator, a NUL, a path
    climb, case and length for strings; NaN, deep nesting and non-objects for JSONL bytes; the extremes, -1 and 0
    for numbers, NaN and the infinities for floats. Run before the random search, so every one is always tried."""
    corpus = []
    for base in bases:
        for path in _set_paths(base):
            parent = base
            for name in path[:-1]:
                parent = getattr(parent, name)
            field = parent.DESCRIPTOR.fields_by_name[path[-1]]
            if field.is_repeated or field.type == F.TYPE_MESSAGE:
                continue
            value = getattr(parent, field.name)
            if field.type == F.TYPE_STRING:
                variants = [edge(value) for edge in _STRING_EDGES]
            elif field.type == F.TYPE_BYTES:
                variants = [edge(value) for edge in _BYTES_EDGES]
            else:
                variants = _number_edges(field)
            for variant in variants:
                message = type(base)()
                message.CopyFrom(base)
                target = message
                for name in path[:-1]:
                    target = getattr(target, name)
                setattr(target, field.name, variant)
                corpus.append(message)
    return corpus
