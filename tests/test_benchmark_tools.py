"""CPU checks of the GPU benchmark scripts' own arithmetic (their timings need a GPU)."""

import pytest
import torch

from conftest import load_script
from megatron_rcm.ops.masks import block_causal_mask, full_mask, teacher_forcing_mask


def _load(name):
    return load_script(f"benchmarks/{name}.py")


@pytest.mark.parametrize("make", [lambda: teacher_forcing_mask(6, 5, 3), lambda: block_causal_mask(6, 4, 2),
                                  lambda: teacher_forcing_mask(4, 3, 1), lambda: full_mask(10)])
def test_mask_density_equals_the_dense_mask_fraction(make):
    mask = make()
    sq, sk = mask.shape
    expected = mask.dense().double().mean().item()
    assert _load("train_step").mask_density(mask, sq, sk) == pytest.approx(expected, rel=1e-12)


def test_flop_counter_prices_forward_jvp_and_backward(one_thread):
    """One TF forward, one TF JVP and one TF forward+backward of a tiny model, priced by the documented rules."""
    from megatron_rcm.config.model import CausalConfig, model_preset
    from megatron_rcm.models import build_model

    ts = _load("train_step")
    torch.manual_seed(0)
    model = build_model(model_preset("tiny", num_layers=2), CausalConfig(chunk_frames=2))
    cfg = model.cfg
    b, f, h, w = 2, 4, 8, 8
    clean, noisy = torch.randn(b, cfg.in_channels, f, h, w), torch.randn(b, cfg.in_channels, f, h, w)
    t, ctx = torch.full((b, f), 500.0), torch.randn(b, cfg.text_len, cfg.text_dim)
    tpf = model.tokens_per_frame(h, w)
    mask = teacher_forcing_mask(f, tpf, 2)
    counter = ts.FlopCounter(model, cfg.text_len)
    s, d, L = 2 * f * tpf, cfg.num_attention_heads * cfg.attention_head_dim, 2
    lin = 2 * b * L * (s * (6 * d * d + 2 * d * cfg.ffn_dim) + cfg.text_len * 2 * d * d)
    attn = 4 * b * L * cfg.num_attention_heads * cfg.attention_head_dim * (
        s * s * mask.dense().double().mean().item() + s * cfg.text_len)
    with counter:
        with torch.no_grad():
            model.forward_teacher_forcing(clean, noisy, t, ctx, mask)
            fwd = counter.flops
            model.forward_teacher_forcing(clean, noisy, t, ctx, mask, torch.randn_like(noisy), torch.ones_like(t))
            jvp = counter.flops - fwd
        model.forward_teacher_forcing(clean, noisy, t, ctx, mask)[0].sum().backward()
        graph = counter.flops - fwd - jvp
    assert fwd == pytest.approx(lin + attn, rel=1e-9)
    assert jvp == pytest.approx(2 * lin + 3 * attn, rel=1e-9)
    assert graph == pytest.approx(3 * lin + 3.5 * attn, rel=1e-9)
    assert [c[2:] for c in counter.calls] == [(False, False), (True, False), (False, True)]
    assert not hasattr(model, "forward_segments") or "counted" not in getattr(model.forward_segments, "__name__", "")


def test_kernel_table_ranks_kernels_by_gpu_time():
    from types import SimpleNamespace as NS

    ts = _load("train_step")
    events = [NS(key="gemm|bf16", self_device_time_total=3000.0, count=4),
              NS(key="cpu_only", self_device_time_total=0.0, count=1),
              NS(key="attn_fwd", self_device_time_total=5000.0, count=2),
              NS(key="norm", self_device_time_total=2000.0, count=8)]
    table = ts.kernel_table(NS(key_averages=lambda: events), top=2).splitlines()
    assert table[2] == "| attn_fwd | 2 | 5.0 | 50.0% |"
    assert table[3] == "| gemm/bf16 | 4 | 3.0 | 30.0% |"  # '|' escaped for markdown
    assert table[-1] == "| (all 3 kernels) | | 10.0 | 100% |" and len(table) == 5


def test_generate_benchmarks_run_and_print_their_tables(capsys, one_thread):
    """CPU smoke runs of the issue-17 GPU benchmarks (tiny sizes): the scripts the GPU figures come from work."""
    _load("generate_data").main(["--device", "cpu", "--layers", "1", "--frames", "5", "--height", "16", "--width",
                                 "16", "--steps", "2", "--videos", "1"])
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| video |") and table[2].startswith("| 5x16x16 | 16x2x2x2 | 2 | 1 | 2 (multistep2)")
    _load("generate").main(["--device", "cpu", "--layers", "1", "--frames", "4", "--height", "8", "--width", "8",
                            "--chunk-frames", "2", "--reps", "1", "--modes", "chunk", "--vae", "--vae-base-dim", "8",
                            "--vae-dtype", "float32"])
    row = capsys.readouterr().out.splitlines()[2]
    assert row.startswith("| chunk-wise (2 frames) | 2 | no | no | 1 | 4 | yes (float32) |")


@pytest.mark.parametrize("recompute", ["hooks", "reentrant"])
def test_host_overhead_counts_ops_and_waits_of_each_call(capsys, one_thread, recompute):
    """The SF-DMD calls' host-cost table (CPU, tiny widths): three calls, their launched ops, no waits."""
    _load("host_overhead").main(["--layers", "2", "--frames", "6", "--reps", "1", "--recompute", recompute])
    rows = [r.split(" | ") for r in capsys.readouterr().out.splitlines()[2:]]
    assert [r[0] for r in rows] == ["| chunk, no grad", "| chunk, grad", "| score"]
    ops = [int(r[2]) for r in rows]
    assert all(r[3] == "0" for r in rows) and ops[1] > 2 * ops[0] > 0  # the exit step: forward, recompute, backward
    assert all(float(r[4]) > 0 for r in rows) and rows[1][1] == "eager" + (", reentrant" if recompute != "hooks" else "")


def test_host_overhead_charges_each_copy_to_the_line_or_backward_node_making_it(capsys, one_thread):
    """--copies: every call's launched ops and copies; the norms' upcasts are charged to ``dual.upcast``, the exit
    step's backward casts to their nodes, and a rollout chunk makes no copy in backward."""
    _load("host_overhead").main(["--layers", "2", "--frames", "6", "--copies", "50"])
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in capsys.readouterr().out.splitlines()[2:]]
    calls = {r[0]: i for i, r in enumerate(rows) if r[0]}
    assert list(calls) == ["chunk, no grad", "chunk, grad", "score"]

    def sources(name):
        start = calls[name]
        end = min([i for i in calls.values() if i > start], default=len(rows))
        return {(r[3], r[4]): int(r[5]) for r in rows[start + 1:end]}

    no_grad, grad = sources("chunk, no grad"), sources("chunk, grad")
    assert any(kind == "_to_copy bf16 -> fp32" and src.startswith("ops/dual.py:") and src.endswith(" upcast")
               for kind, src in no_grad)
    assert not any(src.startswith("backward of") for _, src in no_grad)
    assert any(src == "backward of ToCopyBackward0" for _, src in grad)
    for name, i in calls.items():  # the copies column is the sum of the listed sources (all of them listed here)
        assert int(rows[i][2].split()[0]) == sum(sources(name).values()) <= int(rows[i][1])


def test_host_overhead_times_a_fusable_call_both_ways(monkeypatch):
    """--fusable-call: eager and compiled per-call µs, with and without grad (the compiler stubbed: no C++ build)."""
    from megatron_rcm.ops import fusion

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    fusion.reset()
    monkeypatch.setattr(fusion, "_graph_compiler", lambda graph, example: graph)
    rows = _load("host_overhead").fusable_call_us(torch.device("cpu"), reps=5)
    assert [r[0] for r in rows] == ["no grad", "grad"] and all(len(r) == 5 and min(r[1:]) > 0 for r in rows)
    assert not fusion.enabled()
    fusion.reset()


def test_attention_ab_tables_group_rounds_by_version_and_flag_bitwise_equality():
    ab = _load("attention_ab")
    log = ["noise", 'ROW {"tag": "base", "full32760_bwd": 294.2, "full32760_flash_bwd": 308.8}',
           'ROW {"tag": "new", "full32760_bwd": 434.9}', 'ROW {"tag": "base", "full32760_bwd": 293.6}',
           'ROW {"tag": "new", "full32760_bwd": 435.4}']
    rows = ab.rows_from_log(log)
    assert list(rows) == ["base", "new"] and [r["full32760_bwd"] for r in rows["new"]] == [434.9, 435.4]
    table = ab.metric_table(rows).splitlines()
    assert table[0] == "| metric | base | new |"
    assert "| full32760_bwd | 294, 294 | 435, 435 |" in table
    assert "| full32760_flash_bwd | 309 |  |" in table
    g = torch.Generator().manual_seed(0)
    ref = {"c": [torch.randn(3, 4, generator=g) for _ in ab.OUTPUTS]}
    got = {"c": [t.clone() for t in ref["c"]]}
    got["c"][3] = got["c"][3] * (1 + 1e-3)  # dq changed by its rounding, the rest bitwise equal
    (line,) = ab.equality_lines(ref, got, "new", "base")
    assert line.startswith("new vs base c: o:== o_jvp:== t_jvp:== dq:1.0e-03 dk:== dv:==")


@pytest.mark.parametrize("args", [["only=."], ["a=/nonexistent", "b=."], ["a=.", "b=."]])
def test_attention_ab_script_refuses_bad_versions_with_exit_2(args, tmp_path):
    """Fewer than two versions, a folder without the sources, or (here, without a GPU) trees whose extension
    does not build: one line naming the problem, exit 2."""
    import os
    import subprocess
    if torch.cuda.is_available() and args == ["a=.", "b=."]:
        pytest.skip("on a GPU machine the trees build")
    r = subprocess.run(["bash", "benchmarks/attention_ab.sh", "--rounds", "1", *args], capture_output=True, text=True,
                       env={"PATH": os.environ["PATH"], "AB_WORK": str(tmp_path)})
    assert r.returncode == 2 and r.stderr.startswith("attention_ab.sh: ") and len(r.stderr.splitlines()) == 1


def test_attention_ab_compare_without_base_outputs_exits_2(tmp_path, capsys):
    ab = _load("attention_ab")
    with pytest.raises(SystemExit) as e:
        ab.compare(str(tmp_path), "base", ["new"], str(tmp_path / "log"))
    assert e.value.code == 2 and "no outputs of the base version base" in capsys.readouterr().err


def test_attention_ab_cases_follow_ab_cases_and_refuse_unknown_names(monkeypatch):
    ab = _load("attention_ab")
    monkeypatch.setenv("AB_CASES", "tf65520,full32760")
    assert [c[0] for c in ab.selected_cases()] == ["full32760", "tf65520"]
    monkeypatch.setenv("AB_CASES", "")
    assert ab.selected_cases() == list(ab.CASES)
    monkeypatch.setenv("AB_CASES", "full32760,tf999")
    with pytest.raises(SystemExit, match=r"unknown cases \['tf999'\]"):
        ab.selected_cases()


def test_profile_table_reads_ncu_raw_csv_and_prices_dram_against_the_inputs(tmp_path):
    """ncu's raw CSV (names, units, one row per kernel; the last row is the profiled one) -> one table row:
    time in ms, DRAM bytes over the inputs read once, the busiest SM over the mean, the largest stalls first."""
    prof = _load("profile_attention")
    names = ["Kernel Name", "gpu__time_duration.sum", "sm__cycles_elapsed.avg.per_second", "dram__bytes_read.sum",
             "lts__t_sector_hit_rate.pct",
             "sm__cycles_active.avg", "sm__cycles_active.max",
             "smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio",
             "smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio",
             "smsp__average_warps_issue_stalled_wait_per_issue_active.ratio"]
    need = prof.input_bytes("tf65520", "fwd")
    assert need == 3 * 2 * 21 * 1560 * 12 * 128 * 2  # Q, K, V of [clean ; noisy], bf16
    rows = [names, ["", "ns", "hz", "byte", "%", "cycle", "cycle", "", "", ""],
            ["fwd_kernel", "1,000", "1", "1", "1", "1", "1", "0", "0", "0"],  # an earlier kernel: ignored
            ["fwd_kernel", "13,970,000", "1,729,005,924.33", str(3 * need), "71.5", "900", "1000", "0.5", "2.25", "1.0"]]
    path = tmp_path / "tf65520-fwd.raw.csv"
    path.write_text("\n".join(",".join(f'"{c}"' for c in r) for r in rows) + "\n")
    table = prof.table([str(path)], {"tf65520-fwd": need}).splitlines()
    cells = [c.strip() for c in table[2].strip("|").split("|")]
    head = [c.strip() for c in table[0].strip("|").split("|")]
    row = dict(zip(head, cells))
    assert row["case"] == "tf65520-fwd" and row["ms"] == "13.97" and row["L2 hit %"] == "71.5" and row["SM GHz"] == "1.729"
    assert row["tensor %"] == "-" and row["busiest SM / mean"] == "1.111" and row["DRAM / inputs"] == "3.00"
    assert row["top stalls (cycles per issue)"] == "long_scoreboard 2.25, wait 1.00, barrier 0.50"
    empty = tmp_path / "x-fwd.raw.csv"
    empty.write_text('"Kernel Name"\n"unit"\n')
    with pytest.raises(SystemExit, match="holds no kernel row"):
        prof.read_raw(str(empty))


def test_gpu_idle_charges_each_gap_to_the_innermost_host_label():
    """Idle intervals between merged kernels go to the deepest label the host was in; the rest to (unlabelled)."""
    gi = _load("gpu_idle")

    def x(cat, ts, dur, name="k", tid=1):
        return {"ph": "X", "cat": cat, "ts": ts, "dur": dur, "name": name, "tid": tid}

    trace = {"traceEvents": [
        x("kernel", 0, 10), x("kernel", 5, 3), x("gpu_memcpy", 12, 8), x("kernel", 50, 10), x("kernel", 70, 5),
        x("user_annotation", 0, 65, "loss"), x("user_annotation", 11, 29, "student: fwd"),
        x("user_annotation", 30, 5, "other thread", tid=2),  # same depth as loss there: loses to student
        x("cuda_runtime", 40, 5, "cudaStreamSynchronize"), x("cuda_runtime", 41, 1, "cudaLaunchKernel"),
    ]}
    assert gi.busy_intervals(trace) == [(0, 10), (12, 20), (50, 60), (70, 75)]
    idle, busy, span = gi.idle_by_label(trace)
    assert (busy, span) == (33, 75)
    # gap 10-12: loss 10-11, student 11-12; gap 20-50: student 20-40, loss 40-50; gap 60-70: loss 60-65, none 65-70
    assert idle == pytest.approx({"loss": 1 + 10 + 5, "student: fwd": 1 + 20, "(unlabelled)": 5})
    assert sum(idle.values()) == pytest.approx(span - busy)
    assert gi.sync_calls(trace) == (1, 5)
    table = gi.idle_table(trace)
    assert "GPU busy 0.0 ms of 0.1 ms (44.0%)" in table and "| student: fwd | 1 | 0.0 | 0.0 | 50.0% |" in table


def test_train_step_gaps_labels_every_network_call_and_phase(monkeypatch, capsys, one_thread):
    """``train_step.py --gaps``: the profiled rep carries one label per network call and per phase of the step."""
    import os
    import sys

    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    sys.modules.pop("gpu_idle", None)
    import gpu_idle

    seen = {}
    monkeypatch.setattr(gpu_idle, "idle_table", lambda trace, top: seen.update(gpu_idle.label_totals(trace)) or "T")
    _load("train_step").main(["--device", "cpu", "--kinds", "dmd", "--layers", "1", "--frames", "6", "--height", "8",
                              "--width", "8", "--reps", "1", "--gaps", "5"])
    assert "\nT\n" in capsys.readouterr().out
    assert {"loss", "backward", "optimizer", "critic step"} <= set(seen)
    # 6 frames in two chunks of 3 x (8 / 2) x (8 / 2) = 48 tokens; the exit step builds a graph, the second chunk
    # attends to the first one's cache; the scores see the whole video
    assert {"student: fwd (graph), 48 tok", "student: fwd (graph), 48 tok over 96", "student: fwd, 48 tok over 96",
            "teacher: fwd, 96 tok", "critic: fwd, 96 tok", "critic: fwd (graph), 96 tok"} <= set(seen)
