#!/bin/sh
# Run one line of the Procfile by its process type, the way Heroku does:
#   outlast-entrypoint web      ->  the line "web: ..." of /app/Procfile
# Anything else is run as given (e.g. `outlast tenants create acme`).
# The line runs under `exec`, so the server is PID 1's direct replacement and gets the
# platform's SIGTERM itself (the worker's line maps it to a warm re-queue: REMAP_SIGTERM).
set -eu
PROCFILE="${PROCFILE:-/app/Procfile}"
if [ "$#" -eq 1 ]; then
    line=$(sed -n "s/^$1:[[:space:]]*//p" "$PROCFILE")
    if [ -n "$line" ]; then
        # `env` applies a leading VAR=value of the line, then replaces itself with the command.
        exec sh -c "exec env $line"
    fi
fi
exec "$@"
