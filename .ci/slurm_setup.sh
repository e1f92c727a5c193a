#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the launcher's end-to-end test.
#
# Installs munge, slurmctld and slurmd (Debian packages) when missing, writes a
# minimal slurm.conf (one node = this host, its CPUs, no GPUs, no cgroups:
# proctrack/linuxproc, task/none, select/cons_tres) and starts the three
# daemons. Idempotent: when `sinfo` already answers with the node idle it only
# checks and returns (well under a second). Needs root (apt-get, daemons).
#
#   bash .ci/slurm_setup.sh          # install + start; exit 0 when sinfo answers
#   RECIPEC_SLURM_RESET=1 bash ...   # rewrite slurm.conf and restart the daemons
set -euo pipefail

log() { echo "slurm_setup: $*" >&2; }

if [[ $(id -u) != 0 ]]; then
    log "needs root (apt-get install, munged/slurmctld/slurmd); skipping"
    exit 1
fi

HOST=$(hostname -s)
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf

node_ready() {
    command -v sinfo >/dev/null 2>&1 || return 1
    local state
    state=$(timeout 5 sinfo -h -n "$HOST" -o '%t' 2>/dev/null | head -n 1) || return 1
    [[ $state == idle* || $state == mix* || $state == alloc* ]]
}

# slurm.conf: one node, this host, CPUs and memory as slurmd sees them.
CPUS=$(nproc)
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
WANT=$(cat <<CONF
# written by recipec .ci/slurm_setup.sh: a one-node cluster for tests
ClusterName=recipec
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# job credentials live 10 s (default 120): a requeued job may restart after ~11 s instead of ~2 min
AuthInfo=cred_expire=10
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=/var/log/slurm/jobcomp.log
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
MinJobAge=300
KillWait=30
Waittime=0
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
)
if [[ -z ${RECIPEC_SLURM_RESET:-} ]] && [[ -f $CONF ]] && [[ "$(cat "$CONF")" == "$WANT" ]] && node_ready; then
    log "already running ($(sinfo -h -o '%P %D %t %c' | head -n 1))"
    exit 0
fi

# 1. Packages (only when missing; apt-get update only then, too).
if ! command -v slurmctld >/dev/null 2>&1 || ! command -v slurmd >/dev/null 2>&1 || ! command -v munged >/dev/null 2>&1 \
        || ! command -v sbatch >/dev/null 2>&1; then
    log "installing slurmctld slurmd munge slurm-client"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi

# 2. munge: a key and the daemon.
if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating /etc/munge/munge.key"
    mkdir -p /etc/munge
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
mkdir -p /run/munge /var/lib/munge /var/log/munge
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
chmod 0700 /etc/munge /var/lib/munge /var/log/munge
chmod 0400 /etc/munge/munge.key
chmod 0755 /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "starting munged"
    stop_munged() { [[ -s $1 ]] && kill "$(cat "$1")" 2>/dev/null || true; }
    stop_munged /run/munge/munged.pid
    su -s /bin/sh munge -c "/usr/sbin/munged --force" || /usr/sbin/munged --force
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n | unmunge >/dev/null
fi

# 3. slurm.conf and the directories the daemons use
mkdir -p "$CONF_DIR" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/slurm
CHANGED=0
if [[ ! -f $CONF ]] || [[ "$(cat "$CONF")" != "$WANT" ]]; then
    log "writing $CONF (node $HOST, CPUs=$CPUS, RealMemory=$MEM_MB)"
    printf '%s\n' "$WANT" > "$CONF"
    CHANGED=1
fi
# cgroup.conf is read by some plugins even when unused; keep it inert.
[[ -f $CONF_DIR/cgroup.conf ]] || printf 'CgroupPlugin=autodetect\nIgnoreSystemd=yes\n' > "$CONF_DIR/cgroup.conf"

running() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_pidfile() {
    if running "$1"; then
        kill "$(cat "$1")" 2>/dev/null || true
        for _ in $(seq 50); do running "$1" || break; sleep 0.1; done
    fi
}

if [[ $CHANGED == 1 || -n ${RECIPEC_SLURM_RESET:-} ]]; then
    stop_pidfile /run/slurm/slurmd.pid
    stop_pidfile /run/slurm/slurmctld.pid
fi

# 4. Daemons. -c: clear old state (a fresh controller each start, no stale jobs).
if ! running /run/slurm/slurmctld.pid; then
    log "starting slurmctld"
    /usr/sbin/slurmctld -c -i
fi
for _ in $(seq 100); do timeout 2 scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
if ! running /run/slurm/slurmd.pid; then
    log "starting slurmd"
    /usr/sbin/slurmd
fi

# 5. Wait for the node to come up; bring it back if an earlier run left it down.
for i in $(seq 150); do
    node_ready && break
    if (( i % 25 == 0 )); then
        scontrol update NodeName="$HOST" State=RESUME 2>/dev/null || true
    fi
    sleep 0.2
done
if ! node_ready; then
    log "node $HOST did not become idle; sinfo says:"
    sinfo -N -l >&2 || true
    tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
    exit 1
fi
log "ready: $(sinfo -h -o '%P %D %t %c' | head -n 1)"
