"""Mean ± standard error over seeds, shared by the study table scripts (imported as a sibling module: the scripts
run as `python scripts/<name>.py`, which puts scripts/ on sys.path)."""

from __future__ import annotations

import math


def mean_se(xs):
    """(mean, standard error of the mean, n) of the values that are not None or NaN."""
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return float("nan"), float("nan"), 0
    m = sum(xs) / len(xs)
    se = (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 / len(xs) ** 0.5 if len(xs) > 1 else float("nan")
    return m, se, len(xs)


def fmt(xs, scale=100.0, digits=1):
    """"m ± se" of xs times scale (just "m" for a single value)."""
    m, se, n = mean_se(xs)
    return f"{m * scale:.{digits}f} ± {se * scale:.{digits}f}" if n > 1 else f"{m * scale:.{digits}f}"
