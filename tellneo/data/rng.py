"""Counter-based randomness for the mixer: the same numbers on every platform, process and NumPy version.

Every draw is a pure function of ``(seed, stream, counter)``: ``splitmix64`` applied to a mix of the three. No
generator state exists, so any worker, rank or resumed run can recompute exactly the draws it needs.
"""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_MASK64 = (1 << 64) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


_STREAM_MUL = np.uint64(0xD1B54A32D192ED03)


def _keys(seed: int, streams: np.ndarray) -> np.ndarray:
    """``[len(streams)]`` uint64: the key of every ``(seed, stream)`` (streams non-negative, below 2**63)."""
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got seed={seed}")
    mixed = _splitmix64(np.array([seed & _MASK64], dtype=np.uint64))
    with np.errstate(over="ignore"):
        return _splitmix64(mixed ^ (np.asarray(streams, dtype=np.uint64) * _STREAM_MUL))


def _key(seed: int, stream: int) -> np.uint64:
    """One 64-bit key per (seed, stream); both must be non-negative Python ints."""
    if seed < 0 or stream < 0:
        raise ValueError(f"seed and stream must be >= 0, got seed={seed}, stream={stream}")
    return _keys(seed, np.array([stream], dtype=np.uint64))[0]


def random_bits(seed: int, stream: int, n: int, start: int = 0) -> np.ndarray:
    """``[n]`` uint64: draws number ``start .. start+n-1`` of ``(seed, stream)``."""
    counters = np.arange(start, start + n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        return _splitmix64(counters * _GOLDEN ^ _key(seed, stream))


def uniform(seed: int, stream: int, n: int, start: int = 0) -> np.ndarray:
    """``[n]`` float64 in [0, 1) with 53 random bits each."""
    return (random_bits(seed, stream, n, start) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def permutation(n: int, seed: int, stream: int) -> np.ndarray:
    """A random permutation of ``range(n)`` (int64) determined by ``(seed, stream)`` alone."""
    keys = random_bits(seed, stream, n)
    return np.argsort(keys, kind="stable").astype(np.int64)


def permutations(n: int, seed: int, streams: np.ndarray) -> np.ndarray:
    """``[len(streams), n]`` int64: row i is ``permutation(n, seed, streams[i])``, computed in one vectorised pass."""
    counters = np.arange(n, dtype=np.uint64) * _GOLDEN
    with np.errstate(over="ignore"):
        keys = _splitmix64(counters[None, :] ^ _keys(seed, streams)[:, None])
    return np.argsort(keys, axis=1, kind="stable").astype(np.int64)


def stream_ids(parts: tuple[int, ...], last: np.ndarray) -> np.ndarray:
    """``[len(last)]`` int64: ``stream_id(*parts, last[i])`` for every i, vectorised over the last part."""
    last = np.asarray(last, dtype=np.int64)
    if last.size and last.min() < 0:
        raise ValueError(f"stream parts must be >= 0, got a last part {int(last.min())}")
    acc = np.array([_stream_acc(parts)], dtype=np.uint64)
    with np.errstate(over="ignore"):
        acc = _splitmix64(acc ^ last.astype(np.uint64))
    return (acc >> np.uint64(1)).astype(np.int64)


def _stream_acc(parts: tuple[int, ...]) -> int:
    acc = np.array([0x5851F42D4C957F2D], dtype=np.uint64)
    for p in parts:
        if p < 0:
            raise ValueError(f"stream parts must be >= 0, got {parts}")
        with np.errstate(over="ignore"):
            acc = _splitmix64(acc ^ np.array([p & _MASK64], dtype=np.uint64))
    return int(acc[0])


def stream_id(*parts: int) -> int:
    """Combine small non-negative ints (epoch, purpose, round, ...) into one stream id."""
    return _stream_acc(parts) >> 1
