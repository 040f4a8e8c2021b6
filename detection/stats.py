"""The statistics of the gain report: mean ± std over trials and Welch's interval of a gain.

Welch's interval because the methods' spreads need not be equal; its Student-t quantile comes
from scipy, at the fractional Welch–Satterthwaite degrees of freedom.
"""
from __future__ import annotations

import math
import statistics

from scipy.stats import t as student_t

CONFIDENCE = 0.95


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df > 0`` degrees of freedom (fractional allowed,
    ``math.inf`` for the normal); checked, as scipy answers bad arguments with inf or nan."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile: p must be in (0, 1), got {p}")
    if not df > 0.0:
        raise ValueError(f"t_quantile: df must be positive, got {df}")
    return float(student_t.ppf(p, df))


def mean_and_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample std (ddof=1); the std is None for one value, which has no spread."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def welch_interval(sample: list[float], reference: list[float], confidence: float = CONFIDENCE) -> dict:
    """``mean(sample) - mean(reference)`` with its Welch t-interval and Welch–Satterthwaite
    degrees of freedom: ``{"gain", "low", "high", "df"}``. Bounds and df are None when a group
    has a single value (no variance to estimate); with zero variance in both groups the
    interval shrinks to the gain itself and df is None (0/0)."""
    (sample_mean, sample_std), (reference_mean, reference_std) = mean_and_std(sample), mean_and_std(reference)
    interval = {"gain": sample_mean - reference_mean, "low": None, "high": None, "df": None}
    if sample_std is None or reference_std is None:
        return interval
    variances_of_means = (sample_std ** 2 / len(sample), reference_std ** 2 / len(reference))
    standard_error = math.sqrt(sum(variances_of_means))
    if standard_error == 0.0:
        return {**interval, "low": interval["gain"], "high": interval["gain"]}
    df = standard_error ** 4 / (variances_of_means[0] ** 2 / (len(sample) - 1)
                                + variances_of_means[1] ** 2 / (len(reference) - 1))
    half_width = t_quantile(0.5 + confidence / 2.0, df) * standard_error
    return {**interval, "low": interval["gain"] - half_width, "high": interval["gain"] + half_width, "df": df}
