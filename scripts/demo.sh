#!/usr/bin/env bash
# Serves the demo site: installs the package (building the fastrouter), prepares the database
# and runs `manage.py runserver`, which starts the router and the workers too.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
need=()
command -v cmake >/dev/null || need+=(cmake)
command -v g++ >/dev/null || need+=(g++)
if ((${#need[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq "${need[@]}" >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq "${need[@]}"; }
fi
# [node]: gunicorn and psutil, so `manage.py runparallel` serves the demo as a production node too;
# [toolbar]: django-debug-toolbar, with parallel_render's panel on pages opened with ?toolbar=1.
"$PYTHON" -m pip install -q --disable-pip-version-check -e ".[node,toolbar]"
"$PYTHON" manage.py migrate --noinput
"$PYTHON" manage.py seed_demo
exec "$PYTHON" manage.py runserver "${DEMO_ADDR:-127.0.0.1:8000}"
