"""Keep an in-memory copy of pods or namespaces in step with the Kubernetes API.

The server decides who may have which role from pods and namespaces, so it needs their current
state, locally, at all times — and must notice deletions, or a new pod reusing a deleted pod's
IP could be handed the old pod's role. This module does the list-then-watch dance that keeps a
local copy exact (an "informer"/"reflector" in client-go terms), feeding an ``ObjectSink``:

    Reflector.run                 endless: restarts after errors, with capped backoff
      _list_then_watch            lists when needed, then watches stream after stream;
                                  410 Gone means the history we need is lost: list again
        _list_pages               one full list, page by page (limit/continue), asking for
                                  the next page before decoding this one
        _watch_events             one HTTP watch stream, as batches of decoded events
          _split_lines            raw bytes to lines, however long a line is, as batches:
                                  every complete line already received

It uses kubernetes_asyncio for configuration, authentication and URLs, but reads raw JSON
(``_preload_content=False``): the generated model classes are slow and large, and 100,000 pods
would cost seconds and hundreds of megabytes. The JSON is decoded by the sink's codec
(server/kube_wire.py): straight into the few fields the sink reads when it names a wire
struct, into plain dictionaries otherwise. Nothing here would be needed with a maintained
asyncio informer library for Python that streams raw objects; at the time of writing there is
none that does pagination, bookmarks and re-list reconciliation together.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any, Protocol

import aiohttp
from kubernetes_asyncio.client import ApiClient, CoreV1Api

from server.kube_status import describe, status_message
from server.kube_wire import Codec, Page, object_key
from server.metrics import WATCH_EVENTS, WATCH_RESTARTS

log = logging.getLogger(__name__)

_LIST_TIMEOUT = 60.0  # seconds for one list page, connection and body together
_CONNECT_TIMEOUT = 10.0
_BACKOFF_INITIAL = 0.5
# Large pages: fewer round trips and less per-request work on both sides, while a page of
# real pods (a few kilobytes each) stays a few megabytes.
DEFAULT_PAGE_SIZE = 2000


class ObjectSink(Protocol):
    """Where a Reflector delivers objects: raw dictionaries as the API returns them — or, when
    the sink has a ``wire`` attribute naming a struct of server/kube_wire.py, objects decoded
    into it (any object that does not fit it comes as a dictionary, for the sink to refuse).
    A sink may also take a list page in one step, with ``upsert_page(objects, on_error)``."""

    def begin_relist(self) -> None:
        """A full list is starting. It may start again before ending, if a list fails."""

    def upsert(self, obj: dict[str, Any]) -> None:
        """An object exists in this state (ADDED, MODIFIED, or an item of a list)."""

    def delete(self, obj: dict[str, Any]) -> None:
        """An object is gone (DELETED); ``obj`` is its last state."""

    def end_relist(self) -> None:
        """The list is complete: drop every object not upserted since begin_relist."""


class _Gone(Exception):
    """410 Gone: the resourceVersion we hold has been compacted away (or a continue token
    has expired). The events since are lost; only a fresh list can tell what changed."""


class _ApiError(Exception):
    """The API server answered with an error other than 410, or with something unreadable."""


# Failures worth retrying after a pause: the network, the API server being unwell or answering
# something unreadable, or a list that could not complete before its snapshot expired.
_RETRYABLE = (aiohttp.ClientError, OSError, TimeoutError, _ApiError, _Gone)


class Reflector:
    """Mirrors one resource (``pods`` or ``namespaces``, all namespaces) into a sink."""

    def __init__(
        self,
        api: ApiClient,
        *,
        resource: str,
        sink: ObjectSink,
        field_selector: str | None = None,
        page_size: int = DEFAULT_PAGE_SIZE,
        watch_timeout: float = 300,
        backoff_max: float = 30,
    ) -> None:
        core = CoreV1Api(api)
        listers: dict[str, Callable[..., Any]] = {
            "pods": core.list_pod_for_all_namespaces,
            "namespaces": core.list_namespace,
        }
        if resource not in listers:
            raise ValueError(f"cannot reflect {resource!r}: only {sorted(listers)}")
        self._list = listers[resource]
        self._resource = resource
        self._sink = sink
        self._codec = Codec(getattr(sink, "wire", None))
        self._field_selector = field_selector
        self._page_size = page_size
        self._watch_timeout = watch_timeout
        self._backoff_max = backoff_max
        self._resource_version: str | None = None  # None: we must list before watching
        self._failures = 0
        self.synced = asyncio.Event()

    @property
    def resource(self) -> str:
        """The resource reflected: ``pods`` or ``namespaces``."""
        return self._resource

    @property
    def resource_version(self) -> str | None:
        """The version the sink is up to date with; None when a list is needed."""
        return self._resource_version

    async def run(self) -> None:
        """Keep the sink in step with the API until cancelled."""
        while True:
            try:
                await self._list_then_watch()
            except _RETRYABLE as error:
                self._failures += 1
                delay = self._backoff(self._failures)
                reason = "gone" if isinstance(error, _Gone) else "error"
                WATCH_RESTARTS.labels(resource=self._resource, reason=reason).inc()
                log.warning(
                    "%s list/watch failed (%s); retrying in %.1fs",
                    self._resource,
                    describe(error),
                    delay,
                )
                await asyncio.sleep(delay)

    def _backoff(self, failures: int) -> float:
        # Exponential, capped, with jitter so many servers do not retry in lockstep.
        ceiling = min(self._backoff_max, _BACKOFF_INITIAL * 2 ** (failures - 1))
        return random.uniform(ceiling / 2, ceiling)

    async def _list_then_watch(self) -> None:
        """List if we hold no usable resourceVersion, then watch from it, resuming after each
        stream ends. Returns only by raising a retryable error."""
        while True:
            if self._resource_version is None:
                # A 410 here means a continue token expired mid-list (the list took longer
                # than the API server keeps snapshots): it goes up to run(), which backs off
                # before listing again, so a misbehaving server cannot make us spin.
                await self._relist()
            try:
                async with aclosing(self._watch_events()) as batches:
                    async for batch in batches:
                        self._apply_batch(batch)
            except _Gone as gone:
                log.info("%s watch: %s; listing again", self._resource, gone)
                WATCH_RESTARTS.labels(resource=self._resource, reason="gone").inc()
                self._resource_version = None
                continue
            # Watches end normally and often (timeoutSeconds, API server restarts): carry on
            # from the last version seen; the API server replays what happened since.
            log.debug("%s watch ended at %s", self._resource, self._resource_version)
            WATCH_RESTARTS.labels(resource=self._resource, reason="ended").inc()

    # --- listing ----------------------------------------------------------------------------

    async def _relist(self) -> None:
        self._sink.begin_relist()
        count, version = 0, None
        upsert_page = getattr(self._sink, "upsert_page", None)
        async with aclosing(self._list_pages()) as pages:
            async for page in pages:
                try:
                    items = page.items()
                except ValueError as error:
                    raise _ApiError(f"unreadable list answer: {describe(error)}") from error
                if upsert_page is not None:
                    upsert_page(items, self._rejected)
                else:
                    for obj in items:
                        self._deliver(self._sink.upsert, "LIST", obj)
                count += len(items)
                version = page.resource_version
        self._sink.end_relist()
        self._resource_version = version
        self._failures = 0
        self.synced.set()
        log.info("listed %d %s at resourceVersion %s", count, self._resource, version)

    async def _list_pages(self) -> AsyncIterator[Page]:
        """One full list, a page at a time so a huge cluster is never held in memory at once.
        All pages come from one snapshot; its resourceVersion is where the watch starts.

        The next page is asked for as soon as this one's continue token is read, before its
        items are decoded and applied: the API server produces page n+1 while we decode page
        n. (The token sits in the page's metadata; finding it skims the items undecoded.)"""
        fetch: asyncio.Task[Page] | None = asyncio.ensure_future(self._page(None))
        try:
            while fetch is not None:
                page = await fetch
                fetch = None
                if page.continue_token:
                    fetch = asyncio.ensure_future(self._page(page.continue_token))
                    await asyncio.sleep(0)  # let it send its request
                yield page
        finally:
            if fetch is not None:
                fetch.cancel()
                await asyncio.gather(fetch, return_exceptions=True)

    async def _page(self, token: str | None) -> Page:
        # No resource_version: a consistent read of the latest state, not a cache that may be
        # behind what we have already seen.
        response = await self._list(
            limit=self._page_size,
            _continue=token,
            field_selector=self._field_selector,
            _preload_content=False,
            _request_timeout=_LIST_TIMEOUT,
        )
        try:
            body = await response.read()
        finally:
            response.release()
        _raise_for_status(response.status, body)
        try:
            return self._codec.page(body)
        except ValueError as error:
            raise _ApiError(f"unreadable list answer: {describe(error)}") from error

    # --- watching ---------------------------------------------------------------------------

    async def _watch_events(self) -> AsyncIterator[list[tuple[str, Any, str | None] | None]]:
        """The events of one watch stream from our resourceVersion, until the stream ends, as
        batches: the events of every complete line received so far."""
        response = await self._list(
            watch=True,
            allow_watch_bookmarks=True,
            resource_version=self._resource_version,
            timeout_seconds=max(1, round(self._watch_timeout)),
            field_selector=self._field_selector,
            _preload_content=False,
            # The server ends the stream after timeout_seconds; silence for much longer than
            # that means the connection is dead without us having been told.
            _request_timeout=aiohttp.ClientTimeout(
                sock_connect=_CONNECT_TIMEOUT, sock_read=self._watch_timeout + 30
            ),
        )
        try:
            if response.status != 200:
                _raise_for_status(response.status, await response.read())
            self._failures = 0
            decode = self._codec.event
            async for lines in _split_lines(response.content):
                batch = []
                for line in lines:
                    try:
                        batch.append(decode(line))
                    except ValueError:
                        log.warning("%s watch: skipping a line that is not JSON", self._resource)
                yield batch
        finally:
            response.close()  # never reuse a connection left mid-stream

    def _apply_batch(self, batch: list[tuple[str, Any, str | None] | None]) -> None:
        """Every event already received, applied in one step before the loop moves on: a node
        stream woken by the first of them finds the rest of its node's changes there too, so a
        backlog coalesces by itself. Counted once per batch and type."""
        counted: dict[str, int] = {}
        try:
            for event in batch:
                if event is not None:
                    counted[event[0]] = counted.get(event[0], 0) + 1
                self._apply(event)
        finally:
            for kind, count in counted.items():
                _count_events(self._resource, kind, count)

    def _apply(self, event: tuple[str, Any, str | None] | None) -> None:
        """One decoded watch event: (type, object, the object's resourceVersion), None when
        malformed (see Codec.event)."""
        if event is None:
            log.warning("%s watch: skipping a malformed event", self._resource)
            return
        kind, obj, version = event
        if kind == "ERROR":
            # The API server ends a watch it cannot serve with an ERROR event carrying a
            # Status (always a dictionary here); 410 means our resourceVersion is older than
            # the history it keeps.
            if obj.get("code") == 410:
                raise _Gone(obj.get("message") or "resource version too old")
            raise _ApiError(f"watch error {obj.get('code')}: {obj.get('message')}")
        if not version:
            log.warning(
                "%s watch: skipping a %s event without resourceVersion", self._resource, kind
            )
            return
        if kind == "BOOKMARK":
            # A bookmark only says "nothing you watch changed up to here": no object to apply,
            # but a newer version to resume from, which may spare us a 410 and a re-list.
            pass
        elif kind in ("ADDED", "MODIFIED"):
            self._deliver(self._sink.upsert, kind, obj)
        elif kind == "DELETED":
            self._deliver(self._sink.delete, kind, obj)
        else:
            log.warning("%s watch: skipping an event of unknown type %r", self._resource, kind)
            return
        # Applied (or skipped as bad, which retrying would not fix): resume after it.
        self._resource_version = version

    def _deliver(self, method: Callable[[Any], None], kind: str, obj: Any) -> None:
        """Hand one object to the sink; a bad object is logged and skipped, never fatal."""
        try:
            method(obj)
        except Exception:
            log.exception("%s %s: sink failed on %s", self._resource, kind, _name_of(obj))
        else:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s %s %s", self._resource, kind, _name_of(obj))

    def _rejected(self, obj: Any) -> None:
        """A list item the sink could not take (called inside the sink's except block)."""
        log.exception("%s LIST: sink failed on %s", self._resource, _name_of(obj))


_EVENT_COUNTERS: dict[tuple[str, str], Any] = {}


def _count_events(resource: str, kind: str, count: int) -> None:
    # The labelled child is looked up once per (resource, type): at 20,000 events a second the
    # lookup by label cost more than applying an event.
    counter = _EVENT_COUNTERS.get((resource, kind))
    if counter is None:
        counter = _EVENT_COUNTERS[(resource, kind)] = WATCH_EVENTS.labels(
            resource=resource, type=kind
        )
    counter.inc(count)


async def _split_lines(stream: aiohttp.StreamReader) -> AsyncIterator[list[bytes]]:
    """Lines of a newline-delimited stream, however long, in batches: each batch every complete
    line received so far (the last line may be unterminated when the stream ends). Never an
    empty batch. (StreamReader.readline refuses lines above its buffer limit, and one pod with
    large annotations can exceed it.)"""
    partial: list[bytes] = []
    async for chunk in stream.iter_any():
        lines = []
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            if partial:
                partial.append(chunk[start:end])
                line = b"".join(partial)
                partial.clear()
            else:
                line = chunk[start:end]
            if line and not line.isspace():
                lines.append(line)
            start = end + 1
        if start < len(chunk):
            partial.append(chunk[start:])
        if lines:
            yield lines
    line = b"".join(partial)
    if line and not line.isspace():
        yield [line]


def _raise_for_status(status: int, body: bytes) -> None:
    if 200 <= status < 300:
        return
    message = status_message(body)
    if status == 410:
        raise _Gone(message or "410 Gone")
    raise _ApiError(f"HTTP {status}: {message}")


def _name_of(obj: Any) -> str:
    try:
        namespace, name = object_key(obj)
    except (KeyError, TypeError, AttributeError):
        return "<unnamed>"
    if not name:
        return "<unnamed>"
    return f"{namespace}/{name}" if namespace else name
