#!/usr/bin/env bash
# Workers for the edgetune work pools: controller (a Prefect process worker), gpu (one per
# GPU slot: $EDGETUNE_GPU_SLOTS_PER_DEVICE per GPU of $EDGETUNE_GPU_DEVICES, or
# $EDGETUNE_GPU_WORKERS), compile and edge (edgetune's stage worker: a process worker that
# forks each stage run from a process that imported edgetune once). Each runs in its own
# process group; pid and log in $STATE/workers/.
#
#   infra/workers.sh up|down|status
#   EDGETUNE_WORKER_POOLS=gpu infra/workers.sh up      # a GPU host: gpu workers only
set -euo pipefail

PROG=workers.sh
# shellcheck source=infra/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

readonly ALL_POOLS=(controller gpu compile edge)
readonly ONLINE_TIMEOUT=${EDGETUNE_WORKER_TIMEOUT:-90}

usage() { echo "usage: infra/workers.sh up|down|status" >&2; exit 2; }

load_config() {
    resolve_state_dir
    WDIR=$STATE/workers
    local pools=${EDGETUNE_WORKER_POOLS:-${ALL_POOLS[*]}}
    read -r -a POOLS <<<"${pools//,/ }"
    ((${#POOLS[@]})) || die "EDGETUNE_WORKER_POOLS is empty; name pools, e.g. EDGETUNE_WORKER_POOLS=gpu"
    SLOTS=${EDGETUNE_GPU_SLOTS_PER_DEVICE:-}
    [[ -z $SLOTS || ($SLOTS =~ ^[0-9]+$ && $SLOTS -ge 1) ]] ||
        die "EDGETUNE_GPU_SLOTS_PER_DEVICE must be a whole number of trainings per GPU >= 1, not '$SLOTS'"
    POLL_S=${EDGETUNE_WORKER_POLL_S:-1}
    [[ $POLL_S =~ ^[0-9]+$ && $POLL_S -ge 1 ]] || die "EDGETUNE_WORKER_POLL_S must be a whole number of seconds >= 1, not '$POLL_S'"
    STAGE_POLL_S=${EDGETUNE_STAGE_POLL_S:-0.25}
    [[ $STAGE_POLL_S =~ ^[0-9]*\.?[0-9]+$ ]] && awk "BEGIN{exit !($STAGE_POLL_S >= 0.05)}" ||
        die "EDGETUNE_STAGE_POLL_S must be a number of seconds >= 0.05, not '$STAGE_POLL_S'"
    WORKER_KIND=${EDGETUNE_WORKER_KIND:-stage}
    [[ $WORKER_KIND == stage || $WORKER_KIND == process ]] || die "EDGETUNE_WORKER_KIND must be 'stage' (edgetune worker) or 'process' (Prefect's process worker), not '$WORKER_KIND'"
    local stages=${EDGETUNE_WORKER_STAGES:-}
    read -r -a EXTRA_STAGES <<<"${stages//,/ }"
    local devices=${EDGETUNE_GPU_DEVICES:-}
    read -r -a GPU_DEVICES <<<"${devices//,/ }"
    # By default one gpu worker per slot: EDGETUNE_GPU_SLOTS_PER_DEVICE per listed GPU.
    local gpus=${#GPU_DEVICES[@]}
    GPU_WORKERS=${EDGETUNE_GPU_WORKERS:-$(((gpus > 0 ? gpus : 1) * ${SLOTS:-1}))}
    [[ $GPU_WORKERS =~ ^[0-9]+$ ]] || die "EDGETUNE_GPU_WORKERS must be a number, not '$GPU_WORKERS'"
    # Trainings sharing each listed GPU: the slots asked for, else the workers spread evenly.
    if ((gpus > 0)) && [[ -n $SLOTS ]] && ((GPU_WORKERS > gpus * SLOTS)); then
        die "EDGETUNE_GPU_WORKERS=$GPU_WORKERS is more than $gpus GPU(s) x EDGETUNE_GPU_SLOTS_PER_DEVICE=$SLOTS; raise the slots per GPU or leave EDGETUNE_GPU_WORKERS unset (one worker per slot)"
    fi
    ((gpus == 0)) || SLOTS=${SLOTS:-$(((GPU_WORKERS + gpus - 1) / gpus))}
    # Worker names must differ between hosts that serve the same pool.
    HOST_TAG=${EDGETUNE_WORKER_HOST:-$(hostname -s 2>/dev/null || hostname)}
}

# The clients' environment: the services' env file if there is one, else the caller's.
load_client_env() {
    if [[ -r $STATE/env ]]; then
        # shellcheck disable=SC1091
        source "$STATE/env"
        log "using PREFECT_API_URL=$PREFECT_API_URL from $STATE/env"
    elif [[ -n ${PREFECT_API_URL:-} ]]; then
        log "using PREFECT_API_URL=$PREFECT_API_URL from the environment"
    else
        die "PREFECT_API_URL is not set and $STATE/env does not exist; run infra/services.sh up here, or export PREFECT_API_URL (and MLFLOW_TRACKING_URI, EDGETUNE_STORAGE) pointing at the services"
    fi
    export PREFECT_API_URL
    local var
    for var in MLFLOW_TRACKING_URI EDGETUNE_STORAGE; do
        [[ -n ${!var:-} ]] || log "warning: $var is not set; flows fall back to what their config says"
        [[ -z ${!var:-} ]] || export "${var?}"
    done
    http_ok "$PREFECT_API_URL/health" ||
        die "Prefect API $PREFECT_API_URL does not answer; start it with infra/services.sh up or fix PREFECT_API_URL"
}

worker_count() { [[ $1 == gpu ]] && echo "$GPU_WORKERS" || echo 1; }

# Worker ids (POOL-N) this host should run.
wanted_workers() {
    local pool i
    for pool in "${POOLS[@]}"; do
        for ((i = 1; i <= $(worker_count "$pool"); i++)); do echo "$pool-$i"; done
    done
}

# Worker ids that have a pid file (started earlier), restricted to the selected pools.
recorded_workers() {
    local f id
    for f in "$WDIR"/*.pid; do
        [[ -e $f ]] || continue
        id=$(basename "$f" .pid)
        [[ " ${POOLS[*]} " == *" ${id%-*} "* ]] && echo "$id"
    done
    return 0
}

worker_group() { live_group "$WDIR/$1.pid" " worker "; }

# The environment of gpu worker ID (gpu-N) that pins it to its GPU slot, one VAR=VALUE a line.
gpu_env() { # ID
    [[ ${1%-*} == gpu ]] || return 0
    local n=${1##*-}
    if ((${#GPU_DEVICES[@]})); then
        # Slots fill the GPUs in turn: gpu-1 … gpu-SLOTS on the first GPU listed, and so on.
        echo "CUDA_VISIBLE_DEVICES=${GPU_DEVICES[((n - 1) / SLOTS) % ${#GPU_DEVICES[@]}]}"
    fi
    # batch_size: auto and the batched data path take 1/SLOTS of the GPU's memory.
    [[ -z $SLOTS ]] || echo "EDGETUNE_GPU_SLOTS_PER_DEVICE=$SLOTS"
}

start_worker() { # ID
    local id=$1 pool=${1%-*}
    local -a env_extra=(PREFECT_CLI_PROMPT=false) command
    local gpu
    for gpu in $(gpu_env "$id"); do env_extra+=("$gpu"); done
    if [[ $pool == controller || $WORKER_KIND == process ]]; then
        # The controller runs studies (the flow engine, many at once) as a process worker.
        # Poll often: Prefect's default is 10 s.
        env_extra+=("PREFECT_WORKER_QUERY_SECONDS=$POLL_S")
        command=("$(venv_bin prefect)" worker start --pool "$pool" --type process --name "$id-$HOST_TAG")
        [[ $pool == controller ]] || command+=(--limit 1)
    else
        # A gpu, compile or edge worker is one slot (--limit 1: two trainings on one worker
        # would share its GPU while another worker idles), and forks each stage run from a
        # process that imported edgetune once (edgetune worker). Compile and edge runs are
        # short: their workers look for new ones more often.
        local poll=$POLL_S
        [[ $pool == gpu ]] || poll=$STAGE_POLL_S
        command=("$(venv_bin edgetune)" worker --pool "$pool" --name "$id-$HOST_TAG" --limit 1 --poll "$poll")
        local stage
        for stage in "${EXTRA_STAGES[@]}"; do command+=(--stage "$stage"); done
    fi
    log "starting worker $id-$HOST_TAG for pool $pool${env_extra[1]:+ (${env_extra[*]:1})}"
    # Flows load from the installed package (module entrypoints), so any directory will do.
    (
        export "${env_extra[@]}"
        start_detached "$WDIR/$id.pid" "$WDIR/$id.log" "$WDIR" "${command[@]}"
    )
}

# Waits until the Prefect API reports each named worker ONLINE in its pool.
wait_online() { # ID...
    local deadline=$((SECONDS + ONLINE_TIMEOUT)) id pending
    local python
    python=$(venv_bin python)
    while :; do
        pending=()
        for id in "$@"; do
            worker_group "$id" >/dev/null || die "worker $id exited during start: $(grep -m1 '^error: ' "$WDIR/$id.log" 2>/dev/null || tail -n 1 "$WDIR/$id.log" 2>/dev/null) (log: $WDIR/$id.log)"
            "$python" - "$PREFECT_API_URL" "${id%-*}" "$id-$HOST_TAG" <<'PY' 2>/dev/null || pending+=("$id")
import json, sys, urllib.request
api, pool, name = sys.argv[1:]
req = urllib.request.Request(f"{api}/work_pools/{pool}/workers/filter", data=b"{}",
                             headers={"Content-Type": "application/json"})
workers = json.load(urllib.request.urlopen(req, timeout=5))
sys.exit(0 if any(w["name"] == name and w["status"] == "ONLINE" for w in workers) else 1)
PY
        done
        ((${#pending[@]})) || return 0
        ((SECONDS < deadline)) ||
            die "worker(s) ${pending[*]} not online after ${ONLINE_TIMEOUT}s; see their logs in $WDIR"
        sleep 1
    done
}

cmd_up() {
    load_config
    load_client_env
    resolve_state_dir create
    mkdir -p "$WDIR"
    local id started=()
    for id in $(wanted_workers); do
        if worker_group "$id" >/dev/null; then
            log "worker $id already running"
        else
            start_worker "$id"
            started+=("$id")
        fi
    done
    ((${#started[@]})) || return 0
    # shellcheck disable=SC2064  # a failed start stops the workers this call started
    trap "stop_workers ${started[*]}" EXIT
    wait_online "${started[@]}"
    trap - EXIT
    log "workers online: ${started[*]} (logs in $WDIR)"
}

stop_workers() { # ID...
    local id pgid pgids=()
    for id in "$@"; do
        pgid=$(worker_group "$id") && pgids+=("$pgid")
    done
    if ((${#pgids[@]})); then
        log "stopping worker(s) $* (process groups ${pgids[*]})"
        # Prefect workers ignore the first SIGTERM.
        stop_groups 2 "${pgids[@]}"
    fi
    for id in "$@"; do rm -f "$WDIR/$id.pid"; done
}

cmd_down() {
    load_config
    local ids
    mapfile -t ids < <(recorded_workers)
    if ((${#ids[@]} == 0)); then
        log "no workers running"
        return 0
    fi
    stop_workers "${ids[@]}"
    for id in "${ids[@]}"; do
        ! worker_group "$id" >/dev/null || die "worker $id is still running; kill its process group: kill -KILL -- -$(<"$WDIR/$id.pid")"
    done
    log "workers stopped: ${ids[*]}"
}

cmd_status() {
    load_config
    local id pgid pin down=0 ids
    mapfile -t ids < <({ wanted_workers; recorded_workers; } | sort -u)
    for id in "${ids[@]}"; do
        pin=$(gpu_env "$id" | paste -sd' ')
        if pgid=$(worker_group "$id"); then
            printf '%-14s up    pool %-10s name %s  (pid %s, log %s%s)\n' "$id" "${id%-*}" "$id-$HOST_TAG" "$pgid" "$WDIR/$id.log" "${pin:+, $pin}"
        else
            printf '%-14s down  pool %s%s\n' "$id" "${id%-*}" "${pin:+ ($pin)}"
            down=1
        fi
    done
    return "$down"
}

(($# == 1)) || usage
case $1 in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    *) usage ;;
esac
