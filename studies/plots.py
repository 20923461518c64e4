"""Study figures: one seaborn style, labelled axes with units, 95 % confidence bands across replications
(the Student-t interval of the mean, as in the sweep's aggregate table), each saved as PNG and SVG."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import matplotlib
import matplotlib.ticker
import numpy as np

matplotlib.use("Agg")  # studies run headless (CI, Ray workers, ssh sessions)
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

PALETTE = "colorblind"


@functools.lru_cache
def _t975(dof: int) -> float:
    from scipy import stats
    return float(stats.t.ppf(0.975, dof))


def band(values) -> tuple[float, float]:
    """95 % confidence interval of the mean of the non-NaN `values`: Student t, as `sweep.aggregate` (none from
    one value). Seaborn's bootstrap (1,000 resamples per point) took 20 s for the 64-GPU ratio study's figure."""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if len(v) < 2:
        return np.nan, np.nan
    mean, half = float(v.mean()), _t975(len(v) - 1) * float(v.std(ddof=1)) / math.sqrt(len(v))
    return mean - half, mean + half

# Axis labels, with units, of the columns studies plot.
LABELS = {
    "throughput/samples_per_s": "throughput (samples/s)",
    "staleness/mean": "mean staleness (versions)",
    "staleness/p99": "p99 staleness (versions)",
    "staleness/token_mean": "token staleness (versions)",
    "idle/trainer": "learner idle (fraction of wall time)",
    "idle/rollout": "rollout idle (fraction of worker time)",
    "speedup/vs_sync": "speedup over sync (x)",
    "pipeline.max_staleness": "staleness bound S (versions)",
    "rollout_gpus": "rollout GPUs",
    "tail_ratio": "response length p99 / median",
    "params_b": "model parameters (billions)",
    "gpus": "cluster GPUs",
}


def style() -> None:
    sns.set_theme(style="whitegrid", context="notebook", palette=PALETTE)


def panels(n: int, title: str, width: float = 4.6, height: float = 3.6):
    """A row of n axes (two rows past three panels) under one title."""
    style()
    cols = n if n <= 3 else (n + 1) // 2
    rows = 1 if n <= 3 else 2
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.remove()
    fig.suptitle(title)
    return fig, list(axes.flat[:n])


def line(ax, data: pd.DataFrame, x: str, y: str, hue: str | None = None, style_by: str | None = None,
         xlabel: str | None = None, ylabel: str | None = None, logx: int | None = None) -> None:
    """Mean line with its 95 % band across replications; one line per hue (and style) value."""
    sns.lineplot(data=data, x=x, y=y, hue=hue, style=style_by, errorbar=band, marker="o",
                 markersize=4, ax=ax, palette=PALETTE if hue else None)
    ax.set(xlabel=xlabel or LABELS.get(x, x), ylabel=ylabel or LABELS.get(y, y))
    if logx:  # log axis, ticks at the values studied, written plainly
        ax.set_xscale("log", base=logx)
        ax.set_xticks(sorted(data[x].dropna().unique()))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    if ax.get_legend() is not None:
        ax.legend(fontsize="small", title_fontsize="small", title=ax.get_legend().get_title().get_text())


def one_legend(axes) -> None:
    """Panels that share their hue keep the legend on the first only."""
    for ax in axes[1:]:
        if ax.get_legend() is not None:
            ax.get_legend().remove()


def save(fig, out: Path, stem: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    paths = [out / f"{stem}.png", out / f"{stem}.svg"]
    fig.savefig(paths[0], dpi=120)
    fig.savefig(paths[1])
    plt.close(fig)
    return paths


def pareto(points: pd.DataFrame, front: pd.DataFrame, best: pd.Series | None, hue: str,
           max_mean: float | None, title: str, out: Path, stem: str) -> list[Path]:
    """Throughput against mean staleness of every evaluated configuration, the Pareto front (no other point
    is both faster and fresher) as a step line, the recommendation starred, the staleness limit dashed."""
    fig, (ax,) = panels(1, title, width=7.0, height=4.8)
    x, y = "staleness/mean", "throughput/samples_per_s"
    sns.scatterplot(data=points, x=x, y=y, hue=hue, palette=PALETTE, alpha=0.6, s=28, ax=ax)
    ordered = front.sort_values(x)
    ax.step(ordered[x], ordered[y], where="post", color="black", linewidth=1.2, label="Pareto front")
    if best is not None:
        ax.scatter([best[x]], [best[y]], marker="*", s=260, color="crimson", edgecolor="black", zorder=5,
                   label="recommended")
    if max_mean is not None:
        ax.axvline(max_mean, color="grey", linestyle="--", linewidth=1, label="staleness limit")
    ax.set(xlabel=LABELS[x], ylabel=LABELS[y])
    ax.legend(fontsize="small", loc="lower right")
    return save(fig, out, stem)
