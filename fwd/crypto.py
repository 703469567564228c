"""The encrypted handshake's line codec (docs/PROTOCOL.md §7).

With ``--password`` every handshake line is the same JSON object as in plain
mode, sealed with AES-256-GCM and sent as one line of standard base64::

    base64(nonce[12] || ciphertext || tag[16]) "\\n"

The key is scrypt(password, salt=HANDSHAKE_SALT, n=2**14, r=8, p=1), 32 bytes,
derived once per process (it costs about 16 MiB and tens of milliseconds). The
associated data tells the two directions apart, so a server line reflected back
at the server does not authenticate: client lines use ``AD_C2S``, server lines
``AD_S2C``.

Like protocol.py this is sans-I/O: ``AeadLineCodec`` only turns messages into
lines and back, and plugs into ``protocol.Handshake`` as its ``LineCodec``.
"""
from __future__ import annotations

import base64
import binascii
import json
import os
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from .errors import LineRejected, RemoteProtocolError
from .protocol import MAX_LINE, Role, decode_json_line

HANDSHAKE_SALT = b"fwd-handshake-v1"
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
KEY_BYTES = 32
AD_C2S = b"fwd-hs-c2s"
"""Associated data of every client-to-server line."""
AD_S2C = b"fwd-hs-s2c"
"""Associated data of every server-to-client line."""
NONCE_BYTES = 12
TAG_BYTES = 16
MAX_SEALED_LINE = 4 * -(-(NONCE_BYTES + MAX_LINE + TAG_BYTES) // 3)
"""Longest encrypted line, not counting its ``\\n``: the base64 of a 4096-byte
JSON text plus nonce and tag, 4 * ceil((12 + 4096 + 16) / 3) = 5500 bytes."""
REJECTED = "handshake rejected"
"""The only reason a peer that fails to decode is ever told (in a plain line)."""


def derive_key(password: str) -> bytes:
    """The 32-byte handshake key; the password is encoded as UTF-8."""
    kdf = Scrypt(salt=HANDSHAKE_SALT, length=KEY_BYTES, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P)
    return kdf.derive(password.encode("utf-8"))


def seal_line(key: bytes, ad: bytes, plaintext: bytes, nonce: bytes | None = None) -> bytes:
    """One encrypted line with its ``\\n``; ``nonce`` is fresh random unless given
    (a fixed nonce is for test vectors only: never reuse one with a real key)."""
    if nonce is None:
        nonce = os.urandom(NONCE_BYTES)
    if len(nonce) != NONCE_BYTES:
        raise ValueError(f"nonce must be {NONCE_BYTES} bytes")
    sealed = nonce + AESGCM(key).encrypt(nonce, plaintext, ad)
    return base64.b64encode(sealed) + b"\n"


class AeadLineCodec:
    """A ``protocol.LineCodec`` for the encrypted handshake.

    ``role`` is the side that uses the codec: a server sends with ``AD_S2C``
    and receives with ``AD_C2S``, a client the reverse.

    ``decode`` raises ``LineRejected("handshake rejected")`` (a
    ``RemoteProtocolError``) for any line that is not valid base64, not long
    enough, does not authenticate, is longer than MAX_LINE bytes once
    decrypted, or is not JSON; ``reason`` on the exception says which, for the
    server's own log only. One exception, client side only: a plain JSON line
    that is an hs4 FAIL (``{"rsp":"hs4","result":"FAIL",...}``) is returned
    as-is, because a server refuses undecodable lines in plain text. It is not
    authenticated, but all it can do is end a handshake, which anyone on the
    path could do anyway by resetting the connection. Any other plain line is
    rejected.

    ``authenticated`` turns True once a line from the peer has decrypted: the
    peer holds the key (or replays a line of someone who does).
    """

    __slots__ = ("role", "max_line", "authenticated", "_aead", "_send_ad", "_recv_ad")

    def __init__(self, key: bytes, role: Role) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"key must be {KEY_BYTES} bytes")
        self.role = role
        self.max_line = MAX_SEALED_LINE
        self.authenticated = False
        self._aead = AESGCM(key)
        if role is Role.SERVER:
            self._send_ad, self._recv_ad = AD_S2C, AD_C2S
        else:
            self._send_ad, self._recv_ad = AD_C2S, AD_S2C

    def encode(self, message: dict[str, Any]) -> bytes:
        text = json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode()
        nonce = os.urandom(NONCE_BYTES)
        return base64.b64encode(nonce + self._aead.encrypt(nonce, text, self._send_ad)) + b"\n"

    def decode(self, line: bytes) -> Any:
        if self.role is Role.CLIENT and line[:1] == b"{":
            return self._plain_fail(line)
        if len(line) > MAX_SEALED_LINE:
            raise LineRejected(REJECTED, f"line longer than {MAX_SEALED_LINE} bytes")
        try:
            raw = base64.b64decode(line, validate=True)
        except (binascii.Error, ValueError):
            raise LineRejected(REJECTED, "not base64") from None
        if len(raw) < NONCE_BYTES + TAG_BYTES:
            raise LineRejected(REJECTED, "too short")
        if len(raw) > NONCE_BYTES + MAX_LINE + TAG_BYTES:
            raise LineRejected(REJECTED, f"longer than {MAX_LINE} bytes decrypted")
        try:
            text = self._aead.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], self._recv_ad)
        except InvalidTag:
            raise LineRejected(REJECTED, "authentication failed") from None
        self.authenticated = True
        try:
            return decode_json_line(text)
        except RemoteProtocolError as exc:
            raise LineRejected(REJECTED, f"decrypted, but {exc.desc}") from None

    @staticmethod
    def _plain_fail(line: bytes) -> Any:
        try:
            obj = decode_json_line(line)
        except RemoteProtocolError:
            raise LineRejected(REJECTED, "plain line that is not JSON") from None
        if isinstance(obj, dict) and obj.get("rsp") == "hs4" and obj.get("result") == "FAIL":
            return obj
        raise LineRejected(REJECTED, "plain line that is not an hs4 FAIL")
