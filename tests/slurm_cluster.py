"""A real single-node SLURM cluster for the tests: munged, slurmctld and slurmd as root on localhost.

Installs Debian's packages when they are missing (root only); anything that makes a cluster impossible
becomes a visible pytest skip, never a silent pass.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("slurmctld", "slurmd", "sbatch", "sinfo", "munged")
MUNGE_SOCKET_DIR = Path("/run/munge")

SLURM_CONF = """\
ClusterName=promptbench-test
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
InactiveLimit=0
KillWait=5
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ensure_installed() -> None:
    if all(shutil.which(b) or Path(f"/usr/sbin/{b}").exists() for b in BINARIES):
        return
    if os.geteuid() != 0:
        pytest.skip("SLURM test skipped: slurm/munge are not installed and installing them needs root")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
        if result.returncode != 0:
            pytest.skip(f"SLURM test skipped: `{' '.join(command)}` failed: {result.stderr[-500:]}")


def _ensure_munged() -> None:
    if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode == 0:
        return
    MUNGE_SOCKET_DIR.mkdir(parents=True, exist_ok=True)
    shutil.chown(MUNGE_SOCKET_DIR, "munge", "munge")
    if not Path("/etc/munge/munge.key").exists():
        subprocess.run(["/usr/sbin/mungekey", "--create"], check=True)
        shutil.chown("/etc/munge/munge.key", "munge", "munge")
    subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    def start(self) -> "SlurmCluster":
        if os.geteuid() != 0:
            pytest.skip("SLURM test skipped: running slurmctld/slurmd as a test cluster needs root")
        _ensure_installed()
        _ensure_munged()
        for sub in ("state", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        memory_mb = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.8)
        self.conf.write_text(SLURM_CONF.format(root=self.root, ctld_port=_free_port(), slurmd_port=_free_port(),
                                               cpus=os.cpu_count() or 1, memory_mb=memory_mb))
        subprocess.run(["/usr/sbin/slurmctld", "-c", "-f", str(self.conf)], check=True, env=self.env)
        subprocess.run(["/usr/sbin/slurmd", "-N", "localhost", "-f", str(self.conf)], check=True, env=self.env)
        deadline = time.time() + 60
        while time.time() < deadline:
            state = self.run("sinfo", "-h", "-o", "%t").stdout.strip()
            if state.startswith("idle"):
                return self
            time.sleep(0.5)
        self.stop()
        pytest.fail(f"test SLURM cluster did not come up; slurmctld log:\n{(self.root / 'slurmctld.log').read_text()[-2000:]}")

    def run(self, *command: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(command), capture_output=True, text=True, env=self.env, timeout=60)

    def jobs(self) -> list[str]:
        return self.run("squeue", "-h", "-o", "%i %T").stdout.split("\n")

    def stop(self) -> None:
        self.run("scancel", "--full", "-u", "root")
        for daemon in ("slurmd", "slurmctld"):
            pid_file = self.root / f"{daemon}.pid"
            if pid_file.exists():
                try:
                    os.kill(int(pid_file.read_text().strip()), 15)
                except (ProcessLookupError, ValueError):
                    pass
