"""analysis/: the run table, the paper tables, figures and notebook, on hand-written fixtures.

The inputs in tests/fixtures/results/runs are made-up results (see the README there), not
measurements. analysis/ is a folder package that pip does not install, so this file puts the
project root on sys.path itself (plain `pytest` would not: only `python -m pytest` adds the
working directory). Golden files live in tests/fixtures/results/expected; after an intended
change of the tables, regenerate them with WARTOK_UPDATE_GOLDEN=1 and review the diff.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from analysis.collect import CorruptResultWarning, collect_runs, load_scalars  # noqa: E402
from analysis.make_tables import main as make_tables_main, make_tables  # noqa: E402
from analysis.stats import fit_frontier, frontier_gaps, summarize, t_interval  # noqa: E402
from analysis.tables import ablation_table, frontier_table, main_table  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures" / "results"
RUNS = FIXTURES / "runs"
EXPECTED = FIXTURES / "expected"
BROKEN = ("broken/missing_metrics/result.json", "broken/truncated/result.json")


@pytest.fixture(scope="module")
def runs():
    with pytest.warns(CorruptResultWarning):
        return collect_runs([RUNS])


def test_one_row_per_run_with_failed_and_incomplete_kept(runs):
    assert len(runs) == 21  # 9 main + 3 frontier + 6 ablation + 1 failed + 2 unfinished sweep jobs
    assert runs["status"].value_counts().to_dict() == {"completed": 18, "incomplete": 2, "failed": 1}
    failed = runs[runs["status"] == "failed"].iloc[0]
    assert failed["error"].startswith("FloatingPointError") and math.isnan(failed["ar_loss"])
    unfinished = runs[runs["status"] == "incomplete"].set_index("sweep_job")["sweep_job_status"].to_dict()
    assert unfinished == {7: "running", 8: "pending"}
    joint = runs[runs["run_dir"].str.endswith("main/joint_s0")].iloc[0]
    assert joint["gfid_n"] == 1000 and not joint["gfid_reliable"] and joint["ar_loss_n"] == 640000
    assert json.loads(joint["tokenizer.channels"]) == [64, 128]  # lists become JSON text
    assert runs.loc[runs["run_dir"].str.endswith("ablation_wgf_weight/4"), "sweep_name"].item() == \
        "fixture_wgf_weight"


def test_corrupt_and_partial_files_are_reported_by_path_and_skipped(tmp_path):
    shutil.copytree(RUNS / "main" / "two_stage_s0", tmp_path / "good")
    for name in BROKEN:
        shutil.copytree((RUNS / name).parent, tmp_path / Path(name).parent.name)
    (tmp_path / "good" / "scalars.jsonl").open("a").write('{"stage": "c", "step": 5, "l2": 0.0')  # killed mid-line
    with pytest.warns(CorruptResultWarning) as caught:
        table = collect_runs([tmp_path, tmp_path / "does_not_exist"])
        curves = load_scalars(table)
    messages = [str(w.message) for w in caught]
    for folder in ("missing_metrics", "truncated", "does_not_exist"):
        assert any(folder in m for m in messages), messages
    assert any("scalars.jsonl" in m for m in messages)
    assert table["run_dir"].tolist() == [str(tmp_path / "good")]
    assert len(curves) > 0


def test_mean_std_n_and_interval_by_hand():
    s = summarize([1.90, None, 1.95, float("nan"), 2.00])  # runs without a value do not count
    assert (round(s.mean, 12), round(s.std, 12), s.n) == (1.95, 0.05, 3)
    assert math.isnan(summarize([3.0]).std) and summarize([]).n == 0
    ci = t_interval([1.90, 1.95, 2.00])  # t(0.975, df=2) = 4.302653; half width 4.302653 * 0.05 / sqrt(3)
    assert ci.high - ci.mean == pytest.approx(0.124207, abs=1e-6) and ci.low == pytest.approx(1.95 - 0.124207)


def test_main_table_cells(runs):
    table = main_table(runs)
    rows = {row[0].text: row for row in table.rows}
    assert list(rows) == ["two-stage", "joint", "wAR-Tok"]
    ar_loss, gfid, gkid, psnr = 1, 3, 4, 6
    assert rows["two-stage"][ar_loss].text == "1.950 ± 0.050 (n=3)"
    assert rows["joint"][ar_loss].bold and not rows["two-stage"][ar_loss].bold  # lower is better
    assert rows["two-stage"][psnr].bold and rows["wAR-Tok"][psnr].bold  # higher is better; a tie at 2 decimals
    assert rows["joint"][gfid].mark == "†" and rows["wAR-Tok"][gfid].mark == ""  # FID on 1000 images
    assert rows["wAR-Tok"][gkid].text == "n/a"


def test_paired_differences_by_hand():
    """Seeds 0-2 of two-stage and wAR-Tok, and a wAR-Tok seed 3 with no two-stage partner."""
    import pandas as pd

    from analysis.stats import paired_gaps

    frame = pd.DataFrame({"method": ["two_stage"] * 3 + ["wartok"] * 4, "seed": [0, 1, 2, 0, 1, 2, 3],
                          "ar_loss": [2.0, 1.8, 1.9, 1.9, 1.75, 1.9, 0.0]})
    gap = paired_gaps(frame, "wartok", "ar_loss")  # differences -0.1, -0.05, 0.0
    assert gap.n == 3 and math.isclose(gap.mean, -0.05)
    half_width = 4.302652729911275 * 0.05 / math.sqrt(3)  # t(0.975, 2) * sd / sqrt(n)
    assert math.isclose(gap.low, -0.05 - half_width) and math.isclose(gap.high, -0.05 + half_width)
    assert paired_gaps(frame, "joint", "ar_loss").n == 0


def test_an_ablation_with_as_many_seeds_gives_the_main_table_the_shared_default():
    """wgf_weight runs every weight with 3 seeds, as many as the baselines: wAR-Tok's main row must
    be the weight two-stage and joint ran with (0.01), not the alphabetically first (0.001)."""
    import pandas as pd

    from analysis.stats import main_selection

    rows = [{"method": m, "seed": seed, "tvc.prior.weight": w, "name": "x", "status": "completed",
             "run_dir": f"{m}{w}/{seed}", "ar_loss": 1.0, "ar_loss_n": 10, "ar_loss_reliable": True}
            for m, weights in (("two_stage", [0.01]), ("wartok", [0.001, 0.01, 0.1])) for w in weights
            for seed in (0, 1)]
    selection, _ = main_selection(pd.DataFrame(rows))
    assert set(selection.loc[selection["method"] == "wartok", "tvc.prior.weight"]) == {0.01}
    assert len(selection) == 4


def test_a_job_repeated_by_a_second_sweep_counts_once(tmp_path):
    """The same setting and seed in two folders (one job in two sweeps) is one observation."""
    shutil.copytree(RUNS / "main", tmp_path / "a")
    shutil.copytree(RUNS / "main", tmp_path / "b")  # every run again, e.g. by another sweep
    twice = collect_runs([tmp_path])
    rows = {row[0].text: row for row in main_table(twice).rows}
    assert rows["two-stage"][1].text == "1.950 ± 0.050 (n=3)"  # as from one copy
    assert any("counted once" in note for note in main_table(twice).notes)


@pytest.mark.parametrize("fmt", ["md", "tex"])
def test_main_table_matches_golden_file(tmp_path, fmt):
    with pytest.warns(CorruptResultWarning):
        make_tables([RUNS], tmp_path, "both")
    produced, golden = (tmp_path / f"main.{fmt}").read_text(), EXPECTED / f"main.{fmt}"
    if os.environ.get("WARTOK_UPDATE_GOLDEN"):
        golden.write_text(produced)
    assert produced == golden.read_text()


def test_frontier_distance_by_hand_and_too_few_points(runs):
    line = runs[runs["method"] == "two_stage"].copy()
    line["ar_loss"] = 2.0 - 0.05 * line["rfid"]  # every two-stage run exactly on y = 2 - 0.05 x
    fit, _ = fit_frontier(line, "rfid", "ar_loss")
    assert (fit.slope, fit.intercept) == pytest.approx((-0.05, 2.0))
    above = runs[runs["method"] == "joint"].assign(ar_loss=lambda f: 2.0 - 0.05 * f["rfid"] + 0.5)
    gap, outside = frontier_gaps(above, fit)
    assert (gap.mean, gap.n, outside) == (pytest.approx(0.5), 3, False)

    main_only = runs[runs["run_dir"].str.contains("runs/main/")]  # two-stage at one budget: no frontier
    table = frontier_table(main_only, "rfid")
    assert table.rows == [] and "Too few two-stage points" in table.message


def test_ablation_table_groups_by_weight(runs):
    table = ablation_table(runs, "tvc.prior.weight", "WGF weight", "ablation_wgf_weight")
    assert [row[2].text for row in table.rows] == ["0.001", "0.01", "0.1"]
    assert table.rows[0][3].text == "1.940 ± 0.014 (n=2)"
    assert any("1 failed, 2 incomplete" in note for note in table.notes)
    empty = ablation_table(runs, "tokenizer.quantizer.codebook_size", "K", "ablation_codebook_size")
    assert empty.rows == [] and "No experiment varies" in empty.message


def test_optuna_trials_join_their_runs(tmp_path):
    optuna = pytest.importorskip("optuna")
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="wgf", storage=storage)
    weight = optuna.distributions.LogUniformDistribution(1e-4, 10.0)
    seed = optuna.distributions.IntUniformDistribution(0, 2)
    with warnings.catch_warnings():  # add_trial and create_trial are "experimental" in optuna 2.10
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for params, value in (({"tvc.prior.weight": 0.1, "seed": 0}, 1.70),
                              ({"tvc.prior.weight": 5.0, "seed": 0}, 9.0)):
            distributions = {"tvc.prior.weight": weight, "seed": seed}
            study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, value=value))
    with pytest.warns(CorruptResultWarning):
        table = collect_runs([RUNS], optuna_storage=storage)
    joined = table[table["optuna_trial"] == 0]
    assert joined["run_dir"].item().endswith("ablation_wgf_weight/4") and joined["optuna_value"].item() == 1.70
    alone = table[table["optuna_trial"] == 1]
    assert alone["source"].item() == "optuna" and alone["status"].item() == "completed"


def test_figures_have_fixed_pixel_sizes_and_content(runs, tmp_path):
    import matplotlib.image

    from analysis.figures import DPI, FIGSIZE, WIDE_FIGSIZE, write_figures

    written = write_figures(runs, tmp_path)
    wide = {"vs_wgf_weight", "vs_refresh_every", "training_curves"}
    assert len(written) == 14
    for path in written:
        assert path.stat().st_size > 1000
        if path.suffix == ".pdf":
            assert path.read_bytes().startswith(b"%PDF")
            continue
        pixels = matplotlib.image.imread(path)
        width, height = WIDE_FIGSIZE if path.stem in wide else FIGSIZE
        assert pixels.shape[:2] == (round(height * DPI), round(width * DPI)), path.name
        assert pixels.std() > 0.01, f"{path.name} is blank"
    # no runs at all: every file still there, saying what is missing
    assert len(write_figures(runs.iloc[0:0], tmp_path / "empty")) == 14


def test_make_tables_cli_is_byte_identical_across_runs(tmp_path):
    outputs = []
    for name in ("first", "second"):
        done = subprocess.run([sys.executable, str(ROOT / "analysis" / "make_tables.py"), str(RUNS), "--out",
                               str(tmp_path / name)], capture_output=True, text=True, cwd=tmp_path, check=True)
        assert "### Main comparison" in done.stdout and "truncated/result.json" in done.stderr
        outputs.append({p.name: p.read_bytes() for p in sorted((tmp_path / name).iterdir())})
    assert outputs[0] == outputs[1]
    assert {"main.md", "main.tex", "runs.csv", "frontier_rfid.md", "ablation_wgf_weight.tex"} <= set(outputs[0])


def test_make_tables_help(capsys):
    with pytest.raises(SystemExit) as stop:
        make_tables_main(["--help"])
    assert stop.value.code == 0 and "--format" in capsys.readouterr().out


def test_notebook_runs_on_the_fixtures(monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")  # the kernel nbclient starts
    path = ROOT / "analysis" / "explore.ipynb"
    notebook = nbformat.read(path, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells), "commit the notebook with outputs cleared"
    monkeypatch.setenv("WARTOK_RESULTS", str(RUNS))
    client = nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    images = [o for c in notebook.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 7


def test_the_committed_results_regenerate_byte_for_byte(tmp_path):
    """results/README.md's command on the committed run records gives the committed tables."""
    committed = ROOT / "results"
    runs = committed / "runs"
    assert runs.is_dir(), "results/runs (the run records the committed tables come from) is missing"
    subprocess.run([sys.executable, "analysis/make_tables.py", "results/runs", "--out", str(tmp_path), "--quiet"],
                   capture_output=True, text=True, cwd=ROOT, check=True)
    regenerated = sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".md", ".tex", ".csv"))
    assert {"main.md", "main.tex", "frontier_rfid.md", "ablation_wgf_weight.md", "runs.csv"} <= set(regenerated)
    for name in regenerated:
        assert (tmp_path / name).read_bytes() == (committed / name).read_bytes(), f"results/{name} differs"
