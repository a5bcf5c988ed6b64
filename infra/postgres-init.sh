#!/usr/bin/env bash
# Run once by the postgres:15 image on an empty volume (/docker-entrypoint-initdb.d):
# the `edgetune` role and one database per consumer (Optuna and MLflow both keep an
# `alembic_version` table, so they never share a database). Same layout as infra/services.sh.
set -euo pipefail

: "${EDGETUNE_DB_PASSWORD:?set EDGETUNE_DB_PASSWORD in infra/.env}"

psql -v ON_ERROR_STOP=1 -v pw="$EDGETUNE_DB_PASSWORD" --username "$POSTGRES_USER" --dbname postgres <<'SQL'
CREATE ROLE edgetune WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'pw';
CREATE DATABASE optuna OWNER edgetune;
CREATE DATABASE prefect OWNER edgetune;
CREATE DATABASE mlflow OWNER edgetune;
\connect prefect
CREATE EXTENSION IF NOT EXISTS pg_trgm;
SQL
