#!/usr/bin/env bash
# Run a command and fail if it changed any file git can see: `tools/unchanged.sh "what" cmd args...`.
# Compares the working tree before and after, so it also works with uncommitted edits.
set -euo pipefail
what=$1; shift
snap() { git status --porcelain --untracked-files=all; git diff; git ls-files --others --exclude-standard -z | xargs -0 -r cat 2>/dev/null | sha1sum; }
before=$(snap)
"$@"
after=$(snap)
if [ "$before" != "$after" ]; then
  echo "FAILED: $what. '$*' changed these files:" >&2
  diff <(printf '%s\n' "$before") <(printf '%s\n' "$after") | sed -n 's/^> /  /p' | head -40 >&2
  exit 1
fi
echo "ok: $what"
