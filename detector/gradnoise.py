"""The simple gradient noise scale B_simple = tr(Σ) / |G|², from gradient norms at two batch sizes.

Pure arithmetic on floats (no torch, no ultralytics), shared by the training-time
meter (detector.yolo.gradstats), the exhaustive reference (tools/bench_gradnoise.py)
and the reports. McCandlish et al. 2018, "An Empirical Model of Large-Batch
Training", appendix A: for a gradient G_b averaged over b images,
E|G_b|² = |G|² + tr(Σ)/b, so two batch sizes b < B measured at the same weights give
unbiased estimates of both terms. Each estimate is very noisy; the paper averages
the numerator and the denominator separately over many pairs and divides the
averages (a ratio of means, never a mean of ratios, whose small denominators explode).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def two_batch(small_sq: float, b: float, big_sq: float, B: float) -> tuple[float, float]:
    """Unbiased (|G|², tr(Σ)) from |G_b|² at b images and |G_B|² at B > b images (same weights)."""
    if not 0 < b < B:
        raise ValueError(f"need 0 < b < B, got b={b}, B={B}")
    g2 = (B * big_sq - b * small_sq) / (B - b)
    trace = (small_sq - big_sq) / (1.0 / b - 1.0 / B)
    return g2, trace


def ratio(trace: float | None, g2: float | None) -> float | None:
    """B_simple = tr(Σ) / |G|²; None when |G|² is not positive (no signal above the noise yet)."""
    if trace is None or g2 is None or not math.isfinite(trace) or not math.isfinite(g2) or g2 <= 0:
        return None
    return trace / g2


@dataclass
class NoiseAverage:
    """Running means of the two estimates over a window (an epoch); B_simple is their ratio."""

    g2_sum: float = 0.0
    trace_sum: float = 0.0
    n: int = 0

    def add(self, g2: float, trace: float) -> None:
        if math.isfinite(g2) and math.isfinite(trace):
            self.g2_sum += g2
            self.trace_sum += trace
            self.n += 1

    def add_group(self, smalls: list[tuple[float, float]], big_sq: float, B: float) -> None:
        """One large batch (squared norm big_sq of B images) and the micro-batches (|g|², b) it is made of.

        The micro-batches are treated as independent draws, although an epoch draws its
        batches without replacement. Measured on YOLO (N = 40, b = 8, 16 images in a pair):
        |G_2b|² came out at the independent-draw value (1782 against 1780 predicted), not
        at the without-replacement one (1358): augmentation, BatchNorm and a loss normalised
        per batch keep a pass's batches from cancelling as means of fixed per-image
        gradients would. So no finite-population correction is applied.
        """
        for small_sq, b in smalls:
            if b < B:
                self.add(*two_batch(small_sq, b, big_sq, B))

    @property
    def g2(self) -> float | None:
        return self.g2_sum / self.n if self.n else None

    @property
    def trace(self) -> float | None:
        return self.trace_sum / self.n if self.n else None

    @property
    def b_simple(self) -> float | None:
        return ratio(self.trace, self.g2)


def exhaustive(mean_sq: float, full_sq: float, b: int, m: int) -> tuple[float, float, float | None]:
    """(|G|², tr(Σ), B_simple) from m batch gradients of b images each at fixed weights.

    mean_sq is the mean of |G_b,j|² over the m batches, full_sq is |Ḡ|² of their mean
    (several shuffled passes over every training image). Batches are treated as
    independent draws, as the meter treats them (see NoiseAverage.add_group): the spread
    s² = m/(m−1)·(mean_sq − full_sq) estimates tr(Σ)/b, and |Ḡ|² overstates |G|² by s²/m,
    which is taken off.
    """
    s2 = m / (m - 1) * (mean_sq - full_sq)
    g2 = full_sq - s2 / m
    trace = s2 * b
    return g2, trace, ratio(trace, g2)
