#!/usr/bin/env bash
# Take a backend out of rotation without breaking a connection:
#   1. drain it: no new flows, existing connections stay;
#   2. wait until its active connections reach 0, or --timeout seconds pass;
#   3. disable it: whatever is left is moved to other backends at its next packet.
#
# Usage: lb-maintenance.sh [--timeout SECONDS] [--interval SECONDS] <service> <address>
#   --timeout   longest wait for connections to end (default 300)
#   --interval  polling interval (default 1)
# Env: LB      the lb binary (default: lb on PATH)
#      LB_SOCKET  control socket of the running lb (default /run/lb/lb.sock)
# Exit: 0 drained cleanly, 3 timeout reached (disabled anyway), 1 error.
# Undo with lb-restore.sh. Admin states persist across lb restarts.
set -euo pipefail

LB=${LB:-lb}
timeout=300
interval=1
usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-1}"; }

while [ $# -gt 0 ]; do
  case $1 in
    --timeout) timeout=${2:?--timeout needs a value}; shift 2 ;;
    --interval) interval=${2:?--interval needs a value}; shift 2 ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    -*) echo "lb-maintenance: unknown option $1" >&2; usage ;;
    *) break ;;
  esac
done
[ $# -eq 2 ] || usage
service=$1
address=$2

active() { "$LB" backend show "$service" "$address" | sed -n 's/^active_connections=//p'; }

"$LB" backend drain "$service" "$address"
start=$SECONDS
left=$(active)
while [ "$left" -gt 0 ]; do
  if [ $((SECONDS - start)) -ge "$timeout" ]; then
    echo "lb-maintenance: $left connections still active after ${timeout}s; disabling moves them" >&2
    "$LB" backend disable "$service" "$address"
    exit 3
  fi
  echo "lb-maintenance: $service $address draining, $left active connections"
  sleep "$interval"
  left=$(active)
done
"$LB" backend disable "$service" "$address"
echo "lb-maintenance: $service $address drained in $((SECONDS - start))s and disabled"
