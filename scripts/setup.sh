#!/usr/bin/env bash
# Installs everything polyarch needs on a fresh Debian machine: Vulkan (Mesa's lavapipe
# on machines without a GPU), cmake, a Python 3.11 venv with the pinned packages, and polyarch itself.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}

if ! ldconfig -p 2>/dev/null | grep -q libvulkan.so.1 || ! ls /usr/share/vulkan/icd.d/lvp_icd.*.json >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing mesa-vulkan-drivers libvulkan1 (Vulkan through lavapipe)"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q mesa-vulkan-drivers libvulkan1
  else
    echo "setup: Vulkan is missing; run: sudo apt-get install mesa-vulkan-drivers libvulkan1" >&2
    exit 1
  fi
fi

if ! command -v cmake >/dev/null 2>&1; then  # for find_package(polyarch) and its test (test/cmake)
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing cmake"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q cmake
  else
    echo "setup: cmake is missing; run: sudo apt-get install cmake" >&2
    exit 1
  fi
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $PY"
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
touch .venv/.polyarch-setup
echo "setup: done"
