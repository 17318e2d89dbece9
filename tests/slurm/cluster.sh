#!/usr/bin/env bash
# A real, throw-away SLURM cluster on this one machine, for the SLURM tests.
#
#   tests/slurm/cluster.sh install   apt-get the Debian packages (munge, slurm-wlm 22.05, slurmdbd, MariaDB)
#   tests/slurm/cluster.sh up        start munged, MariaDB, slurmdbd, slurmctld and slurmd n1, n2
#   tests/slurm/cluster.sh down      stop what `up` started (by pid file / mount namespace), wipe state
#   tests/slurm/cluster.sh status    show the daemons' pids and `sinfo`
#   tests/slurm/cluster.sh env       print `export SLURM_CONF=...` for clients (sbatch, sacct, submitit)
#
# Why this shape: submitit polls sacct, so accounting (slurmdbd + MariaDB) must be real; submitit
# uses the first node name as MASTER_ADDR, so n1/n2 must resolve inside jobs, which we do with a
# private /etc/hosts bind-mounted in a private mount namespace (`unshare -m`) around each slurm
# daemon — the machine's /etc/hosts is never touched. Everything lives under $SDCA_SLURM_DIR and
# every process we start is recorded, so `down` never touches anything it did not start.
#
# Environment:
#   SDCA_SLURM_DIR         state folder (default /tmp/sdca-slurm)
#   SDCA_SLURM_PORT_BASE   first of 5 TCP ports on 127.0.0.1 (default 17000): slurmctld=BASE,
#                          slurmd n1/n2=BASE+1/BASE+2, slurmdbd=BASE+3, MariaDB=BASE+4
#   SDCA_SLURM_UP_TIMEOUT  seconds to wait for each daemon / for nodes idle (default 90)
set -euo pipefail

STATE="${SDCA_SLURM_DIR:-/tmp/sdca-slurm}"
BASE="${SDCA_SLURM_PORT_BASE:-17000}"
UP_TIMEOUT="${SDCA_SLURM_UP_TIMEOUT:-90}"
CTLD_PORT=$BASE
SLURMD_PORT1=$((BASE + 1))
SLURMD_PORT2=$((BASE + 2))
DBD_PORT=$((BASE + 3))
DB_PORT=$((BASE + 4))
NODES=(n1 n2)
CLUSTER_NAME=sdca
PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)

ETC="$STATE/etc"
RUN="$STATE/run"
LOG="$STATE/log"
MUNGE_DIR="$STATE/munge"
SOCK="$MUNGE_DIR/munge.socket"
CONF="$ETC/slurm.conf"
DB_DIR="$STATE/mysql"
DB_SOCK="$RUN/mysqld.sock"

die() { echo "cluster.sh: error: $*" >&2; exit 1; }
say() { echo "cluster.sh: $*" >&2; }

# ---------------------------------------------------------------- install
cmd_install() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -eq 0 ]; then
        say "install: all packages present"
        return 0
    fi
    [ "$(id -u)" = 0 ] || die "install needs root (missing: ${missing[*]})"
    # Keep the packages from starting system-wide munge/slurm/mariadb services; only add our own
    # policy-rc.d if none is there (a Docker image may already ship one) and remove only ours.
    local ours=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        ours=1
    fi
    local rc=0
    (
        export DEBIAN_FRONTEND=noninteractive
        apt_install() { apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=300 "${missing[@]}"; }
        apt_install || { apt-get update -q -o DPkg::Lock::Timeout=300 && apt_install; }
    ) || rc=$?
    [ $ours = 1 ] && rm -f /usr/sbin/policy-rc.d
    [ $rc = 0 ] || die "apt-get install ${missing[*]} failed (rc=$rc)"
    say "install: installed ${missing[*]}"
}

# ---------------------------------------------------------------- helpers
# pid files we own: NAME -> expected executable basename (checked before any kill, so a pid that
# was recycled by an unrelated process is never signalled).
declare -A EXPECTED_EXE=(
    [munged]=munged [mariadbd]=mariadbd [slurmdbd]=slurmdbd [slurmctld]=slurmctld
    [slurmd-n1]=slurmd [slurmd-n2]=slurmd
)
STOP_ORDER=(slurmd-n1 slurmd-n2 slurmctld slurmdbd mariadbd munged)

pid_of() { # NAME -> pid if its pid file names a live process running the expected program
    local f="$RUN/$1.pid" pid exe
    [ -s "$f" ] || return 1
    pid=$(tr -dc '0-9' < "$f")
    [ -n "$pid" ] && [ -d "/proc/$pid" ] || return 1
    exe=$(readlink "/proc/$pid/exe" 2>/dev/null || true)
    exe=${exe% (deleted)}
    # Debian installs slurmctld/slurmd as alternatives pointing at slurmctld-wlm/slurmd-wlm.
    case "$(basename "$exe")" in "${EXPECTED_EXE[$1]}" | "${EXPECTED_EXE[$1]}-wlm") ;; *) return 1 ;; esac
    echo "$pid"
}

wait_for() { # SECONDS DESCRIPTION COMMAND... : poll until COMMAND succeeds
    local limit=$1 what=$2; shift 2
    local end=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $end ] || return 1
        sleep 0.5
    done
}

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

tail_log() { [ -f "$1" ] && { echo "---- last lines of $1:" >&2; tail -n 15 "$1" >&2; } || true; }

in_hosts_ns() { # run a daemon in a private mount namespace whose /etc/hosts knows n1, n2
    unshare -m --propagation private sh -c 'mount --bind "$0" /etc/hosts && exec "$@"' "$ETC/hosts" "$@"
}

# ---------------------------------------------------------------- down
cmd_down() {
    if [ ! -d "$STATE" ]; then
        say "down: nothing at $STATE"
        return 0
    fi
    # Cancel jobs first so slurmstepd/job processes end cleanly (they outlive slurmd otherwise).
    if pid_of slurmctld >/dev/null && [ -f "$CONF" ]; then
        local ids
        ids=$(SLURM_CONF="$CONF" timeout 10 squeue -h -o %i 2>/dev/null | tr '\n' ' ' || true)
        if [ -n "${ids// /}" ]; then
            SLURM_CONF="$CONF" timeout 10 scancel $ids 2>/dev/null || true
            local end=$((SECONDS + 15))
            while [ $SECONDS -lt $end ] && [ -n "$(SLURM_CONF="$CONF" timeout 5 squeue -h -o %i 2>/dev/null)" ]; do
                sleep 0.5
            done
        fi
    fi
    local name pid
    for name in "${STOP_ORDER[@]}"; do
        pid=$(pid_of "$name") || continue
        kill -TERM "$pid" 2>/dev/null || true
        local end=$((SECONDS + 15))
        while [ -d "/proc/$pid" ] && [ $SECONDS -lt $end ]; do
            # a zombie (state Z) is gone for our purposes
            grep -q '^State:[[:space:]]*Z' "/proc/$pid/status" 2>/dev/null && break
            sleep 0.2
        done
        if [ -d "/proc/$pid" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$pid/status" 2>/dev/null; then
            say "down: $name (pid $pid) ignored SIGTERM; SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    # Leftovers (slurmstepd, job processes) all live in the mount namespaces we created for the
    # slurm daemons: kill exactly the processes still inside those namespaces.
    if [ -s "$RUN/mntns" ]; then
        local ns p own_ns
        own_ns=$(readlink /proc/self/ns/mnt)
        while read -r ns; do
            # never the machine's own namespace, whatever the file says
            [ -n "$ns" ] && [ "$ns" != "$own_ns" ] || continue
            for p in /proc/[0-9]*; do
                [ "$(readlink "$p/ns/mnt" 2>/dev/null)" = "$ns" ] || continue
                say "down: killing leftover ${p#/proc/} ($(tr '\0' ' ' < "$p/cmdline" 2>/dev/null | cut -c1-60))"
                kill -KILL "${p#/proc/}" 2>/dev/null || true
            done
        done < "$RUN/mntns"
    fi
    rm -rf "$STATE"
    say "down: stopped and removed $STATE"
}

# ---------------------------------------------------------------- up
write_configs() {
    local host; host=$(hostname -s)
    { cat /etc/hosts; echo "127.0.0.1 ${NODES[*]} $host"; } > "$ETC/hosts"

    cat > "$CONF" <<EOF
# Generated by tests/slurm/cluster.sh — a throw-away test cluster; see that script.
ClusterName=$CLUSTER_NAME
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCK,cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
AccountingStoragePass=$SOCK
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
DependencyParameters=kill_invalid_depend
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
JobRequeue=1
ReturnToService=2
KillWait=10
MinJobAge=300
InactiveLimit=0
MessageTimeout=10
NodeName=n[1-2] NodeHostname=$host NodeAddr=127.0.0.1 Port=$SLURMD_PORT1-$SLURMD_PORT2 CPUs=4 State=UNKNOWN
PartitionName=low Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=30
PartitionName=high Nodes=n[1-2] MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
EOF

    cat > "$ETC/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$SOCK
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$ETC/slurmdbd.conf"
}

start_munge() {
    mungekey -c -k "$ETC/munge.key" >/dev/null
    chmod 400 "$ETC/munge.key"
    munged -S "$SOCK" --key-file "$ETC/munge.key" --pid-file "$RUN/munged.pid" \
        --log-file "$LOG/munged.log" --seed-file "$STATE/munge.seed" >/dev/null 2>&1 \
        || { tail_log "$LOG/munged.log"; die "munged failed to start"; }
    wait_for "$UP_TIMEOUT" munged pid_of munged || { tail_log "$LOG/munged.log"; die "munged did not write $RUN/munged.pid"; }
    munge -S "$SOCK" -n </dev/null | unmunge -S "$SOCK" >/dev/null \
        || { tail_log "$LOG/munged.log"; die "munge round-trip on $SOCK failed"; }
}

start_mariadb() {
    mariadb-install-db --no-defaults --datadir="$DB_DIR" --user=root --auth-root-authentication-method=socket \
        --skip-test-db > "$LOG/mariadb-install.log" 2>&1 \
        || { tail_log "$LOG/mariadb-install.log"; die "mariadb-install-db failed"; }
    setsid mariadbd --no-defaults --datadir="$DB_DIR" --user=root --port="$DB_PORT" --bind-address=127.0.0.1 \
        --socket="$DB_SOCK" --pid-file="$RUN/mariadbd.pid" --log-error="$LOG/mariadb.log" \
        --skip-log-bin --innodb-buffer-pool-size=64M --innodb-log-file-size=16M \
        --innodb-lock-wait-timeout=900 --max-allowed-packet=64M </dev/null >/dev/null 2>&1 &
    wait_for "$UP_TIMEOUT" mariadb mariadb-admin --no-defaults -S "$DB_SOCK" -u root ping \
        || { tail_log "$LOG/mariadb.log"; die "MariaDB did not answer on $DB_SOCK within ${UP_TIMEOUT}s"; }
    mariadb --no-defaults -S "$DB_SOCK" -u root -e \
        "CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';" \
        || die "could not create the slurm database user"
}

start_slurmdbd() {
    # slurmdbd has no -f: it reads slurmdbd.conf next to $SLURM_CONF.
    SLURM_CONF="$CONF" slurmdbd </dev/null >/dev/null 2>&1 || { tail_log "$LOG/slurmdbd.log"; die "slurmdbd failed to start"; }
    wait_for "$UP_TIMEOUT" slurmdbd port_open "$DBD_PORT" \
        || { tail_log "$LOG/slurmdbd.log"; die "slurmdbd did not listen on 127.0.0.1:$DBD_PORT within ${UP_TIMEOUT}s"; }
    SLURM_CONF="$CONF" sacctmgr -i add cluster "$CLUSTER_NAME" >/dev/null 2>&1 || true
}

start_slurm_daemon() { # PIDNAME LOGFILE COMMAND...
    local name=$1 log=$2; shift 2
    in_hosts_ns "$@" </dev/null >/dev/null 2>&1 || { tail_log "$log"; die "$name failed to start"; }
    wait_for "$UP_TIMEOUT" "$name" pid_of "$name" || { tail_log "$log"; die "$name did not write $RUN/$name.pid"; }
    readlink "/proc/$(pid_of "$name")/ns/mnt" >> "$RUN/mntns"
}

nodes_idle() {
    local out
    out=$(SLURM_CONF="$CONF" sinfo -h -N -o '%N %t' 2>/dev/null | sort -u) || return 1
    [ "$(grep -cE '^n[12] idle$' <<<"$out")" -eq 2 ] && ! grep -vqE 'idle$' <<<"$out"
}

cmd_up() {
    [ "$(id -u)" = 0 ] || die "up needs root (daemons run as root, /etc/hosts is bind-mounted)"
    local p
    for p in munged mariadbd mariadb-install-db slurmdbd slurmctld slurmd sinfo unshare; do
        command -v "$p" >/dev/null || die "$p not found: run '$0 install' first"
    done
    unshare -m --propagation private true 2>/dev/null \
        || die "'unshare -m' is not permitted here (needs CAP_SYS_ADMIN, e.g. a privileged container): n1/n2 cannot be made resolvable for jobs"
    # A previous (crashed) run: stop what it started, by its own pid files.
    [ -d "$STATE" ] && { say "up: cleaning previous state at $STATE"; cmd_down; }
    for p in "$CTLD_PORT" "$SLURMD_PORT1" "$SLURMD_PORT2" "$DBD_PORT" "$DB_PORT"; do
        port_free "$p" || die "port 127.0.0.1:$p is in use by another program; set SDCA_SLURM_PORT_BASE"
    done
    local t0=$SECONDS
    mkdir -p "$STATE" "$ETC" "$RUN" "$LOG" "$MUNGE_DIR" "$DB_DIR" "$STATE/ctld" "$STATE/spool/n1" "$STATE/spool/n2"
    # munged insists: the folder above its socket 711, the socket folder 755.
    chmod 711 "$STATE"; chmod 755 "$MUNGE_DIR"
    : > "$RUN/mntns"
    write_configs
    start_munge
    start_mariadb
    start_slurmdbd
    start_slurm_daemon slurmctld "$LOG/slurmctld.log" slurmctld -f "$CONF"
    local n
    for n in "${NODES[@]}"; do
        start_slurm_daemon "slurmd-$n" "$LOG/slurmd-$n.log" slurmd -f "$CONF" -N "$n"
    done
    if ! wait_for "$UP_TIMEOUT" "nodes idle" nodes_idle; then
        SLURM_CONF="$CONF" sinfo -N >&2 || true
        tail_log "$LOG/slurmctld.log"
        die "nodes n1, n2 not idle within ${UP_TIMEOUT}s"
    fi
    say "up: cluster '$CLUSTER_NAME' ready in $((SECONDS - t0)) s (state $STATE)"
    echo "SLURM_CONF=$CONF"
}

cmd_status() {
    local name pid rc=0
    for name in "${STOP_ORDER[@]}"; do
        if pid=$(pid_of "$name"); then echo "$name: running (pid $pid)"; else echo "$name: not running"; rc=1; fi
    done
    [ -f "$CONF" ] && SLURM_CONF="$CONF" sinfo -N || rc=1
    return $rc
}

cmd_env() {
    echo "export SLURM_CONF=$CONF"
    echo "export SDCA_SLURM_DIR=$STATE"
}

# A pytest session holds an flock on $STATE.lock for its whole life (tests/slurm/conftest.py) and
# tells us so with SDCA_SLURM_LOCK_HELD=1; by hand, refuse to touch a slot a session is using.
guard_session_lock() {
    [ "${SDCA_SLURM_LOCK_HELD:-}" = 1 ] && return 0
    # only test the lock: an fd held here would be inherited by the daemons and lock the slot forever
    flock -n "$STATE.lock" true || die "a test session is using $STATE (it holds $STATE.lock); pick another SDCA_SLURM_DIR and SDCA_SLURM_PORT_BASE"
}

case "${1:-}" in
    install) cmd_install ;;
    up) guard_session_lock; cmd_up ;;
    down) guard_session_lock; cmd_down ;;
    status) cmd_status ;;
    env) cmd_env ;;
    *) echo "usage: $0 {install|up|down|status|env}" >&2; exit 2 ;;
esac
