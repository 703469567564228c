"""Exception types shared by every layer.

The split mirrors h11: a *remote* error means the peer broke the protocol (it
carries the text the server puts into the hs4 FAIL line), a *local* error means
our own code drove the state machine wrongly (a bug, never the client's fault).
"""
from __future__ import annotations


class FwdError(Exception):
    """Base class for everything fwd raises on purpose."""


class ProtocolError(FwdError):
    """The handshake cannot go on; ``desc`` is safe to show to the peer."""

    def __init__(self, desc: str) -> None:
        super().__init__(desc)
        self.desc = desc


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids."""


class LineRejected(RemoteProtocolError):
    """A handshake line could not be read at all (too long; with a password also:
    not base64, not authentic, not JSON). ``desc`` is what the peer may be told;
    ``reason`` is the detail, for our own log only."""

    def __init__(self, desc: str, reason: str | None = None) -> None:
        super().__init__(desc)
        self.reason = reason or desc


class LocalProtocolError(ProtocolError):
    """We tried to send an event the current state does not allow."""


class ChidInUse(FwdError):
    """Another live session already holds the requested chid."""

    def __init__(self, chid: str) -> None:
        super().__init__(chid)
        self.chid = chid
