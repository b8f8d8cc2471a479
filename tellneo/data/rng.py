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


def _key(seed: int, stream: int) -> np.uint64:
    """One 64-bit key per (seed, stream); both must be non-negative Python ints."""
    if seed < 0 or stream < 0:
        raise ValueError(f"seed and stream must be >= 0, got seed={seed}, stream={stream}")
    mixed = _splitmix64(np.array([seed & _MASK64], dtype=np.uint64))[0]
    return _splitmix64(np.array([(int(mixed) ^ (stream * 0xD1B54A32D192ED03)) & _MASK64], dtype=np.uint64))[0]


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


def stream_id(*parts: int) -> int:
    """Combine small non-negative ints (epoch, purpose, round, ...) into one stream id."""
    acc = np.array([0x5851F42D4C957F2D], dtype=np.uint64)
    for p in parts:
        if p < 0:
            raise ValueError(f"stream parts must be >= 0, got {parts}")
        with np.errstate(over="ignore"):
            acc = _splitmix64(acc ^ np.array([p & _MASK64], dtype=np.uint64))
    return int(acc[0] >> np.uint64(1))
