#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for plwlab's SLURM tests (tests/test_slurm.py) and for trying
# hydra/launcher=slurm by hand: Debian's slurm-wlm (22.05 on bookworm) + munge, no systemd, no cgroups
# (proctrack/linuxproc, task/none), no accounting daemon (sacct fails: plwlab's launcher polls squeue instead).
#
#   bash tools/local_slurm.sh start    # installs the packages when absent (apt, as root), starts munged,
#                                      # slurmctld and slurmd; prints "slurm ready (...)" in 2-3 s
#   bash tools/local_slurm.sh stop     # stops only the daemons this script started
#
# It writes /etc/slurm/slurm.conf (the path every SLURM client and submitit read) and keeps its state, logs and
# PIDs under $PLWLAB_SLURM_DIR (default /tmp/plwlab-slurm). Partition "debug" holds this node, every CPU and all
# memory but 1 GB; MaxTime unlimited; JobRequeue=1 (scontrol requeue and submitit's timeout requeue work).
set -u
BASE=${PLWLAB_SLURM_DIR:-/tmp/plwlab-slurm}
CONF=/etc/slurm/slurm.conf
fail() { echo "slurm failed: $*" >&2; exit 1; }

stop() {
  [ -f "$BASE/pids" ] || return 0
  tac "$BASE/pids" | while read -r name pid; do kill "$pid" 2>/dev/null && echo "stopped $name ($pid)"; done
  sleep 1
  tac "$BASE/pids" | while read -r name pid; do kill -9 "$pid" 2>/dev/null && echo "killed $name ($pid)"; done
  rm -f "$BASE/pids"
}

install_packages() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
    && command -v munged >/dev/null && return 0
  [ "$(id -u)" = 0 ] || fail "slurm-wlm and munge are not installed and installing them needs root (apt-get)"
  local pkgs="slurm-wlm slurmctld slurmd slurm-client munge"
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $pkgs >"$BASE/apt.log" 2>&1 \
    || { apt-get update >>"$BASE/apt.log" 2>&1 \
         && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $pkgs >>"$BASE/apt.log" 2>&1; } \
    || fail "apt-get install $pkgs (see $BASE/apt.log)"
}

start() {
  local t0 host ncpu mem st
  t0=$(date +%s)
  mkdir -p "$BASE"/{state,spool,log} /etc/slurm || fail "cannot create $BASE"
  install_packages
  stop >/dev/null
  # munge: a key, its directories, the daemon as user munge (in the foreground, backgrounded here: its PID is ours)
  install -d -o munge -g munge -m 0700 /etc/munge /var/log/munge
  install -d -o munge -g munge -m 0711 /var/lib/munge
  install -d -o munge -g munge -m 0755 /run/munge
  if [ ! -s /etc/munge/munge.key ]; then
    if [ -x /usr/sbin/mungekey ]; then /usr/sbin/mungekey -c -f -k /etc/munge/munge.key
    else dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 2>/dev/null; fi
  fi
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock /run/munge/munged.pid
  setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged -F --force >"$BASE/log/munged.out" 2>&1 &
  echo "munged $!" >>"$BASE/pids"
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.2; done
  munge -n | unmunge >/dev/null 2>&1 || fail "munged does not answer: $(tail -1 "$BASE/log/munged.out")"

  host=$(hostname -s); ncpu=$(nproc); mem=$(free -m | awk '/^Mem:/{print $2}')
  cat >"$CONF" <<CONF
ClusterName=plwlab
SlurmctldHost=$host
AuthType=auth/munge
CryptoType=crypto/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool
SlurmctldPidFile=$BASE/slurmctld.pid
SlurmdPidFile=$BASE/slurmd.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
ReturnToService=2
JobRequeue=1
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
KillWait=30
MinJobAge=300
Waittime=0
NodeName=$host NodeAddr=127.0.0.1 CPUs=$ncpu RealMemory=$((mem - 1024)) State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
  /usr/sbin/slurmctld -D -c -f "$CONF" >"$BASE/log/slurmctld.out" 2>&1 &
  echo "slurmctld $!" >>"$BASE/pids"
  /usr/sbin/slurmd -D -f "$CONF" >"$BASE/log/slurmd.out" 2>&1 &
  echo "slurmd $!" >>"$BASE/pids"
  for _ in $(seq 110); do
    st=$(sinfo -h -N -n "$host" -o %T 2>/dev/null)
    [ "$st" = idle ] && break
    [ "$st" = "idle*" ] || [ "$st" = down ] && scontrol update nodename="$host" state=resume >/dev/null 2>&1
    sleep 0.5
  done
  [ "$st" = idle ] || fail "node $host is '${st:-unknown}' (see $BASE/log/slurmctld.log and slurmd.log)"
  timeout 30 srun -N1 -n1 true >/dev/null 2>&1 || fail "srun does not run a step (see $BASE/log/slurmd.log)"
  echo "slurm ready ($host, $ncpu CPUs, $((mem - 1024)) MB, partition debug, $(( $(date +%s) - t0 )) s)"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
