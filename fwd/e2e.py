"""End-to-end encryption between fwd clients, as a sans-I/O encoder and decoder.

The relay forwards bytes it could read. Clients that share a secret can wrap
each direction of their stream in this format so that the relay (and anyone
listening in broadcast mode) only ever sees ciphertext, and any change to the
bytes on the way is detected. docs/PROTOCOL.md §8 is the specification, with a
test vector; in short::

    stream  = header record* final
    header  = "FWE1" (4 bytes) || salt (16 random bytes, new for every stream)
    record  = word (4 bytes, big-endian) || AES-256-GCM ciphertext || tag (16)
    word    = FINAL_BIT (0x80000000, only on the last record) | len(ciphertext || tag)
    master  = scrypt(secret, salt="fwd-e2e-v1", n=2**15, r=8, p=1, 32 bytes)
    key     = HKDF-SHA256(ikm=master, salt=header salt, info="fwd-e2e-v1 stream key", 32 bytes)
    nonce   = 4 zero bytes || record counter (8 bytes, big-endian, from 0)
    AAD     = word

Why this shape:

* No nonce on the wire, and no nonce reuse: every stream (each direction of
  each connection) draws its own random salt, so it has its own key, and the
  counter never repeats under one key.
* The word is the AAD, so neither the length nor the FINAL bit can be changed;
  a missing FINAL record before EOF is reported as truncation, so a relay that
  cuts a stream short cannot make it look complete.
* Records hold at most 64 KiB of plaintext: the decoder never buffers more than
  one record, and a write is sent as soon as it is made (no waiting to fill a
  record), which keeps interactive use interactive.
* The expensive scrypt runs once per secret (``E2EKey.from_secret``); the per
  stream HKDF is cheap, so many connections can share one ``E2EKey``.

What it does not do: it does not authenticate *which* holder of the secret
sent a stream, and it cannot stop a relay from dropping or replaying a whole
recorded stream. A decoder can reject a stream that carries its own encoder's
salt (a stream reflected back at its sender).
"""
from __future__ import annotations

import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from .errors import FwdError

MAGIC = b"FWE1"
"""First bytes of every stream: format version 1. Not ``{``, so a broadcast-mode
server never mistakes an encrypted stream for a handshake line."""
SALT_SIZE = 16
HEADER_SIZE = len(MAGIC) + SALT_SIZE
TAG_SIZE = 16
MAX_RECORD = 64 * 1024
"""Most plaintext bytes in one record."""
FINAL_BIT = 0x8000_0000
KEY_SIZE = 32
SCRYPT_SALT = b"fwd-e2e-v1"
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1
HKDF_INFO = b"fwd-e2e-v1 stream key"
_MAX_COUNTER = 2**64 - 1
_WORD = struct.Struct(">I")


class E2EError(FwdError):
    """The encrypted stream is not authentic: wrong key, tampered, truncated or malformed."""


class E2EKey:
    """The 32-byte master key shared by everyone who may read a stream.

    Build it with ``from_secret`` (slow on purpose: scrypt) once, then pass it
    to as many encoders and decoders as needed.
    """

    __slots__ = ("master",)

    def __init__(self, master: bytes) -> None:
        if len(master) != KEY_SIZE:
            raise ValueError(f"an E2E master key is {KEY_SIZE} bytes, not {len(master)}")
        self.master = bytes(master)

    @classmethod
    def from_secret(cls, secret: str | bytes) -> E2EKey:
        """Stretch a shared secret (a passphrase is fine) with scrypt.

        The salt is a fixed label: both ends must arrive at the same key with
        nothing exchanged beforehand, and the per-stream salt is mixed in later
        by HKDF. scrypt's cost is what protects a weak passphrase.
        """
        raw = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
        if not raw:
            raise ValueError("the E2E secret must not be empty")
        kdf = Scrypt(salt=SCRYPT_SALT, length=KEY_SIZE, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P)
        return cls(kdf.derive(raw))

    def stream_key(self, salt: bytes) -> bytes:
        """The AES-256-GCM key of the stream whose header carries ``salt``."""
        hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=salt, info=HKDF_INFO)
        return hkdf.derive(self.master)

    def __repr__(self) -> str:  # never print key material
        return "E2EKey(<secret>)"


def as_key(key: E2EKey | str | bytes) -> E2EKey:
    """Accept a ready key or a secret; a secret costs one scrypt run."""
    if isinstance(key, E2EKey):
        return key
    if not isinstance(key, (str, bytes, bytearray)):  # bytes(1234) is 1234 zeros
        raise TypeError(f"an end-to-end secret is str or bytes, not {type(key).__name__}")
    return E2EKey.from_secret(key)


def _nonce(counter: int) -> bytes:
    return b"\x00\x00\x00\x00" + counter.to_bytes(8, "big")


class Encoder:
    """Plaintext in, stream bytes out. One encoder per direction per connection.

    The header goes out with the first record, not at construction, so that a
    receiver which joins before the first byte is sent still sees it.
    """

    __slots__ = ("salt", "_aead", "_counter", "_header_sent", "_finished")

    def __init__(self, key: E2EKey, salt: bytes | None = None) -> None:
        """``salt`` is for test vectors only: a reused salt means a reused key stream."""
        self.salt = os.urandom(SALT_SIZE) if salt is None else bytes(salt)
        if len(self.salt) != SALT_SIZE:
            raise ValueError(f"salt must be {SALT_SIZE} bytes")
        self._aead = AESGCM(key.stream_key(self.salt))
        self._counter = 0
        self._header_sent = False
        self._finished = False

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def started(self) -> bool:
        """Some of the stream went out (its header with a first record)."""
        return self._header_sent

    def _header(self) -> bytes:
        if self._header_sent:
            return b""
        self._header_sent = True
        return MAGIC + self.salt

    def _record(self, plaintext: bytes, final: bool) -> bytes:
        if self._counter > _MAX_COUNTER:  # pragma: no cover - 2**64 records
            raise E2EError("record counter exhausted")
        nonce = _nonce(self._counter)
        self._counter += 1
        word = _WORD.pack((FINAL_BIT if final else 0) | (len(plaintext) + TAG_SIZE))
        return word + self._aead.encrypt(nonce, plaintext, word)

    def encode(self, data: bytes | bytearray | memoryview) -> bytes:
        """Encrypt ``data`` into records of at most MAX_RECORD plaintext bytes each."""
        if self._finished:  # our misuse, not a stream that fails to authenticate
            raise RuntimeError("write after the end of the encrypted stream")
        view = memoryview(data).cast("B")
        if not len(view):
            return b""
        parts = [self._header()]
        for i in range(0, len(view), MAX_RECORD):
            parts.append(self._record(bytes(view[i:i + MAX_RECORD]), final=False))
        return b"".join(parts)

    def finish(self) -> bytes:
        """The FINAL record: it tells the reader the stream ended here on purpose."""
        if self._finished:
            return b""
        head = self._header()
        self._finished = True
        return head + self._record(b"", final=True)


class Decoder:
    """Stream bytes in, authenticated plaintext out; raises E2EError on anything else.

    Plaintext is only ever returned after its record's tag has been checked,
    so nothing forged reaches the application, even partially. Records are
    released one by one, whatever the reads: the records that verified before
    a bad one in the same ``feed`` are returned, and the next call (``feed``,
    ``feed_eof``, ``check``) raises the error.
    """

    __slots__ = ("key", "forbid_salt", "_buf", "_aead", "_counter", "_finished", "_error",
                 "salt")

    def __init__(self, key: E2EKey, forbid_salt: bytes | None = None) -> None:
        """``forbid_salt``: our own encoder's salt; seeing it means our stream came back."""
        self.key = key
        self.forbid_salt = forbid_salt
        self.salt: bytes | None = None
        self._buf = bytearray()
        self._aead: AESGCM | None = None
        self._counter = 0
        self._finished = False
        self._error: E2EError | None = None

    @property
    def finished(self) -> bool:
        """The FINAL record has arrived: the stream is complete and authentic."""
        return self._finished and self._error is None

    @property
    def started(self) -> bool:
        """Some of a stream has arrived: an end now is a truncation, not a
        peer that sent no stream at all (which only the reader can judge)."""
        return self._aead is not None or bool(self._buf)

    def check(self) -> None:
        """Raise the error the stream met, if any: once refused, always refused."""
        if self._error is not None:
            raise self._error

    def _raise(self, message: str) -> E2EError:
        self._error = E2EError(message)
        return self._error

    def feed(self, data: bytes | bytearray | memoryview) -> bytes:
        """Add received bytes; return the plaintext of every record now complete."""
        if self._error is not None:
            raise self._error
        if not data:
            return b""
        if self._finished:
            raise self._raise("data after the end of the encrypted stream")
        buf = self._buf
        buf += data
        out: list[bytes] = []
        pos = 0
        try:
            if self._aead is None:
                if bytes(buf[:len(MAGIC)]) != MAGIC[:len(buf)]:  # say so at once
                    raise self._raise("not an fwd E2E stream (bad header)")
                if len(buf) < HEADER_SIZE:
                    return b""
                salt = bytes(buf[len(MAGIC):HEADER_SIZE])
                if self.forbid_salt is not None and salt == self.forbid_salt:
                    raise self._raise("received our own encrypted stream back (reflected)")
                self.salt = salt
                self._aead = AESGCM(self.key.stream_key(salt))
                pos = HEADER_SIZE
            while len(buf) - pos >= 4:
                (word,) = _WORD.unpack_from(buf, pos)
                final = bool(word & FINAL_BIT)
                size = word & ~FINAL_BIT
                # A data record carries 1 byte at least; the final one none.
                ok = size == TAG_SIZE if final else TAG_SIZE < size <= MAX_RECORD + TAG_SIZE
                if not ok:
                    raise self._raise(f"bad record length {size}")
                end = pos + 4 + size
                if len(buf) < end:
                    break
                try:
                    plain = self._aead.decrypt(_nonce(self._counter),
                                               bytes(buf[pos + 4:end]), bytes(buf[pos:pos + 4]))
                except InvalidTag:
                    raise self._raise("authentication failed: wrong key or tampered data") from None
                self._counter += 1
                pos = end
                if final:
                    self._finished = True
                    if len(buf) > pos:
                        raise self._raise("data after the end of the encrypted stream")
                    break
                out.append(plain)
        except E2EError:
            if not out:
                raise  # else the next call raises it (self._error)
        finally:
            del buf[:pos]
        return b"".join(out)

    def feed_eof(self) -> None:
        """The transport ended: fine only after the FINAL record."""
        if self._error is not None:
            raise self._error
        if not self._finished:
            raise self._raise("encrypted stream truncated (connection ended before its "
                              "final record)")
