"""Launch commands from fake SLURM environments and plain arguments."""
import pytest

from megatron_rcm.launch import LaunchSpec, expand_hostlist, format_command, spec_from_slurm, torchrun_command


def test_expand_hostlist():
    assert expand_hostlist("gpu[01-03,07],cpu5") == ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]
    assert expand_hostlist("node7") == ["node7"]
    assert expand_hostlist("a[8-10]-ib") == ["a8-ib", "a9-ib", "a10-ib"]


SLURM = {"SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "dgx[003-006]", "SLURM_JOB_NUM_NODES": "4",
         "SLURM_NODEID": "2", "SLURM_GPUS_ON_NODE": "8"}


def test_spec_from_slurm_and_the_torchrun_command():
    spec = spec_from_slurm(SLURM, max_restarts=3)
    assert (spec.nnodes, spec.nproc_per_node, spec.node_rank, spec.master_addr) == (4, 8, 2, "dgx003")
    assert spec.master_port == 20000 + 123456 % 20000
    cmd = torchrun_command(spec, ["-m", "megatron_rcm.cli", "train", "cfg.yaml"])
    assert cmd[:4] == ["torchrun", "--nnodes=4", "--nproc-per-node=8", "--max-restarts=3"]
    assert "--rdzv-endpoint=dgx003:23456" in cmd and "--node-rank=2" in cmd and "--rdzv-id=123456" in cmd
    assert cmd[-2:] == ["train", "cfg.yaml"]


def test_every_node_agrees_on_the_rendezvous():
    endpoints = {tuple(c for c in torchrun_command(spec_from_slurm({**SLURM, "SLURM_NODEID": str(r)}), [])
                       if c.startswith("--rdzv")) for r in range(4)}
    assert len(endpoints) == 1


def test_explicit_master_and_tasks_per_node_format():
    spec = spec_from_slurm({**SLURM, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "4000", "SLURM_GPUS_ON_NODE": "4(x4)"})
    assert (spec.master_addr, spec.master_port, spec.nproc_per_node) == ("10.0.0.1", 4000, 4)


def test_errors():
    with pytest.raises(RuntimeError, match="SLURM_JOB_ID is unset"):
        spec_from_slurm({})
    with pytest.raises(ValueError, match="node_rank 3 outside"):
        LaunchSpec(nnodes=2, node_rank=3)


def test_dry_run_prints_the_command(capsys):
    from megatron_rcm.cli import main
    assert main(["launch", "--nproc-per-node", "2", "--dry-run", "--", "train", "x.yaml"]) == 0
    out = capsys.readouterr().out
    assert "torchrun --nnodes=1 --nproc-per-node=2" in out and "megatron_rcm.cli train x.yaml" in out
    assert format_command(["a b"], {"K": "v"}) == "K=v 'a b'"


def test_workers_share_the_cpus_of_this_node(monkeypatch):
    from megatron_rcm.launch import worker_env
    from megatron_rcm.utils import threads

    monkeypatch.setattr(threads, "available_cpus", lambda: 16)
    spec = LaunchSpec(nproc_per_node=4)
    assert worker_env(spec, environ={})["OMP_NUM_THREADS"] == "4"  # 16 CPUs / 4 local ranks
    assert worker_env(LaunchSpec(nproc_per_node=32), environ={})["OMP_NUM_THREADS"] == "1"
    assert worker_env(spec, threads=3, environ={"OMP_NUM_THREADS": "2"})["OMP_NUM_THREADS"] == "3"  # the flag wins
    assert "OMP_NUM_THREADS" not in worker_env(spec, environ={"OMP_NUM_THREADS": "2"})  # inherited as set


def test_launch_checks_the_run_before_starting_any_rank(tmp_path, capsys):
    from megatron_rcm.cli import main
    from megatron_rcm.training.run_lock import RunLock

    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: {num_layers: 1}\nphases: [{name: t, kind: teacher, objective: flow_matching, steps: 1}]\n")
    argv = ["launch", "--nproc-per-node", "2", "--", "train", str(cfg), f"output_dir={tmp_path / 'run'}"]
    assert main(argv + ["eval.student_steps=[0]"]) == 2
    assert "'eval.student_steps'" in capsys.readouterr().err
    with RunLock(tmp_path / "run"):
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is in use by another trainer" in err
