#!/usr/bin/env bash
# Start a one-node SLURM cluster (munged + slurmctld + slurmd) for running SLURM tests locally.
# Run as root on Debian. Usage: start_local_cluster.sh [STATE_DIR]
# STATE_DIR defaults to $SLURM_TEST_DIR or /tmp/slurm-test; re-running restarts the daemons.
# SLURM_TEST_BIND_CORES=1 binds each task to its cores (TaskPlugin=task/affinity,
# TaskPluginParam=Cores), as sites that pin CPUs run; the default binds nothing (task/none).
set -euo pipefail

DIR=$(realpath -m "${1:-${SLURM_TEST_DIR:-/tmp/slurm-test}}")
CONF=$DIR/slurm.conf
HOST=$(hostname -s)
export SLURM_CONF=$CONF

[[ $EUID -eq 0 ]] || { echo "must run as root" >&2; exit 1; }

fail() {
    echo "ERROR: $*" >&2
    for f in "$DIR"/log/*.log; do [[ -f $f ]] && { echo "--- $f" >&2; tail -n 30 "$f" >&2; }; done
    exit 1
}

# --- 1. packages ------------------------------------------------------------
if ! { command -v slurmctld && command -v slurmd && command -v munged; } >/dev/null; then
    # Another apt run (e.g. a provisioning step logging to /tmp/apt.log) may hold the dpkg lock.
    for _ in $(seq 600); do
        fuser /var/lib/dpkg/lock-frontend /var/lib/dpkg/lock /var/lib/apt/lists/lock >/dev/null 2>&1 || break
        sleep 1
    done
    apt-get -o DPkg::Lock::Timeout=600 update
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y slurm-wlm munge
fi

# --- 2. munge ---------------------------------------------------------------
if [[ ! -s /etc/munge/munge.key ]]; then
    install -d -o munge -g munge -m 700 /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
fi
if ! pgrep -x -u munge munged >/dev/null; then
    # No systemd here, so create what the unit's RuntimeDirectory= would.
    install -d -o munge -g munge -m 755 /run/munge
    install -d -o munge -g munge -m 700 /var/log/munge /var/lib/munge
    runuser -u munge -- /usr/sbin/munged
fi
for _ in $(seq 20); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.5; done
munge -n | unmunge >/dev/null || fail "munge does not work"

# --- 3. slurm.conf ----------------------------------------------------------
"$(dirname "$0")/stop_local_cluster.sh" "$DIR" >/dev/null 2>&1 || true
mkdir -p "$DIR"/{state,spool,run,log}
rm -f "$DIR"/log/*.log  # so that the tail printed on failure is from this run
# A cluster from another state folder on the same ports would answer our sinfo/srun and fake success.
if command -v ss >/dev/null && [[ -n $(ss -ltnH '( sport = :6817 or sport = :6818 )') ]]; then
    fail "ports 6817/6818 are in use (slurm from another state folder running?); stop it first"
fi

CPUS=$(nproc)
if [[ ${SLURM_TEST_BIND_CORES:-0} == 1 ]]; then
    TASK_PLUGIN=$'TaskPlugin=task/affinity\nTaskPluginParam=Cores'
else
    TASK_PLUGIN=TaskPlugin=task/none
fi
# slurmd drains the node if RealMemory exceeds what it detects, so leave some headroom.
MEM=$(awk '/^MemTotal/ {m = int($2 / 1024); print (m > 2048 ? m - 512 : int(m * 0.9))}' /proc/meminfo)

cat >"$CONF" <<EOF
ClusterName=test
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
$TASK_PLUGIN
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without a default, every job would claim the whole node's memory and jobs would run one at a time.
DefMemPerCPU=1024
ReturnToService=2
JobRequeue=1
MinJobAge=300
# Fast scancel / time-limit kill; enforce limits exactly (tests rely on timeouts).
KillWait=5
OverTimeLimit=0
InactiveLimit=0
# A requeued job may only restart after the credential lifetime (default 120 s); keep it short.
AuthInfo=cred_expire=10
# Schedule at once on each event, and every 5 s so that requeued jobs restart soon after becoming eligible.
SchedulerParameters=sched_min_interval=0,batch_sched_delay=0,sched_interval=5,bf_interval=5
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF

# --- 4. daemons -------------------------------------------------------------
# -c: start from a clean state; old jobs from a previous run are not wanted in tests.
slurmctld -c -f "$CONF" || fail "slurmctld did not start"
slurmd -f "$CONF" || fail "slurmd did not start"

wait_idle() {
    for _ in $(seq 30); do
        [[ $(sinfo -h -n "$HOST" -o %t 2>/dev/null) == idle ]] && return
        sleep 1
    done
    fail "node $HOST is not idle: $(sinfo -h -N 2>&1)"
}
wait_idle
for d in slurmctld slurmd; do kill -0 "$(cat "$DIR/run/$d.pid" 2>/dev/null)" 2>/dev/null || fail "$d died"; done
[[ $(timeout 30 srun -N1 hostname 2>&1) == "$(hostname)" ]] || fail "srun -N1 hostname failed"
wait_idle  # the node is 'completing' for a moment after the test job; don't hand it over like that

sinfo
echo
echo "SLURM test cluster is up. Run:"
echo "export SLURM_CONF=$CONF"
