#!/usr/bin/env bash
# What the feedback page's tests need beyond `pip install -e ".[all]"`:
# Debian's chromium at /usr/bin/chromium and the playwright Python package to drive it (the
# browser tests, marker `browser`), and Debian's postgresql server binaries (initdb, pg_ctl) for
# the PostgreSQL run of the 50-rater test, which starts its own throwaway cluster.
# We never run `playwright install` (no browser downloads); the tests launch the system chromium.
# Idempotent: installs only what is missing. PYTHON=... picks the interpreter (default: python).
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
have_initdb() { command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; }
MISSING=()
[ -x /usr/bin/chromium ] || MISSING+=(chromium)
have_initdb || MISSING+=(postgresql)
if [ ${#MISSING[@]} -gt 0 ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${MISSING[@]}"
fi

PY="${PYTHON:-python}"
if ! "$PY" -c "import playwright.sync_api" >/dev/null 2>&1; then
  "$PY" -m pip install --quiet "playwright>=1.45"
fi

echo "feedback deps: chromium $(dpkg-query -W -f='${Version}' chromium 2>/dev/null || echo '?'), postgresql $(dpkg-query -W -f='${Version}' postgresql 2>/dev/null || echo '?'), playwright $("$PY" -c 'import importlib.metadata as m; print(m.version("playwright"))')"
