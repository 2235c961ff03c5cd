#!/usr/bin/env bash
# local-cluster.sh - a real multi-node Ray cluster on the loopback interface.
#
# Every node is its own `ray start` (own raylet, object store and resources),
# all on 127.0.0.1, so multi-node behaviour (SPREAD placement, objects moving
# between nodes, workers that do not share the driver's process) can be tried
# on one machine.
#
#   cluster/local-cluster.sh start N [--cpus C] [--port P] [--object-store-memory BYTES]
#   cluster/local-cluster.sh status
#   cluster/local-cluster.sh env
#   cluster/local-cluster.sh stop [--keep-logs]
#
# `start` prints the cluster address (127.0.0.1:PORT) on its last stdout line:
#   ADDR=$(cluster/local-cluster.sh start 3 | tail -n1)
#   eval "$(cluster/local-cluster.sh env)"      # see "Drivers" below
#   orch launch sweep.yaml --address "$ADDR"
#
# Loopback only: every process of the cluster uses and listens on 127.0.0.1.
# Ray replaces a loopback node or GCS address by the machine's outward IP
# (ray._private.services.resolve_ip_for_localhost) unless
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is set, under which it keeps 127.0.0.1.
# All node processes run with that variable; `ray start --address` refuses to
# run under it, so worker nodes are started through a launcher (START_NODE_PY
# below) that lifts the refusal for itself and keeps the loopback address.
#
# Drivers: for the same reason a driver must run with
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 to reach 127.0.0.1:PORT (`env` prints
# the exports: RAY_ADDRESS, that variable, RAY_AUTH_MODE), or connect through
# the head's Ray client server, which needs nothing: ray://127.0.0.1:PORT+1.
#
# `stop` ends exactly the processes this script started, and nothing else; it
# never calls `ray stop` (which kills every Ray process on the machine).  Each
# node's `ray start` runs in a session of its own (setsid) and with
# ORCH_LOCAL_CLUSTER_ID=<unique id> in its environment.  Ray starts no session
# itself, so every process of a node (GCS, raylet, agents, the worker
# processes a raylet forks later) stays in that session and inherits the id.
# `stop` signals the processes that carry the id in /proc/PID/environ, share
# a session with one that does, or descend from one of those; it checks each
# process's start time before signalling, so a reused PID is never hit.
#
# Environment:
#   ORCH_PYTHON           python whose ray is used (default: `python` on PATH
#                         if it imports ray, else <repo>/.venv/bin/python)
#   ORCH_RAY_PORT         GCS port of the head node (default 6390)
#   ORCH_CLUSTER_STATE    state directory (default $HOME/.orch/local-cluster)
#   ORCH_RAY_TEMP_DIR     Ray temp/session dir shared by the nodes (default
#                         /tmp/orch-ray-PORT; keep it short: Ray's unix socket
#                         paths live under it and are capped at 107 bytes)
#   ORCH_OBJECT_STORE_MEMORY  object store bytes per node (default 256 MiB)
#   ORCH_START_TIMEOUT    seconds to wait for all nodes to register (default 90)
#   ORCH_STOP_GRACE       seconds of SIGTERM grace per stop phase (default 5)
#   RAY_AUTH_MODE         passed on to the nodes; default "disabled" (see below)
#
# Ports: the head's GCS listens on PORT, its Ray client server on PORT+1 and
# its frontend-less dashboard process on PORT+2; node i (0 = head) uses
# PORT+10+100*i ... PORT+109+100*i: node manager +0, object manager +1,
# dashboard agent http +2 / grpc +3, runtime-env agent +4, metrics export +5,
# worker processes +10..+99.  `start` refuses if one of them is taken.
set -euo pipefail

readonly SCRIPT_NAME="${0##*/}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO_ROOT
readonly STATE_DIR="${ORCH_CLUSTER_STATE:-$HOME/.orch/local-cluster}"
readonly STATE_FILE="$STATE_DIR/cluster.env"
readonly MARKER_VAR="ORCH_LOCAL_CLUSTER_ID"
readonly MAX_NODES=32

die() { echo "$SCRIPT_NAME: error: $*" >&2; exit 1; }
log() { echo "$SCRIPT_NAME: $*" >&2; }
is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }

usage() {
    cat <<EOF
usage: $SCRIPT_NAME start N [--cpus C] [--port P] [--object-store-memory BYTES]
       $SCRIPT_NAME status
       $SCRIPT_NAME env
       $SCRIPT_NAME stop [--keep-logs]

start   start a Ray head and N-1 worker nodes on 127.0.0.1, each its own
        'ray start' with C CPUs (default 1); the address is the last line
status  the recorded cluster, its live processes and the nodes the GCS lists
env     exports for a driver on this machine: eval "\$($SCRIPT_NAME env)"
stop    end exactly the processes that 'start' started
EOF
}

# --------------------------------------------------------------------------
# python (and with it ray)
# --------------------------------------------------------------------------
has_ray() { "$1" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("ray") is None)' 2>/dev/null; }

resolve_python() {
    if [[ -n "${ORCH_PYTHON:-}" ]]; then
        PY="$(command -v "$ORCH_PYTHON" 2>/dev/null)" || die "ORCH_PYTHON=$ORCH_PYTHON is not executable"
        has_ray "$PY" || die "ORCH_PYTHON=$PY cannot import ray"
        return
    fi
    local cand
    for cand in "$(command -v python 2>/dev/null || true)" "$(command -v python3 2>/dev/null || true)" \
                "$REPO_ROOT/.venv/bin/python"; do
        if [[ -n "$cand" && -x "$cand" ]] && has_ray "$cand"; then PY="$cand"; return; fi
    done
    die "no python that imports ray; set ORCH_PYTHON=/path/to/python"
}

# `ray start` with the given arguments, run by $PY exactly like the `ray`
# console script next to it (python -m ray.scripts.scripts), in a session of
# its own, and, for a worker node, kept on 127.0.0.1 (see the top).
read -r -d '' START_NODE_PY <<'PYEOF' || true
import os
import sys

try:
    os.setsid()
except PermissionError:  # already a process-group leader: go on in a child
    child = os.fork()
    if child:
        sys.exit(os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]))
    os.setsid()

if "--head" not in sys.argv:
    from ray._private import ray_constants, services

    # The environment holds RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 so that the
    # processes of this node keep 127.0.0.1; `ray start --address` refuses to
    # run under it, so lift it for this launcher only ...
    ray_constants.ENABLE_RAY_CLUSTER = True
    # ... and keep the loopback addresses it is given.
    _resolve = services.resolve_ip_for_localhost
    services.resolve_ip_for_localhost = (
        lambda host: host if host == "127.0.0.1" else _resolve(host)
    )

from ray.scripts.scripts import main

sys.argv[0] = "ray"
sys.exit(main())
PYEOF

# --------------------------------------------------------------------------
# state file: KEY=VALUE lines written by this script
# --------------------------------------------------------------------------
load_state() {
    [[ -f "$STATE_FILE" ]] || return 1
    CL_ID="" CL_PORT="" CL_ADDRESS="" CL_NODES="" CL_CPUS="" CL_TEMP_DIR=""
    CL_TEMP_CREATED=0 CL_AUTH_MODE=disabled CL_SIDS=""
    local key value
    while IFS='=' read -r key value; do
        case "$key" in
            ID) CL_ID="$value" ;;
            PORT) CL_PORT="$value" ;;
            ADDRESS) CL_ADDRESS="$value" ;;
            NODES) CL_NODES="$value" ;;
            CPUS) CL_CPUS="$value" ;;
            TEMP_DIR) CL_TEMP_DIR="$value" ;;
            TEMP_CREATED) CL_TEMP_CREATED="$value" ;;
            AUTH_MODE) CL_AUTH_MODE="$value" ;;
            SIDS) CL_SIDS="$value" ;;
        esac
    done < "$STATE_FILE"
    [[ -n "$CL_ID" ]] || die "corrupt state file $STATE_FILE (no ID)"
}

# --------------------------------------------------------------------------
# the processes of one cluster
# --------------------------------------------------------------------------
# PIDs whose environment holds MARKER_VAR=ID exactly.  (A zombie's environ
# reads empty; a process that rewrote its title with setproctitle, as Ray's
# agents and workers do, may have blanked it: the session catches those.)
marked_pids() {
    local f pid
    { grep -lzxF -- "$MARKER_VAR=$1" /proc/[0-9]*/environ 2>/dev/null || true; } |
    while IFS= read -r f; do
        pid="${f#/proc/}"; echo "${pid%/environ}"
    done
}

# Reads /proc/PID/stat into ST_STATE ST_PPID ST_SID ST_START ST_COMM; fails
# for a process that is gone.
proc_stat() {
    local line rest fields
    { IFS= read -r line < "/proc/$1/stat"; } 2>/dev/null || return 1
    rest="${line##*) }"
    read -r -a fields <<< "$rest"
    ST_STATE="${fields[0]}" ST_PPID="${fields[1]}" ST_SID="${fields[3]}" ST_START="${fields[19]}"
    ST_COMM="${line#*(}"; ST_COMM="${ST_COMM%) *}"
}

# Start time of a live (not zombie) process, empty if it is gone.
proc_start() {
    proc_stat "$1" || return 0
    [[ "$ST_STATE" == [ZX] ]] || echo "$ST_START"
}

own_sid() { proc_stat $$ && echo "$ST_SID"; }

# cluster_procs ID "SID...": prints "PID:STARTTIME COMM" for each live process
# of the cluster: marked ones, those in a session of a marked one or in one of
# the recorded sessions, and their descendants - never this script or its
# children, nor anything in the session of this script.  A recorded session
# whose leader is alive and unmarked is not ours (the `ray start` that led
# ours has exited; a live leader means the number was reused).
cluster_procs() {
    local id="$1" recorded="${2:-}" sids=" " self_sid pid f sid changed
    local -A ppid_of=() start_of=() comm_of=() sid_of=() ours=() mine=()
    self_sid="$(own_sid)"
    for f in /proc/[0-9]*; do
        pid="${f#/proc/}"
        proc_stat "$pid" || continue
        [[ "$ST_STATE" == [ZX] ]] && continue
        ppid_of[$pid]="$ST_PPID" start_of[$pid]="$ST_START" comm_of[$pid]="$ST_COMM" sid_of[$pid]="$ST_SID"
    done
    for pid in $(marked_pids "$id"); do
        [[ -n "${sid_of[$pid]:-}" ]] || continue
        ours[$pid]=1
        sids+="${sid_of[$pid]} "
    done
    for sid in $recorded; do
        is_uint "$sid" || continue
        [[ -z "${ppid_of[$sid]:-}" || -n "${ours[$sid]:-}" ]] && sids+="$sid "
    done
    for pid in "${!sid_of[@]}"; do
        [[ "${sid_of[$pid]}" -gt 1 && "${sid_of[$pid]}" != "$self_sid" && "$sids" == *" ${sid_of[$pid]} "* ]] \
            && ours[$pid]=1
    done
    mine[$$]=1
    changed=1
    while ((changed)); do
        changed=0
        for pid in "${!ppid_of[@]}"; do
            if [[ -z "${mine[$pid]:-}" && -n "${mine[${ppid_of[$pid]}]:-}" ]]; then mine[$pid]=1; changed=1; fi
            if [[ -z "${ours[$pid]:-}" && -n "${ours[${ppid_of[$pid]}]:-}" ]]; then ours[$pid]=1; changed=1; fi
        done
    done
    for pid in "${!ours[@]}"; do
        [[ -n "${mine[$pid]:-}" || "${sid_of[$pid]}" == "$self_sid" ]] && continue
        echo "$pid:${start_of[$pid]} ${comm_of[$pid]}"
    done
    return 0
}

# Sessions of the marked processes (recorded so that `stop` finds a node's
# processes even if its marked ones are already gone).
cluster_sids() {
    local pid self_sid; self_sid="$(own_sid)"
    for pid in $(marked_pids "$1"); do
        proc_stat "$pid" || continue
        [[ "$ST_SID" -gt 1 && "$ST_SID" != "$self_sid" ]] && echo "$ST_SID"
    done | sort -un | tr '\n' ' '
    return 0
}

# send SIGNAL PID:START...: signal only processes whose start time still
# matches (the PID has not been reused).
send() {
    local sig="$1" e; shift
    for e in "$@"; do
        if [[ "$(proc_start "${e%%:*}")" == "${e#*:}" ]]; then
            kill -"$sig" "${e%%:*}" 2>/dev/null || true
        fi
    done
}

alive_of() {  # prints the entries of PID:START... that are still alive
    local e
    for e in "$@"; do [[ "$(proc_start "${e%%:*}")" == "${e#*:}" ]] && echo "$e"; done
    return 0
}

# phase GRACE PID:START...: SIGTERM, wait GRACE seconds, SIGKILL the rest.
phase() {
    local grace="$1" left deadline; shift
    (($#)) || return 0
    send TERM "$@"
    deadline=$((SECONDS + grace))
    while :; do
        mapfile -t left < <(alive_of "$@")
        ((${#left[@]})) || return 0
        ((SECONDS < deadline)) || break
        sleep 0.2
    done
    send KILL "${left[@]}"
    deadline=$((SECONDS + 10))
    while ((SECONDS < deadline)); do
        mapfile -t left < <(alive_of "${left[@]}")
        ((${#left[@]})) || return 0
        sleep 0.1
    done
    log "warning: still alive after SIGKILL: ${left[*]%%:*}"
}

# kill_cluster ID "SID...": in the order of `ray stop` - raylets first (they
# take their workers and agents down with them), then the other processes,
# the GCS last - repeated while anything of the cluster is left (a worker
# forked during the stop is caught by the next round).
kill_cluster() {
    local id="$1" sids="${2:-}" grace="${ORCH_STOP_GRACE:-5}" _round line
    is_uint "$grace" || grace=5
    local -a procs raylets others gcs
    sids+=" $(cluster_sids "$id")"
    for _round in 1 2 3 4; do
        mapfile -t procs < <(cluster_procs "$id" "$sids")
        ((${#procs[@]})) || return 0
        raylets=() gcs=()
        for line in "${procs[@]}"; do
            case "${line#* }" in
                raylet) raylets+=("${line%% *}") ;;
                gcs_server) gcs+=("${line%% *}") ;;
            esac
        done
        phase "$grace" "${raylets[@]}"
        mapfile -t procs < <(cluster_procs "$id" "$sids")
        others=()
        for line in "${procs[@]}"; do
            [[ "${line#* }" == gcs_server ]] || others+=("${line%% *}")
        done
        phase "$grace" "${others[@]}"
        phase "$grace" "${gcs[@]}"
    done
    mapfile -t procs < <(cluster_procs "$id" "$sids")
    ((${#procs[@]} == 0)) || { log "warning: processes left: ${procs[*]}"; return 1; }
}

# --------------------------------------------------------------------------
# helpers run by the cluster's python
# --------------------------------------------------------------------------
ports_busy() {  # prints those of the given ports that cannot be bound
    "$PY" - "$@" <<'PYEOF'
import socket, sys
for port in map(int, sys.argv[1:]):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # as Ray's servers do: a port held only by TIME_WAIT connections is free
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("", port))  # every interface: some Ray servers bind there
    except OSError:
        print(port)
    finally:
        s.close()
PYEOF
}

# gcs_nodes ADDRESS WANT TIMEOUT: waits until the GCS lists WANT alive nodes
# (WANT=0: asks once), prints one line per alive node, fails on timeout.
gcs_nodes() {
    "$PY" - "$@" <<'PYEOF'
import sys
import time

addr, want, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
import ray._raylet
from ray.core.generated import gcs_pb2

deadline = time.monotonic() + timeout
alive, err = [], None
while True:
    try:
        infos = ray._raylet.GcsClient(address=addr).get_all_node_info(timeout=5)
        alive = [(nid, n) for nid, n in infos.items()
                 if n.state == gcs_pb2.GcsNodeInfo.ALIVE]
        err = None
    except Exception as e:  # GCS not up yet, or gone
        err = e
    if (err is None and len(alive) >= want) or time.monotonic() > deadline:
        break
    time.sleep(0.5)
alive.sort(key=lambda x: (not x[1].is_head_node, x[1].node_manager_port))
for nid, n in alive:
    cpus = dict(n.resources_total).get("CPU", 0)
    role = "head  " if n.is_head_node else "worker"
    print(f"{nid.hex()}  {n.node_manager_address}:{n.node_manager_port}  {role}  CPU={cpus:g}  ALIVE")
if err is not None:
    print(f"cannot query the GCS at {addr}: {err}", file=sys.stderr)
sys.exit(0 if err is None and len(alive) >= want else 1)
PYEOF
}

# --------------------------------------------------------------------------
# start
# --------------------------------------------------------------------------
STARTING_ID="" STARTING_TEMP_DIR=""
on_start_exit() {
    local rc=$?
    [[ -n "$STARTING_ID" ]] || return 0
    set +e
    log "start failed; stopping what it started (logs: $STATE_DIR/logs)"
    kill_cluster "$STARTING_ID" ""
    rm -f "$STATE_FILE" "$STATE_DIR/nodes" "$STATE_DIR/pids"
    [[ -z "$STARTING_TEMP_DIR" ]] || rm -rf -- "$STARTING_TEMP_DIR"
    exit $((rc ? rc : 1))
}

cmd_start() {
    local n="" cpus=1 port="${ORCH_RAY_PORT:-6390}" osm="${ORCH_OBJECT_STORE_MEMORY:-268435456}"
    # Token authentication: as the caller's RAY_AUTH_MODE says, else off.  Left
    # to Ray's default, a ~/.ray/auth_token written by any earlier ray.init()
    # would switch it on, and a driver that connects by explicit address does
    # not send that token.  The cluster listens on 127.0.0.1 only.
    local auth_mode="${RAY_AUTH_MODE:-disabled}"
    while (($#)); do
        case "$1" in
            --cpus) (($# >= 2)) || die "--cpus needs a value"; cpus="$2"; shift 2 ;;
            --cpus=*) cpus="${1#*=}"; shift ;;
            --port) (($# >= 2)) || die "--port needs a value"; port="$2"; shift 2 ;;
            --port=*) port="${1#*=}"; shift ;;
            --object-store-memory) (($# >= 2)) || die "--object-store-memory needs a value"; osm="$2"; shift 2 ;;
            --object-store-memory=*) osm="${1#*=}"; shift ;;
            -h|--help) usage; exit 0 ;;
            -*) die "unknown option $1" ;;
            *) [[ -z "$n" ]] || die "unexpected argument $1"; n="$1"; shift ;;
        esac
    done
    [[ -n "$n" ]] || { usage >&2; exit 2; }
    if ! { is_uint "$n" && ((n >= 1 && n <= MAX_NODES)); }; then
        die "N must be an integer in 1..$MAX_NODES (got '$n')"
    fi
    is_uint "$cpus" || die "--cpus must be a whole number (got '$cpus')"
    if ! { is_uint "$port" && ((port >= 1024)); }; then
        die "the port must be a number >= 1024 (got '$port')"
    fi
    is_uint "$osm" || die "the object store size must be a number of bytes (got '$osm')"
    ((port + 109 + 100 * (n - 1) <= 65535)) || die "port $port is too high for $n nodes"

    resolve_python

    if load_state; then
        if [[ -n "$(cluster_procs "$CL_ID" "$CL_SIDS")" ]]; then
            die "a local cluster is running at $CL_ADDRESS (state in $STATE_DIR); '$SCRIPT_NAME stop' it first"
        fi
        log "clearing the state of a cluster that no longer runs ($STATE_DIR)"
        rm -f "$STATE_FILE" "$STATE_DIR/pids" "$STATE_DIR/nodes"
    fi

    local ports=("$port" $((port + 1)) $((port + 2))) i b p busy
    for ((i = 0; i < n; i++)); do
        b=$((port + 10 + 100 * i))
        for p in 0 1 2 3 4 5; do ports+=($((b + p))); done
    done
    busy="$(ports_busy "${ports[@]}" | tr '\n' ' ')"
    [[ -z "${busy// /}" ]] || die "port(s) in use: ${busy}- choose another with --port or ORCH_RAY_PORT"

    # The temp dir is removed by `stop` if this script made it (it then holds
    # a .orch-local-cluster file), kept otherwise.
    local temp_dir="${ORCH_RAY_TEMP_DIR:-/tmp/orch-ray-$port}" temp_created=0
    if [[ ! -e "$temp_dir" || -e "$temp_dir/.orch-local-cluster" ]]; then
        temp_created=1
        mkdir -p "$temp_dir"
        : > "$temp_dir/.orch-local-cluster"
    fi
    mkdir -p "$temp_dir" "$STATE_DIR/logs"
    temp_dir="$(cd "$temp_dir" && pwd -P)"
    STARTING_TEMP_DIR=""
    ((temp_created == 0)) || STARTING_TEMP_DIR="$temp_dir"
    ((${#temp_dir} <= 40)) || log "warning: '$temp_dir' is long; Ray's socket paths under it may pass 107 bytes"

    local id address="127.0.0.1:$port"
    id="orch-$port-$(date +%s)-$$-$RANDOM"
    write_state() {
        {
            echo "ID=$id"; echo "PORT=$port"; echo "ADDRESS=$address"; echo "NODES=$n"
            echo "CPUS=$cpus"; echo "TEMP_DIR=$temp_dir"; echo "TEMP_CREATED=$temp_created"
            echo "PYTHON=$PY"; echo "AUTH_MODE=$auth_mode"; echo "SIDS=$(cluster_sids "$id")"
        } > "$STATE_FILE.tmp"
        mv "$STATE_FILE.tmp" "$STATE_FILE"
    }
    write_state
    : > "$STATE_DIR/nodes"

    # A start that fails (or is interrupted) takes down what it had started.
    STARTING_ID="$id"
    trap on_start_exit EXIT
    trap 'exit 130' INT TERM

    local common=(--num-cpus "$cpus" --object-store-memory "$osm" --temp-dir "$temp_dir"
                  --disable-usage-stats)
    node_ports() {  # the port flags of node $1
        local b=$((port + 10 + 100 * $1))
        echo --node-manager-port=$b --object-manager-port=$((b + 1)) \
             --dashboard-agent-listen-port=$((b + 2)) --dashboard-agent-grpc-port=$((b + 3)) \
             --runtime-env-agent-port=$((b + 4)) --metrics-export-port=$((b + 5)) \
             --min-worker-port=$((b + 10)) --max-worker-port=$((b + 99))
    }
    local node_env=(env "$MARKER_VAR=$id" RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
                    RAY_AUTH_MODE="$auth_mode" RAY_USAGE_STATS_ENABLED=0)

    log "starting the head on $address ($cpus CPU) with $PY"
    # shellcheck disable=SC2046
    "${node_env[@]}" "$PY" -c "$START_NODE_PY" start --head \
        --node-ip-address=127.0.0.1 --port="$port" --ray-client-server-port=$((port + 1)) \
        --include-dashboard=false --dashboard-port=$((port + 2)) \
        "${common[@]}" $(node_ports 0) \
        > "$STATE_DIR/logs/node-0.log" 2>&1 \
        || { tail -n 20 "$STATE_DIR/logs/node-0.log" >&2; die "the head did not start"; }
    echo "0 head $address" >> "$STATE_DIR/nodes"
    write_state

    for ((i = 1; i < n; i++)); do
        log "starting worker node $i ($cpus CPU)"
        # One log monitor per machine (the head's), as Ray advises.
        # shellcheck disable=SC2046
        "${node_env[@]}" "$PY" -c "$START_NODE_PY" start --address="$address" \
            --node-ip-address=127.0.0.1 --include-log-monitor=False \
            "${common[@]}" $(node_ports "$i") \
            > "$STATE_DIR/logs/node-$i.log" 2>&1 \
            || { tail -n 20 "$STATE_DIR/logs/node-$i.log" >&2; die "worker node $i did not start"; }
        echo "$i worker 127.0.0.1:$((port + 10 + 100 * i))" >> "$STATE_DIR/nodes"
        write_state
    done

    log "waiting for $n node(s) to register with the GCS"
    local listing
    listing="$(RAY_AUTH_MODE="$auth_mode" gcs_nodes "$address" "$n" "${ORCH_START_TIMEOUT:-90}")" \
        || { echo "$listing" >&2; die "not all $n nodes came up"; }
    trap - EXIT INT TERM
    STARTING_ID=""
    write_state
    cluster_procs "$id" "$(cluster_sids "$id")" | sort -n > "$STATE_DIR/pids"

    echo "$listing"
    echo "local Ray cluster: $n node(s), $cpus CPU each, state in $STATE_DIR; stop: $0 stop"
    echo "drivers: eval \"\$($0 env)\" first, or use the Ray client: ray://127.0.0.1:$((port + 1))"
    echo "$address"
}

# --------------------------------------------------------------------------
# status / env / stop
# --------------------------------------------------------------------------
cmd_status() {
    if ! load_state; then
        echo "no local cluster recorded in $STATE_DIR"
        return 3
    fi
    local procs; mapfile -t procs < <(cluster_procs "$CL_ID" "$CL_SIDS")
    echo "address:    $CL_ADDRESS  (Ray client: ray://127.0.0.1:$((CL_PORT + 1)))"
    echo "nodes:      $CL_NODES started, $CL_CPUS CPU each"
    echo "state:      $STATE_DIR"
    echo "temp dir:   $CL_TEMP_DIR"
    echo "processes:  ${#procs[@]} alive"
    if ((${#procs[@]} == 0)); then
        echo "not running (stale state; '$SCRIPT_NAME stop' clears it)"
        return 3
    fi
    resolve_python
    RAY_AUTH_MODE="$CL_AUTH_MODE" gcs_nodes "$CL_ADDRESS" 0 10 || true
}

cmd_env() {
    load_state || die "no local cluster recorded in $STATE_DIR"
    # For a driver on this machine only: with the variable Ray keeps
    # 127.0.0.1 (see the top); unset it before reaching any other cluster.
    echo "export RAY_ADDRESS=$CL_ADDRESS"
    echo "export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0"
    echo "export RAY_AUTH_MODE=$CL_AUTH_MODE"
}

cmd_stop() {
    local keep_logs=0
    while (($#)); do
        case "$1" in
            --keep-logs) keep_logs=1; shift ;;
            -h|--help) usage; return 0 ;;
            *) die "unknown argument $1" ;;
        esac
    done
    if ! load_state; then
        echo "no local cluster recorded in $STATE_DIR; nothing to stop"
        return 0
    fi
    local count; count="$(cluster_procs "$CL_ID" "$CL_SIDS" | wc -l)"
    kill_cluster "$CL_ID" "$CL_SIDS" || die "some processes of $CL_ADDRESS did not end; see above"
    if ((keep_logs == 0)) && [[ "$CL_TEMP_CREATED" == 1 && -d "$CL_TEMP_DIR" ]]; then
        rm -rf -- "$CL_TEMP_DIR"
    fi
    rm -f "$STATE_FILE" "$STATE_DIR/pids" "$STATE_DIR/nodes"
    ((keep_logs)) || rm -rf -- "$STATE_DIR/logs"
    rmdir -- "$STATE_DIR" 2>/dev/null || true
    echo "stopped the local cluster at $CL_ADDRESS ($count processes)"
}

main() {
    (($#)) || { usage >&2; exit 2; }
    local cmd="$1"; shift
    case "$cmd" in
        start) cmd_start "$@" ;;
        status) cmd_status "$@" ;;
        env) cmd_env "$@" ;;
        stop) cmd_stop "$@" ;;
        -h|--help|help) usage ;;
        *) usage >&2; exit 2 ;;
    esac
}

main "$@"
