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


def effective(b: float, n_images: int | None) -> float:
    """The batch size with replacement that has the variance of b images drawn without replacement from n.

    Var(mean of b of N) = tr(Σ)/b · (N − b)/(N − 1): at b = 32 of 400 images that is 8% less
    noise than b independent draws, enough to bias B_simple when uncorrected.
    """
    if not n_images or n_images <= 1 or b >= n_images:
        return b if not n_images or b < n_images else math.inf
    return b * (n_images - 1) / (n_images - b)


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

    def add_group(self, smalls: list[tuple[float, float]], big_sq: float, B: float,
                  n_images: int | None = None) -> None:
        """One large batch (squared norm big_sq of B images) and the micro-batches (|g|², b) it is made of.

        With n_images (the training set drawn from without replacement) the batch sizes are
        corrected to their effective sizes; a batch of the whole set has no noise to measure.
        """
        big = effective(B, n_images)
        if not math.isfinite(big):
            return
        for small_sq, b in smalls:
            if b < B:
                self.add(*two_batch(small_sq, effective(b, n_images), big_sq, big))

    @property
    def g2(self) -> float | None:
        return self.g2_sum / self.n if self.n else None

    @property
    def trace(self) -> float | None:
        return self.trace_sum / self.n if self.n else None

    @property
    def b_simple(self) -> float | None:
        return ratio(self.trace, self.g2)


def exhaustive(batch_sq_devs: list[float], full_sq: float, b: int, n_images: int) -> tuple[float, float, float | None]:
    """(|G|², tr(Σ), B_simple) from every batch of b images at fixed weights.

    batch_sq_devs are |G_b,j − G|² for batches that partition the whole training set
    (one or more shuffled passes), full_sq is |G|² of the full-data gradient. Batches
    drawn without replacement from N images have Var = tr(Σ)/b · (N − b)/(N − 1), so
    the finite-population factor is undone here.
    """
    mean_dev = sum(batch_sq_devs) / len(batch_sq_devs)
    fpc = (n_images - b) / (n_images - 1) if n_images > 1 else 1.0
    trace = b * mean_dev / fpc if fpc > 0 else float("nan")
    return full_sq, trace, ratio(trace, full_sq)
