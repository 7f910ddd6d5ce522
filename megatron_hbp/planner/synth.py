"""Named synthetic length distributions for planner studies (seeded, NumPy only)."""

from __future__ import annotations

import numpy as np


def _lognormal(rng: np.random.Generator, n: int, median: float, sigma: float, lo: int, hi: int) -> np.ndarray:
    x = np.exp(rng.normal(np.log(median), sigma, n))
    return np.clip(np.rint(x), lo, hi).astype(np.int32)


def tulu3_longcite(rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    """Tulu3-like short SFT data + LongCite-like long samples (the paper's 8B setting).

    ``round(1e6 * scale)`` short samples, log-normal with median 400 and sigma 1.0 clipped to
    [16, 32768], plus ``round(2000 * scale)`` long ones uniform in [16384, 131072]; shuffled.
    """
    n_short, n_long = round(1_000_000 * scale), round(2_000 * scale)
    short = _lognormal(rng, n_short, 400.0, 1.0, 16, 32768)
    long = rng.integers(16384, 131072, n_long, endpoint=True).astype(np.int32)
    out = np.concatenate([short, long])
    return out[rng.permutation(len(out))]


def short_chat(rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    """Only short chat samples: log-normal median 600, sigma 0.8, clipped to [8, 16384]; 100k * scale."""
    return _lognormal(rng, round(100_000 * scale), 600.0, 0.8, 8, 16384)


def long_mix(rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    """Heavier long tail: 90% log-normal (median 1K, sigma 1.2, <= 64K) + 10% uniform [8K, 64K]; 100k * scale."""
    n = round(100_000 * scale)
    n_long = n // 10
    short = _lognormal(rng, n - n_long, 1000.0, 1.2, 16, 65536)
    long = rng.integers(8192, 65536, n_long, endpoint=True).astype(np.int32)
    out = np.concatenate([short, long])
    return out[rng.permutation(len(out))]


def chat_heavy(rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    """Chat-heavy SFT: ``round(600k * scale)`` samples, 96 % chat turns (log-normal median 500, sigma
    0.9, [8, 16384]), 3.9 % long conversations (log-normal median 6000, sigma 0.6, [2048, 32768]),
    0.1 % long-context documents (uniform [32768, 131072]); shuffled."""
    n = round(600_000 * scale)
    n_long, n_conv = round(n * 0.001), round(n * 0.039)
    parts = [
        _lognormal(rng, n - n_long - n_conv, 500.0, 0.9, 8, 16384),
        _lognormal(rng, n_conv, 6000.0, 0.6, 2048, 32768),
        rng.integers(32768, 131072, n_long, endpoint=True).astype(np.int32),
    ]
    out = np.concatenate(parts)
    return out[rng.permutation(len(out))]


def code_long(rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    """Code-heavy SFT with many long samples: ``round(60k * scale)`` samples, 75 % code files and
    chats (log-normal median 2500, sigma 1.1, [32, 65536]) and 25 % repository-level samples
    (uniform [16384, 131072]); shuffled."""
    n = round(60_000 * scale)
    n_long = round(n * 0.25)
    out = np.concatenate(
        [
            _lognormal(rng, n - n_long, 2500.0, 1.1, 32, 65536),
            rng.integers(16384, 131072, n_long, endpoint=True).astype(np.int32),
        ]
    )
    return out[rng.permutation(len(out))]


DISTRIBUTIONS = {
    "tulu3_longcite": tulu3_longcite,
    "short_chat": short_chat,
    "long_mix": long_mix,
    "chat_heavy": chat_heavy,
    "code_long": code_long,
}


def synth_lengths(name: str, seed: int = 0, scale: float = 1.0) -> np.ndarray:
    """``[N] int32`` lengths from the named distribution (``DISTRIBUTIONS``), deterministic in ``seed``."""
    if name not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution '{name}'; choose one of {', '.join(DISTRIBUTIONS)}")
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    return DISTRIBUTIONS[name](np.random.default_rng(seed), scale)
