# Create (or reuse) the virtual environment with catdog and everything it needs. Sourced by launch.sh and test.sh.
#   CATDOG_VENV   where the environment lives (default: .venv in the repository)
#   CATDOG_TORCH  the torch pip spec (default: torch==2.14.1 torchvision==0.29.1; any torch >= 2.4 works)
set -euo pipefail
CATDOG_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CATDOG_VENV=${CATDOG_VENV:-$CATDOG_ROOT/.venv}
CATDOG_TORCH=${CATDOG_TORCH:-"torch==2.14.1 torchvision==0.29.1"}

wanted="$(sha256sum "$CATDOG_ROOT/pyproject.toml" | cut -c1-16) $CATDOG_TORCH"
stamp="$CATDOG_VENV/.catdog-installed"
if [ ! -x "$CATDOG_VENV/bin/python" ]; then
  echo "setup: creating $CATDOG_VENV" >&2
  python3 -m venv "$CATDOG_VENV"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  echo "setup: installing $CATDOG_TORCH and catdog into $CATDOG_VENV (first time: several minutes)" >&2
  "$CATDOG_VENV/bin/pip" install -q --upgrade pip
  # shellcheck disable=SC2086
  "$CATDOG_VENV/bin/pip" install -q $CATDOG_TORCH
  "$CATDOG_VENV/bin/pip" install -q -e "$CATDOG_ROOT[test]"
  echo "$wanted" > "$stamp"
fi
export PATH="$CATDOG_VENV/bin:$PATH"
