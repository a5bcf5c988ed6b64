# shellcheck shell=bash
# Helpers shared by infra/services.sh and infra/workers.sh. Source it; do not run it.

# Telemetry off for everything these scripts start.
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export DO_NOT_TRACK=true
export MLFLOW_DISABLE_TELEMETRY=true

PROG=${PROG:-$(basename "$0")}
STOP_TIMEOUT=${EDGETUNE_STOP_TIMEOUT:-20}

log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }

# The state directory as an absolute path; with "create", made (traversable only) if missing.
resolve_state_dir() {
    local dir=${EDGETUNE_STATE_DIR:-.edgetune/services}
    if [[ ${1:-} != create && ! -d $dir ]]; then
        STATE=$(realpath -m -- "$dir")
        return 0
    fi
    mkdir -p "$dir" || die "cannot create state dir $dir; set EDGETUNE_STATE_DIR to a writable path"
    STATE=$(cd "$dir" && pwd -P)
    chmod 0711 "$STATE"
    # Keeps passwords, data and logs out of git wherever the state dir lives.
    [[ -e $STATE/.gitignore ]] || printf '*\n' >"$STATE/.gitignore"
}

# Path of an executable: $EDGETUNE_VENV/bin/NAME (default venv: ./.venv), else PATH.
venv_bin() {
    local name=$1 venv=${EDGETUNE_VENV:-.venv}
    if [[ -x $venv/bin/$name ]]; then
        (cd "$venv/bin" && printf '%s/%s\n' "$(pwd -P)" "$name")
    elif command -v "$name" >/dev/null 2>&1; then
        command -v "$name"
    else
        die "'$name' not found in ${venv}/bin nor on PATH; set EDGETUNE_VENV to the virtualenv where edgetune is installed (make setup creates .venv)"
    fi
}

# Replaces the password in URLs by *** for log lines.
mask() { sed -E 's#(://[^:/@]+:)[^@]*@#\1***@#g' <<<"$*"; }

# Percent-encodes a string for the userinfo part of a URL.
urlencode() {
    local s=$1 out='' c i
    for ((i = 0; i < ${#s}; i++)); do
        c=${s:i:1}
        case $c in
            [a-zA-Z0-9._~-]) out+=$c ;;
            *) printf -v c '%%%02X' "'$c"; out+=$c ;;
        esac
    done
    printf '%s' "$out"
}

# True if something accepts TCP connections on 127.0.0.1:PORT.
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# True if URL answers 2xx within 3 s.
http_ok() {
    if command -v curl >/dev/null 2>&1; then
        curl -fsS -o /dev/null --max-time 3 "$1" 2>/dev/null
    else
        "$(venv_bin python)" - "$1" <<'PY' 2>/dev/null
import sys, urllib.request
urllib.request.urlopen(sys.argv[1], timeout=3)
PY
    fi
}

# Live (non-zombie) processes of process group PGID, one pid a line.
group_members() {
    ps -eo pid=,pgid=,stat= | awk -v g="$1" '$2 == g && $3 !~ /^Z/ { print $1 }'
}

group_alive() { [[ -n $(group_members "$1") ]]; }

# Prints the process group recorded in PIDFILE if any process of it is alive; when its
# leader is alive, only if the leader's command line contains PATTERN (a recycled pid).
# Linux never hands out a pid that is still some group's id, so members of a group whose
# leader is gone are ours.
live_group() {
    local pidfile=$1 pattern=$2 pid
    [[ -s $pidfile ]] || return 1
    pid=$(<"$pidfile")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    group_alive "$pid" || return 1
    if [[ -r /proc/$pid/cmdline ]] && [[ $(ps -o pgid= -p "$pid" 2>/dev/null | tr -d ' ') == "$pid" ]]; then
        tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$pattern" || return 1
    fi
    printf '%s\n' "$pid"
}

# Starts a command in the background in its own session and process group, detached
# from the terminal, output to LOGFILE; records its pid (= its process group id).
# Usage: start_detached PIDFILE LOGFILE WORKDIR cmd args...
start_detached() {
    local pidfile=$1 logfile=$2 workdir=$3 pid
    shift 3
    (cd "$workdir" && exec setsid "$@" </dev/null >>"$logfile" 2>&1) &
    pid=$!
    printf '%s\n' "$pid" >"$pidfile"
    # setsid exec'ed in place, so the pid leads its own group; check before relying on it.
    sleep 0.2
    if [[ $(ps -o pgid= -p "$pid" 2>/dev/null | tr -d ' ') != "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
        die "started pid $pid is not a process group leader; is 'setsid' from util-linux installed?"
    fi
}

# Sends SIGNAL to every process group in PGIDS (ignores groups already gone).
signal_groups() {
    local sig=$1 pgid
    shift
    for pgid in "$@"; do kill "-$sig" -- "-$pgid" 2>/dev/null || true; done
}

# Waits up to SECONDS for all groups to exit; fails if some are still alive.
wait_groups_gone() {
    local secs=$1 deadline pgid alive
    shift
    deadline=$((SECONDS + secs))
    while :; do
        alive=0
        for pgid in "$@"; do group_alive "$pgid" && alive=1; done
        ((alive)) || return 0
        ((SECONDS < deadline)) || return 1
        sleep 0.25
    done
}

# Stops process groups: SIGTERM TERMS times (1 s apart), waits STOP_TIMEOUT s, then
# SIGKILL. Fails (naming the survivors) if anything is still alive afterwards.
stop_groups() {
    local terms=$1 i pgid left=()
    shift
    (($#)) || return 0
    for ((i = 0; i < terms; i++)); do
        ((i == 0)) || sleep 1
        signal_groups TERM "$@"
    done
    wait_groups_gone "$STOP_TIMEOUT" "$@" && return 0
    log "still running after ${STOP_TIMEOUT}s, sending SIGKILL to process group(s) $*"
    signal_groups KILL "$@"
    wait_groups_gone 5 "$@" && return 0
    for pgid in "$@"; do group_alive "$pgid" && left+=("$pgid"); done
    die "process group(s) ${left[*]} survived SIGKILL; inspect them with: ps -o pid,stat,args -g ${left[0]}"
}
