"""benchmarks/init_study.py: its diversity measure against a hand computation, and the --quick CPU form end to end
(a row per initialisation with mean ± std over seeds, the ranking, the dCM vs sCM convergence part)."""

import pytest
import torch

from conftest import load_script
import megatron_rcm.evaluation as evaluation


def _bench():
    return load_script("benchmarks/init_study.py")


def test_diversity_is_the_per_pixel_spread_over_seeds():
    bench = _bench()
    v = torch.rand(5, 3, 2, 4, 4) * 2 - 1  # pixels in [-1, 1]
    ref = ((v - v.mean(0)) ** 2).sum(0).div(4).sqrt().mean()
    assert bench.diversity(v) == pytest.approx(float(ref), rel=1e-6)
    assert bench.diversity(v[:1].expand(3, -1, -1, -1, -1)) == 0.0  # one sample repeated: no spread
    assert bench.rank_inits({"a": [{"after": {"fd2": 3.0}}], "b": [{"after": {"fd2": 1.0}}]}) == ["b", "a"]


def test_quick_study_has_a_row_per_init_and_the_convergence_part(tmp_path, monkeypatch, one_thread):
    real = evaluation.train_feature_extractor
    monkeypatch.setattr(evaluation, "train_feature_extractor", lambda data, **kw: real(data, **{**kw, "steps": 3}))
    bench = _bench()
    md = tmp_path / "study.md"
    out = bench.main(["--quick", "--quiet", "--cache-dir", str(tmp_path / "cache"), "--work-dir", str(tmp_path / "work"),
                      "--out-md", str(md)])
    assert set(out["results"]) == set(bench.INITS) and all(len(r) == 2 for r in out["results"].values())
    table = md.read_text()
    rows = [line for line in table.splitlines() if line.startswith(tuple(f"| {v} |" for v in bench.LABELS.values()))]
    assert len(rows) == 6 and all(line.count("±") >= 6 for line in rows)  # 2 seeds: mean ± std in every column
    assert "Ranking by 2-step FD" in table and "### TF-dCM vs TF-sCM at equal counted compute" in table
    assert "--arg dcm.num_steps=48" in table  # the reference dCM grid
    for runs in out["results"].values():
        assert all(run["after"]["fd2"] >= 0 and 0 <= run["after"]["div2"] <= 2 for run in runs)
