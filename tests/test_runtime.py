"""The log handler and formatters of fwd/runtime.py, on a real pipe."""
from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Iterator

import pytest

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


def test_json_lines_carry_fields_as_keys() -> None:
    record = logging.LogRecord("fwd.session", logging.INFO, __file__, 1, "end %s", ("a",), None)
    record.fields = {"event": "session_end", "bytes_in": 3}
    out = json.loads(JsonFormatter("w1").format(record))
    assert out["msg"] == "end a" and out["proc"] == "w1" and out["level"] == "INFO"
    assert out["event"] == "session_end" and out["bytes_in"] == 3
    assert out["ts"].endswith("Z")
