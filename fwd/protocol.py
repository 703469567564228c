"""The chan handshake as a sans-I/O state machine.

Nothing here touches a socket or a clock: the I/O layer feeds received bytes in
(``receive_data``), pulls events out (``next_event``) and turns events it wants
to send into bytes (``send``). That keeps every rule of docs/PROTOCOL.md
testable byte by byte, and lets the same machine serve the server, the client
library and, later, an encrypted line codec.

The legal moves are data (``_RECEIVE`` and ``_SEND``, keyed by role, state and
event type); a move that is not in the tables is a protocol error, and once a
machine has failed it stays failed.
"""
from __future__ import annotations

import enum
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, Union

from .errors import LineRejected, LocalProtocolError, RemoteProtocolError

MAX_LINE = 4096
"""Longest handshake line, in bytes, not counting its ``\\n``."""
MAX_CHID_BYTES = 128
MAX_RECVERS = 1024
MAX_TIMEOUT = 2**31 - 1
"""Largest ``timeout`` accepted (seconds): larger values are rejected, not clamped."""
MAX_NONCE_CHARS = 128
"""Longest ``nonce`` (hs2/hs3, encrypted handshake) accepted, in characters."""


class _Sentinel(enum.Enum):
    NEED_DATA = "NEED_DATA"
    PAUSED = "PAUSED"

    def __repr__(self) -> str:
        return self.value


NEED_DATA = _Sentinel.NEED_DATA
"""``next_event``: a whole line has not arrived yet."""
PAUSED = _Sentinel.PAUSED
"""``next_event``: it is our turn to send (or the handshake is over)."""


def _fail(desc: str) -> RemoteProtocolError:
    return RemoteProtocolError(desc)


def check_chid(value: object, what: str = "chid") -> str:
    """Return ``value`` if it is a usable chid, else raise with a reason.

    Chids end up in logs, metrics labels and other clients' recvers lists, so
    they are limited to short printable text.
    """
    if not isinstance(value, str):
        raise _fail(f"{what} must be a string")
    if not value:
        raise _fail(f"{what} must not be empty")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise _fail(f"{what} is not valid Unicode") from None
    if size > MAX_CHID_BYTES:
        raise _fail(f"{what} longer than {MAX_CHID_BYTES} bytes")
    if any(c < " " or "\x7f" <= c <= "\x9f" for c in value):
        raise _fail(f"{what} contains control characters")
    return value


def check_chids(values: Sequence[object], what: str) -> None:
    """A list of chids (hs3 ``recvers``, ``senders``): its length is checked
    before its entries, so a huge list costs no more than that."""
    if len(values) > MAX_RECVERS:
        raise _fail(f"more than {MAX_RECVERS} {what}s")
    for value in values:
        check_chid(value, what)


def check_nonce(value: object) -> str | None:
    """``None`` or a string of at most MAX_NONCE_CHARS characters."""
    if value is not None and (not isinstance(value, str) or len(value) > MAX_NONCE_CHARS):
        raise _fail(f"nonce must be a string of at most {MAX_NONCE_CHARS} characters")
    return value


@dataclass(frozen=True, slots=True)
class Hs1:
    """Client asks for a chid; ``None`` lets the server pick one."""

    chid: str | None = None

    def __post_init__(self) -> None:
        if self.chid is not None:
            check_chid(self.chid)


@dataclass(frozen=True, slots=True)
class Hs2:
    """Server confirms the chid the session now holds.

    ``nonce`` (encrypted handshake only) is the server's fresh token for this
    connection, which the client must echo in hs3.
    """

    chid: str
    nonce: str | None = None

    def __post_init__(self) -> None:
        check_chid(self.chid)
        check_nonce(self.nonce)


@dataclass(frozen=True, slots=True)
class Hs3:
    """Client names its receivers (empty: everyone else) and an idle timeout."""

    recvers: tuple[str, ...] = ()
    timeout: int | None = None
    nonce: str | None = None
    """Encrypted handshake only: the hs2 ``nonce``, echoed."""
    senders: tuple[str, ...] | None = None
    """The only chids this session receives from (None: anyone). An exposed
    service would otherwise also get every "everyone else" sender's bytes."""

    def __post_init__(self) -> None:
        check_nonce(self.nonce)
        check_chids(self.recvers, "recver")
        if self.senders is not None:
            check_chids(self.senders, "sender")
        t = self.timeout
        if t is not None and (
            isinstance(t, bool) or not isinstance(t, int) or not 0 <= t <= MAX_TIMEOUT
        ):
            raise _fail(f"timeout must be an integer from 0 to {MAX_TIMEOUT}")


@dataclass(frozen=True, slots=True)
class Hs4:
    """Server's verdict; a FAIL carries a human-readable reason."""

    ok: bool
    desc: str = ""


Event = Union[Hs1, Hs2, Hs3, Hs4]  # noqa: UP007 - a runtime alias on Python 3.10


class Role(enum.Enum):
    SERVER = "server"
    CLIENT = "client"


class State(enum.Enum):
    SEND_HS1 = "SEND_HS1"
    AWAIT_HS1 = "AWAIT_HS1"
    SEND_HS2 = "SEND_HS2"
    AWAIT_HS2 = "AWAIT_HS2"
    SEND_HS3 = "SEND_HS3"
    AWAIT_HS3 = "AWAIT_HS3"
    SEND_HS4 = "SEND_HS4"
    AWAIT_HS4 = "AWAIT_HS4"
    DONE = "DONE"
    FAILED = "FAILED"


S = State
_SERVER_STATES = (S.AWAIT_HS1, S.SEND_HS2, S.AWAIT_HS3, S.SEND_HS4, S.FAILED)
# Keys are (role, state, kind); kind tells hs4 OK from hs4 FAIL (see _kind).
_RECEIVE: dict[tuple[Role, State, str], State] = {
    (Role.SERVER, S.AWAIT_HS1, "hs1"): S.SEND_HS2,
    (Role.SERVER, S.AWAIT_HS3, "hs3"): S.SEND_HS4,
    (Role.CLIENT, S.AWAIT_HS2, "hs2"): S.SEND_HS3,
    (Role.CLIENT, S.AWAIT_HS2, "hs4 FAIL"): S.FAILED,  # e.g. "chid in use"
    (Role.CLIENT, S.AWAIT_HS4, "hs4 OK"): S.DONE,
    (Role.CLIENT, S.AWAIT_HS4, "hs4 FAIL"): S.FAILED,
}
_SEND: dict[tuple[Role, State, str], State] = {
    (Role.SERVER, S.SEND_HS2, "hs2"): S.AWAIT_HS3,
    (Role.SERVER, S.SEND_HS4, "hs4 OK"): S.DONE,
    (Role.CLIENT, S.SEND_HS1, "hs1"): S.AWAIT_HS2,
    (Role.CLIENT, S.SEND_HS3, "hs3"): S.AWAIT_HS4,
    # The server may refuse at any step before the handshake is done.
    **{(Role.SERVER, st, "hs4 FAIL"): S.FAILED for st in _SERVER_STATES},
}
_INITIAL = {Role.SERVER: S.AWAIT_HS1, Role.CLIENT: S.SEND_HS1}
_OUR_TURN = {S.SEND_HS1, S.SEND_HS2, S.SEND_HS3, S.SEND_HS4, S.DONE}
_NAMES = {Hs1: "hs1", Hs2: "hs2", Hs3: "hs3", Hs4: "hs4"}


def _kind(event: Event) -> str:
    name = _NAMES[type(event)]
    if isinstance(event, Hs4):
        return f"{name} OK" if event.ok else f"{name} FAIL"
    return name


def _reject_constant(name: str) -> Any:
    raise ValueError(name)


def decode_json_line(line: bytes) -> Any:
    """Parse one line of UTF-8 JSON, mapping every failure to a remote error."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise _fail("invalid UTF-8") from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise _fail("not JSON") from None


_REFUSAL = b'{"rsp":"hs4","result":"FAIL"'
SERVER_CLOSED = "the server closed the connection during the handshake"
"""What a client's Handshake reports for the server's close (FIN) before
hs4: a server going away, to be retried, not a reply that is wrong."""
REFUSAL_WAIT = 2.0
"""How long a client that sent no handshake waits for the close that must
follow a refusal line (see ``refusal``)."""


def refusal(first: bytes) -> str | None:
    """What a chan-mode server said when it refused a client that sent no
    handshake (its hs4 FAIL line, which fwd writes whole, keys in this order),
    given the first bytes such a client read; None for anything else. A plain
    client pointed at a chan server would otherwise pass that line on as data.

    Bytes after the line make it payload. So does a connection that stays
    open: a refusing server closes right after the line, and in broadcast
    mode any client can send the same bytes to make its peers quit. The
    caller waits up to REFUSAL_WAIT for that close before it believes it."""
    if not first.startswith(_REFUSAL) or first.partition(b"\n")[2]:
        return None
    try:
        obj = decode_json_line(first.split(b"\n", 1)[0])
    except RemoteProtocolError:
        obj = None
    desc = obj.get("desc") if isinstance(obj, dict) else None
    return desc if isinstance(desc, str) and desc else "hs4 FAIL"


class LineCodec(Protocol):
    """How one handshake message becomes one line; the encrypted codec plugs in here."""

    def decode(self, line: bytes) -> Any: ...

    def encode(self, message: dict[str, Any]) -> bytes: ...


class PlainCodec:
    """Compact JSON, one object per ``\\n``-terminated line."""

    def decode(self, line: bytes) -> Any:
        return decode_json_line(line)

    def encode(self, message: dict[str, Any]) -> bytes:
        return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


PLAIN = PlainCodec()


FULL = "server full"
PER_IP = "too many connections from this address"
NOT_ALLOWED = "address not allowed"
RESTARTING = "server restarting"
SHUTDOWN = "server shutdown"
REFUSED_AT_ACCEPT = (FULL, PER_IP, NOT_ALLOWED, RESTARTING, SHUTDOWN)
"""The descs of refusal lines sent before any handshake (PROTOCOL.md §2.5):
the connection, not its handshake, was refused."""


def refusal_line(desc: str) -> bytes:
    """The plain hs4 FAIL line for a connection refused before its handshake
    (--max-conns, shutdown): every client reads it, encrypted ones too."""
    return PLAIN.encode({"rsp": "hs4", "result": "FAIL", "desc": desc})


def to_message(event: Event) -> dict[str, Any]:
    """The JSON object that carries ``event`` on the wire."""
    if isinstance(event, Hs1):
        return {"req": "hs1"} if event.chid is None else {"req": "hs1", "chid": event.chid}
    if isinstance(event, Hs2):
        if event.nonce is None:
            return {"rsp": "hs2", "chid": event.chid}
        return {"rsp": "hs2", "chid": event.chid, "nonce": event.nonce}
    if isinstance(event, Hs3):
        msg: dict[str, Any] = {"req": "hs3", "recvers": list(event.recvers)}
        if event.timeout is not None:
            msg["timeout"] = event.timeout
        if event.nonce is not None:
            msg["nonce"] = event.nonce
        if event.senders is not None:
            msg["senders"] = list(event.senders)
        return msg
    if event.ok:
        return {"rsp": "hs4", "result": "OK"}
    return {"rsp": "hs4", "result": "FAIL", "desc": event.desc}


REQUEST_KEYS = {
    "hs1": frozenset({"req", "chid"}),
    "hs3": frozenset({"req", "recvers", "timeout", "nonce", "senders"}),
}
"""The keys each request may carry; any other fails the handshake."""


def from_message(obj: Any, role: Role) -> Event:
    """Validate a decoded JSON value as the message ``role`` expects to receive.

    A request with a key the server does not know fails: a misspelt
    ``recvers`` would otherwise turn a private stream into a broadcast, and a
    client asking for a feature this server lacks learns so. Replies are read
    leniently instead, so that a newer server can add fields.
    """
    if not isinstance(obj, dict):
        raise _fail("not a JSON object")
    key = "req" if role is Role.SERVER else "rsp"
    kind = obj.get(key)
    if not isinstance(kind, str):
        raise _fail(f"missing {key!r}")
    if role is Role.SERVER:
        known = REQUEST_KEYS.get(kind)
        if known is not None:
            for k in obj:
                if k not in known:
                    raise _fail(f"unknown key {k[:32]!r} in {kind}")
        if kind == "hs1":
            chid = obj.get("chid")
            return Hs1(None if chid is None or chid == "" else check_chid(chid))
        if kind == "hs3":
            recvers = obj.get("recvers")
            if recvers is None:
                recvers = []
            if not isinstance(recvers, list):
                raise _fail("recvers must be a list")
            check_chids(recvers, "recver")
            senders = obj.get("senders")
            if senders is not None:
                if not isinstance(senders, list):
                    raise _fail("senders must be a list")
                check_chids(senders, "sender")  # before dict.fromkeys hashes them
            # dict.fromkeys drops repeats but keeps the order the client gave.
            return Hs3(tuple(dict.fromkeys(recvers)), obj.get("timeout"),
                       check_nonce(obj.get("nonce")),
                       None if senders is None else tuple(dict.fromkeys(senders)))
    else:
        if kind == "hs2":
            return Hs2(check_chid(obj.get("chid")), check_nonce(obj.get("nonce")))
        if kind == "hs4":
            result = obj.get("result")
            if result == "OK":
                return Hs4(True)
            if result == "FAIL":
                desc = obj.get("desc")
                return Hs4(False, desc if isinstance(desc, str) else "")
            raise _fail("hs4 result must be OK or FAIL")
    raise _fail(f"unknown {key} {kind[:32]!r}")


class Handshake:
    """One side of one connection's handshake.

    ``receive_data(b"")`` signals EOF. After DONE, ``trailing_data`` holds the
    bytes that arrived behind the last handshake line: they are the start of
    the raw stream and must be forwarded, not dropped.
    """

    __slots__ = ("role", "state", "codec", "_buf", "_eof", "_error")

    def __init__(self, role: Role, codec: LineCodec = PLAIN) -> None:
        self.role = role
        self.codec = codec
        self.state = _INITIAL[role]
        self._buf = bytearray()
        self._eof = False
        self._error: RemoteProtocolError | None = None

    def receive_data(self, data: bytes) -> None:
        if self._eof:
            raise LocalProtocolError("data after EOF")
        if data:
            self._buf += data
        else:
            self._eof = True

    def next_event(self) -> Event | _Sentinel:
        if self._error is not None:
            raise self._error
        if self.state is S.FAILED:
            raise LocalProtocolError("the handshake has already failed")
        if self.state in _OUR_TURN:
            return PAUSED
        try:
            return self._next_event()
        except RemoteProtocolError as exc:
            self.state = S.FAILED
            self._error = exc
            raise

    def _next_event(self) -> Event | _Sentinel:
        # An encrypted codec's lines are longer than the JSON they carry.
        limit: int = getattr(self.codec, "max_line", MAX_LINE)
        nl = self._buf.find(b"\n", 0, limit + 1)
        if nl < 0:
            if len(self._buf) > limit:
                raise LineRejected(f"line longer than {limit} bytes")
            if self._eof:
                # A client reads the server's close: its own would be a local error.
                raise _fail("connection closed during handshake" if self.role is Role.SERVER
                            else SERVER_CLOSED)
            return NEED_DATA
        line = bytes(self._buf[:nl])
        del self._buf[: nl + 1]
        event = from_message(self.codec.decode(line), self.role)
        new_state = _RECEIVE.get((self.role, self.state, _kind(event)))
        if new_state is None:
            expected = self.state.name[-3:].lower()
            raise _fail(f"unexpected {_NAMES[type(event)]}, expected {expected}")
        self.state = new_state
        return event

    def send(self, event: Event) -> bytes:
        """Bytes for ``event``; a server may send a FAIL hs4 in any state but DONE."""
        new_state = _SEND.get((self.role, self.state, _kind(event)))
        if new_state is None:
            raise LocalProtocolError(f"cannot send {_kind(event)} in state {self.state.name}")
        self.state = new_state
        return self.codec.encode(to_message(event))

    @property
    def refusable(self) -> bool:
        """Whether an hs4 FAIL may still be sent: the server refuses at any
        step until its OK is out."""
        return (self.role, self.state, "hs4 FAIL") in _SEND

    @property
    def trailing_data(self) -> bytes:
        """Take the bytes buffered behind the final handshake line."""
        if self.state is not S.DONE:
            raise LocalProtocolError("handshake not finished")
        data = bytes(self._buf)
        self._buf.clear()
        return data


class Sniff(enum.Enum):
    DATA = "DATA"
    HANDSHAKE = "HANDSHAKE"
    UNDECIDED = "UNDECIDED"


def sniff(prefix: bytes) -> Sniff:
    """Classify the first bytes of a broadcast-mode connection.

    A connection is a handshake only if its very first byte is ``{`` and its
    first line is a JSON object whose ``req`` is ``"hs1"``. The I/O layer adds
    the time limit: still UNDECIDED after a few milliseconds means DATA.
    """
    if not prefix:
        return Sniff.UNDECIDED
    if prefix[0] != 0x7B:
        return Sniff.DATA
    nl = prefix.find(b"\n", 0, MAX_LINE + 1)
    if nl < 0:
        return Sniff.DATA if len(prefix) > MAX_LINE else Sniff.UNDECIDED
    try:
        obj = decode_json_line(prefix[:nl])
    except RemoteProtocolError:
        return Sniff.DATA
    return Sniff.HANDSHAKE if isinstance(obj, dict) and obj.get("req") == "hs1" else Sniff.DATA


FAILURE_REASONS: tuple[tuple[str, str], ...] = (
    ("handshake timeout", "timeout"),
    ("connection closed during handshake", "closed"),
    ("chid in use", "chid_in_use"),
    ("handshake rejected", "rejected"),
    ("line longer than", "line_too_long"),
    ("unexpected ", "out_of_order"),
    ("hs3 nonce", "bad_nonce"),
)
"""hs4 FAIL desc prefix → the reason label that metrics and logs count it under."""


def failure_reason(desc: str) -> str:
    """A small fixed set of names for handshake failures: the descs themselves
    carry client input (a chid, a key name), unfit as a metric label."""
    for prefix, reason in FAILURE_REASONS:
        if desc.startswith(prefix):
            return reason
    return "malformed"
