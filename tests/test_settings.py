"""The README's table of validated settings, row by row, through the entry point's own path.

Each row's rejected example must stop the run before any compute with one line that names the
setting and says what it allows (the choices or the bound the table gives), and leave nothing
behind: no run folder content, no checkpoint, result or stage-cache entry. The table is parsed
from README.md, so a row that stops being true fails here.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from wartok.config import load_run_config
from wartok.run import execute
from wartok.sweep import PROJECT_ROOT, compose
from wartok.validate import ConfigError

BEGIN, END = "<!-- settings-table: begin -->", "<!-- settings-table: end -->"
BOUNDS = (r"integers? >= \d+", r"finite number > \d+", r"finite number >= \d+", r"in \[0, 1[\])]")


def table_rows() -> list[tuple[str, str, list[str]]]:
    """(setting column, allowed column, example overrides) of every row."""
    text = (PROJECT_ROOT / "README.md").read_text()
    body = text[text.index(BEGIN) + len(BEGIN):text.index(END)]
    rows = []
    for line in body.strip().splitlines()[2:]:  # after the header and its rule
        setting, allowed, example = (cell.strip() for cell in line.strip().strip("|").split(" | "))
        rows.append((setting, allowed, shlex.split(example.strip("`"))))
    return rows


def expected_fragments(example: list[str], allowed: str) -> list[str]:
    """What the message must contain: the example's key, and the choices or bound of the row."""
    key = example[-1].split("=", 1)[0].lstrip("+")
    fragments = [key]
    if allowed.startswith("`"):  # a list of choices: each must be offered
        fragments += re.findall(r"`([^`]+)`", allowed.split("(")[0])
    for bound in BOUNDS:
        match = re.search(bound, allowed)
        if match:
            fragments.append(match.group(0).replace("integers", "integer"))
    return fragments


ROWS = table_rows()


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One $WARTOK_CACHE for the module: the unpacked data set is shared, every other entry is a defect."""
    return tmp_path_factory.mktemp("cache")


def test_the_table_is_there_and_covers_every_config_node() -> None:
    keys = {example[-1].split("=", 1)[0].lstrip("+").split(".")[0] for _, _, example in ROWS}
    assert len(ROWS) >= 60
    assert {"method", "device", "precision", "seed", "data", "tokenizer", "prior", "tvc", "stage_a", "stage_b",
            "stage_d", "eval", "metrics", "checkpoint"} <= keys


@pytest.mark.parametrize(("setting", "allowed", "example"), ROWS, ids=[" ".join(r[2]) for r in ROWS])
def test_each_bad_setting_fails_before_compute_and_writes_nothing(
        setting: str, allowed: str, example: list[str], cache: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WARTOK_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    with pytest.raises(ConfigError) as info:  # what sweep.main turns into one line and exit code 2
        execute(load_run_config(compose(["experiment=smoke", "device=cpu", *example])), out, example)
    message = str(info.value)
    assert "\n" not in message
    for fragment in expected_fragments(example, allowed):
        assert fragment in message, f"{fragment!r} missing from: {message}"
    assert not out.exists()
    assert {p.name for p in cache.iterdir()} <= {"datasets"}  # no stage, FID-statistics or weights entry
    assert sorted(p.name for p in tmp_path.iterdir()) == []
