"""scripts/bench.py: the sampling and train-step benchmarks run and report (no speed asserted)."""

import re

import pytest

from fusion.benchmarks.sampling import main


@pytest.mark.parametrize("family,steps", [("transfusion", "2"), ("chameleon", "-")])
def test_sampling_benchmark_reports_both_paths_and_their_agreement(capsys, family, steps):
    main(["--family", family, "--batch", "2", "--steps", "2", "--repeats", "1",
          "--threads", "1"])
    out = capsys.readouterr().out
    assert out.startswith(family.capitalize())
    row = next(line for line in out.splitlines() if line.split()[:2] == ["2", steps])
    _, _, cached, per_second, uncached, speedup, diff = row.split()
    assert float(cached) > 0 and float(uncached) > 0
    assert abs(float(per_second) * float(cached) - 1) < 0.05  # images/s is 1 / (s/image)
    assert re.fullmatch(r"[0-9.]+x", speedup)
    assert float(diff) < 1e-3  # the cache changes speed, not the image


def test_train_step_benchmark_times_every_case(capsys):
    from fusion.benchmarks.train_step import main as train_step

    train_step(["--pack-len", "0", "64", "--backends", "auto", "--batches", "1", "--warmup", "0",
                "--rounds", "1"])
    out = capsys.readouterr().out
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ")]
    assert [r[0].strip() for r in rows[1:]] == ["max_seq_len", "64"]  # header, then the cases
    assert all(float(r[2]) > 0 for r in rows[1:]) and rows[1][3].strip() == "1.00x"


def test_loader_benchmark_reports_the_loader_against_the_step(capsys):
    from fusion.benchmarks.loader import main as loader

    loader(["--experiment", "chameleon_tiny", "--workers", "0", "1", "--batch", "4",
            "--batches", "2", "--rounds", "1", "--warmup", "0", "--set", "data.num_train=64"])
    out = capsys.readouterr().out
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in out.splitlines()
            if line.startswith("| chameleon_tiny")]
    assert [r[2] for r in rows] == ["0", "1"]  # one row per worker count
    for _, batch, _, loader_rate, _, step_rate, ratio, _ in rows:
        loader_rate, step_rate = (float(x.replace(",", "")) for x in (loader_rate, step_rate))
        assert batch == "4" and loader_rate > 0 and step_rate > 0
        # the rates are printed as whole numbers, the ratio from the unrounded ones
        rounding = 0.5 / step_rate + 0.5 / loader_rate
        assert float(ratio.rstrip("x")) == pytest.approx(loader_rate / step_rate,
                                                        rel=rounding + 0.005, abs=0.01)


def test_family_step_benchmark_times_every_part_of_a_packed_step(capsys):
    from fusion.benchmarks.family_step import PARTS
    from fusion.benchmarks.family_step import main as family_step

    family_step(["--experiment", "transfusion_tiny", "--seq", "128", "--rows", "2",
                 "--rounds", "1", "--warmup", "0", "--set", "data.num_train=256"])
    out = capsys.readouterr().out
    (row,) = [[c.strip() for c in line.split("|")[1:-1]] for line in out.splitlines()
              if line.startswith("| transfusion_tiny")]
    assert row[3] in ("1×128", "2×128") and int(row[4]) > 4  # rows of 128 hold many documents
    assert float(row[6].replace(",", "")) > 0 and row[8] == "-"  # no MFU peak on a CPU
    shares = [float(s.rstrip("%")) for s in row[-len(PARTS):]]
    assert all(s >= 0 for s in shares) and abs(sum(shares) - 100) <= len(PARTS)
