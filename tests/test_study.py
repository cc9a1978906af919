"""The compute study harness (fusion/study.py, scripts/study.py)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from fusion.config import StudySettings, compose
from fusion.errors import UserError
from fusion.study import (
    Run,
    draw_curves,
    flops_to_reach,
    parity_ratios,
    plan_runs,
    read_table,
    summary_markdown,
    write_table,
)

ROOT = Path(__file__).resolve().parents[1]


def _settings(**given) -> StudySettings:
    return OmegaConf.structured(StudySettings(**given))


def test_runs_go_cheapest_first_and_extra_seeds_only_where_the_budget_allows():
    runs = plan_runs(_settings(budgets=[4e12, 1e12, 2e12], seeds=[0, 1],
                               extra_seeds_up_to=2e12))
    assert runs[:6] == [Run(f, b, 0) for b in (1e12, 2e12, 4e12)
                        for f in ("transfusion", "chameleon")]
    assert runs[6:] == [Run(f, b, 1) for b in (1e12, 2e12) for f in ("transfusion", "chameleon")]
    assert len({r.name for r in runs}) == len(runs)  # one folder per run
    every = plan_runs(_settings(budgets=[1e12, 2e12], seeds=[3, 4]))
    assert sum(r.seed == 4 for r in every) == 4  # no limit: the second seed everywhere


@pytest.mark.parametrize("bad, message", [
    ({"budgets": []}, "distinct positive"), ({"budgets": [1e12, -1.0]}, "distinct positive"),
    ({"budgets": [1e12, 1e12]}, "distinct positive"), ({"seeds": []}, "seeds is empty"),
    ({"families": ["transfusion", "dalle"]}, "unknown"), ({"families": []}, "unknown")])
def test_bad_study_settings_are_refused_by_name(bad, message):
    with pytest.raises(UserError, match=message):
        plan_runs(_settings(**{"budgets": [1e12], **bad}))


def test_an_editing_data_study_needs_its_start_models_and_one_budget():
    edits = dict(budgets=[1e12], edit_triplets=[1000, 8000], experiment="edit_{family}_tiny")
    with pytest.raises(UserError, match="study.init_from.transfusion=<model folder>"):
        plan_runs(_settings(**edits))
    start = {"transfusion": "a/model", "chameleon": "b/model"}
    runs = plan_runs(_settings(**edits, init_from=start))
    assert [(r.family, r.edits) for r in runs] == [
        ("transfusion", 1000), ("chameleon", 1000), ("transfusion", 8000), ("chameleon", 8000)]
    assert runs[0].name == "transfusion_1000edits_1e12_seed0"
    assert Run("chameleon", 1e12, 0).key() == {"family": "chameleon", "budget": 1e12, "seed": 0}
    with pytest.raises(UserError, match="one FLOP budget"):
        plan_runs(_settings(**{**edits, "budgets": [1e12, 2e12]}, init_from=start))
    with pytest.raises(UserError, match="distinct counts"):
        plan_runs(_settings(**{**edits, "edit_triplets": [0, 8]}, init_from=start))


def test_the_shipped_studies_compose_with_a_ladder_of_at_least_four_budgets():
    cpu = compose("study", []).study
    assert cpu.name == "cpu" and len(cpu.budgets) >= 4
    ratios = np.diff(np.log2(sorted(cpu.budgets)))
    assert np.allclose(ratios, 1.0)  # a factor of 2 apart
    assert len(cpu.scoring.world_seeds) >= 3  # GenEval pooled over three prompt sets
    assert compose("study", ["study=debug"]).study.debug == "default"


def test_flops_to_reach_interpolates_in_log_flops():
    x, y = np.array([1e12, 4e12, 16e12]), np.array([0.1, 0.3, 0.5])
    flops, rel = flops_to_reach(x, y, 0.2, higher_is_better=True)
    assert rel == "=" and flops == pytest.approx(2e12)  # half-way between 1 and 4 in log
    assert flops_to_reach(x, y, 0.05, True) == (1e12, "≤")  # the cheapest point does
    assert flops_to_reach(x, y, 0.9, True) == (16e12, ">")  # never reached
    loss = np.array([3.0, 2.0, 1.5])
    flops, rel = flops_to_reach(x, loss, 1.75, higher_is_better=False)
    assert rel == "=" and flops == pytest.approx(8e12)


def _rows(shift: float) -> list[dict]:
    """Transfusion reaching every score at ``shift`` x Chameleon's FLOPs."""
    rows = []
    for k, budget in enumerate((1e12, 2e12, 4e12, 8e12)):
        for family, flops in (("chameleon", budget), ("transfusion", budget * shift)):
            rows.append({"family": family, "budget": budget, "seed": 0, "train_flops": flops,
                         "geneval_overall": 0.1 * (k + 1), "fid_shapes": 40.0 / 2 ** k,
                         "caption_single_object_accuracy": 0.2 * k,
                         "text_loss": 3.0 - 0.5 * k})
    return rows


def test_parity_ratio_recovers_a_known_compute_advantage():
    # Transfusion's curves are Chameleon's at 1/4 of the FLOPs: its last score is reached at
    # 8e12 / 4 on Transfusion's x, i.e. a ratio of 1/4 for every metric
    ratios = parity_ratios(_rows(shift=0.25))
    assert set(ratios) == {"geneval_overall", "fid_shapes", "caption_single_object_accuracy",
                           "text_loss"}
    for metric, p in ratios.items():
        assert p["relation"] == "=" and p["ratio"] == pytest.approx(0.25), metric
    behind = parity_ratios(_rows(shift=2.0))  # Transfusion needs 2x: never reached by 8e12
    assert behind["geneval_overall"]["relation"] == "="
    assert behind["geneval_overall"]["ratio"] == pytest.approx(2.0)


def test_seeds_are_averaged_per_budget():
    rows = _rows(shift=1.0)
    twin = dict(rows[0], seed=1, geneval_overall=0.3, train_flops=3e12)
    from fusion.study import curve

    x, y = curve(rows + [twin], "chameleon", "geneval_overall")
    assert x[0] == pytest.approx(2e12) and y[0] == pytest.approx(0.2)


def test_summary_table_and_curves(tmp_path):
    rows = _rows(shift=0.25)
    text = summary_markdown(rows, ["transfusion", "chameleon"])
    assert "| 1e+12 | 0.100 | 0.100 |" in text
    assert "| FID-shapes | = 0.25 | 5.000 | 0.029 |" in text  # the paper's figure beside it
    for row in rows:
        row.pop("fid_shapes")  # a study scored without FID draws no FID plot, nor column
    assert "FID" not in summary_markdown(rows, ["transfusion", "chameleon"]).split("\n")[0]
    one_family = [dict(r, only=1.0) if r["family"] == "chameleon" else r for r in rows]
    head = summary_markdown(one_family, ["transfusion", "chameleon"],
                            {"only": ("only", True, None)}).split("\n")[0]
    assert head == "| budget (FLOPs) | chameleon: only |"
    paths = draw_curves(rows, ["transfusion", "chameleon"], tmp_path / "plots")
    assert [p.name for p in paths] == ["study_geneval_overall.png",
                                       "study_caption_single_object_accuracy.png",
                                       "study_text_loss.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


def test_table_round_trip_and_a_missing_table(tmp_path):
    rows = _rows(shift=1.0)
    write_table(tmp_path / "table.jsonl", rows)
    assert read_table(tmp_path / "table.jsonl") == rows
    with pytest.raises(UserError, match="no study table"):
        read_table(tmp_path / "none.jsonl")


@pytest.mark.slow
def test_debug_study_trains_scores_and_reuses_its_runs(tmp_path):
    """``scripts/study.py study=debug``: six seconds-long runs (two budgets, both families, a
    second seed at the smaller), scored; a re-run trains and scores nothing again; then the
    editing-data study from two of them (~6 minutes in all)."""
    out = tmp_path / "study"

    def run() -> str:
        proc = subprocess.run([sys.executable, "scripts/study.py", "study=debug",
                               f"output_dir={out}"], cwd=ROOT, capture_output=True, text=True,
                              timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    first = run()
    rows = read_table(out / "table.jsonl")
    assert [(r["family"], r["budget"], r["seed"]) for r in rows] == [
        ("transfusion", 1e10, 0), ("chameleon", 1e10, 0), ("transfusion", 2e10, 0),
        ("chameleon", 2e10, 0), ("transfusion", 1e10, 1), ("chameleon", 1e10, 1)]
    meta = json.loads((out / "runs" / "chameleon_2e10_seed0" / "model" / "config.json")
                      .read_text())
    for r in rows:
        # the FLOP budget ends each run at the first step that reaches it
        per_step = r["train_flops"] / r["steps"]
        assert r["budget"] <= r["train_flops"] < r["budget"] + 2 * per_step
        assert math.isfinite(r["text_loss"]) and 0 <= r["geneval_overall"] <= 1
    assert meta["train_flops"] == rows[3]["train_flops"]
    assert (out / "summary.md").read_text() in first
    for metric in ("geneval_overall", "caption_single_object_accuracy", "text_loss"):
        assert (out / f"study_{metric}.png").exists()
    second = run()
    assert second.count("reused") == 18 and "$ " not in second  # no run trained or scored

    # the editing-data study on the same harness, from two of these models
    edits = tmp_path / "edits"
    proc = subprocess.run(
        [sys.executable, "scripts/study.py", "study=edits_debug", f"output_dir={edits}",
         f"+study.init_from.transfusion={out / 'runs/transfusion_2e10_seed0/model'}",
         f"+study.init_from.chameleon={out / 'runs/chameleon_2e10_seed0/model'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_table(edits / "table.jsonl")
    assert [(r["family"], r["edits"]) for r in rows] == [
        ("transfusion", 8), ("chameleon", 8), ("transfusion", 32), ("chameleon", 32)]
    for r in rows:
        assert 0 <= r["edit_accuracy_recolor"] <= 1 and r["budget"] <= r["train_flops"]
        # the teacher-forced diagnosis of the changed cells: Chameleon rows only
        diagnosed = r["family"] == "chameleon"
        assert ("changed_cells_nll" in r) == diagnosed == ("changed_cells_right" in r)
        if diagnosed:
            assert r["changed_cells_nll"] > 0 and 0 <= r["changed_cells_right"] <= 1
        meta = json.loads((edits / "runs" / f"{r['family']}_{r['edits']}edits_1e10_seed0" /
                           "model" / "config.json").read_text())
        assert meta["documents"] == "edit" and meta["init_from"].endswith(
            f"{r['family']}_2e10_seed0/model")
    assert (edits / "study_edit_accuracy_recolor.png").exists()
    assert (edits / "study_changed_cells_nll.png").exists()
    assert "| edit triplets |" in (edits / "summary.md").read_text()
