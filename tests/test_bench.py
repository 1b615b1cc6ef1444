"""`python -m wartok.bench` end to end at toy sizes: every row is there, the ratios are to the
two_stage row, FLOPs are counted, and the JSON holds the same rows (numbers, not timings, are
checked: speed targets live in the benchmark, not in tests)."""
import json

import pytest
import torch

from wartok import bench


def test_the_bench_prints_every_row_and_writes_them_as_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--tokenizer", "tiny", "--prior", "tiny", "--batch", "4", "--prior-batch", "4",
                       "--sub-batch", "2", "--samples", "2", "--fid-images", "0", "--warmup", "0",
                       "--repeats", "1", "--refresh-every", "1", "4", "16", "--device", "cpu", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    payload = json.loads(out.read_text())
    names = [row["name"] for row in payload["rows"]]
    for expected in ("stage C step two_stage", "stage C step joint", "stage C step wartok refresh_every=1",
                     "stage C step wartok refresh_every=16", "stage C step wartok sub_batch=2",
                     "wartok: the two AR forward passes", "wartok: one tracker refresh", "prior train step",
                     "sampling with KV cache", "sampling without KV cache", "sampling static KV cache, eager on CPU"):
        assert any(name.startswith(expected) for name in names), expected
        assert expected in printed
    rows = {row["name"]: row for row in payload["rows"]}
    two_stage = next(row for name, row in rows.items() if name.startswith("stage C step two_stage"))
    assert two_stage["ratio"] == 1.0
    assert all(row["median_s"] > 0 and row["rate"] > 0 for row in rows.values())
    # FLOPs were counted for the training rows; no MFU without a known GPU peak and bf16
    assert two_stage["tflops"] > 0 and two_stage["mfu"] is None
    assert next(row for name, row in rows.items() if name.startswith("prior train step"))["tflops"] > 0
    assert payload["environment"]["gpu"] is None and payload["args"]["tokenizer"] == "tiny"
    # wartok's extra FLOPs are its two part rows, all of it (the rest is the (B, T, K) distances)
    # and a step refreshing every n-th time is charged 1/n of a refresh (timed over whole cycles)
    part = {name.split(" (")[0]: row["gflop"] for name, row in rows.items() if name.startswith("wartok: ")}
    for every in (1, 4, 16):
        wartok = next(row for name, row in rows.items() if name.startswith(f"stage C step wartok refresh_every={every} "))
        expected = two_stage["gflop"] + part["wartok: the two AR forward passes"] + part["wartok: one tracker refresh"] / every
        assert abs(wartok["gflop"] - expected) < 0.01 * expected, every


def test_mfu_uses_the_given_peak_for_bf16_rows():
    args = bench.parse_args(["--tokenizer", "tiny", "--prior", "tiny", "--batch", "2", "--prior-batch", "2",
                             "--sub-batch", "0", "--samples", "1", "--fid-images", "0", "--warmup", "0",
                             "--repeats", "1", "--device", "cpu", "--precision", "bf16", "--peak-tflops", "2.0"])
    rows = bench.run(args)
    counted = [row for row in rows if row.tflops is not None]
    assert counted and all(abs(row.mfu - row.tflops / 2.0) < 1e-12 for row in counted)


def test_bad_arguments_and_missing_inception_weights_fail_before_anything_is_timed(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench, "run", lambda args: pytest.fail("the bench started timing"))
    for argv, expected in ((["--sub-batch", "-1"], "--sub-batch=-1 is not allowed; it must be >= 0"),
                           (["--peak-tflops", "0"], "--peak-tflops=0.0 is not allowed; it must be > 0"),
                           (["--fid-images", "-4"], "--fid-images=-4 is not allowed; it must be >= 0"),
                           (["--refresh-every", "4", "0"], "--refresh-every=4 0 is not allowed; each must be >= 1")):
        with pytest.raises(SystemExit) as exit_info:
            bench.main(argv)
        assert exit_info.value.code == 2 and expected in capsys.readouterr().err, argv
    missing = tmp_path / "inception.pth"
    monkeypatch.setenv("WARTOK_INCEPTION_WEIGHTS", str(missing))
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--fid-images", "8"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and str(missing) in err and "--fid-images 0" in err, err


def test_flops_are_counted_on_the_first_warm_up_call_not_an_extra_one():
    calls = []

    def matmul() -> None:
        calls.append(1)
        torch.ones(4, 8) @ torch.ones(8, 16)

    for warmup, expected_calls in ((2, 2 + 3), (0, 1 + 3)):  # warmup=0: the counted call comes on top
        calls.clear()
        row = bench.measure("matmul", "calls/s", 1, matmul, torch.device("cpu"), warmup, repeats=3, flops=True)
        assert len(calls) == expected_calls and row.gflop * 1e9 == 2 * 4 * 8 * 16, (warmup, len(calls))
