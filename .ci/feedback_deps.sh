#!/usr/bin/env bash
# What the feedback page's browser tests (tests/test_feedback_browser.py, marker `browser`) need:
# Debian's chromium at /usr/bin/chromium, and the playwright Python package to drive it.
# We never run `playwright install` (no browser downloads); the tests launch the system chromium.
# Idempotent: installs only what is missing. PYTHON=... picks the interpreter (default: python).
set -euo pipefail

if [ ! -x /usr/bin/chromium ]; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium
fi

PY="${PYTHON:-python}"
if ! "$PY" -c "import playwright.sync_api" >/dev/null 2>&1; then
  "$PY" -m pip install --quiet "playwright>=1.45"
fi

echo "feedback deps: chromium $(dpkg-query -W -f='${Version}' chromium 2>/dev/null || echo '?'), playwright $("$PY" -c 'import importlib.metadata as m; print(m.version("playwright"))')"
