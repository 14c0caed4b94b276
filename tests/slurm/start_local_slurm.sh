#!/usr/bin/env bash
# A one-node SLURM on localhost (controller + node daemon) for tests/test_slurm_sweep.py and CI.
#   eval "$(tests/slurm/start_local_slurm.sh)"    # then sbatch/squeue/sinfo talk to it
# Installs Debian's slurm-wlm when it is missing (root and the network needed: without them this
# fails, it never skips), writes slurm.conf and the daemons' state under $LMJAX_SLURM_DIR (default
# /tmp/lmjax-slurm), starts slurmctld and slurmd and waits until the node takes jobs. Idempotent:
# when that SLURM already answers it only prints. Its last line on stdout is `export SLURM_CONF=...`.
# No accounting database, no cgroups (proctrack/linuxproc, task/none): it runs in containers.
# Stop it with: kill $(cat "$LMJAX_SLURM_DIR"/slurmctld.pid "$LMJAX_SLURM_DIR"/slurmd.pid)
set -euo pipefail
dir=${LMJAX_SLURM_DIR:-/tmp/lmjax-slurm}
export SLURM_CONF=$dir/slurm.conf

node_state() { sinfo --noheader --nodes=localhost --format=%t 2>/dev/null || true; }
# Our daemon $1 is alive: its pid file names a live (not zombie) process of that name.
running() {
  local pid
  pid=$(cat "$dir/$1.pid" 2>/dev/null) || return 1
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$pid/status"
}
# Both daemons alive (the controller notices a dead slurmd only minutes later) and the node taking jobs.
ready() {
  [ -f "$SLURM_CONF" ] && command -v sbatch >/dev/null && running slurmctld && running slurmd \
    && [[ "$(node_state)" =~ ^(idle|mix|alloc)$ ]]
}

if ready; then
  echo "export SLURM_CONF=$SLURM_CONF"
  exit 0
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null; then
  if [ "$(id -u)" != 0 ]; then
    echo "error: slurm-wlm is not installed, and installing it (apt-get) needs root" >&2
    exit 1
  fi
  echo "installing slurm-wlm (apt-get)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >&2
  apt-get install -y -q --no-install-recommends slurm-wlm >&2
fi

# A half-started SLURM from an earlier attempt: stop it (only the daemons whose pid files are ours).
for daemon in slurmd slurmctld; do
  if running "$daemon"; then
    kill "$(cat "$dir/$daemon.pid")"
  fi
done
sleep 1
mkdir -p "$dir/state" "$dir/spool"

# The node as this machine has it: fewer CPUs or less memory than configured would drain it.
cpus=$(nproc)
memory_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 8 / 10 ))
# auth/none: no munge key or munged to manage (Slurm 22.05 still ships the plugin). Ports off the
# defaults, so a SLURM already on this machine is left alone.
cat > "$SLURM_CONF" <<CONF
ClusterName=lmjax-test
SlurmctldHost=localhost
SlurmctldPort=16817
SlurmdPort=16818
AuthType=auth/none
CredType=cred/none
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
KillWait=60
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory_mb State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF

# -c: a clean controller state (no jobs left from an earlier test session).
slurmctld -c </dev/null >>"$dir/slurmctld.out" 2>&1
slurmd -N localhost </dev/null >>"$dir/slurmd.out" 2>&1

for _ in $(seq 60); do
  if ready; then
    echo "export SLURM_CONF=$SLURM_CONF"
    exit 0
  fi
  sleep 1
done
echo "error: the local SLURM did not come up within 60 s (node state: '$(node_state)'); logs:" >&2
tail -n 20 "$dir/slurmctld.log" "$dir/slurmd.log" >&2 || true
exit 1
