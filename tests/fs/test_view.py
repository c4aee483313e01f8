"""Merge rules of `View` over N in-memory layers."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from vfsroot.layers.base import Kind, LayerUnavailable
from vfsroot.view import View

from .fakes import FakeLayer


def view(*trees: dict[str, Any], unavailable: int | None = None) -> View:
    names = ["client", "disk", "default", "fourth", "fifth"]
    layers = [FakeLayer(names[i], tree) for i, tree in enumerate(trees)]
    if unavailable is not None:
        layers[unavailable].unavailable = True
    return View("10.0.0.1", layers)


async def served(v: View, *path: str) -> tuple[str, str] | None:
    resolved = await v.resolve(path)
    if resolved is None:
        return None
    assert resolved.layer.name == resolved.node.layer
    return resolved.node.layer, resolved.node.kind.value


async def listing(v: View, *path: str) -> dict[str, tuple[str, str]]:
    resolved = await v.resolve(path)
    assert resolved is not None and resolved.node.is_dir
    entries = await v.listdir(resolved, path)
    return {n: (node.layer, node.kind.value) for n, node in entries.items()}


async def test_precedence_is_per_file_over_three_layers() -> None:
    v = view(
        {"vmlinuz": b"client", "cfg": {"a": b"c"}},
        {"initrd": b"disk", "vmlinuz": b"disk", "cfg": {"a": b"d", "b": b"d"}},
        {"vmlinuz": b"default", "initrd": b"default", "only": b"default", "cfg": {"c": b"x"}},
    )
    assert await served(v, "vmlinuz") == ("client", "file")
    assert await served(v, "initrd") == ("disk", "file")
    assert await served(v, "only") == ("default", "file")
    assert await served(v, "cfg", "a") == ("client", "file")
    assert await served(v, "cfg", "b") == ("disk", "file")
    assert await served(v, "cfg", "c") == ("default", "file")
    assert await served(v, "nothing") is None
    assert await served(v, "cfg", "nothing") is None


async def test_union_listing_without_duplicates_highest_wins() -> None:
    v = view(
        {"a": b"1", "d": {"x": b""}},
        {"a": b"22", "b": b"2", "d": {"y": b""}},
        {"a": b"333", "b": b"3", "c": b"3", "d": {"x": b"", "z": b""}},
    )
    assert await listing(v) == {
        "a": ("client", "file"), "b": ("disk", "file"), "c": ("default", "file"),
        "d": ("client", "dir"),
    }
    assert await listing(v, "d") == {
        "x": ("client", "file"), "y": ("disk", "file"), "z": ("default", "file"),
    }
    root = await v.resolve(())
    assert root is not None
    assert (await v.listdir(root, ()))["a"].size == 1


async def test_file_shadows_directory_below() -> None:
    v = view({"boot": b"a file"}, {}, {"boot": {"vmlinuz": b"k"}, "other": b""})
    assert await served(v, "boot") == ("client", "file")
    assert await served(v, "boot", "vmlinuz") is None
    assert (await listing(v))["boot"] == ("client", "file")


async def test_directory_shadows_file_below_and_everything_under_it() -> None:
    v = view(
        {"cfg": {"mine": b""}},
        {"cfg": b"a file on the disk"},
        {"cfg": {"theirs": b""}},
    )
    assert await served(v, "cfg") == ("client", "dir")
    assert await listing(v, "cfg") == {"mine": ("client", "file")}
    # the default's directory is below the disk's file: shadowed too
    assert await served(v, "cfg", "theirs") is None


async def test_directories_merge_through_a_layer_that_lacks_the_path() -> None:
    v = view(
        {"pxelinux.cfg": {"a": {"deep": b"client"}}},
        {"unrelated": b""},
        {"pxelinux.cfg": {"a": {"deeper": b"default"}, "b": b"default"}},
    )
    assert await listing(v, "pxelinux.cfg") == {
        "a": ("client", "dir"), "b": ("default", "file"),
    }
    assert await listing(v, "pxelinux.cfg", "a") == {
        "deep": ("client", "file"), "deeper": ("default", "file"),
    }
    assert await served(v, "pxelinux.cfg", "a", "deeper") == ("default", "file")
    contributors = await v.contributors(("pxelinux.cfg", "a"))
    assert [layer.name for layer in contributors] == ["client", "default"]


async def test_file_in_the_middle_of_a_path_is_not_a_directory() -> None:
    v = view({"vmlinuz": b"k"}, {}, {"vmlinuz": {"x": b""}})
    assert await served(v, "vmlinuz", "x") is None


@pytest.mark.parametrize("path", [("vmlinuz",), ("cfg", "a"), ("cfg",), ()])
async def test_unavailable_layer_never_falls_through(path: tuple[str, ...]) -> None:
    v = view({"cfg": {}}, {}, {"vmlinuz": b"default", "cfg": {"a": b""}}, unavailable=1)
    with pytest.raises(LayerUnavailable):
        resolved = await v.resolve(path)
        assert resolved is not None
        await v.listdir(resolved, path)


async def test_unavailable_layer_does_not_hide_a_higher_file() -> None:
    v = view({"vmlinuz": b"client"}, {}, {"vmlinuz": b"default"}, unavailable=1)
    assert await served(v, "vmlinuz") == ("client", "file")


async def test_unavailable_layer_does_not_block_a_higher_file_in_a_merged_directory() -> None:
    # The client's own pxelinux.cfg/01-<mac> must be served while its disk attaches, although
    # pxelinux.cfg/ merges with the disk's (and default's) directory of the same name.
    v = view({"pxelinux.cfg": {"01-aa": b"client"}}, {},
             {"pxelinux.cfg": {"default": b"default"}}, unavailable=1)
    assert await served(v, "pxelinux.cfg", "01-aa") == ("client", "file")
    assert await served(v, "pxelinux.cfg") == ("client", "dir")
    with pytest.raises(LayerUnavailable):
        await served(v, "pxelinux.cfg", "default")  # the disk might shadow it
    with pytest.raises(LayerUnavailable):
        await listing(v, "pxelinux.cfg")  # the listing needs the disk's entries


async def test_higher_file_cuts_off_a_deeper_lower_path() -> None:
    v = view({}, {"boot": b"a file"}, {"boot": {"vmlinuz": b"default"}})
    assert await served(v, "boot") == ("disk", "file")
    assert await served(v, "boot", "vmlinuz") is None
    v = view({"boot": {}}, {"boot": b"a file"}, {"boot": {"vmlinuz": b"default"}})
    assert await served(v, "boot", "vmlinuz") is None
    assert await listing(v, "boot") == {}


async def test_explain_lists_every_copy_highest_first() -> None:
    v = view({"vmlinuz": b"c"}, {}, {"vmlinuz": b"dd", "cfg": {}})
    copies = await v.explain(("vmlinuz",))
    assert [(n.layer, n.size) for n in copies] == [("client", 1), ("default", 2)]
    assert [n.layer for n in await v.explain(("cfg",))] == ["default"]
    assert await v.explain(("nothing",)) == []


async def test_works_for_five_layers() -> None:
    v = view({}, {"d": {"b": b""}}, {}, {"d": b"file in the 4th"}, {"d": {"e": b""}, "x": b""})
    assert await listing(v) == {"d": ("disk", "dir"), "x": ("fifth", "file")}
    assert await listing(v, "d") == {"b": ("disk", "file")}


# -- properties over random layer stacks ------------------------------------------------

NAMES = st.sampled_from(["a", "b", "c"])
trees = st.recursive(
    st.binary(max_size=3),
    lambda children: st.dictionaries(NAMES, children, max_size=3),
    max_leaves=8,
).filter(lambda t: isinstance(t, dict))
stacks = st.lists(trees, min_size=1, max_size=4)


def all_paths(depth: int = 3) -> list[tuple[str, ...]]:
    paths: list[tuple[str, ...]] = [()]
    frontier: list[tuple[str, ...]] = [()]
    for _ in range(depth):
        frontier = [(*p, n) for p in frontier for n in "abc"]
        paths += frontier
    return paths


def expected(stack: list[dict[str, Any]], path: tuple[str, ...]) -> tuple[int, str] | None:
    """Reference rule, stated independently: walk down; at each step the set of live layers
    is the consecutive run, from the top, of layers that have a directory there, cut at the
    first layer that has a file."""
    live = list(range(len(stack)))
    here = {i: stack[i] for i in live}
    for part in path:
        found = [(i, here[i][part]) for i in live if isinstance(here[i], dict) and part in here[i]]
        if not found:
            return None
        top, value = found[0]
        if not isinstance(value, dict):
            live, here = [top], {top: value}
            continue
        live = []
        for i, v in found:
            if not isinstance(v, dict):
                break
            live.append(i)
        here = {i: v for i, v in found if i in live}
    top = live[0]
    return top, "dir" if isinstance(here[top], dict) else "file"


@settings(max_examples=150, deadline=None)
@given(stacks)
def test_random_stacks_follow_the_rules(stack: list[dict[str, Any]]) -> None:
    async def check() -> None:
        layers = [FakeLayer(f"L{i}", t) for i, t in enumerate(stack)]
        v = View("10.0.0.1", layers)
        for path in all_paths():
            resolved = await v.resolve(path)
            want = expected(stack, path)
            got = None if resolved is None else (
                int(resolved.node.layer[1:]), resolved.node.kind.value)
            assert got == want, path
            if resolved is not None and resolved.node.kind is Kind.DIR:
                entries = await v.listdir(resolved, path)
                # every listed name resolves to exactly the listed node, and nothing resolvable
                # is missing from the listing
                for name, node in entries.items():
                    child = await v.resolve((*path, name))
                    assert child is not None and child.node == node, (path, name)
                for name in "abc":
                    if name not in entries:
                        assert await v.resolve((*path, name)) is None, (path, name)

    trio.run(check)
