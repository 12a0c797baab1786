"""A real single-host Slurm for the `slurm` tests: munged, slurmctld and two slurmd (nodes n1, n2 in
multiple-slurmd mode) from Debian's packages, with their own key, socket, ports, state and logs under a
temporary directory, started and stopped by pid (no systemd).

    def test_x(slurm):                    # session-scoped; skips unless root with the binaries installed
        job = slurm.sbatch([script, ...], cwd=tmp, wait=True)   # job id; SLURM_CONF points at our cluster
        slurm.job(job)["JobState"]        # fields of `scontrol show job -o`

Nothing here touches a system Slurm or munge: every daemon gets our slurm.conf (SLURM_CONF) and our
munge socket (AuthInfo=socket=...); processes left behind by jobs are found by that SLURM_CONF in their
environment and killed by pid at teardown.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel", "squeue")
NODES = ("n1", "n2")
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
         "PREEMPTED")
CPUS_PER_NODE = 4  # more than the host has: tests oversubscribe on purpose (config_overrides)


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def missing_reason() -> str | None:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "the local Slurm cluster needs root (slurmd runs jobs as their user); .ci/run installs it as root"
    missing = [b for b in DAEMONS if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]
    if missing:
        return (f"Slurm/munge binaries missing ({', '.join(missing)}); "
                "install with: apt-get install slurmctld slurmd slurm-client munge")
    return None


def _which(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = root
        self.host = socket.gethostname().split(".")[0]
        self.conf = root / "etc" / "slurm.conf"
        self.munge_socket = root / "munge" / "munge.socket"
        self.procs: dict[str, subprocess.Popen] = {}
        base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
        self.env = {**base, "SLURM_CONF": str(self.conf)}

    # --- set-up -------------------------------------------------------------------------------------------
    def write_config(self) -> None:
        r = self.root
        os.chmod(r, 0o755)  # munged wants every directory above its socket searchable by all
        for d in ("etc", "munge", "state", "log", "tmp", *(f"spool/{n}" for n in NODES)):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o755)  # munged refuses a socket directory writable by others
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        ctld_port, *node_ports = _free_ports(1 + len(NODES))
        nodes = "\n".join(
            f"NodeName={n} NodeHostname={self.host} NodeAddr=127.0.0.1 Port={p} CPUs={CPUS_PER_NODE} "
            f"RealMemory=2000 State=UNKNOWN" for n, p in zip(NODES, node_ports))
        self.conf.write_text(f"""\
ClusterName=meshtrontest
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
PlugStackConfig={r}/etc/plugstack.conf
TmpFS={r}/tmp
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=batch_sched_delay=0
SlurmdParameters=config_overrides
JobRequeue=1
ReturnToService=2
MpiDefault=none
SwitchType=switch/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
InactiveLimit=0
KillWait=10
MinJobAge=600
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        (r / "etc" / "plugstack.conf").write_text("")

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.console", "wb")
        self.procs[name] = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()

    def start(self) -> None:
        r = self.root
        self._spawn("munged", [_which("munged"), "-F", f"--socket={self.munge_socket}",
                               f"--key-file={r}/munge/munge.key", f"--pid-file={r}/munge/munged.pid",
                               f"--log-file={r}/log/munged.log", f"--seed-file={r}/munge/munged.seed"])
        self._wait_for(lambda: self.munge_socket.exists(), "munged's socket")
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._wait_for(lambda: self.run(["scontrol", "ping"], check=False).stdout.count("UP") >= 1,
                       "slurmctld to answer")
        for n in NODES:
            self._spawn(f"slurmd-{n}", [_which("slurmd"), "-D", "-N", n, "-f", str(self.conf)])
        self._wait_for(self._nodes_idle, "both nodes to be idle")

    def _nodes_idle(self) -> bool:
        out = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False).stdout.split()
        states = dict(zip(out[::2], out[1::2]))
        return all(states.get(n) == "idle" for n in NODES)

    def _wait_for(self, ready, what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode} while waiting for {what}:\n"
                                       + self.logs())
            if ready():
                return
            time.sleep(0.2)
        raise TimeoutError(f"timed out waiting for {what}:\n" + self.logs())

    # --- use ----------------------------------------------------------------------------------------------
    def run(self, cmd: list[str], check: bool = True, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, env={**self.env, **(env or {})}, capture_output=True, text=True,
                              timeout=kw.pop("timeout", 600), **kw)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def sbatch(self, args: list[str], cwd: Path, env: dict | None = None, wait: bool = False,
               timeout: float = 300) -> int:
        """Submits (with --parsable); returns the job id, with wait=True once the job has ended.

        Not `sbatch --wait`: it polls after 2 s, 8 s, then every 32 s, so a 10 s job returns after 42 s."""
        proc = self.run(["sbatch", "--parsable", *args], cwd=cwd, env=env, check=False)
        job = proc.stdout.strip().splitlines()[0].split(";")[0] if proc.stdout.strip() else ""
        if not job.isdigit() or proc.returncode != 0:
            raise AssertionError(f"sbatch {' '.join(args)} -> {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        if wait:
            self.wait_job(int(job), lambda f: f["JobState"] in ENDED, timeout=timeout)
        return int(job)

    def job(self, job_id: int) -> dict[str, str]:
        out = self.run(["scontrol", "show", "job", "-o", str(job_id)]).stdout.strip()
        return dict(f.split("=", 1) for f in out.split() if "=" in f)

    def wait_job(self, job_id: int, until, timeout: float = 300, poll: float = 0.5) -> dict[str, str]:
        """Polls `scontrol show job` until until(fields) is true; returns the fields."""
        deadline = time.monotonic() + timeout
        fields = {}
        while time.monotonic() < deadline:
            fields = self.job(job_id)
            if until(fields):
                return fields
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} did not get there in {timeout} s: {fields}")

    def job_log(self, job_id: int, cwd: Path, tail: int | None = None) -> str:
        """The job's output files (the template writes logs/<name>-<id>.out under the submit directory)."""
        logs = sorted(cwd.glob(f"**/*-{job_id}.out"))
        text = "\n".join(f"--- {p}\n{p.read_text(errors='replace')}" for p in logs) or "(no job output)"
        return text[-tail:] if tail else text

    def logs(self) -> str:
        parts = []
        for p in sorted((self.root / "log").iterdir()):
            parts.append(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)

    # --- tear-down ----------------------------------------------------------------------------------------
    def stop(self) -> None:
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run(["scancel", "--full", "--signal=KILL", "--partition=debug"], check=False, timeout=30)
            self.run(["scancel", "--partition=debug"], check=False, timeout=30)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                live = self.run(["squeue", "-h", "-t", "PD,R,CG,S,RQ,RS,RH,RD", "-o", "%i"], check=False)
                if not live.stdout.split():
                    break
                time.sleep(0.5)
        for name in [n for n in self.procs if n.startswith("slurmd")] + ["slurmctld", "munged"]:
            p = self.procs.get(name)
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=30)
            if name == "slurmctld":
                self._kill_leftovers()  # slurmstepd and job processes: after slurmd, before munged

    def _kill_leftovers(self) -> None:
        """Processes that still carry our SLURM_CONF (slurmstepd, job tasks), killed by pid."""
        marker = f"SLURM_CONF={self.conf}".encode()
        spare = {os.getpid()} | {p.pid for p in self.procs.values() if p.poll() is None}
        for _ in range(2):
            found = []
            for d in Path("/proc").iterdir():
                if not d.name.isdigit() or int(d.name) in spare:
                    continue
                try:
                    if marker in (d / "environ").read_bytes().split(b"\0"):
                        found.append(int(d.name))
                except OSError:
                    continue
            for pid in found:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if not found:
                return
            time.sleep(0.5)


@pytest.fixture(scope="session")
def slurm():
    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="meshtron-slurm-", dir="/tmp"))  # short: unix socket paths <= 107
    cluster = SlurmCluster(root)
    try:
        cluster.write_config()
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        if os.environ.get("MESHTRON_KEEP_SLURM_DIR"):
            print(f"slurm test cluster kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
