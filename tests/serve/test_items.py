"""ItemList: the conversation's items as the server tells clients about them. Pure data, table-tested."""

from __future__ import annotations

import pytest

from voice_agent.serve.items import MAX_ITEMS, ROOT, ItemList
from voice_agent.serve.protocols.events import Item


def listed(*ids: str) -> ItemList:
    items = ItemList()
    for i in ids:
        items.add(Item(i, "user", text=i))
    return items


@pytest.mark.parametrize(
    ("before", "after", "expected_ids", "expected_previous"),
    [
        ((), None, ["new"], None),  # the first item, at the end
        ((), ROOT, ["new"], None),  # the first item, after root
        (("a", "b"), None, ["a", "b", "new"], "b"),  # at the end
        (("a", "b"), ROOT, ["new", "a", "b"], None),  # first
        (("a", "b"), "a", ["a", "new", "b"], "a"),  # in the middle
        (("a", "b"), "b", ["a", "b", "new"], "b"),  # after the last, named
    ],
    ids=["empty-end", "empty-root", "end", "root", "after-first", "after-last"],
)
def test_add_places_the_item_and_returns_the_id_before_it(
    before: tuple[str, ...], after: str | None, expected_ids: list[str], expected_previous: str | None
) -> None:
    items = listed(*before)
    previous = items.add(Item("new", "assistant", text="hi"), after)
    assert previous == expected_previous
    assert items.ids() == expected_ids
    assert len(items) == len(expected_ids)
    assert "new" in items and items.get("new") == Item("new", "assistant", text="hi")


def test_add_after_an_unknown_id_raises_and_changes_nothing() -> None:
    items = listed("a")
    with pytest.raises(KeyError):
        items.add(Item("new", "user"), "nope")
    assert items.ids() == ["a"]


@pytest.mark.parametrize(
    ("before", "delete", "expected_ids", "expected_last"),
    [
        (("a",), "a", [], None),
        (("a", "b", "c"), "a", ["b", "c"], "c"),
        (("a", "b", "c"), "b", ["a", "c"], "c"),
        (("a", "b", "c"), "c", ["a", "b"], "b"),
    ],
    ids=["only", "first", "middle", "last"],
)
def test_delete_removes_only_that_item(
    before: tuple[str, ...], delete: str, expected_ids: list[str], expected_last: str | None
) -> None:
    items = listed(*before)
    items.delete(delete)
    assert items.ids() == expected_ids
    assert delete not in items and items.get(delete) is None
    assert items.last_id == expected_last


@pytest.mark.parametrize("before", [(), ("a",)], ids=["empty", "other"])
def test_delete_of_an_unknown_id_raises(before: tuple[str, ...]) -> None:
    items = listed(*before)
    with pytest.raises(KeyError):
        items.delete("nope")
    assert items.ids() == list(before)


def test_update_replaces_fields_and_keeps_the_rest() -> None:
    items = ItemList()
    items.add(Item("r", "assistant", text="", status="in_progress", kind="audio"))
    updated = items.update("r", text="hello there", audio_ms=800.0, status="completed")
    assert updated == Item("r", "assistant", text="hello there", audio_ms=800.0, status="completed", kind="audio")
    assert items.get("r") == updated
    assert items.ids() == ["r"]  # same place


def test_update_of_an_unknown_id_is_none_and_changes_nothing() -> None:
    items = listed("a")
    assert items.update("nope", text="x") is None
    assert items.get("a") == Item("a", "user", text="a")


@pytest.mark.parametrize(
    ("ids", "last", "contains", "missing"),
    [((), None, [], ["a", ROOT, None, 3]), (("a", "b"), "b", ["a", "b"], ["c", ROOT, None, 3])],
    ids=["empty", "two"],
)
def test_membership_and_last_id(ids: tuple[str, ...], last: str | None, contains: list[str],
                                missing: list[object]) -> None:
    items = listed(*ids)
    assert items.last_id == last
    assert all(i in items for i in contains)
    assert not any(m in items for m in missing)


def full() -> ItemList:
    items = ItemList()
    for i in range(MAX_ITEMS):
        items.add(Item(f"i{i}", "user", text=str(i)))
    return items


def test_max_items_evicts_the_oldest_when_adding_at_the_end() -> None:
    items = full()
    assert len(items) == MAX_ITEMS
    previous = items.add(Item("new", "user"))
    assert len(items) == MAX_ITEMS
    assert "i0" not in items and items.ids()[0] == "i1"
    assert items.ids()[-1] == "new" and previous == f"i{MAX_ITEMS - 1}"


def test_max_items_evicts_the_oldest_when_adding_in_the_middle() -> None:
    items = full()
    previous = items.add(Item("new", "user"), "i500")
    assert len(items) == MAX_ITEMS
    assert "i0" not in items
    assert previous == "i500"
    assert items.ids()[items.ids().index("i500") + 1] == "new"


def test_max_items_adding_after_the_oldest_item_evicts_it_and_the_new_item_is_first() -> None:
    items = full()
    previous = items.add(Item("new", "user"), "i0")
    assert len(items) == MAX_ITEMS
    assert items.ids()[:2] == ["new", "i1"]
    assert previous is None  # the item it followed has left


def test_max_items_adding_at_root_keeps_the_new_item() -> None:
    items = full()
    previous = items.add(Item("new", "user"), ROOT)
    assert previous is None
    assert "new" in items
    assert len(items) == MAX_ITEMS
