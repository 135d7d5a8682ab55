"""The re-list bookkeeping between a Reflector and a store keyed by namespace and name.

A reflector that lost its watch lists everything again, and a list says only what exists: an
object deleted while the watch was away is simply absent. ``KeyedSink`` notes every key seen
during a full list and, when it ends, deletes from the store whatever was not seen. The store
itself only has to know how to upsert one object, delete one key, and list its keys.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from server.pods import object_key

Key = tuple[str, str]  # (namespace, name); namespace is "" for cluster-scoped objects


class KeyedSink:
    """An ObjectSink (server/reflector.py) over a keyed store."""

    def __init__(
        self,
        *,
        upsert: Callable[[dict[str, Any]], Key],
        delete: Callable[[Key], None],
        stored: Callable[[], Iterable[Key]],
    ) -> None:
        self._upsert = upsert
        self._delete = delete
        self._stored = stored
        self._seen: set[Key] | None = None

    def begin_relist(self) -> None:
        self._seen = set()

    def upsert(self, obj: dict[str, Any]) -> None:
        key = self._upsert(obj)
        if self._seen is not None:
            self._seen.add(key)

    def delete(self, obj: dict[str, Any]) -> None:
        self._delete(object_key(obj))

    def end_relist(self) -> None:
        seen, self._seen = self._seen or set(), None
        for key in [key for key in self._stored() if key not in seen]:
            self._delete(key)
