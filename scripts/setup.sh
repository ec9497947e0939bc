#!/usr/bin/env bash
# Set-up for a fresh machine of this project's kind (2-core CPU, Debian, Python 3.11); safe to run again.
# CPU torch first (any other torch spec pulls GBs of CUDA wheels), then the package with its dev and app
# extras, then Debian's Chromium for the app's browser test (never `playwright install`: it downloads).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check torch==2.13.0
python -m pip install --quiet --disable-pip-version-check -e '.[dev,app]'
# DeepSpeed for tests/test_deepspeed.py (ZeRO-1/2 on the CPU): its sdist builds only against the installed
# torch (no build isolation) and without its CUDA ops; naming torch again keeps pip from swapping it.
DS_BUILD_OPS=0 python -m pip install --quiet --disable-pip-version-check --no-build-isolation \
  torch==2.13.0 'deepspeed>=0.15'
if [ ! -x /usr/bin/chromium ]; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
