#!/usr/bin/env bash
# Installs Debian's chromium for the demo's headless browser test (tests/test_demo.py), if missing.
# Idempotent: does nothing when a chromium binary is already on PATH; runs `apt-get update` only when
# the package is not installable from the current package lists. Playwright-python drives this binary
# through executable_path; `playwright install` (which downloads its own browser) is never used.
set -euo pipefail

if command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-browser: chromium is missing and apt-get is not available; install chromium by hand" \
         "(the browser test is skipped without it)." >&2
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
        echo "install-browser: not root and no sudo; cannot install chromium (the browser test is skipped)." >&2
        exit 0
    fi
fi
export DEBIAN_FRONTEND=noninteractive
if ! apt-cache show chromium >/dev/null 2>&1; then
    $SUDO apt-get update -qq
fi
# Stale package lists can name versions the mirror no longer has: refresh once and retry.
$SUDO apt-get install -y -qq --no-install-recommends chromium \
    || { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends chromium; }
