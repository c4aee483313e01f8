"""The merge rules: what one client sees when its layers are stacked.

Layers are ordered, highest first (client directory, client disk, default).  The rules are
overlayfs's, applied per path:

* The highest layer that has something at a path decides what it is.
* A directory merges with the directories at the same path in lower layers (union listing,
  the highest entry of a name wins) until a lower layer has a *non-directory* there: a file
  shadows a directory below it, and a directory shadows a file below it.
* A layer that cannot answer now (`LayerUnavailable`, e.g. a disk still attaching) stops the
  walk with an error instead of letting a lower layer's file be served in its place.

The rules work for any number of layers; nothing here knows what a layer is made of.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .layers.base import Layer, Node, Path


@dataclass(frozen=True, slots=True)
class Resolved:
    """A path of the merged view: the node that serves it and the layers that merge into it."""

    node: Node
    #: The layer whose node is served.
    layer: Layer
    #: For directories: every layer whose directory merges here, highest first.
    contributors: tuple[Layer, ...]


class View:
    """One client's merged view over ordered layers."""

    def __init__(self, client: str, layers: Sequence[Layer]) -> None:
        self.client = client
        self.layers = tuple(layers)

    async def resolve(self, path: Path) -> Resolved | None:
        """What the merged view has at `path`, or None."""
        contributors: tuple[Layer, ...] = self.layers
        node: Node | None = None
        top: Layer | None = None
        if not path:
            return await self._root()
        for depth in range(1, len(path) + 1):
            prefix = path[:depth]
            node, top, contributors = await self._step(prefix, contributors)
            if node is None:
                return None
            if not node.is_dir and depth < len(path):
                return None  # a file in the middle of a path: ENOENT, like ENOTDIR
        assert node is not None and top is not None
        return Resolved(node, top, contributors)

    async def _root(self) -> Resolved | None:
        roots: list[tuple[Layer, Node]] = []
        for layer in self.layers:
            node = await layer.lookup(())
            if node is not None and node.is_dir:
                roots.append((layer, node))
        if not roots:
            return None
        return Resolved(roots[0][1], roots[0][0], tuple(layer for layer, _ in roots))

    @staticmethod
    async def _step(
        path: Path, parents: tuple[Layer, ...]
    ) -> tuple[Node | None, Layer | None, tuple[Layer, ...]]:
        """Resolve one more component among the layers whose parent directory merges here."""
        first: Node | None = None
        first_layer: Layer | None = None
        dirs: list[Layer] = []
        for layer in parents:
            node = await layer.lookup(path)
            if node is None:
                continue
            if first is None:
                first, first_layer = node, layer
                if not node.is_dir:
                    break
                dirs.append(layer)
            elif node.is_dir:
                dirs.append(layer)
            else:
                break  # a lower file under our directory: it and everything below are shadowed
        return first, first_layer, tuple(dirs)

    async def listdir(self, resolved: Resolved, path: Path) -> dict[str, Node]:
        """Union listing of a merged directory: for each name, the node the view serves."""
        result: dict[str, Node] = {}
        for layer in resolved.contributors:
            for name, node in (await layer.listdir(path)).items():
                result.setdefault(name, node)
        return result

    async def explain(self, path: Path) -> list[Node]:
        """Every copy of `path` in every layer, highest first (the first one is served,
        provided its parents resolve in the merged view)."""
        copies: list[Node] = []
        for layer in self.layers:
            node = await layer.lookup(path)
            if node is not None:
                copies.append(node)
        return copies
