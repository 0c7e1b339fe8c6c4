"""The suite's own scheduling helper: slow tests go first, never two in a row."""

from types import SimpleNamespace

from tests.conftest import slow_tests_first


def _item(name: str, slow: bool):
    return SimpleNamespace(name=name, get_closest_marker=lambda marker: object() if slow and marker == "slow" else None)


def test_slow_tests_go_first_each_followed_by_a_fast_one():
    items = [_item("a", False), _item("S1", True), _item("b", False), _item("c", False), _item("S2", True),
             _item("S3", True)]
    assert [i.name for i in slow_tests_first(items)] == ["S1", "a", "S2", "b", "S3", "c"]


def test_more_slow_than_fast_tests_keeps_every_test_once():
    items = [_item("S1", True), _item("a", False), _item("S2", True), _item("S3", True)]
    assert [i.name for i in slow_tests_first(items)] == ["S1", "a", "S2", "S3"]
