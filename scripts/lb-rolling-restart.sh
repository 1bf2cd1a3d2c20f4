#!/usr/bin/env bash
# Restart every backend of a service, one at a time, without breaking connections:
# for each backend: lb-maintenance.sh (drain, wait, disable), run the command, lb-restore.sh,
# then wait --settle seconds before the next one. Stops at the first failing command and
# leaves that backend disabled (fix it, then lb-restore.sh it).
#
# Usage: lb-rolling-restart.sh [--timeout S] [--settle S] <service> -- <command> [args...]
#   The command runs once per backend with LB_BACKEND=<address> in its environment, and
#   every argument equal to {} replaced by the address, e.g.
#   lb-rolling-restart.sh web -- ssh {} systemctl restart nginx
#   --timeout  longest drain wait per backend (default 300)
#   --settle   pause after restoring a backend (default 5)
# Env: LB, LB_SOCKET as for lb-maintenance.sh.
set -euo pipefail

LB=${LB:-lb}
here=$(cd "$(dirname "$0")" && pwd)
timeout=300
settle=5
usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-1}"; }

while [ $# -gt 0 ]; do
  case $1 in
    --timeout) timeout=${2:?--timeout needs a value}; shift 2 ;;
    --settle) settle=${2:?--settle needs a value}; shift 2 ;;
    -h|--help) usage 0 ;;
    -*) echo "lb-rolling-restart: unknown option $1" >&2; usage ;;
    *) break ;;
  esac
done
if [ $# -lt 3 ] || [ "$2" != "--" ]; then usage; fi
service=$1
shift 2

mapfile -t backends < <("$LB" backend list "$service")
[ ${#backends[@]} -gt 0 ] || { echo "lb-rolling-restart: service $service has no backends" >&2; exit 1; }
n=0
for address in "${backends[@]}"; do
  n=$((n + 1))
  echo "lb-rolling-restart: [$n/${#backends[@]}] $service $address"
  rc=0
  LB="$LB" "$here/lb-maintenance.sh" --timeout "$timeout" "$service" "$address" || rc=$?
  [ "$rc" -eq 0 ] || [ "$rc" -eq 3 ] || exit "$rc"
  args=()
  for a in "$@"; do
    if [ "$a" = "{}" ]; then args+=("$address"); else args+=("$a"); fi
  done
  if ! LB_BACKEND=$address "${args[@]}"; then
    echo "lb-rolling-restart: command failed for $address; it stays disabled (lb-restore.sh $service $address)" >&2
    exit 1
  fi
  LB="$LB" "$here/lb-restore.sh" "$service" "$address"
  [ "$n" -eq ${#backends[@]} ] || sleep "$settle"
done
echo "lb-rolling-restart: $service: ${#backends[@]} backends restarted"
