#!/usr/bin/env bash
# Run the test suite, setting up the environment first: ./test.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")"
source tools/setup.sh
# The report's browser test needs Chromium; install Debian's package when we can (it is skipped otherwise).
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "test.sh: could not install chromium" >&2
fi
exec python -m pytest -q "$@"
