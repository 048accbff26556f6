"""The conversation's items as the server tells clients about them: ids, order, roles, transcripts.

The engine holds the conversation the model reads (`voice_agent.engine.conversation`); this list is what
the server has said about it (item ids in order, what each holds, its status), so client requests that
name items (`previous_item_id`, delete, retrieve, truncate) are checked here before the engine sees them,
and `retrieve` is answered without asking the engine. Pure data; the session (`voice_agent.serve.session`)
keeps it in step with the engine's history.

Limits: at most MAX_ITEMS items are listed (the oldest leave first, as the engine forgets the oldest
history when its context fills); an item's id is unique in the list.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from voice_agent.serve.protocols.events import Item

ROOT = "root"  # previous_item_id naming the start of the conversation
MAX_ITEMS = 1000


class ItemList:
    """Items in conversation order, by id."""

    def __init__(self) -> None:
        self._items: list[Item] = []

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, item_id: object) -> bool:
        return any(item.id == item_id for item in self._items)

    @property
    def last_id(self) -> str | None:
        return self._items[-1].id if self._items else None

    def get(self, item_id: str) -> Item | None:
        return next((item for item in self._items if item.id == item_id), None)

    def ids(self) -> list[str]:
        return [item.id for item in self._items]

    def add(self, item: Item, after: str | None = None) -> str | None:
        """Insert `item` after `after` (None: at the end; ROOT: first); returns the id before it (None:
        it is first). `after` must be ROOT, None or a listed id (KeyError otherwise)."""
        if after is None:
            i = len(self._items)
        elif after == ROOT:
            i = 0
        else:
            i = self._index(after) + 1
        self._items.insert(i, item)
        if len(self._items) > MAX_ITEMS:  # the oldest other than the new one leaves
            self._items.pop(1 if i == 0 else 0)
            i = max(0, i - 1)
        return self._items[i - 1].id if i > 0 else None

    def delete(self, item_id: str) -> None:
        del self._items[self._index(item_id)]

    def update(self, item_id: str, **changes: Any) -> Item | None:
        """Replace fields of a listed item; None when it is not listed (any more)."""
        for i, item in enumerate(self._items):
            if item.id == item_id:
                self._items[i] = dataclasses.replace(item, **changes)
                return self._items[i]
        return None

    def _index(self, item_id: str) -> int:
        for i, item in enumerate(self._items):
            if item.id == item_id:
                return i
        raise KeyError(item_id)
