"""Tables as plain data, and their Markdown (GitHub pipe) and LaTeX (booktabs) renderings.

Cells are written once in a neutral text form ("1.950 ± 0.050 (n=3)", "†", "↓") and each
renderer translates it, so the Markdown and LaTeX versions can never disagree on a number.
Both renderings are pure functions of the table: regenerating them gives identical bytes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

NA = "n/a"
DAGGER = "†"  # a metric computed on too few images to be reliable (FID/KID on < 2048)
DOUBLE_DAGGER = "‡"  # a frontier distance extrapolated outside the two-stage range
# LaTeX for the few non-ASCII symbols cells use, and the characters LaTeX treats as special.
LATEX_SYMBOLS = {"±": r"$\pm$", "†": r"$^{\dagger}$", "‡": r"$^{\ddagger}$", "↓": r"$\downarrow$",
                 "↑": r"$\uparrow$", "Δ": r"$\Delta$", "≥": r"$\geq$", "<": r"$<$", ">": r"$>$",
                 "&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#", "$": r"\$", "{": r"\{", "}": r"\}",
                 "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}"}


@dataclass(frozen=True)
class Cell:
    text: str
    bold: bool = False
    mark: str = ""  # a footnote symbol after the value


@dataclass
class Table:
    label: str  # file stem and LaTeX label
    title: str
    header: list[str]
    rows: list[list[Cell]]
    notes: list[str] = field(default_factory=list)
    align: str = ""  # LaTeX column spec; default: first column left, the rest right
    message: str = ""  # set instead of rows when the table could not be made, saying why


def fmt_number(value: float, digits: int) -> str:
    return NA if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def fmt_summary(mean: float, std: float, n: int, digits: int) -> str:
    """'mean ± std (n=k)'; just 'mean (n=1)' for one seed; 'n/a' for none."""
    if n == 0:
        return NA
    if n == 1 or not math.isfinite(std):
        return f"{fmt_number(mean, digits)} (n={n})"
    return f"{fmt_number(mean, digits)} ± {fmt_number(std, digits)} (n={n})"


def markdown(table: Table) -> str:
    def cell(c: Cell) -> str:
        text = (f"**{c.text}**" if c.bold else c.text) + c.mark
        return text.replace("|", r"\|")

    lines = [f"### {table.title}", ""]
    if table.message:
        return "\n".join(lines + [table.message]) + "\n"
    lines.append("| " + " | ".join(table.header) + " |")
    lines.append("|" + "|".join([" --- "] + [" ---: "] * (len(table.header) - 1)) + "|")
    for row in table.rows:
        lines.append("| " + " | ".join(cell(c) for c in row) + " |")
    if table.notes:
        lines.append("")
        lines.extend(table.notes)
    return "\n".join(lines) + "\n"


def latex_escape(text: str) -> str:
    return "".join(LATEX_SYMBOLS.get(char, char) for char in text)


def latex(table: Table) -> str:
    def cell(c: Cell) -> str:
        text = latex_escape(c.text)
        return (rf"\textbf{{{text}}}" if c.bold else text) + latex_escape(c.mark)

    if table.message:
        return f"% {table.label}: {latex_escape(table.title)}\n% {latex_escape(strip_markdown(table.message))}\n"
    align = table.align or "l" + "r" * (len(table.header) - 1)
    lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{latex_escape(table.title)}}}",
             rf"\label{{tab:{table.label}}}", rf"\begin{{tabular}}{{{align}}}", r"\toprule",
             " & ".join(latex_escape(h) for h in table.header) + r" \\", r"\midrule"]
    lines.extend(" & ".join(cell(c) for c in row) + r" \\" for row in table.rows)
    lines.append(r"\bottomrule")
    lines.append(r"\end{tabular}")
    if table.notes:
        lines.append(r"\par\smallskip")
        lines.append(r"{\footnotesize " + r" \par ".join(latex_escape(strip_markdown(n)) for n in table.notes) + "}")
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def strip_markdown(text: str) -> str:
    """Notes are written for Markdown; LaTeX gets them without code ticks."""
    return text.replace("`", "")

