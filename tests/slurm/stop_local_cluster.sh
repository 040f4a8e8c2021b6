#!/usr/bin/env bash
# Stop the slurmctld/slurmd started by start_local_cluster.sh from the same state folder.
# munged is left running (it is shared and harmless). Usage: stop_local_cluster.sh [STATE_DIR]
set -euo pipefail

DIR=$(realpath -m "${1:-${SLURM_TEST_DIR:-/tmp/slurm-test}}")
CONF=$DIR/slurm.conf

pids=()
for f in "$DIR"/run/slurmctld.pid "$DIR"/run/slurmd.pid; do
    [[ -s $f ]] && pids+=("$(cat "$f")")
done
# Pid files can be stale or missing; also match daemons by their exact -f argument.
pids+=($(pgrep -f "^(/usr/sbin/)?slurm(ctld|d) .*-f $CONF( |$)" || true))

alive=()
for p in "${pids[@]}"; do
    # Only signal processes that really are slurm daemons (a stale pid may have been reused).
    [[ $(ps -o comm= -p "$p" 2>/dev/null) =~ ^slurm(ctld|d)$ ]] && alive+=("$p")
done
[[ ${#alive[@]} -eq 0 ]] && { echo "no slurm daemons running for $DIR"; exit 0; }

kill "${alive[@]}" 2>/dev/null || true
for _ in $(seq 20); do
    kill -0 "${alive[@]}" 2>/dev/null || { echo "stopped slurm daemons for $DIR"; exit 0; }
    sleep 0.5
done
kill -9 "${alive[@]}" 2>/dev/null || true
echo "killed slurm daemons for $DIR"
