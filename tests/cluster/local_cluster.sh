#!/usr/bin/env bash
# A real two-node SLURM cluster, plus ssh/pdsh between two host aliases, on this one machine.
#
#   tests/cluster/local_cluster.sh up              # install (once), configure, start; idempotent
#   tests/cluster/local_cluster.sh status          # what runs, sinfo, ssh reachability
#   tests/cluster/local_cluster.sh down            # stop only what `up` started
#   tests/cluster/local_cluster.sh exec NODE CMD.. # run CMD with NODE's view of the filesystems
#   tests/cluster/local_cluster.sh stop-sshd NODE  # make NODE unreachable over ssh (`up` restarts it)
#
# Debian's slurmd can run several node daemons on one host (`slurmd -N node1`), so
# node1 and node2 are real slurmd processes on ports 17001/17002 under one slurmctld.
# /etc/hosts gets node1 -> 127.0.0.2 and node2 -> 127.0.0.3 (all of 127/8 is loopback),
# and one sshd per node, listening on its address, lets pdsh (the deepspeed launcher's
# default multi-node transport) "ssh into" each node.
#
# Each node lives in its own mount namespace (held open by a `sleep` process), where its
# slurmd and its sshd run, so each node has a disk of its own like a real cluster's
# /localscratch: a tmpfs at $STATE/local that no other node sees. Everything else is one
# filesystem for all, like a cluster's network filesystem; mounts made later under
# $STATE/shared (a shared mount point) reach every node, other new mounts do not.
#
# Runs as root; exit code 3 means "this machine cannot host the cluster" (not root, no
# apt-get), which the tests turn into a skip.
set -euo pipefail

STATE=${DS_GPT_CLUSTER_STATE:-/var/lib/ds_gpt_local_cluster}
MARK="# ds_gpt local cluster (tests/cluster/local_cluster.sh)"
PACKAGES=(slurmctld slurmd slurm-client munge openssh-server openssh-client pdsh procps util-linux)
NODES=(node1 node2)
declare -A NODE_ADDR=([node1]=127.0.0.2 [node2]=127.0.0.3)
SLURM_CONF=/etc/slurm/slurm.conf
HOST=$(hostname -s)
NODE_LOCAL=$STATE/local    # each node's own disk (a tmpfs per node namespace)
SHARED_MNT=$STATE/shared   # mounts made under here reach every node
NODE_LOCAL_SIZE=2g

say() { echo "local_cluster: $*" >&2; }
die() { say "error: $*"; exit "${2:-1}"; }

need_root() {
    [[ $(id -u) == 0 ]] || die "must run as root (it installs packages and edits /etc/hosts)" 3
    command -v apt-get >/dev/null || command -v slurmctld >/dev/null \
        || die "needs apt-get (Debian/Ubuntu) to install slurm, munge, sshd and pdsh" 3
}

# The first line of FILE into the variable named VAR; false if FILE cannot be read. Files that
# can vanish between a check and the read (a daemon's pid file as it exits, /proc/PID of a
# process that has just exited) are never read with $(<FILE): under `set -e` bash ends the
# whole script when that read fails, even inside a condition.
read_line() {  # read_line VAR FILE
    local -n line_into=$1
    line_into=
    { IFS= read -r line_into <"$2" || [[ -n $line_into ]]; } 2>/dev/null
}

# Whether a process runs. One that has exited but is not yet reaped (a zombie) does not: the
# daemons' parent here is the machine's init, which can take seconds to reap them.
running() {  # running PID
    local stat
    read_line stat "/proc/$1/stat" || return 1
    stat=${stat##*) }  # the fields after "(comm) "; the first is the state
    [[ ${stat:0:1} != Z ]]
}

# Whether PID is alive and is the program we expect (pids get reused).
runs_as() {  # runs_as PID COMM
    local comm
    [[ -n $1 ]] && running "$1" && read_line comm "/proc/$1/comm" && [[ $comm == "$2"* ]]
}

# A pid file's process, if it is alive and is the program we expect.
alive() {  # alive PIDFILE COMM
    local pid
    read_line pid "$1" && runs_as "$pid" "$2"
}

install_packages() {
    local missing=()
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    ((${#missing[@]})) || return 0
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Package scripts must not start the daemons: we start our own, configured below.
    local policy=/usr/sbin/policy-rc.d added_policy=0
    if [[ ! -e $policy ]]; then printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod +x "$policy"; added_policy=1; fi
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1 || {
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    }
    ((added_policy)) && rm -f "$policy"
    return 0
}

hosts_entries() {
    for n in "${NODES[@]}"; do
        if ! grep -qE "^[[:space:]]*${NODE_ADDR[$n]//./\\.}[[:space:]]+$n([[:space:]]|\$)" /etc/hosts; then
            # /etc/hosts may be a bind mount (containers): append in place, never replace the file.
            echo "${NODE_ADDR[$n]} $n $MARK" >>/etc/hosts
        fi
    done
}

setup_munge() {
    if [[ ! -s /etc/munge/munge.key ]]; then
        mkdir -p /etc/munge
        head -c 1024 /dev/urandom >/etc/munge/munge.key
        chown munge:munge /etc/munge/munge.key 2>/dev/null || true
        chmod 400 /etc/munge/munge.key
    fi
    mkdir -p /run/munge /var/lib/munge /var/log/munge "$STATE/log"
    chown munge:munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi  # someone's munged works
    munged --force --pid-file="$STATE/munged.pid" 2>>"$STATE/log/munged.err"
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0; sleep 0.1; done
    die "munged did not start"
}

write_slurm_conf() {
    if [[ -e $SLURM_CONF ]] && ! grep -qF "$MARK" "$SLURM_CONF"; then
        die "$SLURM_CONF exists and is not ours; refusing to overwrite a real cluster's config"
    fi
    mkdir -p /etc/slurm "$STATE/slurmctld" "$STATE/log"
    local cpus=1 mem=2000
    cat >"$SLURM_CONF.tmp" <<EOF
$MARK
ClusterName=dsgpt
SlurmctldHost=$HOST(127.0.0.1)
AuthType=auth/munge
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
MpiDefault=none
ReturnToService=2
# Trust this file over what slurmd detects: both "nodes" share this host's CPUs, and the
# GPUs below exist only as counts.
SlurmdParameters=config_overrides
# A requeued job waits for its credential lifetime (AuthInfo cred_expire: 120 s, at least 5)
# before it may start again; the tests start it sooner themselves (tests/cluster/cluster_jobs.py).
JobRequeue=1
# SIGKILL 10 s after a cancel's SIGTERM (default 30): ample for a tiny model's checkpoint.
KillWait=10
SchedulerType=sched/backfill
# slurmctld starts a submitted batch job on its full scheduling pass, run here every second
# (default 60): submit to start measured 0.1-0.9 s. batch_sched_delay=0 and sched_min_interval=0
# changed nothing measurable in 22.05, so they are left at their defaults.
SchedulerParameters=sched_interval=1
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
StateSaveLocation=$STATE/slurmctld
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdSpoolDir=$STATE/slurmd/%n
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmdLogFile=$STATE/log/slurmd-%n.log
# Both node daemons run on this host; each gets its own port. The GPUs are stand-ins
# (see gres.conf), so \`--gpus-per-node=a100:N\` schedules as on a GPU cluster.
NodeName=node[1-2] NodeHostname=$HOST NodeAddr=127.0.0.1 Port=17001-17002 CPUs=$cpus RealMemory=$mem Gres=gpu:a100:4
PartitionName=debug Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
    mv "$SLURM_CONF.tmp" "$SLURM_CONF"
    # slurmd drops a GPU without a device file, and wants a character device: /dev/null will do.
    mkdir -p "$STATE/fakegpu"
    for i in 0 1 2 3; do ln -sfn /dev/null "$STATE/fakegpu/nvidia$i"; done
    printf '%s\nName=gpu Type=a100 File=%s/fakegpu/nvidia[0-3]\n' "$MARK" "$STATE" >/etc/slurm/gres.conf
}

# Stop the process a pid file names, if it is still the program we expect.
stop_pidfile() {  # stop_pidfile NAME COMM
    local file=$STATE/$1.pid
    local pid  # read once: a daemon removes its pid file as it exits
    if read_line pid "$file" && runs_as "$pid" "$2"; then
        kill "$pid" && say "stopped $2 ($pid)"
        for _ in $(seq 50); do running "$pid" || break; sleep 0.1; done
    fi
    rm -f "$file"
}

# The shared mount point: bound onto itself and marked shared before any node namespace
# copies the mount table, so that a mount made under it later propagates to every node.
shared_mount() {
    mkdir -p "$SHARED_MNT"
    if ! mountpoint -q "$SHARED_MNT"; then
        mount --bind "$SHARED_MNT" "$SHARED_MNT"
    fi
    mount --make-shared "$SHARED_MNT"
}

# A node's mount namespace, held by a `sleep` whose pid file is ns-NODE.pid; its tmpfs at
# $NODE_LOCAL is that node's local disk. A node whose namespace is gone loses its daemons too
# (they would run with another node's view).
node_namespace() {  # node_namespace NODE
    local n=$1
    alive "$STATE/ns-$n.pid" sleep && return 0
    stop_pidfile "sshd-$n" sshd
    stop_pidfile "slurmd-$n" slurmd
    mkdir -p "$NODE_LOCAL"
    setsid -f unshare --mount --propagation slave -- sh -c \
        "mount -t tmpfs -o size=$NODE_LOCAL_SIZE,mode=1777 ds_gpt_$n '$NODE_LOCAL' && echo \$\$ >'$STATE/ns-$n.pid' && exec sleep infinity" \
        </dev/null >/dev/null 2>>"$STATE/log/ns-$n.err"
    for _ in $(seq 50); do alive "$STATE/ns-$n.pid" sleep && return 0; sleep 0.1; done
    die "the mount namespace of $n did not start; see $STATE/log/ns-$n.err"
}

in_node() {  # in_node NODE CMD...: run CMD in NODE's mount namespace
    local n=$1; shift
    local pid
    read_line pid "$STATE/ns-$n.pid" && runs_as "$pid" sleep || die "$n is not up (tests/cluster/local_cluster.sh up)"
    nsenter --target "$pid" --mount -- "$@"
}

start_slurm() {
    if ! alive "$STATE/slurmctld.pid" slurmctld; then
        slurmctld
    fi
    for n in "${NODES[@]}"; do
        mkdir -p "$STATE/slurmd/$n"
        node_namespace "$n"
        alive "$STATE/slurmd-$n.pid" slurmd || in_node "$n" slurmd -N "$n"
    done
    for _ in $(seq 60); do
        if [[ $(sinfo -h -N -o '%N %t' 2>/dev/null | grep -cE ' (idle|mix|alloc)') == 2 ]]; then return 0; fi
        # A node left down by an earlier run comes back once its slurmd registers again.
        scontrol update NodeName=node[1-2] State=RESUME >/dev/null 2>&1 || true
        sleep 1
    done
    sinfo -N >&2 || true
    die "the two slurm nodes did not come up; see $STATE/log/"
}

setup_ssh() {
    local key=$HOME/.ssh/id_ed25519
    mkdir -p "$HOME/.ssh" && chmod 700 "$HOME/.ssh"
    [[ -s $key ]] || ssh-keygen -q -t ed25519 -N '' -f "$key"
    touch "$HOME/.ssh/authorized_keys" && chmod 600 "$HOME/.ssh/authorized_keys"
    grep -qF "$(cut -d' ' -f2 "$key.pub")" "$HOME/.ssh/authorized_keys" || cat "$key.pub" >>"$HOME/.ssh/authorized_keys"
    ssh-keygen -A >/dev/null
    mkdir -p /run/sshd && chmod 755 /run/sshd
    stop_pidfile sshd sshd  # the one sshd for both nodes of earlier versions of this script
    for n in "${NODES[@]}"; do
        alive "$STATE/sshd-$n.pid" sshd && continue
        cat >"$STATE/sshd-$n.config" <<EOF
$MARK
ListenAddress ${NODE_ADDR[$n]}
PidFile $STATE/sshd-$n.pid
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
AcceptEnv LANG LC_*
Subsystem sftp internal-sftp
EOF
        in_node "$n" /usr/sbin/sshd -f "$STATE/sshd-$n.config"
    done
    for n in "${NODES[@]}"; do
        # sshd forks into the background before it listens: wait for its port (slow on a loaded machine).
        local listening=""
        for _ in $(seq 300); do
            (exec 3<>"/dev/tcp/${NODE_ADDR[$n]}/22") 2>/dev/null && { listening=1; break; }
            sleep 0.1
        done
        [[ -n $listening ]] || die "sshd of $n does not listen on ${NODE_ADDR[$n]}:22 after 30 s; see $STATE/sshd-$n.config"
        # Record the host key once, so the deepspeed launcher's non-interactive ssh never prompts.
        ssh-keygen -F "$n" >/dev/null 2>&1 && continue
        for _ in $(seq 50); do ssh-keyscan -T 2 "$n" >"$STATE/keyscan" 2>/dev/null && [[ -s $STATE/keyscan ]] && break; sleep 0.1; done
        cat "$STATE/keyscan" >>"$HOME/.ssh/known_hosts"
    done
}

ssh_ok() { ssh -o BatchMode=yes -o ConnectTimeout=5 "$1" true 2>/dev/null; }

up() {
    need_root
    mkdir -p "$STATE"
    install_packages
    hosts_entries
    setup_munge
    write_slurm_conf
    shared_mount
    start_slurm
    setup_ssh
    # pdsh (over ssh) is what `deepspeed --hostfile` runs; check it reaches both aliases.
    if [[ $(PDSH_RCMD_TYPE=ssh pdsh -w node1,node2 hostname 2>&1 | wc -l) != 2 ]]; then
        ssh_ok node1 && ssh_ok node2 || die "ssh to node1/node2 does not work; see $STATE/sshd-node*.config"
        die "pdsh cannot reach node1,node2"
    fi
    say "up: $(sinfo -h -o '%D nodes %t' | tr '\n' ' ')(state in $STATE)"
}

down() {
    [[ -d $STATE ]] || { say "nothing to stop"; return 0; }
    if alive "$STATE/slurmctld.pid" slurmctld; then
        scancel --quiet --full --signal=KILL --state=RUNNING 2>/dev/null || true
        scancel --quiet 2>/dev/null || true
    fi
    local what
    for what in sshd:sshd sshd-node1:sshd sshd-node2:sshd slurmd-node1:slurmd slurmd-node2:slurmd \
                ns-node1:sleep ns-node2:sleep slurmctld:slurmctld munged:munged; do
        stop_pidfile "${what%%:*}" "${what##*:}"
    done
    # The node namespaces (and their tmpfs disks) went with their last process.
    if mountpoint -q "$SHARED_MNT"; then umount --recursive "$SHARED_MNT" || say "could not unmount $SHARED_MNT"; fi
    # Our /etc/hosts lines, by their marker; rewrite in place (it may be a bind mount).
    if grep -qF "$MARK" /etc/hosts; then
        local kept; kept=$(grep -vF "$MARK" /etc/hosts)
        printf '%s\n' "$kept" >/etc/hosts
    fi
}

status() {
    local what pid
    for what in munged:munged slurmctld:slurmctld ns-node1:sleep ns-node2:sleep slurmd-node1:slurmd \
                slurmd-node2:slurmd sshd-node1:sshd sshd-node2:sshd; do
        if read_line pid "$STATE/${what%%:*}.pid" && runs_as "$pid" "${what##*:}"; then echo "${what%%:*}: running ($pid)"
        else echo "${what%%:*}: not started here"; fi
    done
    sinfo -N 2>/dev/null || echo "sinfo: no controller"
    for n in "${NODES[@]}"; do ssh_ok "$n" && echo "ssh $n: ok" || echo "ssh $n: unreachable"; done
}

node_arg() {
    [[ -n ${1:-} && -n ${NODE_ADDR[$1]:-} ]] || die "expected a node name (${NODES[*]}), got '${1:-}'" 2
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    exec) node_arg "${2:-}"; n=$2; shift 2; in_node "$n" "$@" ;;
    stop-sshd) node_arg "${2:-}"; stop_pidfile "sshd-$2" sshd ;;
    *) echo "usage: $0 up|down|status|exec NODE CMD...|stop-sshd NODE" >&2; exit 2 ;;
esac
