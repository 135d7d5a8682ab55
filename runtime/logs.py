"""Logging set-up: one line per event, plain or JSON (``--json-log``), for server and agent."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from datetime import UTC, datetime

# Attributes every LogRecord has; anything else was passed through ``extra=`` and is a field.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update((k, v) for k, v in vars(record).items() if k not in _STANDARD)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class PlainFormatter(logging.Formatter):
    """The plain format, its date and time worked out once a second rather than once a record
    (the server writes an audit line per pod served; strftime was a sixth of each)."""

    def __init__(self, fmt: str) -> None:
        super().__init__(fmt)
        self._second = -1
        self._text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second:
            self._text = time.strftime(self.default_time_format, self.converter(record.created))
            self._second = second
        return self.default_msec_format % (self._text, record.msecs)


class GatheringHandler(logging.StreamHandler):
    """Writes the lines logged during one turn of the event loop together, when that turn's
    callbacks are done: one write to the stream per turn instead of one per line (at 20,000
    watch events a second, an audit line each, the writes were a third of what logging cost).
    Outside a running loop, and for warnings and errors (which may precede a traceback that
    Python writes to stderr itself), everything gathered is written at once, in order."""

    def __init__(self, stream) -> None:
        super().__init__(stream)
        self._gathered: list[str] = []
        self._scheduled = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            loop = None
            if record.levelno < logging.WARNING:
                try:
                    loop = asyncio.get_running_loop()
                except RuntimeError:
                    pass
            self._gathered.append(line)
            if loop is None:
                self._write_gathered()
            elif not self._scheduled:
                self._scheduled = True
                loop.call_soon(self._write_scheduled)
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def flush(self) -> None:
        with self.lock:
            self._write_gathered()
            super().flush()

    def _write_scheduled(self) -> None:
        with self.lock:
            self._scheduled = False
            self._write_gathered()

    def _write_gathered(self) -> None:
        if not self._gathered:
            return
        lines, self._gathered = self._gathered, []
        lines.append("")  # the last line's terminator
        try:
            self.stream.write(self.terminator.join(lines))
            self.stream.flush()
        except (OSError, ValueError):
            pass  # the stream is gone (a closed pipe, at exit): there is nowhere left to say so


def configure(level: str, *, json_log: bool) -> None:
    # No format here reads the caller's file and line, thread or process: skip working them
    # out for every record (the logging HOWTO's "Optimization"). The server writes one audit
    # line per pod served, so at 20,000 watch events a second this is per event.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = GatheringHandler(sys.stderr)
    if json_log:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(PlainFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Library chatter (botocore's credential lookups, aiohttp access lines) is not ours to log.
    for noisy in ("botocore", "boto3", "urllib3", "aiohttp.access", "kubernetes_asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
