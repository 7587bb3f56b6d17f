"""A throw-away SLURM cluster for tests: munged, slurmctld and slurmd in the foreground, owned by
the test process, every file (config, munge key and socket, state, spool, logs) in one temp dir.

Facts it relies on (measured with Debian's slurm 22.05, see
../shared/reference/local_cluster_recipes.md §1): no systemd or cgroups are needed with
proctrack/linuxproc + task/none; `cred_expire=10` shortens the wait before a requeued job may run
again (120 s by default); slurmd must outlive the jobs' slurmstepd, or they are orphaned.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import random
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

# The daemons and client commands the cluster needs, and where they come from.
REQUIRED = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue")
INSTALL_HINT = (
    "run `make cluster-tools` (as root on Debian/Ubuntu it installs them: apt-get install "
    "--no-install-recommends slurmctld slurmd slurm-client munge)"
)

SLURM_CONF = """\
ClusterName=capsdisttest
# A random first job id: jobs' rendezvous ports follow their ids, so two test clusters on one
# machine (two checkouts' test runs) do not hand out the same ones.
FirstJobId={first_job_id}
GresTypes=gpu
SlurmctldHost={host}
SlurmUser={user}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (120 s default)
AuthInfo=socket={d}/munge/munge.socket.2,cred_expire=10
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/run/slurmctld.pid
SlurmdPidFile={d}/run/slurmd-%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
ReturnToService=2
SlurmdTimeout=30
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    """A running test cluster: `env` is this process's environment with SLURM_CONF pointing at
    it (pass it to sbatch, srun, scontrol and `make launch`)."""

    def __init__(self, root: Path, env: dict[str, str], nodes: list[str]):
        self.root = root
        self.env = env
        self.nodes = nodes

    def scontrol(self, *args: str) -> str:
        return subprocess.run(
            ["scontrol", *args], env=self.env, check=True, capture_output=True, text=True
        ).stdout

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job -o` as a dict (JobState, ExitCode, Restarts, ...)."""
        fields = self.scontrol("show", "job", "-o", job_id).split()
        return dict(field.partition("=")[::2] for field in fields if "=" in field)

    def job_steps_alive(self, job_id: str) -> bool:
        """Whether a slurmstepd of the job still runs here: slurmctld may count a step as done
        (and requeue the job) a few seconds before its slurmstepd has finished tidying up."""
        return bool(_slurmstepd_pids(job_id))

    def job_ids(self) -> set[str]:
        """Every job slurmctld knows (finished ones for MinJobAge, 300 s)."""
        return set(re.findall(r"^JobId=(\d+)", self.scontrol("show", "job", "-o"), re.MULTILINE))

    def node_addr(self, node: str) -> str:
        """The address a node is reached at (its NodeAddr; the node name by default)."""
        return re.search(r"NodeAddr=(\S+)", self.scontrol("show", "node", "-o", node)).group(1)

    def logs(self) -> str:
        """The end of every daemon log, for a failure message."""
        return _log_tails(self.root)


# Debian puts the daemons in /usr/sbin, which a non-root PATH may lack.
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def missing_tools() -> list[str]:
    return [tool for tool in REQUIRED if shutil.which(tool, path=SEARCH_PATH) is None]


def _free_ports(count: int) -> list[int]:
    """Ports free now on 127.0.0.1 (all held open together, so they differ)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _slurmstepd_pids(job_id: str = "") -> set[int]:
    """slurmstepd processes on this host (`slurmstepd: [J.batch]`, `[J.0]`, ...), of one job's
    steps if `job_id` is given."""
    prefix = f"slurmstepd: [{job_id}." if job_id else "slurmstepd"
    pids = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if (proc / "cmdline").read_bytes().startswith(prefix.encode()):
                    pids.add(int(proc.name))
    return pids


def _log_tails(root: Path, lines: int = 15) -> str:
    """The end of every daemon log (the temp dir goes with the cluster)."""
    out = []
    for path in sorted([*root.glob("log/*"), *root.glob("munge/*.log")]):
        tail = path.read_text(errors="replace").splitlines()[-lines:]
        out.append(f"--- {path.name}\n" + "\n".join(tail))
    return "\n".join(out)


def _wait_until(check, timeout: float, what: str, procs: list[subprocess.Popen], root: Path):
    deadline = time.monotonic() + timeout
    while not check():
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{proc.args[0]} exited with {proc.returncode}:\n{_log_tails(root)}"
                )
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} within {timeout}s:\n{_log_tails(root)}")
        time.sleep(0.2)


def _node_lines(names: list[str], ports: list[int], cpus: int, gpus: int, memory: int) -> str:
    """One node: this host under its own name. Several: emulated nodes n1, n2, ... on this host,
    each with its own slurmd port, all at NodeAddr 127.0.0.1; their names resolve nowhere, as
    a job must cope with (it finds the first node's address with `scontrol show node`)."""
    if len(names) == 1:
        return f"NodeName={names[0]} CPUs={cpus} Gres=gpu:{gpus} RealMemory={memory} State=UNKNOWN"
    return "\n".join(
        f"NodeName={name} NodeHostname={name} NodeAddr=127.0.0.1 Port={port} CPUs={cpus} "
        f"Gres=gpu:{gpus} RealMemory={memory // len(names)} State=UNKNOWN"
        for name, port in zip(names, ports, strict=True)
    )


@contextlib.contextmanager
def slurm_cluster(nodes: int = 1, cpus: int = 2, gpus: int = 2) -> Iterator[SlurmCluster]:
    """`nodes` nodes (one slurmd each, all on this host) of `cpus` CPUs, each with `gpus` GPUs
    that SLURM counts but that do not exist (no device files: a job asking for them runs on the
    CPU), enough to check what a job asks for. `cpus` may be up to this host's CPUs on every
    node: each slurmd reports the whole host. Fails (never skips) without SLURM."""
    missing = missing_tools()
    if missing:
        raise RuntimeError(f"SLURM is not installed ({', '.join(missing)} missing): {INSTALL_HINT}")
    root = Path(tempfile.mkdtemp(prefix="capsdist-slurm-"))
    root.chmod(0o755)  # munged wants every directory above its socket a+x; mkdtemp gives 0700
    host = socket.gethostname().split(".")[0]
    names = [host] if nodes == 1 else [f"n{index + 1}" for index in range(nodes)]
    hw = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    memory = int(re.search(r"RealMemory=(\d+)", hw).group(1))
    for sub in ("munge", "state", "log", "run", *(f"spool/{name}" for name in names)):
        (root / sub).mkdir(parents=True)
    (root / "munge").chmod(0o755)
    ctld_port, *slurmd_ports = _free_ports(1 + nodes)
    # gres/gpu counts device files: empty regular files stand in for /dev/nvidia*.
    gres = []
    for name in names:
        files = [root / f"fake-gpu-{name}-{index}" for index in range(gpus)]
        for file in files:
            file.touch()
        gres.append(f"NodeName={name} Name=gpu File={','.join(map(str, files))}")
    (root / "gres.conf").write_text("\n".join(gres) + "\n")
    conf = root / "slurm.conf"
    conf.write_text(
        SLURM_CONF.format(
            host=host,
            user=getpass.getuser(),
            ctld_port=ctld_port,
            slurmd_port=slurmd_ports[0],
            d=root,
            first_job_id=random.randint(1, 1_000_000),
            nodes=_node_lines(names, slurmd_ports, cpus, gpus, memory),
        )
    )
    env = {**os.environ, "SLURM_CONF": str(conf), "PATH": SEARCH_PATH}
    cluster = SlurmCluster(root, env, names)
    steps_before = _slurmstepd_pids()
    procs: list[subprocess.Popen] = []
    daemon_log = open(root / "log" / "daemons.out", "w")  # noqa: SIM115 (closed in finally)

    def start(*command: str) -> None:
        procs.append(subprocess.Popen(command, env=env, stdout=daemon_log, stderr=daemon_log))

    try:
        key = root / "munge" / "munge.key"
        subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True)
        key.chmod(0o600)
        socket_path = root / "munge" / "munge.socket.2"
        start(
            "munged",
            "--foreground",
            f"--socket={socket_path}",
            f"--key-file={key}",
            f"--pid-file={root}/munge/munged.pid",
            f"--log-file={root}/munge/munged.log",
            f"--seed-file={root}/munge/munged.seed",
        )
        _wait_until(socket_path.exists, 30, "munged made no socket", procs, root)
        start("slurmctld", "-D")
        for name in names:
            start("slurmd", "-D", "-N", name)

        def all_idle() -> bool:
            out = subprocess.run(
                ["sinfo", "-h", "-N", "-o", "%t"], env=env, capture_output=True, text=True
            )
            states = out.stdout.split()
            refused = [state for state in states if state.startswith(("drain", "inval", "down"))]
            if refused:
                raise RuntimeError(f"slurmctld refused a node ({refused}):\n{_log_tails(root)}")
            return states == ["idle"] * nodes

        _wait_until(all_idle, 120, "the nodes did not become idle", procs, root)
        yield cluster
    finally:
        _teardown(env, procs, steps_before)
        daemon_log.close()
        shutil.rmtree(root, ignore_errors=True)


def _teardown(env: dict[str, str], procs: list[subprocess.Popen], steps_before: set[int]) -> None:
    """Cancel every job and let slurmd end its steps (a slurmd stopped first orphans its
    slurmstepd, which then ignores SIGTERM), then stop the daemons, newest first. Raises if a
    slurmstepd this cluster started is still alive."""
    if len(procs) >= 2:  # slurmctld is up: it can cancel
        subprocess.run(["scancel", f"--user={getpass.getuser()}"], env=env, capture_output=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            out = subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True)
            if out.returncode != 0 or not out.stdout.strip():
                break
            time.sleep(0.2)
    deadline = time.monotonic() + 60
    while _slurmstepd_pids() - steps_before and time.monotonic() < deadline:
        time.sleep(0.2)
    for proc in reversed(procs):  # slurmd, slurmctld, then munged
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    left = _slurmstepd_pids() - steps_before
    if left:
        raise RuntimeError(f"slurmstepd left running after teardown: pids {sorted(left)}")
