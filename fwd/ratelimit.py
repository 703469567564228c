"""--max-rate: how fast one client may send into the relay.

A token bucket per sending session, fed with what each read brought and when.
The reader is never cut short: a read may overdraw the bucket, and the
session then stops reading until the debt is paid, so the kernel's socket
buffers and TCP push back on the client as with a slow receiver. Over any
stretch of time a session reads at most ``burst + rate * seconds`` bytes,
plus the one read that overdrew it.
"""
from __future__ import annotations


class RateMeter:
    """One session's bucket: ``burst`` bytes deep, refilled at ``rate`` per second."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("rate and burst must be positive")
        self.rate = rate
        self.burst = burst
        self.tokens = burst  # a new session may send a burst at once
        self.stamp = now

    def take(self, nbytes: int, now: float) -> float:
        """Count ``nbytes`` read at ``now``; return how many seconds the
        session must not read for (0.0: it may go on)."""
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
        self.tokens -= nbytes
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate
