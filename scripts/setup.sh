#!/usr/bin/env bash
# Prepares a fresh Debian machine: QEMU tools, the servers the tests use, a venv with the project.
# Idempotent: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v qemu-img >/dev/null || need_apt+=(qemu-utils)
command -v qemu-system-x86_64 >/dev/null || need_apt+=(qemu-system-x86)
if [ "${SNAPTREE_SETUP_SERVERS:-0}" = 1 ]; then
  command -v redis-server >/dev/null || need_apt+=(redis-server)
  command -v pg_ctlcluster >/dev/null || need_apt+=(postgresql)
fi
# The test guest is a 32-bit multiboot ELF built with gcc -m32.
if [ "${SNAPTREE_SETUP_GUEST:-0}" = 1 ] && ! echo 'int main(){return 0;}' | gcc -m32 -x c -c -o /dev/null - 2>/dev/null; then
  need_apt+=(gcc-multilib)
fi
# The Linux test guest and the UEFI tests (tests/guest/linux/__init__.py says why each is needed).
if [ "${SNAPTREE_SETUP_SERVERS:-0}" = 1 ] || [ "${SNAPTREE_SETUP_GUEST:-0}" = 1 ]; then
  for pkg in $(python3 -c "import sys; sys.path.insert(0, '.'); from tests.guest.linux import HOST_PACKAGES; print(' '.join(HOST_PACKAGES))"); do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need_apt+=("$pkg")
  done
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "snaptree setup: missing Debian packages: ${need_apt[*]}" >&2
    echo "snaptree setup: not root, cannot install them; run: sudo apt-get install ${need_apt[*]}" >&2
    exit 1
  fi
  echo "snaptree setup: installing ${need_apt[*]} with apt-get" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.snaptree-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[test]'
  touch "$stamp"
fi
# Bytecode for snaptree's own modules: where PYTHONDONTWRITEBYTECODE is set (as on these CI
# machines) every `snaptree` process would otherwise compile ~60 modules again (0.2 s each time).
.venv/bin/python -m compileall -q domain service adapters projections workers tests >/dev/null || true
# ... and the code of the methods @dataclass generates, the other quarter (adapters/cli/dataclass_cache.py).
.venv/bin/python -m adapters.cli.dataclass_cache >/dev/null || true
