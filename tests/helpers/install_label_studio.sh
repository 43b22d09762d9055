#!/usr/bin/env bash
# Label Studio for tests/test_label_studio.py, in a venv of its own: it pins Django, pydantic and many more
# packages that must never replace the project's. Then a migrated data folder that the test copies, so each
# test server starts in seconds instead of migrating a new database (about 80 s on 2 cores).
# Idempotent: a second run checks the version and the template and returns in about a second.
#
#   bash tests/helpers/install_label_studio.sh        (TWIST_LABEL_STUDIO_VENV changes the folder)
set -euo pipefail

VENV=${TWIST_LABEL_STUDIO_VENV:-/opt/ls-venv}
VERSION=1.23.2
TEMPLATE="$VENV/twist-template-data"
# The loopback-only test account; tests/test_label_studio.py starts the server with the same values.
USER_EMAIL=twist-test@localhost
USER_PASSWORD=twist-test-password
USER_TOKEN=7c2f0e5a9d4b4f1e8a3c6b2d0f9e8d7c6b5a4f3e

installed() {
    "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('label-studio') != '$VERSION')" \
        2>/dev/null
}

# sentry-sdk 3 (December 2026) refuses an option label-studio 1.23.2 passes at start-up ("Unknown option
# 'send_default_pii'"): the server dies before it answers. Keep its 2.x line.
SENTRY='sentry-sdk<3'
sentry_fits() {
    "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(int(m.version('sentry-sdk').split('.')[0]) >= 3)" \
        2>/dev/null
}

if ! installed; then
    echo "installing label-studio $VERSION into $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q "label-studio==$VERSION" "$SENTRY" 2>&1 | grep -v "^WARNING: Location" || true
    installed || { echo "label-studio $VERSION did not install into $VENV" >&2; exit 1; }
    rm -rf "$TEMPLATE"
fi
if ! sentry_fits; then
    "$VENV/bin/pip" install -q "$SENTRY" 2>&1 | grep -v "^WARNING: Location" || true
    sentry_fits || { echo "could not install $SENTRY into $VENV" >&2; exit 1; }
fi

if [ ! -s "$TEMPLATE/label_studio.sqlite3" ]; then
    echo "migrating a template database in $TEMPLATE"
    rm -rf "$TEMPLATE.tmp" && mkdir -p "$TEMPLATE.tmp"
    port=$("$VENV/bin/python" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
    LATEST_VERSION_CHECK=false COLLECT_ANALYTICS=false \
        "$VENV/bin/label-studio" start --no-browser --internal-host 127.0.0.1 -p "$port" \
        --data-dir "$TEMPLATE.tmp" --username "$USER_EMAIL" --password "$USER_PASSWORD" \
        --user-token "$USER_TOKEN" --enable-legacy-api-token > "$TEMPLATE.tmp/server.log" 2>&1 &
    server=$!
    ready=0
    for _ in $(seq 1 600); do
        if "$VENV/bin/python" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/health', timeout=2)" \
            2>/dev/null; then
            ready=1 && break
        fi
        kill -0 "$server" 2>/dev/null || { tail -20 "$TEMPLATE.tmp/server.log" >&2; exit 1; }
        sleep 1
    done
    kill "$server" && wait "$server" 2>/dev/null || true
    [ "$ready" = 1 ] || { echo "Label Studio did not answer within 600 s" >&2; exit 1; }
    [ -s "$TEMPLATE.tmp/label_studio.sqlite3" ] || { echo "Label Studio wrote no database" >&2; exit 1; }
    rm -f "$TEMPLATE.tmp/server.log"
    mv "$TEMPLATE.tmp" "$TEMPLATE"
fi
echo "label-studio $VERSION ready: $VENV/bin/label-studio, template data $TEMPLATE"
