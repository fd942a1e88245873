#!/usr/bin/env bash
# A SLURM cluster on this machine from Debian's packages (slurm-wlm 22.05 + munge), for trying the
# launch/ scripts without a real cluster. Everything lives under .slurm/ in the repository (ignored by
# git): config, munge key and socket, daemon state, logs.
#
#   scripts/slurm-local.sh up            one node (this host, its CPUs, no GPUs), partition "cpu"
#   scripts/slurm-local.sh up --hosts 2  two "hosts": network namespaces ddpm-h1 and ddpm-h2, joined by a
#                                        veth pair (10.77.0.1 and 10.77.0.2), each with its own hostname
#                                        (h1, h2) and slurmd; slurmctld runs on h1
#   scripts/slurm-local.sh status        daemons, sinfo, squeue
#   scripts/slurm-local.sh down          stop the daemons (and remove the namespaces)
#   scripts/slurm-local.sh exec CMD...   run a client command (sbatch, srun, squeue, ...) against the
#                                        cluster: with SLURM_CONF set, and inside ddpm-h1 for --hosts 2
#   scripts/slurm-local.sh net up|down   only the two namespaces and their veth pair (no SLURM)
#   scripts/slurm-local.sh rsh HOST CMD  run CMD on h1 or h2 like ssh would; `slurm-local.sh HOST CMD`
#                                        does the same, for OpenMPI's `--mca plm_rsh_agent`
#
# With one node, `up` also links /etc/slurm/slurm.conf to the generated config when that file does
# not exist, so plain `sbatch`/`squeue` work; otherwise use `exec` or export SLURM_CONF as printed.
# Needs root (daemons run as root; apt-get installs slurm-wlm and munge if missing).
# Environment: SLURM_LOCAL_DIR (state dir, default .slurm), SLURMCTLD_PORT (6817), SLURMD_PORT (6818),
# NET_PREFIX (10.77.0).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
state=$(realpath -m "${SLURM_LOCAL_DIR:-$repo/.slurm}")
conf=$state/etc/slurm.conf
ctld_port=${SLURMCTLD_PORT:-6817}
slurmd_port=${SLURMD_PORT:-6818}
net=${NET_PREFIX:-10.77.0}
ns=(ddpm-h1 ddpm-h2)

die() { echo "slurm-local: error: $*" >&2; exit 1; }
say() { echo "slurm-local: $*" >&2; }

# Runs "$@" as host I (1 or 2) of the --hosts 2 cluster: in its network namespace, with its own
# hostname (a fresh UTS namespace per call, so OpenMPI and SLURM see two different hosts).
# nsenter rather than `ip netns exec`, which remounts /sys and so hides /sys/fs/cgroup from slurmd
# ("No filesystem mounted on /sys/fs/cgroup ... slurmd initialization failed").
# Each host also gets its own /tmp (a bind mount of .slurm/tmp/hI in a private mount namespace): the
# SLURM PMIx plugin keeps per-step files under /tmp named by job and step only, and two slurmd on one
# /tmp collide ("Cannot create directory /tmp/spmix_appdir_0_10.0: File exists").
on_host() {
  local i=$1; shift
  mkdir -p "$state/tmp/h$i"
  chmod 1777 "$state/tmp/h$i"
  nsenter --net="/run/netns/${ns[$((i - 1))]}" unshare --uts --mount --propagation private \
    sh -c 'hostname "$0" && mount --bind "$1" /tmp && shift && exec "$@"' "h$i" "$state/tmp/h$i" "$@"
}

install_packages() {
  local missing=()
  command -v slurmctld >/dev/null || missing+=(slurmctld)
  command -v slurmd >/dev/null || missing+=(slurmd)
  command -v sbatch >/dev/null || missing+=(slurm-client)
  command -v munged >/dev/null || missing+=(munge)
  command -v ip >/dev/null || missing+=(iproute2)
  command -v unshare >/dev/null || missing+=(util-linux)
  command -v pgrep >/dev/null || missing+=(procps)
  [ ${#missing[@]} = 0 ] && return
  [ "$(id -u)" = 0 ] || die "missing ${missing[*]}; run as root or: sudo apt-get install ${missing[*]}"
  say "installing ${missing[*]} (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# Alive process from a pid file, or nothing.
pid_of() { local p; p=$(cat "$1" 2>/dev/null) && kill -0 "$p" 2>/dev/null && echo "$p"; }

# Fails with the process using it when TCP port $2 is already listened on in namespace $1 ("" = this one).
check_port_free() {
  local where=$1 port=$2
  local cmd=(python3 -c "import socket,sys; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('', int(sys.argv[1])))" "$port")
  [ -n "$where" ] && cmd=(ip netns exec "$where" "${cmd[@]}")
  "${cmd[@]}" 2>/dev/null && return
  die "TCP port $port is taken${where:+ in namespace $where} ($(ss -ltnp 2>/dev/null | grep ":$port " | head -1 || true)); stop that daemon (another slurmctld/slurmd?) or set SLURMCTLD_PORT/SLURMD_PORT"
}

net_up() {
  if ip netns list | grep -qw "${ns[0]}"; then return; fi
  ip netns add "${ns[0]}"
  ip netns add "${ns[1]}"
  ip link add ddpm-v1 type veth peer name ddpm-v2
  local i
  for i in 1 2; do
    ip link set "ddpm-v$i" netns "${ns[$((i - 1))]}"
    ip -n "${ns[$((i - 1))]}" addr add "$net.$i/24" dev "ddpm-v$i"
    ip -n "${ns[$((i - 1))]}" link set "ddpm-v$i" up
    ip -n "${ns[$((i - 1))]}" link set lo up
  done
  say "namespaces ${ns[*]} up: h1=$net.1 h2=$net.2 (veth ddpm-v1/ddpm-v2)"
}

net_down() {
  local n
  for n in "${ns[@]}"; do ip netns del "$n" 2>/dev/null || true; done
}

write_conf() {
  local hosts=$1 head_host head_addr nodes
  local cpus mem
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))
  if [ "$hosts" = 1 ]; then
    head_host=$(hostname -s) head_addr=127.0.0.1
    nodes="NodeName=$head_host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN"
  else
    head_host=h1 head_addr=$net.1
    nodes="NodeName=h1 NodeAddr=$net.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
NodeName=h2 NodeAddr=$net.2 CPUs=$cpus RealMemory=$mem State=UNKNOWN"
  fi
  mkdir -p "$state/etc" "$state/ctld" "$state/log" "$state/spool"
  : >"$state/etc/plugstack.conf"
  cat >"$conf" <<EOF
# Generated by scripts/slurm-local.sh ($hosts host(s)); rewritten on every \`up\`.
ClusterName=ddpm-local
SlurmctldHost=$head_host($head_addr)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job may start only after its old credential expired (default 120 s, plus
# up to a scheduler pass); 10 s lets a requeued job restart promptly on this one-user cluster.
AuthInfo=socket=$state/munge/munge.socket,cred_expire=10
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/spool/%n
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd-%n.pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd-%n.log
PlugStackConfig=$state/etc/plugstack.conf
# No cgroups in containers: track processes through /proc; pin tasks with sched_setaffinity.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
# Debian's OpenMPI 4.1 is built against PMIx (ompi_info: "MCA pmix: ext3x"); it has no PMI-2 client.
MpiDefault=pmix
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=5
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=600
SlurmdTimeout=60
$nodes
PartitionName=cpu Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
  mkdir -p "$state/munge"
  chmod 700 "$state/munge"
  [ -n "$(pid_of "$state/munge/munged.pid")" ] && return
  [ -s "$state/munge/munge.key" ] || mungekey -c -k "$state/munge/munge.key"
  munged -f --socket="$state/munge/munge.socket" --key-file="$state/munge/munge.key" \
    --log-file="$state/log/munged.log" --pid-file="$state/munge/munged.pid" \
    --seed-file="$state/munge/munged.seed" ||
    die "munged did not start; see $state/log/munged.log"
}

# The daemons of a HOSTS-host cluster, one per line: program, host (0: this machine; 1, 2: h1, h2),
# pid/log file name, TCP port.
daemons() {
  if [ "$1" = 1 ]; then
    echo "slurmctld 0 slurmctld $ctld_port"
    echo "slurmd 0 slurmd-$(hostname -s) $slurmd_port"
  else
    echo "slurmctld 1 slurmctld $ctld_port"
    echo "slurmd 1 slurmd-h1 $slurmd_port"
    echo "slurmd 2 slurmd-h2 $slurmd_port"
  fi
}

# Before anything starts: the ports of the daemons that are not running yet must be free.
check_ports() {
  local prog host name port
  while read -r prog host name port; do
    [ -n "$(pid_of "$state/$name.pid")" ] && continue
    if [ "$host" = 0 ]; then check_port_free "" "$port"; else check_port_free "${ns[$((host - 1))]}" "$port"; fi
  done < <(daemons "$1")
}

# Starts slurmctld (on the head host) and one slurmd per host, unless they already run.
start_slurm() {
  local prog host name port
  export SLURM_CONF=$conf
  while read -r prog host name port; do
    [ -n "$(pid_of "$state/$name.pid")" ] && continue
    if [ "$host" = 0 ]; then
      "$prog" -f "$conf" </dev/null || die "$prog did not start; see $state/log/$name.log"
    else
      on_host "$host" "$prog" -f "$conf" </dev/null || die "$prog on h$host did not start; see $state/log/$name.log"
    fi
  done < <(daemons "$1")
}

# Client command against the running cluster.
client() {
  local hosts
  hosts=$(cat "$state/hosts" 2>/dev/null) || die "no cluster in $state; run: $0 up"
  # `exec` for the `exec` subcommand: the shell is gone while a long client (sbatch --wait) runs.
  if [ "$hosts" = 1 ]; then
    SLURM_CONF=$conf ${CLIENT_EXEC:-} "$@"
  else
    SLURM_CONF=$conf ${CLIENT_EXEC:-} ip netns exec "${ns[0]}" "$@"
  fi
}

wait_idle() {
  local hosts=$1 i out
  for i in $(seq 1 60); do
    out=$(client sinfo -h -o '%T' 2>/dev/null | sort -u | tr '\n' ' ') || true
    if [ "$out" = "idle " ]; then return; fi
    # A node left DOWN/DRAINED by an earlier run (e.g. after a config change) is brought back.
    if [[ $out == *down* || $out == *drain* ]] && [ "$i" -gt 3 ]; then
      client scontrol update nodename=ALL state=resume 2>/dev/null || true
    fi
    sleep 1
  done
  client sinfo -N -l >&2 || true
  tail -5 "$state"/log/*.log >&2 || true
  die "nodes not idle after 60 s (sinfo: $out); logs in $state/log"
}

# A slurmctld/slurmd not started from this state dir would clash with ours. Ours run with `-f` and
# our config; a process of that name with an empty command line is a helper a daemon forked (e.g.
# slurmctld's slurmscriptd) and goes with its daemon.
check_foreign_daemons() {
  local d p cmd
  for d in slurmctld slurmd; do
    for p in $(pgrep -x "$d" || true); do
      cmd=$(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null) || continue
      [ -z "$cmd" ] || [[ $cmd == *" -f $conf"* ]] || die "another $d is running (pid $p: $cmd); stop it first"
    done
  done
}

# Runs a command line on host h1 or h2 (by name or address), as ssh would.
rsh() {
  local host
  case "${1:-}" in
    h1 | "$net.1") host=1 ;;
    h2 | "$net.2") host=2 ;;
    *) die "rsh: unknown host '${1:-}' (expected h1, h2, $net.1 or $net.2)" ;;
  esac
  shift
  on_host "$host" sh -c "$*"
}

cmd_up() {
  local hosts=1
  case "${1:-}" in
    "") ;;
    --hosts) hosts=${2:?--hosts needs 1 or 2} ;;
    *) die "usage: $0 up [--hosts 1|2]" ;;
  esac
  [ "$hosts" = 1 ] || [ "$hosts" = 2 ] || die "--hosts must be 1 or 2"
  [ "$(id -u)" = 0 ] || die "needs root (the daemons run as root here)"
  install_packages
  local running
  running=$(cat "$state/hosts" 2>/dev/null || true)
  if [ -n "$running" ] && [ "$running" != "$hosts" ] && [ -n "$(pid_of "$state/slurmctld.pid")" ]; then
    die "a $running-host cluster is running; run: $0 down"
  fi
  check_foreign_daemons
  [ "$hosts" = 2 ] && net_up
  write_conf "$hosts"
  echo "$hosts" >"$state/hosts"
  check_ports "$hosts"
  start_munge
  start_slurm "$hosts"
  wait_idle "$hosts"
  if [ "$hosts" = 1 ]; then link_etc_conf; fi
  client sinfo >&2
  say "up ($hosts host(s)); logs in $state/log"
  if [ "$hosts" = 1 ] && [ "$(readlink /etc/slurm/slurm.conf 2>/dev/null)" != "$conf" ]; then
    say "clients need: export SLURM_CONF=$conf"
  elif [ "$hosts" = 2 ]; then
    say "clients run on h1: $0 exec sbatch ..."
  fi
}

# Plain `sbatch` reads /etc/slurm/slurm.conf: point it at ours unless the machine has its own.
link_etc_conf() {
  if [ ! -e /etc/slurm/slurm.conf ] || [[ $(readlink /etc/slurm/slurm.conf) == */.slurm/etc/slurm.conf ]]; then
    mkdir -p /etc/slurm
    ln -sfn "$conf" /etc/slurm/slurm.conf
  fi
}

# Sends SIGTERM to the pid in file $1 and waits up to 30 s for it to go.
stop_pid() {
  local p i
  p=$(pid_of "$1") || return 0
  kill "$p" 2>/dev/null || true
  for i in $(seq 1 30); do
    kill -0 "$p" 2>/dev/null || { rm -f "$1"; return 0; }
    sleep 1
  done
  say "pid $p ($1) ignored SIGTERM for 30 s; killing it"
  kill -9 "$p" 2>/dev/null || true
  rm -f "$1"
}

cmd_down() {
  local f
  for f in "$state"/slurmd-*.pid; do [ -e "$f" ] && stop_pid "$f"; done
  stop_pid "$state/slurmctld.pid"
  stop_pid "$state/munge/munged.pid"
  if [ "$(readlink /etc/slurm/slurm.conf 2>/dev/null)" = "$conf" ]; then rm -f /etc/slurm/slurm.conf; fi
  net_down
  rm -f "$state/hosts"
  say "down"
}

cmd_status() {
  local f p rc=0
  for f in "$state/munge/munged.pid" "$state/slurmctld.pid" "$state"/slurmd-*.pid; do
    [ -e "$f" ] || continue
    if p=$(pid_of "$f"); then echo "running  $(basename "$f" .pid) (pid $p)"; else echo "dead     $(basename "$f" .pid)"; rc=1; fi
  done
  [ -e "$state/hosts" ] || { echo "no cluster (run: $0 up)"; return 1; }
  client sinfo || rc=1
  client squeue || rc=1
  return $rc
}

case "${1:-}" in
  up) shift; cmd_up "$@" ;;
  down) cmd_down ;;
  status) cmd_status ;;
  exec) shift; CLIENT_EXEC="exec" client "$@" ;;
  # `rsh HOST CMD`, or `HOST CMD` as OpenMPI's remote-launch agent (plm_rsh_agent, in place of
  # ssh; OpenMPI passes no arguments of its own before the host): runs the command line on h1/h2.
  rsh) shift; rsh "$@" ;;
  h1 | h2 | "$net.1" | "$net.2") rsh "$@" ;;
  net)
    case "${2:-}" in
      up) net_up ;;
      down) net_down ;;
      *) die "usage: $0 net up|down" ;;
    esac ;;
  *) echo "usage: $0 up [--hosts 2] | down | status | exec CMD... | net up|down | rsh HOST CMD..." >&2; exit 2 ;;
esac
