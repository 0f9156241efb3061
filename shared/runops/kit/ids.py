"""Friendly ids and residency (spec §1).

A public id is a *friendly id*: ``<prefix>_<body>``, e.g. ``run_<body>``, ``batch_<body>``,
``wp_<body>``. The prefix is lowercase ASCII (``[a-z][a-z0-9]*`` segments joined by single
underscores, at most :data:`MAX_PREFIX_LEN` chars); the body is everything after the LAST
underscore. Two body shapes exist, and the shape alone decides the *residency* (which database
owns the row):

LEGACY bodies (control-plane database) are cuid-shaped: 25 chars, ``c`` + 24 lowercase base36
chars, minted like cuid v1::

    c | timestamp (8) | counter (4) | fingerprint (4) | random (8)

    timestamp    Unix time in ms, base36, modulo 36**8 (wraps in the year 2059, like a cuid's
                 8-char timestamp block)
    counter      per-process counter modulo 36**4, starting at a random value; taken under a
                 lock, so ids minted concurrently in one process never share (timestamp, counter)
    fingerprint  2 chars from the pid + 2 chars from the host name (recomputed after fork)
    random       8 base36 chars from the OS CSPRNG (~41 bits)

NEW bodies (run-ops database) are 26 chars of lowercase base32hex (alphabet ``0-9a-v``, whose
ASCII order equals its digit order), i.e. one 130-bit big-endian number, most significant first::

    bits 129..80  (50 bits, chars  0..9)   Unix time in milliseconds (good until year 37648)
    bits  79..5   (75 bits, chars 10..24)  randomness / monotonic sequence
    bits   4..0   ( 5 bits, char  25)      format version, always 1 (the char ``1``)

Because the timestamp leads and is big-endian, lexicographic order is time order. Within one
process the minted sequence is strictly increasing (ULID monotonic mode): the first id of a
millisecond draws fresh 75-bit randomness; later ids in the same millisecond increment it by one.
If the clock steps backwards the last timestamp is kept (ids never go back); if the sequence would
overflow 75 bits the timestamp is advanced by one millisecond. A forked child resets this state so
it never replays its parent's sequence.

:func:`residency_of` classifies anything: a NEW-shaped body (bare, or after a well-formed prefix)
is NEW; everything else — cuids, other strings, empty strings, garbage, non-strings — is LEGACY.
It never raises and costs one precompiled regex match.

With the database split off (single-database mode) every new id is minted LEGACY-shaped; with it
on, new ids are minted NEW (:class:`IdMinter`). Rows created for a parent (a batch's runs, a
waitpoint of a batch or run) inherit the parent's residency (:meth:`IdMinter.mint_child`).
"""

from __future__ import annotations

import enum
import os
import re
import secrets
import socket
import threading
import time
from datetime import UTC, datetime, timedelta

from runops.common.v1 import common_pb2

__all__ = [
    "BATCH",
    "ENVIRONMENT",
    "EPOCH",
    "LEGACY_BODY_LEN",
    "MAX_PREFIX_LEN",
    "NEW_BODY_LEN",
    "NEW_VERSION",
    "ORGANIZATION",
    "PROJECT",
    "RUN",
    "WAITPOINT",
    "WORKER",
    "IdMinter",
    "Residency",
    "body_of",
    "is_legacy_body",
    "is_new_body",
    "is_valid_prefix",
    "mint",
    "mint_body",
    "residency_from_proto",
    "residency_of",
    "residency_to_proto",
    "split_friendly_id",
    "timestamp_ms_of_new",
    "timestamp_of_new",
]

# Well-known prefixes.
RUN = "run"
BATCH = "batch"
WAITPOINT = "wp"
ORGANIZATION = "org"
PROJECT = "proj"
ENVIRONMENT = "env"
WORKER = "worker"

MAX_PREFIX_LEN = 32
NEW_BODY_LEN = 26
LEGACY_BODY_LEN = 25
NEW_VERSION = 1

_B32HEX = "0123456789abcdefghijklmnopqrstuv"
_B36 = "0123456789abcdefghijklmnopqrstuvwxyz"

_TIME_BITS = 50
_RANDOM_BITS = 75
_VERSION_BITS = 5
_MAX_MS = (1 << _TIME_BITS) - 1
_MAX_RANDOM = (1 << _RANDOM_BITS) - 1

_PREFIX = r"[a-z][a-z0-9]*(?:_[a-z0-9]+)*"
_PREFIX_RE = re.compile(_PREFIX)
_NEW_BODY_RE = re.compile(r"[0-9a-v]{25}1")
# The same shape for a SQL `~` match (Postgres regular expressions), anchored.
NEW_BODY_SQL_PATTERN = "^" + _NEW_BODY_RE.pattern + "$"
# A bare NEW body, or a well-formed prefix + "_" + a NEW body. The prefix alternation cannot
# backtrack badly (segments are underscore-delimited) and input length is capped before matching.
_NEW_ID_RE = re.compile(rf"(?:{_PREFIX}_)?[0-9a-v]{{25}}1")
_LEGACY_BODY_RE = re.compile(r"c[0-9a-z]{24}")
_MAX_NEW_ID_LEN = MAX_PREFIX_LEN + 1 + NEW_BODY_LEN


class Residency(enum.Enum):
    """Which database owns a row: LEGACY = control-plane database, NEW = run-ops database."""

    LEGACY = "legacy"
    NEW = "new"

    def to_proto(self) -> common_pb2.Residency.ValueType:
        return residency_to_proto(self)

    @classmethod
    def from_proto(cls, value: int) -> Residency:
        return residency_from_proto(value)


def residency_to_proto(residency: Residency) -> common_pb2.Residency.ValueType:
    """The protobuf enum value (RESIDENCY_LEGACY / RESIDENCY_NEW) for a residency."""
    if residency is Residency.NEW:
        return common_pb2.RESIDENCY_NEW
    return common_pb2.RESIDENCY_LEGACY


def residency_from_proto(value: int) -> Residency:
    """The residency for a protobuf enum value; ValueError for UNSPECIFIED or unknown values."""
    if value == common_pb2.RESIDENCY_NEW:
        return Residency.NEW
    if value == common_pb2.RESIDENCY_LEGACY:
        return Residency.LEGACY
    raise ValueError(f"residency must be RESIDENCY_LEGACY or RESIDENCY_NEW, got {value!r}")


# ---------------------------------------------------------------------------------------------
# Classification and parsing


def residency_of(value: object) -> Residency:
    """NEW if ``value`` is a NEW-shaped body or ``<prefix>_<NEW body>``, otherwise LEGACY.

    Never raises, whatever ``value`` is (non-strings are LEGACY)."""
    if (
        isinstance(value, str)
        and NEW_BODY_LEN <= len(value) <= _MAX_NEW_ID_LEN
        and _NEW_ID_RE.fullmatch(value) is not None
    ):
        return Residency.NEW
    return Residency.LEGACY


def is_new_body(value: object) -> bool:
    """True for a bare NEW-shaped body: 26 chars of [0-9a-v], the last one ``1``."""
    return (
        isinstance(value, str)
        and len(value) == NEW_BODY_LEN
        and _NEW_BODY_RE.fullmatch(value) is not None
    )


def is_legacy_body(value: object) -> bool:
    """True for a bare cuid-shaped body: ``c`` + 24 lowercase base36 chars."""
    return (
        isinstance(value, str)
        and len(value) == LEGACY_BODY_LEN
        and _LEGACY_BODY_RE.fullmatch(value) is not None
    )


def is_valid_prefix(prefix: object) -> bool:
    """True for a prefix :func:`mint` accepts (``run``, ``batch``, ``wp``, ``batch_item``, ...)."""
    return (
        isinstance(prefix, str)
        and 0 < len(prefix) <= MAX_PREFIX_LEN
        and _PREFIX_RE.fullmatch(prefix) is not None
    )


def split_friendly_id(value: str) -> tuple[str, str] | None:
    """``(prefix, body)`` of a friendly id, split at the LAST underscore; None unless the prefix is
    well-formed and the body non-empty. The body's shape is not checked (see residency_of)."""
    if not isinstance(value, str):
        return None
    prefix, sep, body = value.rpartition("_")
    if not sep or not body or not is_valid_prefix(prefix):
        return None
    return prefix, body


def body_of(id_or_body: str) -> str:
    """The body of a friendly id, or the input itself when it is not a friendly id."""
    parts = split_friendly_id(id_or_body)
    return id_or_body if parts is None else parts[1]


def timestamp_ms_of_new(id_or_body: object) -> int | None:
    """The Unix time in ms encoded in a NEW body (bare or friendly); None if not NEW-shaped."""
    if residency_of(id_or_body) is not Residency.NEW:
        return None
    assert isinstance(id_or_body, str)
    return int(id_or_body[-NEW_BODY_LEN:][:10], 32)


# Unix time zero (runops.kit.limits names it for the services).
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def timestamp_of_new(id_or_body: object) -> datetime | None:
    """The creation time (UTC, millisecond precision) encoded in a NEW body; None if the input is
    not NEW-shaped or its time lies beyond what ``datetime`` represents (year 9999)."""
    ms = timestamp_ms_of_new(id_or_body)
    if ms is None:
        return None
    try:
        return EPOCH + timedelta(milliseconds=ms)
    except OverflowError:
        return None


# ---------------------------------------------------------------------------------------------
# Encoding


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


_B32HEX = "0123456789abcdefghijklmnopqrstuv"  # RFC 4648 base32hex, lowercased
# Two characters for each 10-bit value: a body is 13 lookups, several times cheaper than
# base64.b32hexencode (bodies are minted per run on the batch write path).
_B32HEX_PAIRS = tuple(a + b for a in _B32HEX for b in _B32HEX)


def _encode_new(ms: int, rand: int) -> str:
    """130 bits as 26 base32hex characters, most significant first."""
    value = (ms << (_RANDOM_BITS + _VERSION_BITS)) | (rand << _VERSION_BITS) | NEW_VERSION
    return "".join([_B32HEX_PAIRS[(value >> shift) & 0x3FF] for shift in range(120, -1, -10)])


def _b36(value: int, width: int) -> str:
    chars = ["0"] * width
    for i in range(width - 1, -1, -1):
        value, digit = divmod(value, 36)
        chars[i] = _B36[digit]
    return "".join(chars)


class _NewSequence:
    """Monotonic NEW-body generator (one per process)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_ms = -1
        self._last_rand = 0

    def reset(self) -> None:
        self._lock = threading.Lock()
        self._last_ms = -1
        self._last_rand = 0

    def next(self) -> str:
        now = _now_ms()
        with self._lock:
            if now > self._last_ms:
                ms, rand = now, secrets.randbits(_RANDOM_BITS)
            elif self._last_rand < _MAX_RANDOM:
                ms, rand = self._last_ms, self._last_rand + 1
            else:
                ms, rand = self._last_ms + 1, secrets.randbits(_RANDOM_BITS)
            if ms > _MAX_MS:  # pragma: no cover - year 37648
                raise OverflowError("NEW id timestamp space exhausted")
            self._last_ms, self._last_rand = ms, rand
        return _encode_new(ms, rand)


_BLOCK = 36**4
_TIME_WRAP = 36**8


def _fingerprint() -> str:
    pid = _b36(os.getpid() % (36**2), 2)
    host = socket.gethostname()
    acc = len(host) + 36
    for ch in host:
        acc += ord(ch)
    return pid + _b36(acc % (36**2), 2)


class _LegacySequence:
    """cuid v1 generator (one per process)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._lock = threading.Lock()
        self._counter = secrets.randbelow(_BLOCK)
        self._fingerprint = _fingerprint()

    def next(self, at_ms: int | None = None) -> str:
        with self._lock:
            count = self._counter
            self._counter = (count + 1) % _BLOCK
        ms = _now_ms() if at_ms is None else at_ms
        return (
            "c"
            + _b36(ms % _TIME_WRAP, 8)
            + _b36(count, 4)
            + self._fingerprint
            + _b36(secrets.randbelow(_TIME_WRAP), 8)
        )


_NEW_SEQ = _NewSequence()
_LEGACY_SEQ = _LegacySequence()


def _after_fork_in_child() -> None:
    _NEW_SEQ.reset()
    _LEGACY_SEQ.reset()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# ---------------------------------------------------------------------------------------------
# Minting


def mint_body(residency: Residency, *, at_ms: int | None = None) -> str:
    """A fresh body of the given residency.

    ``at_ms`` (Unix ms) stamps an explicit time instead of the clock (backfills, tests). Explicit
    NEW bodies are not part of the process's monotonic sequence: each gets fresh randomness, so
    two bodies for the same explicit millisecond are unique but not ordered."""
    if at_ms is not None and not (0 <= at_ms <= _MAX_MS):
        raise ValueError(f"at_ms must be between 0 and {_MAX_MS}, got {at_ms!r}")
    if residency is Residency.NEW:
        if at_ms is None:
            return _NEW_SEQ.next()
        return _encode_new(at_ms, secrets.randbits(_RANDOM_BITS))
    if residency is Residency.LEGACY:
        return _LEGACY_SEQ.next(at_ms)
    raise ValueError(f"residency must be a Residency, got {residency!r}")


def mint(prefix: str, residency: Residency, *, at_ms: int | None = None) -> str:
    """A fresh friendly id ``<prefix>_<body>``; ValueError for a malformed prefix."""
    if not is_valid_prefix(prefix):
        raise ValueError(
            f"id prefix must be lowercase [a-z][a-z0-9]* segments joined by '_' "
            f"(at most {MAX_PREFIX_LEN} chars), got {prefix!r}"
        )
    return f"{prefix}_{mint_body(residency, at_ms=at_ms)}"


class IdMinter:
    """The id policy of spec §1: with the database split on, new ids are minted NEW (run-ops
    database); with it off (single-database mode), LEGACY (control-plane database)."""

    __slots__ = ("_residency", "_split")

    def __init__(self, *, database_split: bool) -> None:
        self._split = database_split
        self._residency = Residency.NEW if database_split else Residency.LEGACY

    @property
    def database_split(self) -> bool:
        return self._split

    @property
    def residency(self) -> Residency:
        """The residency given to ids without a parent."""
        return self._residency

    def mint(self, prefix: str) -> str:
        """A friendly id for a new top-level row (a batch, a single run)."""
        return mint(prefix, self._residency)

    def mint_body(self) -> str:
        return mint_body(self._residency)

    def mint_child(self, prefix: str, parent_id: object) -> str:
        """A friendly id for a row that must live with its parent (a batch's runs, a waitpoint
        of a batch or run): it inherits the parent's residency, whatever the policy says now."""
        return mint(prefix, residency_of(parent_id))

    def __repr__(self) -> str:
        return f"IdMinter(database_split={self._split})"
