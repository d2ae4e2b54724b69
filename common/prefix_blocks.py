"""A prompt as a chain of block hashes: what a paged KV cache with prefix caching can share.

Block i's hash covers its tokens and, through block i-1's hash, every token before them, so two
prompts share a cached block only if they agree on everything up to its end. Only full blocks count
(an engine caches whole blocks). Python hashes ints and tuples of ints the same in every process.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


def block_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    hashes, previous = [], 0
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        previous = hash((previous, tuple(token_ids[start:start + block_size])))
        hashes.append(previous)
    return hashes


class PrefixCache:
    """Blocks of the prompts seen, the least recently used evicted past `capacity_blocks`: how many of a
    prompt's leading tokens an engine with prefix caching would find cached."""

    def __init__(self, block_size: int, capacity_blocks: int) -> None:
        self.block_size = block_size
        self._capacity = capacity_blocks
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def lookup_and_store(self, token_ids: Sequence[int]) -> int:
        """Cached tokens of this prompt (its longest cached prefix of whole blocks; never the last token,
        which an engine computes to start decoding); then its blocks are cached, most recent last."""
        hashes = block_hashes(token_ids, self.block_size)
        hits = 0
        while hits < len(hashes) and hashes[hits] in self._blocks:
            hits += 1
        for block in hashes:
            self._blocks[block] = None
            self._blocks.move_to_end(block)
        while len(self._blocks) > self._capacity:
            self._blocks.popitem(last=False)
        return min(hits * self.block_size, max(0, len(token_ids) - 1))
