"""The KV-block index the master keeps for KV-cache routing (UMBP's external block index):
which node holds which block hashes on which tier. Pure bookkeeping, no I/O."""

from __future__ import annotations

from typing import Any


class BlockIndex:
    """KV-block hashes per node and tier (UMBP's external KV block index)."""

    def __init__(self) -> None:
        self.index: dict[int, dict[str, set[str]]] = {}
        self.by: dict[tuple[str, str], set[int]] = {}

    def register(self, node: str, hashes: list[int], tier: str) -> int:
        mine = self.by.setdefault((node, tier), set())
        added = 0
        for h in hashes:
            if h not in mine:
                mine.add(h)
                self.index.setdefault(h, {}).setdefault(node, set()).add(tier)
                added += 1
        return added

    def revoke(self, node: str, hashes: list[int], tier: str) -> int:
        mine = self.by.get((node, tier), set())
        gone = 0
        for h in hashes:
            if h in mine:
                mine.discard(h)
                self._unindex(h, node, tier)
                gone += 1
        return gone

    def revoke_tier(self, node: str, tier: str) -> int:
        mine = self.by.pop((node, tier), set())
        for h in mine:
            self._unindex(h, node, tier)
        return len(mine)

    def revoke_node(self, node: str) -> None:
        for n, tier in [k for k in self.by if k[0] == node]:
            self.revoke_tier(n, tier)

    def _unindex(self, h: int, node: str, tier: str) -> None:
        nodes = self.index.get(h)
        if nodes is None:
            return
        tiers = nodes.get(node)
        if tiers is not None:
            tiers.discard(tier)
            if not tiers:
                del nodes[node]
        if not nodes:
            del self.index[h]

    def match(self, hashes: list[int]) -> dict[str, Any]:
        per_node: dict[str, dict[str, list[int]]] = {}
        distinct = set()
        for h in hashes:
            for node, tiers in self.index.get(h, {}).items():
                distinct.add(h)
                for tier in tiers:
                    per_node.setdefault(node, {}).setdefault(tier, []).append(h)
        return {"nodes": per_node, "distinct": len(distinct)}
