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
    """A path of the merged view: the node that serves it and the layer it comes from."""

    node: Node
    #: The layer whose node is served.
    layer: Layer


class View:
    """One client's merged view over ordered layers."""

    def __init__(self, client: str, layers: Sequence[Layer]) -> None:
        self.client = client
        self.layers = tuple(layers)

    async def resolve(self, path: Path) -> Resolved | None:
        """What the merged view has at `path`, or None.

        Layers are asked top-down and only as far as needed: a file the client directory has
        is served without asking the disk below it (which may be attaching), even when its
        parent directory merges with the disk's.  A lower layer is asked only after every
        higher one turned out not to have the path, and its answer counts only if no higher
        layer shadows one of the path's directories with a non-directory.
        """
        if not path:
            return await self._root()
        depth = len(path)
        #: stopped[d]: a layer still merging at path[:d-1] has a non-directory at path[:d],
        #: which hides path[:d] (and everything below it) in every lower layer.
        stopped = [False] * depth
        for layer in self.layers:
            node = await layer.lookup(path)
            if node is not None:
                # The layer has the whole path, so each of its prefixes is a directory: it
                # serves the path unless a higher layer cut one of those prefixes off.
                if not any(stopped[1:]):
                    return Resolved(node, layer)
                return None
            for d in range(1, depth):
                if stopped[d]:
                    break
                prefix = await layer.lookup(path[:d])
                if prefix is None:
                    break
                if not prefix.is_dir:
                    stopped[d] = True
                    break
        return None

    async def _root(self) -> Resolved | None:
        for layer in self.layers:
            node = await layer.lookup(())
            if node is not None and node.is_dir:
                return Resolved(node, layer)
        return None

    async def contributors(self, path: Path) -> tuple[Layer, ...]:
        """Every layer whose directory at `path` merges into the view's, highest first."""
        merging: tuple[Layer, ...] = tuple(
            [layer for layer in self.layers if (n := await layer.lookup(())) and n.is_dir])
        for depth in range(1, len(path) + 1):
            dirs: list[Layer] = []
            for layer in merging:
                node = await layer.lookup(path[:depth])
                if node is None:
                    continue
                if not node.is_dir:
                    break  # it and everything below it are shadowed (or the path is a file)
                dirs.append(layer)
            merging = tuple(dirs)
        return merging

    async def listdir(self, resolved: Resolved, path: Path) -> dict[str, Node]:
        """Union listing of a merged directory: for each name, the node the view serves."""
        result: dict[str, Node] = {}
        for layer in await self.contributors(path):
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
