#!/usr/bin/env bash
# Run the test suite, setting up the environment first: ./test.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")"
source tools/setup.sh
# Debian packages some tests need, installed when we can (those tests are skipped otherwise): Chromium for the
# report's browser test; openssh-server and rsync for the multinode test of `ray up` over SSH.
missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v sshd >/dev/null || [ -x /usr/sbin/sshd ] || missing+=(openssh-server)
command -v rsync >/dev/null || missing+=(rsync)
if [ ${#missing[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null) \
    || echo "test.sh: could not install ${missing[*]}" >&2
fi
exec python -m pytest -q "$@"
