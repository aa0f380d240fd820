"""Near-duplicate search over 64-bit perceptual hashes with an index instead of all pairs.

Multi-index hashing (Norouzi et al. 2012) with faiss' IndexBinaryMultiHash: the 64 bits are cut into
`threshold + 1` substrings; two hashes within Hamming distance `threshold` agree exactly on at least one of them
(pigeonhole), so looking up each hash's substrings finds every pair within the threshold, and faiss checks the
full distance of each candidate. The result is exact (the same pairs as `prepare.near_duplicate_pairs`), and the
work grows with the number of candidates, not with n^2. For 10^8 hashes, run it per shard group against an index of
the groups before it (`NearDuplicateIndex.add` then `query`), so memory stays at 8 bytes per hash plus the tables.
"""
from __future__ import annotations

import numpy as np


def _as_codes(hashes: np.ndarray) -> np.ndarray:
    """uint64 hashes -> [n, 8] uint8 codes (big-endian: bit order is irrelevant to Hamming distance)."""
    return np.ascontiguousarray(np.asarray(hashes, dtype=">u8").view(np.uint8).reshape(-1, 8))


class NearDuplicateIndex:
    """An index of 64-bit hashes answering "which indexed hashes lie within `threshold` bits of these"."""

    def __init__(self, threshold: int = 6):
        import faiss

        if not 0 <= threshold < 64:
            raise ValueError(f"near_dup_threshold={threshold}: must be in [0, 63]")
        self.threshold = threshold
        nhash = threshold + 1
        self.index = faiss.IndexBinaryMultiHash(64, nhash, 64 // nhash)
        self.size = 0

    def add(self, hashes: np.ndarray) -> None:
        codes = _as_codes(hashes)
        self.index.add(codes)
        self.size += len(codes)

    def query(self, hashes: np.ndarray) -> np.ndarray:
        """[m, 3] int64 rows (query index, indexed index, distance) for every pair within the threshold."""
        codes = _as_codes(hashes)
        if not len(codes) or not self.size:
            return np.zeros((0, 3), np.int64)
        lims, dist, ids = self.index.range_search(codes, self.threshold + 1)    # distance < radius
        q = np.repeat(np.arange(len(codes)), np.diff(lims).astype(np.int64))
        return np.stack([q, ids, dist], axis=1).astype(np.int64)


def near_duplicate_pairs_indexed(hashes: np.ndarray, threshold: int = 6) -> np.ndarray:
    """All pairs (i, j, hamming) with i < j and hamming <= threshold, as `prepare.near_duplicate_pairs`, through
    the index."""
    index = NearDuplicateIndex(threshold)
    index.add(hashes)
    pairs = index.query(hashes)
    pairs = pairs[pairs[:, 0] < pairs[:, 1]]
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]


def clusters(n: int, pairs: np.ndarray) -> np.ndarray:
    """[n] cluster ids (the smallest member index) of the connected components of the pairs (union-find)."""
    parent = np.arange(n)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs[:, :2]:
        a, b = root(int(i)), root(int(j))
        if a != b:
            parent[max(a, b)] = min(a, b)
    return np.array([root(i) for i in range(n)])
