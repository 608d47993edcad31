#!/usr/bin/env bash
# A factory station provisioning a batch of devices in a row: each device gets its key created
# in its own TPM, its certificate from the station's registration authority, and is verified
# by an mTLS connection to the broker. Each device enrols with its own one-time secret from the
# factory manifest, for the one name the manifest gives it. One JSON line per device goes to
# provisioned.jsonl; a device that fails is reported and the line goes on.
#
#   Examples/factory/provision-batch.sh [COUNT]
#
# On loopback, as here, the devices are swtpm instances and the station runs its own RA and
# broker; on a real line, replace lb_swtpm by the device's TCTI (e.g. over a test fixture) and
# point --server / -h at the station's services.
set -euo pipefail
cd "$(dirname "$0")/../.."
count=${1:-5}
# BIN_DIR: use binaries built already (the tests pass .build/debug) instead of a release build.
if [[ -z "${BIN_DIR:-}" ]]; then
  swift build -c release --product edgekey >/dev/null
  swift build -c release --product edgekey-ra >/dev/null
  BIN_DIR="$PWD/.build/release"
fi
edgekey="$BIN_DIR/edgekey"
EDGEKEY_RA="$BIN_DIR/edgekey-ra"
source scripts/lib/loopback.sh
lb_init
lb_ca
lb_ra --reserve-from-acl Examples/broker/acl
lb_broker
# The factory's manifest: one serial, one name and one one-time secret per device. The RA keeps
# only a salted hash of each secret; a secret enrols its device once.
manifest="$LB_WORK/manifest.csv"
(umask 077 && echo "serial,name,secret" >"$manifest")
for i in $(seq -w 1 "$count"); do
  echo "SN-2026-$i,device-2026-$i,$(openssl rand -hex 16)" >>"$manifest"
done
lb_devices "$manifest"
out=${OUT:-$PWD/provisioned.jsonl}
: >"$out"
ok=0
started=$(date +%s.%N)
for i in $(seq -w 1 "$count"); do
  serial="SN-2026-$i"
  name="device-2026-$i"
  # The device's own secret, in the environment (never an argument: ps would show it).
  EST_PASSWORD="$serial:$(grep "^$serial," "$manifest" | cut -d, -f3)"
  export EST_PASSWORD
  tcti=$(lb_swtpm "$serial")
  if "$edgekey" provision --state "$LB_WORK/devices/$serial" --server "$LB_RA_URL" --cafile "$LB_WORK/ca.pem" \
    --subject "O=EdgeKey Factory,CN=$name" -h 127.0.0.1 -p "$LB_BROKER_PORT" --password-env EST_PASSWORD \
    --tcti "$tcti" >>"$out"; then
    ok=$((ok + 1))
    echo "$serial: provisioned"
  else
    echo "$serial: FAILED (see the last line of $out)"
  fi
  lb_stop "$(cat "$LB_WORK/$serial.swtpm.pid")" # the device leaves the station
done
elapsed=$(python3 -c "import time; print(f'{time.time() - $started:.1f}')")
echo "$ok of $count devices provisioned in $elapsed s; one JSON line each in $out"
[[ $ok == "$count" ]]
