#!/usr/bin/env bash
# Install Debian's Chromium for the docs browser test (tests/test_docs_browser.py) where we can: as root
# with apt-get. Never fails the build: without Chromium the browser test skips and says why.
if command -v chromium >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing chromium + chromium-driver for the docs browser test (apt-get)"
  if (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/tmp/chromium-apt.log 2>&1; then
    exit 0
  fi
  echo "note: apt-get could not install chromium (see /tmp/chromium-apt.log); the docs browser test will skip" >&2
else
  echo "note: chromium is not installed and apt-get is unavailable (or not root); the docs browser test will skip" >&2
fi
exit 0
