"""The numbers behind every table and figure: seed statistics, settings, and the two-stage frontier.

Conventions (the tables' footnotes repeat them):
- mean and sample standard deviation (ddof=1) over the seeds that report a value; n counts them;
- a 95% interval is Student's t interval of the mean over seeds (none for n < 2);
- a "setting" is a run's config without its seed and bookkeeping keys (name, notes, paths...):
  runs of one setting differ only by seed, and are aggregated into one point; a seed of a
  setting counts once (the same job run by two sweeps, e.g. wAR-Tok at the default weight in
  `baselines` and `wgf_weight`, is one observation, not two: the first run folder is kept);
- the two-stage frontier is a straight line y = slope * x + intercept fitted by ordinary least
  squares (numpy.polyfit, degree 1) to every completed two-stage run, where x is a
  reconstruction metric (rfid or psnr) and y is ar_loss or gfid. A method's distance to it is
  its own y minus the line at its own x, per seed: negative means better than two-stage at
  matched reconstruction quality.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from analysis.collect import LEADING_COLUMNS, completed

# Config keys that say where or how a run was bookkept, not what was trained.
BOOKKEEPING_KEYS = ("name", "notes", "tags", "device", "cache_dir", "data.root", "data.num_workers",
                    "data.download", "compile", "channels_last", "eval.sample_cuda_graph", "config.name")
# At least this many distinct two-stage settings (budgets, codebook sizes...) before a line is fitted:
# two points always fit exactly and say nothing about the frontier's shape or noise.
MIN_FRONTIER_SETTINGS = 3
METHOD_ORDER = ("two_stage", "joint", "wartok")
METHOD_LABELS = {"two_stage": "two-stage", "joint": "joint", "wartok": "wAR-Tok"}


@dataclass(frozen=True)
class Summary:
    mean: float
    std: float  # nan for n < 2
    n: int


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float  # nan for n < 2
    high: float
    n: int


@dataclass(frozen=True)
class Frontier:
    x: str
    y: str
    slope: float
    intercept: float
    n_runs: int
    n_settings: int
    x_min: float
    x_max: float

    def predict(self, x: np.ndarray | float) -> np.ndarray | float:
        return self.slope * np.asarray(x, dtype=float) + self.intercept


def summarize(values) -> Summary:
    """Mean, sample std and count of the finite values (NaN/None are runs that did not report it)."""
    array = finite(values)
    if array.size == 0:
        return Summary(math.nan, math.nan, 0)
    std = float(np.std(array, ddof=1)) if array.size > 1 else math.nan
    return Summary(float(np.mean(array)), std, int(array.size))


def t_interval(values, level: float = 0.95) -> Interval:
    array = finite(values)
    if array.size == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = float(np.mean(array))
    if array.size < 2:
        return Interval(mean, math.nan, math.nan, 1)
    half = float(scipy_stats.t.ppf(0.5 + level / 2, df=array.size - 1)) * float(np.std(array, ddof=1))
    half /= math.sqrt(array.size)
    return Interval(mean, mean - half, mean + half, int(array.size))


def finite(values) -> np.ndarray:
    array = pd.to_numeric(pd.Series(values, dtype="object"), errors="coerce").to_numpy(dtype=float)
    return array[np.isfinite(array)]


def metric_names(frame: pd.DataFrame) -> list[str]:
    return sorted(c for c in frame.columns if f"{c}_n" in frame.columns and f"{c}_reliable" in frame.columns)


def setting_columns(frame: pd.DataFrame) -> list[str]:
    """The config columns that define what was trained (everything but seed and bookkeeping)."""
    metrics = metric_names(frame)
    metric_cols = {f"{m}{s}" for m in metrics for s in ("", "_n", "_reliable")}
    return [c for c in frame.columns
            if c not in LEADING_COLUMNS and c not in metric_cols and c not in BOOKKEEPING_KEYS]


def setting_labels(frame: pd.DataFrame) -> pd.Series:
    """One text label per row naming its method and setting; equal labels = same setting, other seed."""
    columns = ["method"] + setting_columns(frame)
    return frame[columns].astype("object").apply(lambda row: repr(tuple(row)), axis=1) if len(frame) else \
        pd.Series([], dtype="object")


def distinct_runs(frame: pd.DataFrame) -> pd.DataFrame:
    """The completed runs, each (experiment, setting, seed) once: the first by run folder."""
    done = completed(frame)
    if not len(done) or "seed" not in done:
        return done
    done = done.sort_values("run_dir", kind="stable") if "run_dir" in done else done
    key = setting_labels(done) + "|seed=" + done["seed"].astype(str)
    if "name" in done:  # runs of two experiments stay two runs, even where their configs agree
        key = key + "|name=" + done["name"].astype(str)
    return done[~key.duplicated()].sort_index()


def main_selection(frame: pd.DataFrame, name: str | None = None) -> tuple[pd.DataFrame, list[str]]:
    """The runs of the main comparison, and notes saying how they were chosen.

    Experiment `name` if given, else the experiment name that covers the most methods (then the
    most runs, then alphabetically first). Within it, each method keeps its most-seeded setting,
    so a study that also varied a setting does not blur the comparison; where several settings
    of a method have that many seeds, the one that agrees with the other methods' settings on
    most config keys (the shared defaults), then the alphabetically first.
    """
    done = distinct_runs(frame)
    notes = []
    repeats = len(completed(frame)) - len(done)
    if repeats:
        notes.append(f"{repeats} run(s) repeating another run's setting and seed (the same job in two sweeps) "
                     "counted once.")
    if "name" in done and done["name"].notna().any():
        if name is None:
            ranking = done.groupby("name")["method"].agg(["nunique", "size"]).reset_index()
            ranking = ranking.sort_values(["nunique", "size", "name"], ascending=[False, False, True])
            name = str(ranking["name"].iloc[0])
            notes.append(f"Main comparison: runs of experiment `{name}` (chosen as the one covering the most "
                         "methods; `--main-name` picks another).")
        else:
            notes.append(f"Main comparison: runs of experiment `{name}`.")
        done = done[done["name"] == name]
    labels = setting_labels(done)
    candidates = {}  # method -> the labels of its most-seeded settings
    for method, method_labels in labels.groupby(done["method"], sort=True):
        counts = method_labels.value_counts()
        candidates[method] = sorted(counts[counts == counts.max()].index)
    # a method with one most-seeded setting fixes the reference; a tie (an ablation that ran every
    # value with as many seeds, e.g. wgf_weight) goes to the setting agreeing with it on most keys
    reference = [done[labels == tied[0]].iloc[0] for tied in candidates.values() if len(tied) == 1]
    columns = setting_columns(done)
    kept = []
    for method, tied in candidates.items():
        mine = done["method"] == method
        best = max(tied, key=lambda label: (agreement(done[labels == label].iloc[0], reference, columns),
                                             -tied.index(label)))
        kept.append(done[labels == best])
        if (mine & (labels != best)).any():
            notes.append(f"{METHOD_LABELS.get(method, method)}: {(mine & (labels != best)).sum()} run(s) at other "
                         "settings of this experiment left out (the main table uses each method's most-seeded "
                         "setting; among equally seeded ones, the one that shares most settings with the "
                         "other methods).")
    selection = pd.concat(kept) if kept else done.iloc[0:0]
    return selection, notes


def agreement(run: pd.Series, reference: list[pd.Series], columns: list[str]) -> int:
    """How many (reference run, setting column) pairs hold the same value as `run`."""
    return sum(bool(same(run[c], ref[c])) for ref in reference for c in columns)


def same(a, b) -> bool:
    """Equal config values, where two missing values are equal."""
    a_missing, b_missing = (pd.api.types.is_scalar(v) and bool(pd.isna(v)) for v in (a, b))
    return a_missing and b_missing if a_missing or b_missing else bool(a == b)


def paired_gaps(selection: pd.DataFrame, method: str, metric: str, baseline: str = "two_stage") -> Interval:
    """`method` minus `baseline` on `metric`, seed by seed (the seeds both report); mean and 95%
    interval over seeds. Runs of one seed share stages A and B, so the pairing removes the
    tokenizer-initialisation and target-prior variance that the unpaired std carries."""
    if metric not in selection or "seed" not in selection:
        return t_interval([])
    by_seed = {m: selection[selection["method"] == m].groupby("seed")[metric].first() for m in (method, baseline)}
    both = by_seed[method].index.intersection(by_seed[baseline].index)
    return t_interval(finite((by_seed[method][both] - by_seed[baseline][both]).to_numpy()))


def ordered_methods(methods) -> list[str]:
    present = sorted(set(methods))
    return [m for m in METHOD_ORDER if m in present] + [m for m in present if m not in METHOD_ORDER]


def ablation_studies(frame: pd.DataFrame, key: str) -> list[tuple[str, str, pd.DataFrame]]:
    """(experiment name, method, its completed runs) for each experiment and method that varies `key`,
    ordered by name, then method."""
    done = distinct_runs(frame)
    if key not in done or "name" not in done:
        return []
    done = done[done[key].notna()]
    studies = [(str(name), method, runs) for (name, method), runs in done.groupby(["name", "method"], sort=True)
               if runs[key].nunique() > 1]
    order = {m: i for i, m in enumerate(ordered_methods(s[1] for s in studies))}
    return sorted(studies, key=lambda s: (s[0], order[s[1]]))


def fit_frontier(frame: pd.DataFrame, x: str, y: str) -> tuple[Frontier | None, str]:
    """The two-stage frontier of y against x, or None and the reason it could not be fitted."""
    runs = distinct_runs(frame)
    runs = runs[(runs["method"] == "two_stage") & runs[x].notna() & runs[y].notna()] \
        if x in runs and y in runs else runs.iloc[0:0]
    n_settings = setting_labels(runs).nunique() if len(runs) else 0
    distinct_x = runs[x].nunique() if len(runs) else 0
    if n_settings < MIN_FRONTIER_SETTINGS or distinct_x < 2:
        return None, (f"Too few two-stage points to fit the frontier of {y} against {x}: need completed "
                      f"two-stage runs with both values at >= {MIN_FRONTIER_SETTINGS} settings "
                      f"(budgets or codebook sizes), found {len(runs)} run(s) at {n_settings} setting(s).")
    xs, ys = runs[x].to_numpy(dtype=float), runs[y].to_numpy(dtype=float)
    slope, intercept = np.polyfit(xs, ys, deg=1)
    return Frontier(x, y, float(slope), float(intercept), len(runs), int(n_settings),
                    float(xs.min()), float(xs.max())), ""


def frontier_gaps(runs: pd.DataFrame, frontier: Frontier) -> tuple[Interval, bool]:
    """A method's per-seed vertical distance to the frontier (mean, 95% interval) and whether any
    of its runs lies outside the two-stage x range (the line is then extrapolated)."""
    usable = runs[runs[frontier.x].notna() & runs[frontier.y].notna()]
    xs = usable[frontier.x].to_numpy(dtype=float)
    gaps = usable[frontier.y].to_numpy(dtype=float) - frontier.predict(xs)
    outside = bool(((xs < frontier.x_min) | (xs > frontier.x_max)).any())
    return t_interval(gaps), outside
