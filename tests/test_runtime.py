"""The log handler and formatters of fwd/runtime.py, on a real pipe."""
from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import re
import threading
from collections.abc import Iterator

import pytest

from fwd import runtime
from fwd.runtime import JsonFormatter, LoopBufferedHandler


@pytest.fixture
def piped() -> Iterator[tuple[logging.Logger, int]]:
    """A logger whose LoopBufferedHandler writes into a pipe (64 KiB: tests stay
    below it, nobody reads until they end); the read end."""
    r, w = os.pipe()
    os.set_blocking(r, False)
    stream = os.fdopen(w, "w")
    handler = LoopBufferedHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger(f"test-runtime-{r}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield logger, r
    logger.removeHandler(handler)
    stream.close()
    os.close(r)


def pending(fd: int) -> bytes:
    try:
        return os.read(fd, 1 << 20)
    except BlockingIOError:
        return b""


def test_outside_a_loop_each_record_is_written_at_once(piped: tuple[logging.Logger, int]) -> None:
    logger, r = piped
    logger.info("one")
    assert pending(r) == b"INFO one\n"


def test_in_a_loop_records_wait_for_the_end_of_the_iteration(
        piped: tuple[logging.Logger, int]) -> None:
    logger, r = piped

    async def main() -> tuple[bytes, bytes, bytes]:
        logger.info("a")
        logger.info("b")
        before = pending(r)
        await asyncio.sleep(0)
        after = pending(r)
        logger.info("c")
        logger.warning("w")  # a warning takes what waits with it, at once
        return before, after, pending(r)

    before, after, warned = asyncio.run(main())
    assert before == b""
    assert after == b"INFO a\nINFO b\n"
    assert warned == b"INFO c\nWARNING w\n"


def test_many_lines_arrive_whole_and_in_order(piped: tuple[logging.Logger, int]) -> None:
    logger, r = piped

    async def main() -> None:
        for i in range(500):
            logger.info("line %04d %s", i, "x" * 90)
        await asyncio.sleep(0)

    asyncio.run(main())
    got = b""
    while chunk := pending(r):
        got += chunk
    lines = got.decode().splitlines()
    assert lines == [f"INFO line {i:04d} {'x' * 90}" for i in range(500)]


def test_a_stderr_nobody_reads_does_not_block_the_loop(
        piped: tuple[logging.Logger, int], monkeypatch: pytest.MonkeyPatch) -> None:
    """Lines stderr cannot take wait (LOG_BACKLOG bytes of them) and the rest
    are dropped, then counted: a stalled log reader must not stall the relay,
    whose clients can make it log (a helper froze a server with 500 bad
    handshakes). Once stderr reads again, what waited follows in order."""
    logger, r = piped
    monkeypatch.setattr(runtime, "LOG_BACKLOG", 32 * 1024)
    size = fcntl.fcntl(r, fcntl.F_GETPIPE_SZ)
    line = "x" * 99  # 100 bytes a line with its newline, 106 with "INFO "
    count = (size + 64 * 1024) // 100
    out: list[bytes] = []

    async def main() -> None:
        for i in range(count):
            logger.info("%05d %s", i, line[6:])
            if i % 100 == 0:
                await asyncio.sleep(0)  # the end of an iteration: a write
        while True:  # the reader comes back
            chunk = pending(r)
            out.append(chunk)
            if b"log lines dropped" in chunk:
                return
            await asyncio.sleep(runtime.LOG_RETRY)

    done = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    done.start()
    done.join(30)
    assert not done.is_alive(), "the loop blocked on stderr"
    lines = b"".join(out).decode().splitlines()
    note = lines.pop()
    numbers = [int(ln.split()[1]) for ln in lines]
    assert numbers == list(range(len(numbers)))  # whole lines, in order, no hole
    dropped = int(re.search(r"WARNING (\d+) log lines dropped", note).group(1))
    assert len(numbers) + dropped == count and dropped > 0


def test_json_lines_carry_fields_as_keys() -> None:
    record = logging.LogRecord("fwd.session", logging.INFO, __file__, 1, "end %s", ("a",), None)
    record.fields = {"event": "session_end", "bytes_in": 3}
    out = json.loads(JsonFormatter("w1").format(record))
    assert out["msg"] == "end a" and out["proc"] == "w1" and out["level"] == "INFO"
    assert out["event"] == "session_end" and out["bytes_in"] == 3
    assert out["ts"].endswith("Z")
