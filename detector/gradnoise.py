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
import random
from dataclasses import dataclass, field


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


LEVEL = 0.9  # the interval written per epoch: 90%
MIN_STEPS = 4  # fewer step estimates than this give no interval
RESAMPLES = 1000


@dataclass
class NoiseAverage:
    """The estimates of a window (an epoch), grouped by optimizer step; B_simple is the ratio of their means.

    Each group holds the sums of one step's estimates (one per micro-batch against the step),
    so the bootstrap resamples whole steps: a step's estimates share its large batch.
    """

    groups: list = field(default_factory=list)  # (|G|² sum, tr(Σ) sum, count) per step

    def add(self, g2: float, trace: float) -> None:
        """One estimate as a group of its own."""
        if math.isfinite(g2) and math.isfinite(trace):
            self.groups.append((g2, trace, 1))

    def add_group(self, smalls: list[tuple[float, float]], big_sq: float, B: float) -> None:
        """One large batch (squared norm big_sq of B images) and the micro-batches (|g|², b) it is made of.

        The micro-batches are treated as independent draws, although an epoch draws its
        batches without replacement. Measured on YOLO (N = 40, b = 8, 16 images in a pair):
        |G_2b|² came out at the independent-draw value (1782 against 1780 predicted), not
        at the without-replacement one (1358): augmentation, BatchNorm and a loss normalised
        per batch keep a pass's batches from cancelling as means of fixed per-image
        gradients would. So no finite-population correction is applied.
        """
        est = [two_batch(small_sq, b, big_sq, B) for small_sq, b in smalls if b < B]
        est = [(g, t) for g, t in est if math.isfinite(g) and math.isfinite(t)]
        if est:
            self.groups.append((sum(g for g, _ in est), sum(t for _, t in est), len(est)))

    @property
    def n(self) -> int:
        return sum(c for _, _, c in self.groups)

    @property
    def g2(self) -> float | None:
        return sum(g for g, _, _ in self.groups) / self.n if self.groups else None

    @property
    def trace(self) -> float | None:
        return sum(t for _, t, _ in self.groups) / self.n if self.groups else None

    @property
    def b_simple(self) -> float | None:
        return ratio(self.trace, self.g2)

    def interval(self, level: float = LEVEL, resamples: int = RESAMPLES, seed: int = 0):
        """(low, high) of B_simple: percentile bootstrap over the steps (see bootstrap)."""
        return bootstrap(self.groups, level, resamples, seed)


def bootstrap(groups: list, level: float = LEVEL, resamples: int = RESAMPLES, seed: int = 0):
    """Percentile interval of B_simple = Σ tr(Σ) / Σ |G|² over groups drawn with replacement.

    groups: (|G|² sum, tr(Σ) sum, count) per step. A resample whose |G|² mean is not
    positive has B_simple = ∞ (the noise hides the signal). Returns (low, high):
    high None means unbounded above (more than (1 − level)/2 of the resamples at ∞);
    (None, None) means no interval (fewer than MIN_STEPS steps, or low unbounded too).
    A deterministic generator: the same steps give the same interval.
    """
    if len(groups) < MIN_STEPS:
        return None, None
    rng = random.Random(seed)
    k = len(groups)
    values = []
    for _ in range(resamples):
        g2 = trace = 0.0
        for _ in range(k):
            g, t, _c = groups[rng.randrange(k)]
            g2 += g
            trace += t
        values.append(trace / g2 if g2 > 0 else math.inf)
    values.sort()
    tail = (1 - level) / 2
    low = values[int(tail * (resamples - 1))]
    high = values[int(math.ceil((1 - tail) * (resamples - 1)))]
    if not math.isfinite(low):
        return None, None
    return max(low, 0.0), (high if math.isfinite(high) else None)


def steps_ratio(B: float, B_ref: float, noise: float | None) -> float:
    """Predicted optimizer steps to the same loss at B images per step, relative to B_ref images per step.

    S/S_min = 1 + B_noise/B (McCandlish et al. 2018, eq. 2.11), so S(B)/S(B_ref) =
    (1 + B_noise/B) / (1 + B_noise/B_ref); noise None (unbounded) gives the limit B_ref/B.
    """
    if noise is None or not math.isfinite(noise):
        return B_ref / B
    return (1 + noise / B) / (1 + noise / B_ref)


def images_ratio(B: float, B_ref: float, noise: float | None) -> float:
    """Predicted images to the same loss at B against B_ref images per step: E/E_min = 1 + B/B_noise.

    E(B)/E(B_ref) = (B_noise + B) / (B_noise + B_ref); noise None (unbounded) gives 1.
    """
    if noise is None or not math.isfinite(noise):
        return 1.0
    return (noise + B) / (noise + B_ref)


def predict(B: float, B_ref: float, noise: float, low: float | None, high: float | None) -> dict:
    """Steps and images at B relative to B_ref, each as (value, low, high) over the noise scale's interval.

    Both ratios are monotonic in B_noise, so the interval's ends map to the prediction's
    ends; an unbounded high maps to the limits (B_ref/B for steps, 1 for images).
    """
    out = {}
    for key, f in (("steps", steps_ratio), ("images", images_ratio)):
        ends = [f(B, B_ref, x) for x in ((low if low is not None else noise), high)]
        out[key] = (f(B, B_ref, noise), min(ends), max(ends))
    return out


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
