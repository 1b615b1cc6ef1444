"""The paper's figures from the run table of `analysis.collect`, as PNG and PDF.

    python analysis/figures.py [FOLDER ...] [--out results/figures]

Each figure has a fixed file name and a fixed pixel size (FIGSIZE x DPI), also when it has no
data (it then says what is missing), so scripts and tests can rely on every file existing:
  ar_loss_vs_rfid, gfid_vs_rfid, ar_loss_vs_psnr   one point per setting (mean ± std over seeds),
                                                   method as hue, the two-stage frontier as a line
  vs_wgf_weight, vs_refresh_every                  gfid and ar_loss against the swept setting
  usage_vs_codebook_size                           codebook usage against K
  training_curves                                  the raw TVC terms of stages a and c (scalars.jsonl)
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import matplotlib

if "MPLBACKEND" not in os.environ:  # files only, no display; Jupyter's kernel sets its inline backend here
    matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

if __package__ in (None, ""):  # run as `python analysis/figures.py`: make `analysis` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from analysis.collect import collect_runs, load_scalars  # noqa: E402
from analysis.stats import (METHOD_LABELS, METHOD_ORDER, ablation_studies, distinct_runs, fit_frontier,  # noqa: E402
                            main_selection, ordered_methods, setting_labels)

DPI = 100
FIGSIZE = (6.4, 4.0)  # one panel: 640 x 400 pixels
WIDE_FIGSIZE = (11.0, 4.0)  # two panels side by side: 1100 x 400 pixels
AXIS_LABELS = {"ar_loss": "AR loss (nats/token)", "gfid": "gFID", "rfid": "rFID", "psnr": "PSNR (dB)",
               "codebook_usage": "codebook usage", "tvc.prior.weight": "WGF weight",
               "tvc.prior.tracker.refresh_every": "tracker refresh every (steps)",
               "tokenizer.quantizer.codebook_size": "codebook size K"}
# Logged per step but not TVC terms: the weighted total and optimisation diagnostics.
NOT_TVC_TERMS = ("loss", "lr", "grad_norm", "usage", "perplexity")
# PDF: no creation date, so regenerating a figure gives the same bytes.
SAVE_METADATA = {"pdf": {"CreationDate": None}, "png": {}}


def palette() -> dict[str, tuple]:
    """A fixed colour per method label, the same in every figure."""
    colours = sns.color_palette("colorblind", 8)
    return {METHOD_LABELS[m]: colours[i] for i, m in enumerate(METHOD_ORDER)}


def colour(label: str) -> tuple:
    return palette().get(label, sns.color_palette("colorblind", 8)[len(METHOD_ORDER)])


def per_setting(runs: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """One row per (method, setting): mean and std over seeds of each column, and the seed count."""
    if runs.empty:
        return pd.DataFrame(columns=["method", "n"] + [f"{c}_{s}" for c in columns for s in ("mean", "std")])
    grouped = runs.assign(setting=setting_labels(runs)).groupby(["method", "setting"], sort=True)
    agg = grouped[columns].agg(["mean", "std"])
    agg.columns = [f"{c}_{s}" for c, s in agg.columns]
    agg["n"] = grouped.size()
    agg = agg.reset_index()
    agg["method"] = agg["method"].map(lambda m: METHOD_LABELS.get(m, m))
    return agg


def empty_note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, transform=ax.transAxes)


def frontier_figure(frame: pd.DataFrame, y: str, x: str):
    """y against x, one point per setting, seed spread as error bars, the two-stage frontier drawn."""
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    runs = distinct_runs(frame)
    runs = runs[runs[x].notna() & runs[y].notna()] if x in runs and y in runs else runs.iloc[0:0]
    points = per_setting(runs, [x, y])
    if points.empty:
        empty_note(ax, f"no completed runs report both {y} and {x}")
    for label in ordered_labels(points["method"]):
        mine = points[points["method"] == label]
        ax.errorbar(mine[f"{x}_mean"], mine[f"{y}_mean"], xerr=mine[f"{x}_std"].fillna(0),
                    yerr=mine[f"{y}_std"].fillna(0), fmt="o", color=colour(label), label=label, capsize=3)
    fit, reason = fit_frontier(frame, x, y)
    if fit is not None:
        xs = pd.Series([fit.x_min, fit.x_max])
        ax.plot(xs, fit.predict(xs), "--", color=colour(METHOD_LABELS["two_stage"]), label="two-stage frontier")
    elif not points.empty:
        ax.set_title("no frontier: too few two-stage settings", fontsize=9)
    ax.set_xlabel(AXIS_LABELS.get(x, x))
    ax.set_ylabel(AXIS_LABELS.get(y, y))
    if not points.empty:
        ax.legend(fontsize=8)
    return fig


def ordered_labels(labels) -> list[str]:
    by_label = {METHOD_LABELS.get(m, m): m for m in METHOD_ORDER}
    present = sorted(set(labels))
    known = [METHOD_LABELS[m] for m in ordered_methods(by_label[lab] for lab in present if lab in by_label)]
    return known + [lab for lab in present if lab not in known]


def ablation_figure(frame: pd.DataFrame, key: str):
    """gfid and ar_loss against a swept setting, one line per (experiment, method)."""
    fig, axes = plt.subplots(1, 2, figsize=WIDE_FIGSIZE, dpi=DPI)
    studies = ablation_studies(frame, key)
    for ax, metric in zip(axes, ("gfid", "ar_loss")):
        if not studies:
            empty_note(ax, f"no experiment varies {key}")
        for name, method, runs in studies:
            points = per_setting(runs, [key, metric]).sort_values(f"{key}_mean")
            label = f"{METHOD_LABELS.get(method, method)} ({name})"
            ax.errorbar(points[f"{key}_mean"], points[f"{metric}_mean"], yerr=points[f"{metric}_std"].fillna(0),
                        fmt="o-", capsize=3, color=colour(METHOD_LABELS.get(method, method)), label=label)
        if studies and (frame[key].dropna() > 0).all() and key != "tvc.prior.weight":
            ax.set_xscale("log", base=2)
        elif studies:
            # weights span decades and may include 0: linear near 0, logarithmic beyond the smallest weight
            positive = frame[key][frame[key] > 0]
            ax.set_xscale("symlog", linthresh=float(positive.min()) if len(positive) else 1.0)
        ax.set_xlabel(AXIS_LABELS.get(key, key))
        ax.set_ylabel(AXIS_LABELS[metric])
        if studies:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def usage_figure(frame: pd.DataFrame):
    """Codebook usage against K: every completed run, mean ± std over seeds per (method, setting)."""
    key, metric = "tokenizer.quantizer.codebook_size", "codebook_usage"
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    runs = distinct_runs(frame)
    runs = runs[runs[key].notna() & runs[metric].notna()] if key in runs else runs.iloc[0:0]
    points = per_setting(runs, [key, metric])
    if points.empty:
        empty_note(ax, "no completed runs report codebook_usage and K")
    for label in ordered_labels(points["method"]):
        mine = points[points["method"] == label]
        ax.errorbar(mine[f"{key}_mean"], mine[f"{metric}_mean"], yerr=mine[f"{metric}_std"].fillna(0), fmt="o",
                    capsize=3, color=colour(label), label=label, alpha=0.8)
    if not points.empty:
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=8)
    ax.set_xlabel(AXIS_LABELS[key])
    ax.set_ylabel(AXIS_LABELS[metric])
    return fig


def curves_figure(frame: pd.DataFrame):
    """The raw TVC terms over the tokenizer's steps (stages a and c) of the main comparison's runs,
    mean and std over seeds per method."""
    runs, _ = main_selection(frame)
    curves = load_scalars(runs)
    curves = curves[curves["stage"].isin(["a", "c"]) & ~curves["term"].isin(NOT_TVC_TERMS)]
    terms = sorted(curves["term"].unique())
    fig, axes = plt.subplots(1, max(len(terms), 1), figsize=WIDE_FIGSIZE, dpi=DPI, squeeze=False)
    if not terms:
        empty_note(axes[0, 0], "no scalars.jsonl with tokenizer terms in the main comparison's runs")
    curves = curves.assign(method=curves["method"].map(lambda m: METHOD_LABELS.get(m, m)))
    hue_order = ordered_labels(curves["method"])
    for ax, term in zip(axes[0], terms):
        sns.lineplot(data=curves[curves["term"] == term], x="global_step", y="value", hue="method",
                     hue_order=hue_order, palette={lab: colour(lab) for lab in hue_order}, errorbar="sd", ax=ax,
                     legend=term == terms[0])
        ax.set_title(term)
        ax.set_xlabel("tokenizer step (a, then c)")
        ax.set_ylabel("")
    fig.tight_layout()
    return fig


def all_figures(frame: pd.DataFrame) -> dict[str, object]:
    """File stem -> figure, in a fixed order."""
    return {
        "ar_loss_vs_rfid": frontier_figure(frame, "ar_loss", "rfid"),
        "gfid_vs_rfid": frontier_figure(frame, "gfid", "rfid"),
        "ar_loss_vs_psnr": frontier_figure(frame, "ar_loss", "psnr"),
        "vs_wgf_weight": ablation_figure(frame, "tvc.prior.weight"),
        "vs_refresh_every": ablation_figure(frame, "tvc.prior.tracker.refresh_every"),
        "usage_vs_codebook_size": usage_figure(frame),
        "training_curves": curves_figure(frame),
    }


def write_figures(frame: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Every figure as <stem>.png and <stem>.pdf in out_dir; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with sns.axes_style("whitegrid"):
        figures = all_figures(frame)
    for stem, fig in figures.items():
        for ext in ("png", "pdf"):
            path = out_dir / f"{stem}.{ext}"
            fig.savefig(path, format=ext, metadata=SAVE_METADATA[ext])  # no bbox="tight": the size stays fixed
            written.append(path)
        plt.close(fig)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="figures.py", description="Write the paper's figures as PNG and PDF.")
    parser.add_argument("folders", nargs="*", type=Path, default=[Path("outputs"), Path("multirun")],
                        help="folders searched recursively for result.json (default: outputs multirun)")
    parser.add_argument("--out", type=Path, default=Path("results/figures"), help="default: results/figures/")
    args = parser.parse_args(argv)
    written = write_figures(collect_runs(args.folders), args.out)
    print(f"wrote {len(written)} files into {args.out}/", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
