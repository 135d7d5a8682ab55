"""The re-list bookkeeping between a Reflector and a store keyed by namespace and name.

A reflector that lost its watch lists everything again, and a list says only what exists: an
object deleted while the watch was away is simply absent. ``KeyedSink`` notes every key seen
during a full list and, when it ends, deletes from the store whatever was not seen. The store
itself only has to know how to upsert one object (or a page of them), delete one key, and list
its keys.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from server.kube_wire import object_key

Key = tuple[str, str]  # (namespace, name); namespace is "" for cluster-scoped objects


class KeyedSink:
    """An ObjectSink (server/reflector.py) over a keyed store. ``wire`` is the struct the
    reflector decodes objects into (server/kube_wire.py); the store's upserts also take raw
    dictionaries, as tests and tools write them."""

    def __init__(
        self,
        *,
        wire: type | None = None,
        upsert: Callable[[Any], Key],
        delete: Callable[[Key], None],
        stored: Callable[[], Iterable[Key]],
        upsert_page: Callable[[Sequence[Any], Callable[[Any], None]], list[Key]] | None = None,
    ) -> None:
        self.wire = wire
        self._upsert = upsert
        self._upsert_page = upsert_page
        self._delete = delete
        self._stored = stored
        self._seen: set[Key] | None = None

    def begin_relist(self) -> None:
        # Into an empty store (the first list) nothing can be missing at the end: no need to
        # remember 550,000 keys to find that out.
        self._seen = set() if any(True for _ in self._stored()) else None

    def upsert(self, obj: Any) -> None:
        key = self._upsert(obj)
        if self._seen is not None:
            self._seen.add(key)

    def upsert_page(self, objects: Sequence[Any], on_error: Callable[[Any], None]) -> None:
        """A page of a list in one step; ``on_error(obj)`` is called, inside the except block,
        for each object the store could not take (the others are taken all the same)."""
        if self._upsert_page is None:
            for obj in objects:
                try:
                    self.upsert(obj)
                except Exception:
                    on_error(obj)
            return
        keys = self._upsert_page(objects, on_error)
        if self._seen is not None:
            self._seen.update(keys)

    def delete(self, obj: Any) -> None:
        self._delete(object_key(obj))

    def end_relist(self) -> None:
        seen, self._seen = self._seen, None
        if seen is None:
            return  # the store was empty when the list began
        for key in [key for key in self._stored() if key not in seen]:
            self._delete(key)
