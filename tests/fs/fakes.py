"""In-memory layers for the merge-rule tests: a tree of dicts (directories) and bytes (files)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vfsroot.layers.base import Kind, LayerUnavailable, Node, Path

Tree = dict[str, Any]


@dataclass
class FakeReader:
    node: Node
    data: bytes
    closed: bool = False

    async def read(self, offset: int, size: int) -> bytes:
        return self.data[offset : offset + size]

    async def close(self) -> None:
        self.closed = True


@dataclass
class FakeLayer:
    """A `Layer` over a nested dict.  `unavailable=True` makes every call raise
    LayerUnavailable; `fail` raises that exception from every call."""

    name: str
    tree: Tree
    unavailable: bool = False
    fail: BaseException | None = None
    calls: list[tuple[str, Path]] = field(default_factory=list)

    def _check(self, op: str, path: Path) -> None:
        self.calls.append((op, path))
        if self.unavailable:
            raise LayerUnavailable(f"{self.name} is attaching")
        if self.fail is not None:
            raise self.fail

    def _get(self, path: Path) -> Any:
        here: Any = self.tree
        for part in path:
            if not isinstance(here, dict) or part not in here:
                return None
            here = here[part]
        return here

    def _node(self, path: Path, value: Any) -> Node:
        source = f"{self.name}:/" + "/".join(path)
        if isinstance(value, dict):
            return Node(Kind.DIR, 0, 0, self.name, source)
        return Node(Kind.FILE, len(value), 0, self.name, source, version=(value,))

    async def lookup(self, path: Path) -> Node | None:
        self._check("lookup", path)
        value = self._get(path)
        return None if value is None else self._node(path, value)

    async def listdir(self, path: Path) -> dict[str, Node]:
        self._check("listdir", path)
        value = self._get(path)
        assert isinstance(value, dict), f"listdir of a non-directory {path} in {self.name}"
        return {name: self._node((*path, name), v) for name, v in value.items()}

    async def open(self, path: Path) -> FakeReader:
        self._check("open", path)
        value = self._get(path)
        assert isinstance(value, bytes)
        return FakeReader(self._node(path, value), value)
