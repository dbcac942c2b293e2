"""Build ``torchrun`` command lines for single-node, multi-node and SLURM jobs.

SLURM layout: **one srun task per node, each running torchrun** with ``--nproc-per-node`` = GPUs
per node. Why: torchrun then owns the local workers, so ``--max-restarts`` restarts a failed rank
(fault tolerance) and the elastic rendezvous works the same on a laptop and a cluster; one task per
GPU would leave restarts to SLURM and duplicate the rendezvous logic. Rendezvous (c10d) comes from
the first host of ``SLURM_JOB_NODELIST`` and a port derived from the job id, so every node computes
the same endpoint without talking to the others.
"""
from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field


@dataclass
class LaunchSpec:
    nnodes: int = 1
    nproc_per_node: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    max_restarts: int = 0
    job_id: str = "local"
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if self.nnodes < 1 or self.nproc_per_node < 1:
            raise ValueError(f"nnodes and nproc_per_node must be >= 1, got {self.nnodes}, {self.nproc_per_node}")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node_rank {self.node_rank} outside [0, {self.nnodes})")


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand SLURM's compressed host lists: ``gpu[01-03,07],cpu5`` -> gpu01 gpu02 gpu03 gpu07 cpu5."""
    hosts: list[str] = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", hostlist):
        m = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", part)
        if not m:
            hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for r in ranges.split(","):
            if "-" in r:
                lo, hi = r.split("-")
                hosts += [f"{prefix}{i:0{len(lo)}d}{suffix}" for i in range(int(lo), int(hi) + 1)]
            else:
                hosts.append(f"{prefix}{r}{suffix}")
    return hosts


def _int_env(env, *names, default=None):
    for n in names:
        if env.get(n):
            m = re.match(r"\d+", env[n])  # SLURM_GPUS_ON_NODE may read "8", SLURM_TASKS_PER_NODE "1(x4)"
            if m:
                return int(m.group())
    return default


def spec_from_slurm(env: dict[str, str] | None = None, nproc_per_node: int | None = None,
                    max_restarts: int = 3) -> LaunchSpec:
    env = dict(os.environ if env is None else env)
    if "SLURM_JOB_ID" not in env:
        raise RuntimeError("not inside a SLURM job: SLURM_JOB_ID is unset (use --nnodes/--master-addr instead)")
    nodes = expand_hostlist(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "")))
    nnodes = _int_env(env, "SLURM_JOB_NUM_NODES", "SLURM_NNODES", default=len(nodes) or 1)
    gpus = nproc_per_node or _int_env(env, "SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE", default=1)
    job = env["SLURM_JOB_ID"]
    return LaunchSpec(
        nnodes=nnodes, nproc_per_node=gpus, node_rank=_int_env(env, "SLURM_NODEID", "SLURM_PROCID", default=0),
        master_addr=env.get("MASTER_ADDR") or (nodes[0] if nodes else "127.0.0.1"),
        master_port=int(env.get("MASTER_PORT") or 20000 + int(re.sub(r"\D", "", job) or 0) % 20000),
        max_restarts=max_restarts, job_id=job,
    )


CLUSTER_ENV = {
    # Fail fast instead of hanging on a dead peer; async error handling lets torchrun restart the job.
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    "NCCL_DEBUG": "WARN",
    # NVLink multicast (NVLS) off: not available on every fabric and a source of hangs on shared hosts.
    "NCCL_NVLS_ENABLE": "0",
    # Workers get their own rendezvous store per attempt: with torchrun's shared store (the default)
    # a restarted group reads its peers' addresses from the previous attempt and never connects
    # (pytorch/pytorch#135712), which breaks --max-restarts.
    "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
}


def torchrun_command(spec: LaunchSpec, program: list[str]) -> list[str]:
    """The torchrun invocation for this node. ``program`` is e.g. ['-m', 'megatron_rcm.cli', 'train', cfg]."""
    cmd = ["torchrun", f"--nnodes={spec.nnodes}", f"--nproc-per-node={spec.nproc_per_node}",
           f"--max-restarts={spec.max_restarts}"]
    if spec.nnodes == 1:
        cmd += ["--standalone"] if spec.master_port == 0 else \
            ["--rdzv-backend=c10d", f"--rdzv-endpoint={spec.master_addr}:{spec.master_port}",
             f"--rdzv-id={spec.job_id}"]
    else:
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={spec.master_addr}:{spec.master_port}",
                f"--rdzv-id={spec.job_id}", f"--node-rank={spec.node_rank}"]
    return cmd + program


def format_command(cmd: list[str], env: dict[str, str] | None = None) -> str:
    prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
    return (prefix + " " if prefix else "") + " ".join(shlex.quote(c) for c in cmd)


def add_launch_arguments(p) -> None:
    p.add_argument("--from-slurm", action="store_true", help="derive nodes/rank/rendezvous from SLURM variables")
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--nproc-per-node", type=int, default=None, help="processes per node (default: 1, or SLURM's GPUs)")
    p.add_argument("--node-rank", type=int, default=0)
    p.add_argument("--master-addr", default="127.0.0.1")
    p.add_argument("--master-port", type=int, default=29500)
    p.add_argument("--max-restarts", type=int, default=0)
    p.add_argument("--dry-run", action="store_true", help="print the command and environment, run nothing")
    p.add_argument("program", nargs="+", help="megatron-rcm subcommand and its arguments, after --")


def worker_env(spec: LaunchSpec, threads: int | None = None, environ=None) -> dict[str, str]:
    """What the launcher adds to the workers' environment: CLUSTER_ENV (unless already set) and
    ``OMP_NUM_THREADS``: ``threads``, else the user's, else this node's CPUs (affinity) / its ranks."""
    from .utils.threads import threads_per_process

    environ = os.environ if environ is None else environ
    env = {k: v for k, v in CLUSTER_ENV.items() if k not in environ}
    n, source = threads_per_process(spec.nproc_per_node, threads, environ)
    if source != "OMP_NUM_THREADS":  # the user's own value is inherited as it is
        env["OMP_NUM_THREADS"] = str(n)
    return env


def preflight(program: list[str], node_rank: int = 0) -> None:
    """For ``launch -- train CONFIG ...``: what would stop every rank, checked once before torchrun starts
    them (the config, the shard folder and - on node 0 - a trainer already holding the run folder)."""
    if not program or program[0] != "train":
        return
    from .cli import build_parser
    from .config.run import load_config
    from .data.checks import check_data
    from .training.run_lock import probe

    args = build_parser().parse_args(program)
    cfg = load_config(args.config, args.overrides)
    check_data(cfg)
    if node_rank == 0:
        probe(cfg.output_dir)


def run_launch(args) -> int:
    import subprocess
    import sys

    if args.from_slurm:
        spec = spec_from_slurm(nproc_per_node=args.nproc_per_node, max_restarts=args.max_restarts)
    else:
        spec = LaunchSpec(args.nnodes, args.nproc_per_node or 1, args.node_rank, args.master_addr, args.master_port,
                          args.max_restarts)
    env = worker_env(spec, getattr(args, "threads", None))
    cmd = torchrun_command(spec, ["-m", "megatron_rcm.cli", *args.program])
    print(format_command(cmd, env), flush=True)
    if args.dry_run:
        return 0
    try:
        preflight(args.program, spec.node_rank)
    except SystemExit as e:  # argparse already printed what is wrong with the train arguments
        return int(e.code or 0)
    return subprocess.call([sys.executable, "-m", "torch.distributed.run", *cmd[1:]], env={**os.environ, **env})
