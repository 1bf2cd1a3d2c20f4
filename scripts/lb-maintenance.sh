#!/usr/bin/env bash
# Take a backend out of rotation without breaking a connection:
#   1. drain it: no new flows, existing connections stay;
#   2. wait until its active connections reach 0 and no unrecorded flow can reach it any
#      more (unrecorded_flows_seconds: maglev/sh UDP services, timeouts.udp after the drain;
#      TCP services with record_connections = "on_change", timeouts.tcp), or --timeout
#      seconds pass;
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

# Sets left (active connections) and quiet (seconds unrecorded flows may still come).
poll() {
  local show
  show=$("$LB" backend show "$service" "$address")
  left=$(sed -n 's/^active_connections=//p' <<<"$show")
  quiet=$(sed -n 's/^unrecorded_flows_seconds=//p' <<<"$show")
  quiet=${quiet:-0}
}

"$LB" backend drain "$service" "$address"
start=$SECONDS
poll
while [ "$left" -gt 0 ] || [ "$quiet" -gt 0 ]; do
  if [ $((SECONDS - start)) -ge "$timeout" ]; then
    echo "lb-maintenance: $left connections still active after ${timeout}s (unrecorded flows for ${quiet}s more); disabling moves them" >&2
    "$LB" backend disable "$service" "$address"
    exit 3
  fi
  echo "lb-maintenance: $service $address draining, $left active connections, unrecorded flows for ${quiet}s more"
  sleep "$interval"
  poll
done
"$LB" backend disable "$service" "$address"
echo "lb-maintenance: $service $address drained in $((SECONDS - start))s and disabled"
