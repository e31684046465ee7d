#!/usr/bin/env bash
# Installs Debian's chromium and chromium-driver for the end-to-end browser test, when missing.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver
else
  echo "chromium is not installed and this user cannot apt-get it: the browser test will be skipped." >&2
  echo "Install it with: sudo apt-get install chromium chromium-driver" >&2
fi
