#!/usr/bin/env bash
# Put a backend back into rotation after maintenance (undoes drain/disable).
#
# Usage: lb-restore.sh <service> <address>
# Env: LB (the lb binary, default lb on PATH), LB_SOCKET (control socket).
set -euo pipefail

LB=${LB:-lb}
if [ $# -ne 2 ]; then
  sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//'
  exit 1
fi
"$LB" backend enable "$1" "$2"
"$LB" backend show "$1" "$2" | grep -E '^(state|effective_weight)='
