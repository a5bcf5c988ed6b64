#!/usr/bin/env bash
# PostgreSQL + Prefect server + MLflow tracking server for a distributed edgetune, without
# Docker, on 127.0.0.1 only. State (data, logs, pids, password) lives in $EDGETUNE_STATE_DIR.
#
#   infra/services.sh up|down|status|env
#   eval "$(infra/services.sh env)"     # PREFECT_API_URL, MLFLOW_TRACKING_URI, EDGETUNE_STORAGE
set -euo pipefail

PROG=services.sh
# shellcheck source=infra/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

readonly DB_ROLE=edgetune
readonly DATABASES=(optuna prefect mlflow)
readonly HEALTH_TIMEOUT=${EDGETUNE_HEALTH_TIMEOUT:-120}

usage() { echo "usage: infra/services.sh up|down|status|env|restart-db" >&2; exit 2; }

# ---------------------------------------------------------------- configuration

# Ports and artifact store: the environment, else what the last `up` recorded, else defaults.
load_config() {
    resolve_state_dir
    local rec_pg='' rec_artifacts=''
    REC_PREFECT_PORT='' REC_MLFLOW_PORT=''
    if [[ -r $STATE/services.conf ]]; then
        rec_pg=$(sed -n 's/^PG_PORT=//p' "$STATE/services.conf")
        REC_PREFECT_PORT=$(sed -n 's/^PREFECT_PORT=//p' "$STATE/services.conf")
        REC_MLFLOW_PORT=$(sed -n 's/^MLFLOW_PORT=//p' "$STATE/services.conf")
        rec_artifacts=$(sed -n 's/^ARTIFACTS=//p' "$STATE/services.conf")
    fi
    PG_PORT=${EDGETUNE_PG_PORT:-${rec_pg:-55432}}
    PREFECT_PORT=${EDGETUNE_PREFECT_PORT:-${REC_PREFECT_PORT:-4200}}
    MLFLOW_PORT=${EDGETUNE_MLFLOW_PORT:-${REC_MLFLOW_PORT:-5000}}
    ARTIFACTS=${EDGETUNE_ARTIFACTS:-${rec_artifacts:-file://$STATE/mlartifacts}}
    local p
    for p in "$PG_PORT" "$PREFECT_PORT" "$MLFLOW_PORT"; do
        if ! [[ $p =~ ^[0-9]+$ ]] || ((p < 1 || p > 65535)); then
            die "invalid port '$p'; set EDGETUNE_*_PORT to a number in 1-65535"
        fi
    done
    PGDATA=$STATE/pg
    PGSOCK=$STATE/sock
    PREFECT_URL=http://127.0.0.1:$PREFECT_PORT
    MLFLOW_URL=http://127.0.0.1:$MLFLOW_PORT
}

save_config() {
    printf 'PG_PORT=%s\nPREFECT_PORT=%s\nMLFLOW_PORT=%s\nARTIFACTS=%s\n' \
        "$PG_PORT" "$PREFECT_PORT" "$MLFLOW_PORT" "$ARTIFACTS" >"$STATE/services.conf"
}

# $EDGETUNE_DB_PASSWORD, else the one kept in $STATE/db-password, else (up only) a new
# random one. `up` keeps whatever it applied there (mode 600) so that `env` agrees with it.
resolve_password() { # up|read
    local file=$STATE/db-password
    if [[ -n ${EDGETUNE_DB_PASSWORD:-} ]]; then
        DB_PASSWORD=$EDGETUNE_DB_PASSWORD
    elif [[ -s $file ]]; then
        DB_PASSWORD=$(<"$file")
    elif [[ $1 == up ]]; then
        DB_PASSWORD=$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')
    else
        die "no services in $STATE yet; run 'infra/services.sh up' first (or set EDGETUNE_STATE_DIR)"
    fi
    [[ $DB_PASSWORD != *$'\n'* ]] || die "EDGETUNE_DB_PASSWORD must be a single line"
    [[ $1 == up ]] || return 0
    if [[ -s $file && $(<"$file") != "$DB_PASSWORD" ]] && pg_running; then
        die "EDGETUNE_DB_PASSWORD differs from the password the running services use; run 'infra/services.sh down' first to change it"
    fi
    (umask 077 && printf '%s\n' "$DB_PASSWORD" >"$file.tmp") && mv -f "$file.tmp" "$file"
}

db_url() { # SCHEME DATABASE
    printf '%s://%s:%s@127.0.0.1:%s/%s' "$1" "$DB_ROLE" "$(urlencode "$DB_PASSWORD")" "$PG_PORT" "$2"
}

env_lines() {
    printf "export PREFECT_API_URL='%s/api'\n" "$PREFECT_URL"
    printf "export MLFLOW_TRACKING_URI='%s'\n" "$MLFLOW_URL"
    printf "export EDGETUNE_STORAGE='%s'\n" "$(db_url journal+postgresql optuna)"
}

write_env_file() {
    (umask 077 && env_lines >"$STATE/env.tmp") && mv -f "$STATE/env.tmp" "$STATE/env"
}

# ---------------------------------------------------------------- PostgreSQL

find_pg_bin() {
    local dir
    if [[ -n ${EDGETUNE_PG_BIN:-} ]]; then
        dir=$EDGETUNE_PG_BIN
    elif command -v initdb >/dev/null 2>&1; then
        dir=$(dirname "$(readlink -f "$(command -v initdb)")")
    else
        local dirs=(/usr/lib/postgresql/*/bin)
        dir=$(printf '%s\n' "${dirs[@]}" | sort -V | tail -n1)
    fi
    [[ -n $dir && -x $dir/initdb && -x $dir/pg_ctl && -x $dir/psql ]] ||
        die "PostgreSQL server binaries (initdb, pg_ctl, psql) not found; install PostgreSQL (apt-get install postgresql) or set EDGETUNE_PG_BIN to their directory"
    PG_BIN=$dir
}

# PostgreSQL refuses to run as root: as root it runs as the `postgres` system user.
resolve_pg_user() {
    if ((EUID == 0)); then
        id -u postgres >/dev/null 2>&1 ||
            die "running as root but no 'postgres' system user exists; create it (useradd --system postgres) or run as a non-root user"
        PG_USER=postgres
    else
        PG_USER=$(id -un)
    fi
}

# Runs a command as $PG_USER, from / so that an unreadable cwd does not matter.
as_pg() {
    if ((EUID == 0)); then
        (cd / && runuser -u "$PG_USER" -- "$@")
    else
        (cd / && "$@")
    fi
}

pg() { local tool=$1; shift; as_pg "$PG_BIN/$tool" "$@"; }

# The postgres user must traverse every directory above its data directory.
ensure_pg_can_traverse() {
    ((EUID == 0)) || return 0
    local dir=$STATE
    while [[ $dir != / ]]; do
        if ! runuser -u "$PG_USER" -- test -x "$dir" 2>/dev/null; then
            chmod o+x "$dir" || die "cannot make $dir traversable for user $PG_USER; choose EDGETUNE_STATE_DIR under a directory it can reach (e.g. /srv or /tmp)"
            log "made $dir traversable (o+x) so that user $PG_USER reaches $STATE/pg"
        fi
        dir=$(dirname "$dir")
    done
}

pg_running() { pg pg_ctl status -D "$PGDATA" >/dev/null 2>&1; }

pg_recorded_port() { sed -n 's/^port *= *//p' "$PGDATA/edgetune.conf" 2>/dev/null || true; }

init_pg() {
    # sun_path holds 107 bytes: socket dir + "/.s.PGSQL.PORT".
    ((${#PGSOCK} + 16 <= 107)) ||
        die "state dir path too long for a PostgreSQL unix socket ($PGSOCK); set EDGETUNE_STATE_DIR to a shorter path"
    install -d -m 0700 -o "$PG_USER" "$PGSOCK"
    if [[ ! -s $PGDATA/PG_VERSION ]]; then
        log "initialising PostgreSQL cluster in $PGDATA"
        install -d -m 0700 -o "$PG_USER" "$PGDATA"
        pg initdb -D "$PGDATA" -E UTF8 --locale=C --auth-local=peer --auth-host=scram-sha-256 \
            >"$STATE/initdb.log" 2>&1 || die "initdb failed; see $STATE/initdb.log"
        echo "include_if_exists = 'edgetune.conf'" | as_pg tee -a "$PGDATA/postgresql.conf" >/dev/null
    fi
    # Rewritten on every start so the port and paths follow the environment.
    as_pg tee "$PGDATA/edgetune.conf" >/dev/null <<EOF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$PGSOCK'
max_connections = 200
password_encryption = 'scram-sha-256'
EOF
    as_pg tee "$PGDATA/pg_hba.conf" >/dev/null <<EOF
# Superuser over the private unix socket only; the edgetune role over loopback TCP.
local  all                    $PG_USER   peer
host   $(IFS=,; echo "${DATABASES[*]}")  $DB_ROLE   127.0.0.1/32  scram-sha-256
EOF
}

start_pg() {
    if pg_running; then
        local port
        port=$(pg_recorded_port)
        [[ $port == "$PG_PORT" ]] || die "PostgreSQL already runs on port $port, not $PG_PORT; run 'infra/services.sh down' first to change the port"
        log "postgres already running on 127.0.0.1:$PG_PORT"
        return 0
    fi
    port_open "$PG_PORT" && die "port $PG_PORT is already in use; stop what listens there or set EDGETUNE_PG_PORT to a free port"
    init_pg
    touch "$STATE/postgres.log" && chown "$PG_USER" "$STATE/postgres.log"
    log "starting postgres on 127.0.0.1:$PG_PORT"
    pg pg_ctl start -D "$PGDATA" -l "$STATE/postgres.log" -w -t 60 >/dev/null ||
        die "PostgreSQL did not start; see $STATE/postgres.log"
    STARTED+=(postgres)
}

sql_literal() { printf "'%s'" "${1//\'/\'\'}"; }

# Idempotent: the role (with the current password), the three databases, pg_trgm for Prefect.
provision_pg() {
    local db
    {
        echo "SELECT 'CREATE ROLE $DB_ROLE' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$DB_ROLE') \\gexec"
        echo "ALTER ROLE $DB_ROLE WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD $(sql_literal "$DB_PASSWORD");"
        for db in "${DATABASES[@]}"; do
            echo "SELECT 'CREATE DATABASE $db OWNER $DB_ROLE' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '$db') \\gexec"
        done
    } | pg psql -X -q -v ON_ERROR_STOP=1 -h "$PGSOCK" -p "$PG_PORT" -d postgres >/dev/null 2>"$STATE/psql.err" || {
        local err
        err=$(<"$STATE/psql.err")
        printf '%s\n' "${err//"$DB_PASSWORD"/***}" >&2
        die "creating the role and databases failed; see $STATE/postgres.log"
    }
    rm -f "$STATE/psql.err"
    # Prefect's migrations create it; as superuser here it cannot fail on privileges.
    pg psql -X -q -v ON_ERROR_STOP=1 -h "$PGSOCK" -p "$PG_PORT" -d prefect \
        -c 'SET client_min_messages = warning' -c 'CREATE EXTENSION IF NOT EXISTS pg_trgm' >/dev/null ||
        die "creating extension pg_trgm failed; install postgresql-contrib"
}

stop_pg() {
    if [[ ! -s $PGDATA/PG_VERSION ]] || ! pg_running; then
        log "postgres not running"
        return 0
    fi
    log "stopping postgres"
    pg pg_ctl stop -D "$PGDATA" -m fast -w -t 60 >/dev/null || die "PostgreSQL did not stop; see $STATE/postgres.log"
}

# ---------------------------------------------------------------- HTTP services

# Waits until URL answers, the process group lives, or HEALTH_TIMEOUT passes.
wait_healthy() { # NAME URL PGID LOG
    local name=$1 url=$2 pgid=$3 logfile=$4 deadline=$((SECONDS + HEALTH_TIMEOUT))
    until http_ok "$url"; do
        group_alive "$pgid" || die "$name exited during start; see $logfile"
        ((SECONDS < deadline)) || die "$name did not answer $url within ${HEALTH_TIMEOUT}s; see $logfile"
        sleep 1
    done
}

# Marker that identifies each server's process in its command line.
pattern_of() { case $1 in prefect) echo 'server start' ;; mlflow) echo 'mlflow server' ;; esac; }

# Common part of `up` for Prefect and MLflow: returns 1 if it is already running.
check_can_start() { # NAME PORT HEALTH_URL
    local name=$1 port=$2 url=$3 rec_var=REC_${1^^}_PORT
    if live_group "$STATE/$name.pid" "$(pattern_of "$name")" >/dev/null; then
        [[ -z ${!rec_var} || ${!rec_var} == "$port" ]] ||
            die "$name already runs on port ${!rec_var}, not $port; run 'infra/services.sh down' first to change the port"
        http_ok "$url" || die "$name runs (pid $(<"$STATE/$name.pid")) but $url does not answer; check $STATE/$name.log or run 'infra/services.sh down' first"
        log "$name already running on 127.0.0.1:$port"
        return 1
    fi
    port_open "$port" && die "port $port is already in use; stop what listens there or set EDGETUNE_${name^^}_PORT to a free port"
    return 0
}

start_prefect() {
    check_can_start prefect "$PREFECT_PORT" "$PREFECT_URL/api/health" || return 0
    local prefect
    prefect=$(venv_bin prefect)
    mkdir -p "$STATE/prefect"
    log "starting prefect server on $PREFECT_URL (database $(mask "$(db_url postgresql+asyncpg prefect)"))"
    PREFECT_HOME=$STATE/prefect \
        PREFECT_API_DATABASE_CONNECTION_URL=$(db_url postgresql+asyncpg prefect) \
        PREFECT_API_URL=$PREFECT_URL/api \
        start_detached "$STATE/prefect.pid" "$STATE/prefect.log" "$STATE/prefect" \
        "$prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT" --analytics-off
    STARTED+=(prefect)
    wait_healthy "prefect server" "$PREFECT_URL/api/health" "$(<"$STATE/prefect.pid")" "$STATE/prefect.log"
}

start_mlflow() {
    check_can_start mlflow "$MLFLOW_PORT" "$MLFLOW_URL/health" || return 0
    local mlflow
    mlflow=$(venv_bin mlflow)
    [[ $ARTIFACTS != file://* ]] || mkdir -p "${ARTIFACTS#file://}"
    mkdir -p "$STATE/mlflow"
    log "starting mlflow server on $MLFLOW_URL (database $(mask "$(db_url postgresql+psycopg2 mlflow)"), artifacts $ARTIFACTS)"
    # The store URI goes through the environment: a command line is visible to every user.
    # Job execution (GenAI scorers, trace rollups: 8 extra processes) is not used by edgetune.
    MLFLOW_BACKEND_STORE_URI=$(db_url postgresql+psycopg2 mlflow) \
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false \
        start_detached "$STATE/mlflow.pid" "$STATE/mlflow.log" "$STATE/mlflow" \
        "$mlflow" server --artifacts-destination "$ARTIFACTS" --serve-artifacts \
        --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
        --allowed-hosts "${EDGETUNE_MLFLOW_ALLOWED_HOSTS:-127.0.0.1,127.0.0.1:*,localhost,localhost:*}"
    STARTED+=(mlflow)
    wait_healthy "mlflow server" "$MLFLOW_URL/health" "$(<"$STATE/mlflow.pid")" "$STATE/mlflow.log"
}

stop_http_service() { # NAME
    local name=$1 pgid
    if pgid=$(live_group "$STATE/$name.pid" "$(pattern_of "$name")"); then
        log "stopping $name (process group $pgid)"
        stop_groups 1 "$pgid"
    else
        log "$name not running"
    fi
    rm -f "$STATE/$name.pid"
}

# ---------------------------------------------------------------- commands

# Fails before anything starts if a service that is not running would find its port taken.
preflight_ports() {
    local name port
    if ! pg_running && port_open "$PG_PORT"; then
        die "port $PG_PORT is already in use; stop what listens there or set EDGETUNE_PG_PORT to a free port"
    fi
    for name in prefect mlflow; do
        port=$([[ $name == prefect ]] && echo "$PREFECT_PORT" || echo "$MLFLOW_PORT")
        if ! live_group "$STATE/$name.pid" "$(pattern_of "$name")" >/dev/null && port_open "$port"; then
            die "port $port is already in use; stop what listens there or set EDGETUNE_${name^^}_PORT to a free port"
        fi
    done
}

STARTED=()
UP_DONE=0

# A failed `up` stops what it started itself (never what was already running).
rollback() {
    local rc=$?
    ((rc != 0 && UP_DONE == 0 && ${#STARTED[@]} > 0)) || return 0
    trap - EXIT
    log "up failed; stopping what it started: ${STARTED[*]}"
    local i
    for ((i = ${#STARTED[@]} - 1; i >= 0; i--)); do
        case ${STARTED[i]} in
            postgres) (stop_pg) || true ;;
            *) (stop_http_service "${STARTED[i]}") || true ;;
        esac
    done
    exit "$rc"
}

cmd_up() {
    load_config
    find_pg_bin
    resolve_pg_user
    venv_bin prefect >/dev/null
    venv_bin mlflow >/dev/null
    resolve_state_dir create
    resolve_password up
    preflight_ports
    trap rollback EXIT
    ensure_pg_can_traverse
    start_pg
    provision_pg
    start_prefect
    start_mlflow
    save_config
    write_env_file
    UP_DONE=1
    log "services up: prefect $PREFECT_URL/api, mlflow $MLFLOW_URL, optuna $(mask "$(db_url journal+postgresql optuna)")"
    log "environment for clients: eval \"\$(infra/services.sh env)\" (also in $STATE/env)"
}

cmd_down() {
    load_config
    local f
    for f in "$STATE"/workers/*.pid; do
        if [[ -e $f ]] && live_group "$f" "worker start" >/dev/null; then
            log "note: workers of this state dir still run; stop them with infra/workers.sh down"
            break
        fi
    done
    stop_http_service mlflow
    stop_http_service prefect
    if [[ -s $PGDATA/PG_VERSION ]]; then
        find_pg_bin
        resolve_pg_user
        stop_pg
    else
        log "postgres not running"
    fi
}

cmd_status() {
    load_config
    local down=0 pgid
    if [[ -s $PGDATA/PG_VERSION ]] && find_pg_bin && resolve_pg_user && pg_running && port_open "$PG_PORT"; then
        printf '%-9s up    127.0.0.1:%s  (databases: %s)\n' postgres "$PG_PORT" "${DATABASES[*]}"
    else
        printf '%-9s down\n' postgres
        down=1
    fi
    if pgid=$(live_group "$STATE/prefect.pid" "$(pattern_of prefect)") && http_ok "$PREFECT_URL/api/health"; then
        printf '%-9s up    %s/api  (pid %s, log %s)\n' prefect "$PREFECT_URL" "$pgid" "$STATE/prefect.log"
    else
        printf '%-9s down\n' prefect
        down=1
    fi
    if pgid=$(live_group "$STATE/mlflow.pid" "$(pattern_of mlflow)") && http_ok "$MLFLOW_URL/health"; then
        printf '%-9s up    %s  (pid %s, log %s)\n' mlflow "$MLFLOW_URL" "$pgid" "$STATE/mlflow.log"
    else
        printf '%-9s down\n' mlflow
        down=1
    fi
    return "$down"
}

# Restart PostgreSQL alone (after changing its settings, say); servers and studies reconnect.
cmd_restart_db() {
    load_config
    [[ -s $PGDATA/PG_VERSION ]] || die "no PostgreSQL cluster in $PGDATA; run 'infra/services.sh up' first"
    find_pg_bin
    resolve_pg_user
    ensure_pg_can_traverse
    pg_running || die "PostgreSQL is not running; start everything with 'infra/services.sh up'"
    log "restarting postgres on 127.0.0.1:$PG_PORT"
    pg pg_ctl restart -D "$PGDATA" -m fast -l "$STATE/postgres.log" -w -t 60 >/dev/null ||
        die "PostgreSQL did not restart; see $STATE/postgres.log"
}

cmd_env() {
    load_config
    resolve_password read
    env_lines
}

(($# == 1)) || usage
case $1 in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    env) cmd_env ;;
    restart-db) cmd_restart_db ;;
    -h | --help | help) usage ;;
    *) usage ;;
esac
