"""benchmarks/convergence.py end to end at minuscule sizes: one row per method and budget point, and
the per-step compute it counts matches the passes each objective makes."""

import pytest

from conftest import load_script
import megatron_rcm.evaluation as evaluation

def _bench():
    return load_script("benchmarks/convergence.py")


def test_budget_grid_starts_at_zero_and_ends_at_the_full_budget():
    assert _bench().budget_fractions(4) == [0.0, 0.25, 0.5, 1.0]


def test_quick_run_has_a_row_per_method_and_budget_point(tmp_path, monkeypatch, one_thread):
    real = evaluation.train_feature_extractor
    monkeypatch.setattr(evaluation, "train_feature_extractor", lambda data, **kw: real(data, **{**kw, "steps": 3}))
    bench = _bench()
    methods = bench.available_methods()
    assert {"dcm", "scm"} <= set(methods)
    md = tmp_path / "table.md"
    out = bench.main(["--quick", "--quiet", "--teacher-steps", "2", "--budget-fe", "28", "--points", "3", "--reps", "1",
                      "--jvp-fe", "2", "--bwd-fe", "2",
                      "--cache-dir", str(tmp_path / "cache"), "--work-dir", str(tmp_path / "work"),
                      "--out-md", str(md), "--methods", ",".join(methods), "data.batch_size=2", "eval.num_videos=2",
                      "eval.teacher_steps=2"])
    costs, curves = out["costs"], out["curves"]
    # dCM: CFG teacher (x2) + stop-grad target + student forward/backward; sCM/MeanFlow: a JVP instead of the target
    assert costs["dcm"]["passes"] == "teacher fwd ×2, student fwd ×1, student fwd+bwd ×1"
    assert costs["scm"]["passes"] == "teacher fwd ×2, student jvp ×1, student fwd+bwd ×1"
    if "meanflow" in methods:  # like sCM: CFG teacher velocity, one JVP for the target, the student's own pass
        assert costs["meanflow"]["passes"] == costs["scm"]["passes"]
    assert costs["dcm"]["fe"] == pytest.approx(6) and costs["scm"]["fe"] == pytest.approx(7)
    assert (costs["dcm"]["steps"], costs["scm"]["steps"]) == (5, 4)  # round(28 / FE per step)
    for m in methods:
        assert sorted(curves[m]) == [0.0, 0.5, 1.0]
        assert curves[m][1.0][0] == costs[m]["steps"]
    table = md.read_text()
    rows = [line for line in table.splitlines() if line.startswith(tuple(f"| {m} | " for m in methods))]
    assert sum(1 for r in rows if r.count("|") == 6) == len(methods)  # the cost table
    assert sum(1 for r in rows if r.count("|") == 10) == 3 * len(methods)  # one quality row per budget point
    # a second run reuses the cached teacher
    assert (tmp_path / "cache").exists() and len(list((tmp_path / "cache").iterdir())) == 1
