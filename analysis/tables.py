"""The paper's tables, built from the run table of `analysis.collect` as `render.Table` data.

- `main_table`: method x headline metrics, mean ± std over seeds, best per column in bold;
- `paired_table`: each method minus two-stage, seed by seed (same stages A and B);
- `frontier_table`: each method's vertical distance to the two-stage frontier (see
  `analysis.stats` for the fit), at matched rfid or matched psnr;
- `ablation_table`: one per swept setting (WGF weight, tracker refresh rate, codebook size);
- `status_table`: how many runs completed, failed or never finished, per method.
"""
from __future__ import annotations

import pandas as pd

from analysis.render import DAGGER, DOUBLE_DAGGER, NA, Cell, Table, fmt_number, fmt_summary
from analysis.stats import (METHOD_LABELS, ablation_studies, fit_frontier, frontier_gaps, main_selection,
                            ordered_methods, paired_gaps, setting_columns, setting_labels, summarize)

# (metric, column header, decimals); the arrow says which direction is better.
MAIN_METRICS = (("ar_loss", "AR loss (nats/token) ↓", 3), ("rfid", "rFID ↓", 2), ("gfid", "gFID ↓", 2),
                ("gkid", "gKID ↓", 4), ("is", "IS ↑", 2), ("psnr", "PSNR (dB) ↑", 2),
                ("codebook_usage", "usage ↑", 3))
HIGHER_IS_BETTER = {"is", "psnr", "codebook_usage", "token_perplexity"}
DIGITS = {metric: digits for metric, _, digits in MAIN_METRICS}
ABLATION_METRICS = ("ar_loss", "gfid", "rfid", "psnr", "codebook_usage")
# (config key, what it is, output file stem)
ABLATIONS = (("tvc.prior.weight", "WGF weight", "ablation_wgf_weight"),
             ("tvc.prior.tracker.refresh_every", "tracker refresh every (steps)", "ablation_refresh_every"),
             ("tokenizer.quantizer.codebook_size", "codebook size K", "ablation_codebook_size"))
LABELS = {"ar_loss": "AR loss", "gfid": "gFID", "rfid": "rFID", "psnr": "PSNR", "codebook_usage": "usage"}
SEED_NOTE = "Mean ± sample std over seeds; n = seeds reporting the value; n/a = not reported."
UNRELIABLE_NOTE = (f"{DAGGER} Flagged unreliable by the run (`reliable: false`; e.g. FID on fewer than 2048 images): "
                   "the metric's `note` in result.json says why.")


def method_label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def unreliable(runs: pd.DataFrame, metric: str) -> bool:
    column = f"{metric}_reliable"
    return column in runs and bool((runs[column] == False).fillna(False).any())  # noqa: E712 (nullable)


def best_methods(summaries: dict[str, object], metric: str, digits: int) -> set[str]:
    """The methods whose shown mean is best; ties at the shown precision are all bold."""
    shown = {m: round(s.mean, digits) for m, s in summaries.items() if s.n > 0}
    if len(shown) < 2:
        return set()
    target = max(shown.values()) if metric in HIGHER_IS_BETTER else min(shown.values())
    return {m for m, value in shown.items() if value == target}


def main_table(frame: pd.DataFrame, name: str | None = None) -> Table:
    selection, notes = main_selection(frame, name)
    title = "Main comparison at equal compute"
    header = ["method"] + [h for _, h, _ in MAIN_METRICS]
    if selection.empty:
        return Table("main", title, header, [], message="No completed runs: nothing to compare.")
    methods = ordered_methods(selection["method"])
    columns: list[list[Cell]] = []
    any_unreliable = False
    for metric, _, digits in MAIN_METRICS:
        summaries = {m: summarize(selection.loc[selection["method"] == m, metric]) for m in methods}
        best = best_methods(summaries, metric, digits)
        column = []
        for m in methods:
            s, flag = summaries[m], unreliable(selection[selection["method"] == m], metric)
            any_unreliable |= bool(flag and s.n)
            column.append(Cell(fmt_summary(s.mean, s.std, s.n, digits), bold=m in best,
                               mark=DAGGER if flag and s.n else ""))
        columns.append(column)
    rows = [[Cell(method_label(m))] + [col[i] for col in columns] for i, m in enumerate(methods)]
    notes = [SEED_NOTE + " Bold: best per column (↓ lower is better, ↑ higher is better)."] + \
        ([UNRELIABLE_NOTE] if any_unreliable else []) + notes
    return Table("main", title, header, rows, notes)


PAIRED_METRICS = ("ar_loss", "psnr", "codebook_usage", "rfid", "gfid")


def paired_table(frame: pd.DataFrame, name: str | None = None) -> Table:
    """The main comparison's methods minus two-stage, seed by seed: mean [95% CI] (n)."""
    selection, _ = main_selection(frame, name)
    title = "Paired difference to two-stage (same seed)"
    header = ["method"] + [f"Δ {LABELS.get(m, m)}" for m in PAIRED_METRICS]
    methods = [m for m in ordered_methods(selection["method"]) if m != "two_stage"] if len(selection) else []
    if not methods or "two_stage" not in set(selection["method"]):
        return Table("paired", title, header, [], message="Needs two-stage and another method in the main comparison.")
    rows = [[Cell(method_label(m))] + [Cell(fmt_interval(paired_gaps(selection, m, metric), DIGITS.get(metric, 3)))
                                      for metric in PAIRED_METRICS] for m in methods]
    notes = ["Δ = the method's value minus two-stage's at the same seed (the same stage-A tokenizer and stage-B "
             "target), mean and Student-t 95% interval over seeds. Lower is better for AR loss, rFID, gFID; "
             "higher for PSNR and usage. Unlike the frontier tables this does not adjust for reconstruction "
             "quality: read it beside the Δ PSNR column."]
    return Table("paired", title, header, rows, notes)


def frontier_table(frame: pd.DataFrame, x: str, name: str | None = None) -> Table:
    """Distances to the two-stage frontiers of ar_loss and gfid against reconstruction metric x."""
    selection, _ = main_selection(frame, name)
    title = f"Distance to the two-stage frontier at matched {LABELS[x]}"
    ys = ("ar_loss", "gfid")
    header = ["method", f"{LABELS[x]} (mean ± std)"] + [f"Δ {LABELS[y]} vs frontier (mean [95% CI])" for y in ys]
    fits = {y: fit_frontier(frame, x, y) for y in ys}
    if all(f is None for f, _ in fits.values()):
        return Table(f"frontier_{x}", title, header, [], message=" ".join(reason for _, reason in fits.values()))
    notes, extrapolated = [], False
    for y, (fit, reason) in fits.items():
        notes.append(reason if fit is None else
                     f"Frontier {y} = {fit.slope:.4g} * {x} {'-' if fit.intercept < 0 else '+'} "
                     f"{abs(fit.intercept):.4g}: least squares (numpy.polyfit, "
                     f"degree 1) over {fit.n_runs} completed two-stage runs at {fit.n_settings} settings, "
                     f"{x} from {fit.x_min:.4g} to {fit.x_max:.4g}.")
    rows = []
    for method in ordered_methods(selection["method"]):
        runs = selection[selection["method"] == method]
        spread = summarize(runs[x])
        row = [Cell(method_label(method)), Cell(fmt_summary(spread.mean, spread.std, spread.n, DIGITS.get(x, 3)))]
        for y, (fit, _) in fits.items():
            if fit is None:
                row.append(Cell(NA))
                continue
            gap, outside = frontier_gaps(runs, fit)
            extrapolated |= outside and gap.n > 0
            row.append(Cell(fmt_interval(gap, DIGITS[y]), mark=DOUBLE_DAGGER if outside and gap.n else ""))
        rows.append(row)
    notes.append("Δ = a method's value minus the frontier at its own reconstruction quality, per seed; mean and "
                 "Student-t 95% interval over seeds. Negative Δ: better than two-stage at matched quality.")
    if extrapolated:
        notes.append(f"{DOUBLE_DAGGER} Some of this method's runs lie outside the two-stage {x} range: the "
                     "frontier is extrapolated there.")
    return Table(f"frontier_{x}", title, header, rows, notes)


def fmt_interval(gap, digits: int) -> str:
    if gap.n == 0:
        return NA
    if gap.n < 2:
        return f"{fmt_number(gap.mean, digits)} (n=1)"
    return f"{fmt_number(gap.mean, digits)} [{fmt_number(gap.low, digits)}, {fmt_number(gap.high, digits)}] " \
           f"(n={gap.n})"


def fmt_value(value) -> str:
    """A setting's value as a short label: 0.01, 256, ..."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def ablation_table(frame: pd.DataFrame, key: str, what: str, label: str) -> Table:
    """Each (experiment, method) that varies `key`: one row per setting, mean ± std over seeds."""
    title = f"Ablation: {what} ({key})"
    studies = ablation_studies(frame, key)
    header = ["experiment", "method", key, "other varied settings"] + \
        [h for m, h, _ in MAIN_METRICS if m in ABLATION_METRICS]
    if not studies:
        return Table(label, title, header, [], message=f"No experiment varies {key} within one method: "
                                                       "no ablation to show.")
    rows, notes = [], [SEED_NOTE]
    for name, method, runs in studies:
        rows.extend(ablation_rows(name, method, runs, key))
        notes.extend(left_out_note(frame, name))
    if all(row[3].text == "" for row in rows):
        header.pop(3)
        rows = [row[:3] + row[4:] for row in rows]
    return Table(label, title, header, rows, notes)


def ablation_rows(name: str, method: str, runs: pd.DataFrame, key: str) -> list[list[Cell]]:
    varied = [c for c in setting_columns(runs) if c != key and runs[c].astype("object").nunique(dropna=False) > 1]
    labels = setting_labels(runs)
    groups = sorted(labels.unique(), key=lambda lab: value_order(runs.loc[labels == lab, key].iloc[0]) + (lab,))
    rows = []
    for label in groups:
        group = runs[labels == label]
        first = group.iloc[0]
        others = ", ".join(f"{c}={fmt_value(first[c])}" for c in varied)
        cells = [Cell(str(name)), Cell(method_label(method)), Cell(fmt_value(first[key])), Cell(others)]
        for metric, _, digits in MAIN_METRICS:
            if metric in ABLATION_METRICS:
                s = summarize(group[metric])
                mark = DAGGER if unreliable(group, metric) and s.n else ""
                cells.append(Cell(fmt_summary(s.mean, s.std, s.n, digits), mark=mark))
        rows.append(cells)
    return rows


def value_order(value) -> tuple:
    """Numbers in numeric order, before any text values (a swept choice such as a prior kind)."""
    try:
        return (0, float(value), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(value))


def left_out_note(frame: pd.DataFrame, name: str) -> list[str]:
    """Say which runs of this experiment or sweep are missing from the table because they did not finish."""
    ours = (frame["name"] == name) if "name" in frame else pd.Series(False, index=frame.index)
    if "sweep_name" in frame:
        ours = ours | (frame["sweep_name"] == name)
    missing = frame[ours.fillna(False).astype(bool) & (frame["status"] != "completed")]
    if missing.empty:
        return []
    counts = missing["status"].value_counts().sort_index()
    listed = ", ".join(f"{count} {status}" for status, count in counts.items())
    return [f"`{name}`: {listed} run(s) not in the table."]


def status_table(frame: pd.DataFrame) -> Table:
    """Runs per method and status, so a table's n can be read against what was launched."""
    if frame.empty:
        return Table("status", "Runs by status", ["method"], [], message="No runs found under the given folders.")
    statuses = sorted(frame["status"].dropna().unique()) if len(frame) else []
    methods = frame["method"].astype("object").where(frame["method"].notna(), "unknown")
    rows = []
    for method in ordered_methods(methods):
        mine = frame[methods == method]
        rows.append([Cell(method_label(method))] +
                    [Cell(str(int((mine["status"] == s).sum()))) for s in statuses] + [Cell(str(len(mine)))])
    notes = []
    failed = frame[frame["status"] == "failed"]
    for _, run in failed.iterrows():
        error = run["error"] if isinstance(run["error"], str) else "no error recorded"
        notes.append(f"failed: `{run['run_dir']}`: {error}")
    return Table("status", "Runs by status", ["method"] + statuses + ["total"], rows, notes)


def all_tables(frame: pd.DataFrame, main_name: str | None = None) -> list[Table]:
    tables = [main_table(frame, main_name), paired_table(frame, main_name), frontier_table(frame, "rfid", main_name),
              frontier_table(frame, "psnr", main_name)]
    tables += [ablation_table(frame, key, what, label) for key, what, label in ABLATIONS]
    return tables + [status_table(frame)]
