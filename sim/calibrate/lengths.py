"""Response lengths from what a per-step log gives: a lognormal capped at max_new_tokens.

The simulator draws a response length as ceil(X), X ~ lognormal(mu, sigma), cut to [1, cap] (sim/workload.py), so
for whole numbers j: P(length >= j) = 1 - F(j - 1), with F the lognormal CDF (F(0) = 0). Hence exactly

    mean  = sum_{j=0}^{cap-1} (1 - F(j))
    clip  = P(length = cap) = 1 - F(cap - 1)
    P(max of n lengths <= M) = F(M)^n   (M < cap)

A log gives per-step means, maxima and clip ratios. Two equations fix (mu, sigma): the pooled mean with the pooled
clip ratio when responses were cut; otherwise the pooled mean with the median over steps of the per-step maximum,
which sits where F(M)^n = 1/2. With only the mean, sigma must be given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sim.config import ConfigError


@dataclass(frozen=True)
class LengthFit:
    median: float
    sigma: float
    cap: int
    how: str  # which statistics fixed it

    def as_config(self) -> dict:
        return {"kind": "lognormal", "median": self.median, "sigma": self.sigma}


def _cdf(x: np.ndarray, mu: float, sigma: float) -> np.ndarray:
    from scipy.special import ndtr

    x = np.asarray(x, np.float64)
    out = np.zeros_like(x)
    pos = x > 0
    out[pos] = ndtr((np.log(x[pos]) - mu) / sigma)
    return out


def capped_mean(mu: float, sigma: float, cap: int) -> float:
    """Mean of min(max(ceil(X), 1), cap), X ~ lognormal(mu, sigma)."""
    return float(np.sum(1.0 - _cdf(np.arange(cap), mu, sigma)))


def clip_fraction(mu: float, sigma: float, cap: int) -> float:
    """P(min(ceil(X), cap) = cap)."""
    return float(1.0 - _cdf(np.array([cap - 1.0]), mu, sigma)[0]) if cap > 1 else 1.0


def _solve_sigma(mean: float, cap: int, mu_of_sigma, what: str) -> float:
    """sigma with capped_mean(mu(sigma), sigma) = mean: a sign change on a log grid, then Brent's method."""
    from scipy.optimize import brentq

    grid = np.geomspace(1e-3, 6.0, 200)
    gap = np.array([capped_mean(mu_of_sigma(s), s, cap) - mean for s in grid])
    change = np.flatnonzero(np.sign(gap[:-1]) != np.sign(gap[1:]))
    if len(change) == 0:
        raise ConfigError(f"response lengths: no capped lognormal has mean {mean:.1f} tokens and {what} (cap {cap}); "
                          f"the log's statistics disagree with one another")
    i = change[0]
    return float(brentq(lambda s: capped_mean(mu_of_sigma(s), s, cap) - mean, grid[i], grid[i + 1], xtol=1e-10))


def fit_lengths(mean: float, cap: int, clip: float | None = None, max_median: float | None = None,
                n_per_step: float | None = None, sigma: float | None = None) -> LengthFit:
    """The capped lognormal with pooled mean `mean` and either the pooled clip ratio `clip` (> 0), or the median
    over steps of the per-step maximum `max_median` of `n_per_step` responses, or a given `sigma`."""
    from scipy.optimize import brentq
    from scipy.special import ndtri

    if not 1 <= mean <= cap:
        raise ConfigError(f"response lengths: the mean, {mean:.1f} tokens, must lie between 1 and the cap ({cap})")
    if sigma is not None:
        mu = brentq(lambda m: capped_mean(m, sigma, cap) - mean, -20.0, math.log(cap) + 20 * sigma, xtol=1e-12)
        return LengthFit(math.exp(mu), sigma, cap, f"mean {mean:.1f} with sigma {sigma:g} as given")
    if clip is not None and clip > 0:
        if clip >= 1:
            raise ConfigError(f"response lengths: every response is cut at the cap ({cap}); the length distribution "
                              f"below it is unidentified: pass --response-sigma")
        z = float(ndtri(1.0 - clip))
        top = math.log(cap - 1) if cap > 1 else 0.0
        s = _solve_sigma(mean, cap, lambda s: top - z * s, f"clip ratio {clip:.4f}")
        return LengthFit(math.exp(top - z * s), s, cap, f"mean {mean:.1f} and clip ratio {clip:.4f} at cap {cap}")
    if max_median is not None and n_per_step is not None and max_median < cap:
        z = float(ndtri(0.5 ** (1.0 / n_per_step)))
        top = math.log(max_median)
        s = _solve_sigma(mean, cap, lambda s: top - z * s,
                         f"a median per-step maximum of {max_median:.0f} over {n_per_step:.0f} responses")
        return LengthFit(math.exp(top - z * s), s, cap,
                         f"mean {mean:.1f} and median per-step maximum {max_median:.0f} of {n_per_step:.0f} responses "
                         f"(none cut at cap {cap})")
    raise ConfigError("response lengths: the log gives their mean only (no clip ratio above 0 and no per-step maximum "
                      "below the cap), which does not fix their spread: pass --response-sigma")
