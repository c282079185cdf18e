"""PackedNames: a Maildir listing's names in one string, read as the list was."""

from __future__ import annotations

import pytest

from qpopper.maildrop.packednames import PackedNames

NAMES = [f"17000000{i:02d}.M{i}P1.host,S={1000 + i},W={1030 + i}:2,{'S' * (i % 2)}" for i in range(7)]


def packed(names: list[str] = NAMES) -> PackedNames:
    return PackedNames("\n".join(names), len(names))


def test_a_pass_over_the_names_leaves_them_packed() -> None:
    names = packed()
    assert len(names) == len(NAMES) and list(names) == NAMES and NAMES[3] in names
    assert names._list is None  # noqa: SLF001 - the state this module is for


def test_every_name_reads_back_by_number_once_unpacked() -> None:
    names = packed()
    assert [names[i] for i in range(len(NAMES))] == NAMES
    assert names[-1] == NAMES[-1] and names[2:5] == NAMES[2:5] and names.index(NAMES[4]) == 4
    assert names.unpacked() == NAMES and list(names) == NAMES and len(names) == len(NAMES)
    assert packed(["only,S=1,W=2"])[0] == "only,S=1,W=2"


@pytest.mark.parametrize("index", [len(NAMES), -len(NAMES) - 1])
def test_a_number_past_either_end_is_an_index_error(index: int) -> None:
    with pytest.raises(IndexError):
        packed()[index]
    with pytest.raises(IndexError):
        packed()[index] = "x"


def test_a_moved_name_is_seen_through_the_list_and_the_object_alike() -> None:
    names = packed()
    as_list = names.unpacked()
    names[0] = "moved-first:2,S"
    as_list[-1] = "moved-last:2,F"  # the maildrop changes its list; the UID partials hold the object
    expected = ["moved-first:2,S", *NAMES[1:-1], "moved-last:2,F"]
    assert list(names) == as_list == expected and names[-1] == "moved-last:2,F"
