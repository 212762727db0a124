#!/bin/sh
# The image's entrypoint: one image, several roles. Every role that needs the schema applies the
# migrations first (idempotent; in compose.yaml the `migrate` service has done it before the others start).
#
#   api      migrate, then the API under gunicorn (GUNICORN_BIND, default 0.0.0.0:5000)
#   worker   migrate, then the job worker (`gpusnap worker`); give it the API's DATABASE_URL and REDIS_URL
#   migrate  apply the migrations and exit
#   serve    migrate, then API and a worker in one container (SQLite under /data: a single machine only)
#   other    run as a command: `docker compose run --rm api gpusnap tokens create ops`
set -eu

GPUSNAP_HOME="${GPUSNAP_HOME:-/app}"   # where gunicorn.conf.py and app.py are
role="${1:-api}"
[ "$#" -gt 0 ] && shift

case "$role" in
  api)
    gpusnap db upgrade
    exec gunicorn --config "$GPUSNAP_HOME/gunicorn.conf.py" --chdir "$GPUSNAP_HOME" \
      --bind "${GUNICORN_BIND:-0.0.0.0:5000}" "$@" app:app
    ;;
  worker)
    gpusnap db upgrade
    exec gpusnap worker "$@"
    ;;
  migrate)
    exec gpusnap db upgrade
    ;;
  serve)
    bind="${GUNICORN_BIND:-0.0.0.0:5000}"
    exec gpusnap serve --host "${bind%:*}" --port "${bind##*:}" "$@"
    ;;
  *)
    exec "$role" "$@"
    ;;
esac
