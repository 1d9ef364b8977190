"""A real, throw-away Slurm cluster on localhost for the tests: one slurmctld and two slurmd
daemons emulating nodes n1 and n2, everything (conf, state, spool, logs, pid files) under a
pytest tmp directory. Facts behind each choice: /work/shared/notes/slurm-local.md ("the notes").

Use it from a test module with `pytest_plugins = ["slurm_cluster"]` and take `slurm_cluster` as
an argument. A plugin is registered once, so all modules share one cluster per session
(`from slurm_cluster import slurm_cluster` would instead start one per importing module).
The fixture skips where Slurm is not installed and fails loudly (with the daemons' log tails)
where it is installed but the cluster does not come up.

The node names n1/n2 do not resolve as host names; `scontrol show node n1` prints NodeAddr."""

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

NODES = ["n1", "n2"]
DAEMONS = ("slurmctld", "slurmd", "sbatch")
UP_TIMEOUT_S = 30


@dataclass
class SlurmCluster:
    conf: Path                      # the slurm.conf the daemons and clients use
    env: dict                       # os.environ plus SLURM_CONF: pass to anything that talks to Slurm
    log_dir: Path                   # slurmctld.log, slurmd-n1.log, ... (plus daemons' stderr)
    nodes: list = field(default_factory=lambda: list(NODES))
    startup_s: float = 0.0          # seconds from starting the daemons to both nodes idle

    def run(self, *args, **kw) -> subprocess.CompletedProcess:
        """Run a client command (sbatch, squeue, scontrol, scancel, sinfo; no sacct here)."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("timeout", 120)
        kw.setdefault("env", self.env)
        return subprocess.run([str(a) for a in args], **kw)

    def log_tails(self, lines: int = 25) -> str:
        """The last lines of each daemon's log file, or of its stderr where it never opened one
        (under -D, stderr repeats the log). The PMIx lines are harmless noise (the notes)."""
        parts = []
        for stem in sorted({p.stem for p in self.log_dir.iterdir()}):
            log = self.log_dir / f"{stem}.log"
            if not log.exists() or not log.stat().st_size:
                log = self.log_dir / f"{stem}.stderr"
            text = [l for l in log.read_text(errors="replace").splitlines() if "pmix" not in l.lower()]
            parts.append(f"--- {log.name} (last {min(lines, len(text))} lines) ---\n" + "\n".join(text[-lines:]))
        return "\n".join(parts)


def _free_ports(n: int) -> list[int]:
    """Ports the kernel calls free right now (all held at once, so they are distinct)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _node_hardware() -> str:
    """`slurmd -C` prints this machine's node line; keep CPUs/Boards/Sockets/Cores/Threads and
    declare RealMemory below the real memory (a node reporting less than declared is drained)."""
    line = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    keys = dict(item.split("=", 1) for item in line.split())
    hw = " ".join(f"{k}={keys[k]}" for k in ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore"))
    return f"{hw} RealMemory={max(1, int(keys['RealMemory']) // 2)}"


def _write_conf(root: Path, log_dir: Path) -> Path:
    host = socket.gethostname().split(".")[0]  # `hostname -s`
    ctld_port, *node_ports = _free_ports(1 + len(NODES))
    hw = _node_hardware()
    nodes = "\n".join(f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} {hw} State=UNKNOWN"
                      for name, port in zip(NODES, node_ports))
    conf = root / "slurm.conf"
    conf.write_text(f"""\
ClusterName=pytest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
# Test-only: no authentication at all (and no munged to run). Never for a real cluster.
AuthType=auth/none
CredType=cred/none
# A requeued job may start again after 10 s instead of ~120 s (the notes, "slurm.conf keys").
AuthInfo=cred_expire=10
# No cgroups on the test machine.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# `sbatch --wait` polls every 2 s with this; with the default 300 a 1 s job takes ~10 s.
MinJobAge=5
# Main scheduler every 2 s (default 60): a requeued job, once cred_expire has passed, otherwise
# waits up to a minute for the next scheduling pass (measured: 12 s from requeue to rerun, not 26-57).
SchedulerParameters=sched_interval=2
# A node that went DOWN (say, its slurmd restarted) returns by itself once it registers again.
ReturnToService=2
MailProg=/bin/true
# Nothing under /run, /var/log or /var/spool: the daemons run with -D, which writes no pid file,
# but the pid paths are set anyway so they never point at a system Slurm's.
StateSaveLocation={root}/state
SlurmctldPidFile={root}/slurmctld.pid
SlurmctldLogFile={log_dir}/slurmctld.log
# %n = node name: two slurmd on one machine need their own spool dir, pid and log file.
SlurmdSpoolDir={root}/spool/%n
SlurmdPidFile={root}/slurmd-%n.pid
SlurmdLogFile={log_dir}/slurmd-%n.log
{nodes}
PartitionName=debug Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
""")
    return conf


def _node_states(cluster: SlurmCluster) -> dict:
    out = cluster.run("sinfo", "-h", "-N", "-o", "%N %t", timeout=10).stdout
    return dict(line.split() for line in out.splitlines() if len(line.split()) == 2)


def _stop(procs: list) -> None:
    """SIGTERM, then SIGKILL after a few seconds; `wait` so no zombie stays behind."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _leftovers(conf: Path) -> list[int]:
    """Live processes of this cluster: the daemons got SLURM_CONF=<conf> from cluster.env and pass
    it to slurmstepd, jobs inherit it from sbatch's environment. Zombies (empty environ) do not
    count; nor does pytest's own session, in case a test put SLURM_CONF into os.environ."""
    marker, pids = f"\0SLURM_CONF={conf}\0".encode(), []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker in b"\0" + (proc / "environ").read_bytes() \
                    and os.getsid(int(proc.name)) != os.getsid(0):
                pids.append(int(proc.name))
        except OSError:  # gone meanwhile, or not ours to read
            pass
    return pids


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    missing = [b for b in DAEMONS if shutil.which(b) is None]
    if missing:
        pytest.skip(f"Slurm not installed ({', '.join(missing)} not on PATH)")
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster runs its daemons as root (SlurmUser=root)")

    root = tmp_path_factory.mktemp("slurm")
    log_dir = root / "log"
    for d in [log_dir, root / "state", *(root / "spool" / n for n in NODES)]:
        d.mkdir(parents=True)  # slurmd does not create its spool dir (the notes)
    conf = _write_conf(root, log_dir)
    cluster = SlurmCluster(conf=conf, env={**os.environ, "SLURM_CONF": str(conf)}, log_dir=log_dir)

    # -D keeps each daemon in the foreground as our child: we hold its pid without reading pid
    # files, see at once if it dies, and can reap it. New session: a Ctrl-C at the terminal
    # reaches pytest (which then tears down), not the daemons directly.
    # Their stderr (to log_dir/*.stderr) is where a fatal config error shows before logging starts.
    def start(name, *args):
        with open(log_dir / f"{name}.stderr", "w") as out:
            return subprocess.Popen([*args, "-D", "-f", str(conf)], env=cluster.env, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    ctld = start("slurmctld", "slurmctld", "-i")  # -i: ignore (empty) saved state
    slurmds = []
    try:
        slurmds = [start(f"slurmd-{n}", "slurmd", "-N", n) for n in NODES]
        daemons = dict(zip(["slurmctld", *(f"slurmd -N {n}" for n in NODES)], [ctld, *slurmds]))
        t0, states = time.monotonic(), {}
        while time.monotonic() - t0 < UP_TIMEOUT_S:
            dead = [name for name, p in daemons.items() if p.poll() is not None]
            if dead:  # pytrace=False: the message (with the logs) is the useful part, not our code
                pytest.fail(f"Slurm daemon(s) exited during start-up: {dead}\n{cluster.log_tails()}", pytrace=False)
            states = _node_states(cluster)
            if all(states.get(n) == "idle" for n in NODES):
                break
            time.sleep(0.25)
        else:
            pytest.fail(f"Slurm nodes not idle after {UP_TIMEOUT_S} s (sinfo: {states})\n{cluster.log_tails()}",
                        pytrace=False)
        cluster.startup_s = round(time.monotonic() - t0, 2)
        yield cluster
    finally:
        # Cancel every job and wait (bounded) for the queue to drain: slurmstepd processes outlive
        # a stopped slurmd, so jobs should end while slurmd can still kill their steps. A job
        # that traps SIGTERM stays for KillWait (30 s; scancel --signal=KILL is no quicker, Slurm
        # treats it as a cancel): after 10 s the sweep below deals with it instead.
        try:
            if ctld.poll() is None:
                cluster.run("scancel", "--user", "root", timeout=10)
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and cluster.run("squeue", "-h", timeout=10).stdout.strip():
                    time.sleep(0.5)
        except subprocess.TimeoutExpired:
            pass  # a hung slurmctld: the daemons are stopped below all the same
        _stop(slurmds)  # slurmd first, then slurmctld (the notes, "Starting and stopping")
        _stop([ctld])
        # With the daemons gone, whatever still carries our SLURM_CONF (a stubborn step, a
        # slurmstepd finishing up) is a straggler: SIGKILL it, so nothing outlives the session.
        deadline = time.monotonic() + 5
        while (left := _leftovers(conf)) and time.monotonic() < deadline:
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
