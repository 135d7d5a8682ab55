"""The process log's handler and plain format (runtime/logs.py), on a real stream: lines logged
during one turn of the event loop reach the stream in one write, in order, and nothing waits
that could be lost before a traceback or at exit."""

from __future__ import annotations

import asyncio
import io
import logging

from runtime.logs import GatheringHandler, PlainFormatter

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class CountingStream(io.StringIO):
    """A stream that remembers how many times it was written to."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def logger_on(stream: CountingStream) -> tuple[logging.Logger, GatheringHandler]:
    handler = GatheringHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger(f"test.logs.{id(stream)}")
    logger.propagate = False
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG)
    return logger, handler


async def test_lines_of_one_loop_turn_reach_the_stream_in_one_write_in_order() -> None:
    stream = CountingStream()
    logger, _ = logger_on(stream)
    for n in range(3):
        logger.info("line %d", n)
    assert stream.getvalue() == ""  # not yet: the turn is not over
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert stream.getvalue() == "INFO line 0\nINFO line 1\nINFO line 2\n"
    assert stream.writes == 1


async def test_a_warning_is_written_at_once_after_what_came_before_it() -> None:
    stream = CountingStream()
    logger, _ = logger_on(stream)
    logger.info("before")
    logger.warning("trouble")
    assert stream.getvalue() == "INFO before\nWARNING trouble\n"


async def test_flushing_writes_what_was_gathered() -> None:
    stream = CountingStream()
    logger, handler = logger_on(stream)
    logger.info("at exit")
    handler.flush()  # what logging.shutdown does at exit
    assert stream.getvalue() == "INFO at exit\n"
    await asyncio.sleep(0)
    assert stream.getvalue() == "INFO at exit\n"  # and only once


def test_outside_an_event_loop_each_line_is_written_at_once() -> None:
    stream = CountingStream()
    logger, _ = logger_on(stream)
    logger.info("one")
    assert stream.getvalue() == "INFO one\n"
    logger.debug("two")
    assert stream.getvalue() == "INFO one\nDEBUG two\n"


def test_the_plain_format_reads_as_the_standard_one() -> None:
    record = logging.makeLogRecord({"name": "podiam.audit", "levelname": "INFO", "msg": "x"})
    for created in (1_700_000_000.123, 1_700_000_000.987, 1_700_000_001.5):
        record.created, record.msecs = created, (created % 1) * 1000 // 1
        assert PlainFormatter(FORMAT).format(record) == logging.Formatter(FORMAT).format(record)
    formatter = PlainFormatter(FORMAT)  # one formatter across seconds, as a process uses it
    for created in (1_700_000_000.123, 1_700_000_001.5, 1_700_000_001.75):
        record.created, record.msecs = created, (created % 1) * 1000 // 1
        assert formatter.format(record) == logging.Formatter(FORMAT).format(record)
