#!/usr/bin/env bash
# Non-destructive acceptance check for a board's TPM, run by its owner: what works, what does
# not, and how fast. Creates one transient key file in a temporary directory (nothing is
# persisted in the TPM, no hierarchy is touched, no authorization is tried) and removes it.
#
#   Hardware/acceptance.sh [--edgekey PATH] [--rsa]      (the TPM: $EDGEKEY_TCTI or /dev/tpmrm0)
#
# Exit 0 when everything EdgeKey needs works (P-256 keys, signing, not in lockout).
set -uo pipefail
edgekey=$(command -v edgekey || echo "$(dirname "$0")/../.build/release/edgekey")
rsa=0
while (($#)); do
  case $1 in
    --edgekey) edgekey=$2; shift ;;
    --rsa) rsa=1 ;;
    *) echo "usage: $0 [--edgekey PATH] [--rsa]" >&2; exit 2 ;;
  esac
  shift
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failures=0
ok() { printf '✓ %-30s %s\n' "$1" "$2"; }
bad() { printf '✗ %-30s %s\n' "$1" "$2"; failures=$((failures + 1)); }
note() { printf '· %-30s %s\n' "$1" "$2"; }
ms() { python3 -c "import time; print(int(time.time()*1000))"; }
field() { python3 -c "import json,sys; v=json.load(sys.stdin)$1; print(v if not isinstance(v,list) else ','.join(map(str,v)))"; }

tcti=${EDGEKEY_TCTI:-device:/dev/tpmrm0}
if [[ $tcti == device:* ]]; then
  dev=${tcti#device:}
  if [[ ! -e $dev ]]; then
    bad "device node" "$dev is missing: enable the TPM (see Hardware/README.md)"
  elif [[ ! -r $dev || ! -w $dev ]]; then
    bad "device node" "$dev is not readable and writable by $(id -un): add it to the tss group"
  else
    ok "device node" "$dev ($(stat -c '%U:%G %a' "$dev"))"
  fi
fi

if ! info=$("$edgekey" tpm info --json 2>"$work/err"); then
  bad "TPM reachable" "$(cat "$work/err")"
  echo "$failures check(s) failed"
  exit 1
fi
ok "TPM reachable" "$(echo "$info" | field "['manufacturer']") $(echo "$info" | field "['vendor']"), firmware $(echo "$info" | field "['firmware']"), via $(echo "$info" | field "['tcti']")"
[[ $(echo "$info" | field "['resourceManager']") == True ]] && ok "resource manager" "yes" ||
  note "resource manager" "no (a raw device: one user at a time; prefer /dev/tpmrm0)"
if [[ $(echo "$info" | field "['inLockout']") == True ]]; then
  bad "dictionary-attack lockout" "IN LOCKOUT: authorizations are refused until it clears"
else
  ok "dictionary-attack lockout" "not in lockout ($(echo "$info" | field "['lockoutCounter']")/$(echo "$info" | field "['maxAuthFail']") failures)"
fi
keys=$(echo "$info" | field "['supportedKeys']")
[[ ,$keys, == *,ecc-p256,* ]] && ok "ECC P-256" "supported (EdgeKey's default)" || bad "ECC P-256" "not supported"
[[ ,$keys, == *,ecc-p384,* ]] && ok "ECC P-384" "supported" || note "ECC P-384" "not supported (common: SLB9670); use P-256"
[[ $(echo "$info" | field "['ekCertificates']") != 0 ]] && ok "EK certificate" "present in NV" ||
  note "EK certificate" "none in NV (attestation needs the vendor's EK certificate)"

# One transient P-256 key in a file: create, a CSR signed by it (checked by OpenSSL), timings.
t0=$(ms)
if "$edgekey" key create --out "$work/probe.key" >/dev/null 2>"$work/err"; then
  ok "create a P-256 key" "$(($(ms) - t0)) ms"
  t0=$(ms)
  for i in 1 2 3 4 5; do
    "$edgekey" csr --file "$work/probe.key" --subject "CN=acceptance-$i" --out "$work/probe.csr" >/dev/null 2>"$work/err" || break
  done
  per=$((($(ms) - t0) / 5))
  if openssl req -in "$work/probe.csr" -verify -noout 2>/dev/null; then
    ok "sign (CSR, OpenSSL verifies)" "$per ms per CSR, process start and key load included"
  else
    bad "sign" "$(cat "$work/err")"
  fi
  if TPM2OPENSSL_TCTI=$tcti TSS2_LOG=all+none openssl pkey -provider tpm2 -provider default \
    -in "$work/probe.key" -pubout >/dev/null 2>&1; then
    ok "tpm2-openssl reads the key" "the key file is interoperable"
  else
    note "tpm2-openssl reads the key" "not checked (tpm2-openssl not installed, or no access)"
  fi
else
  bad "create a P-256 key" "$(cat "$work/err")"
fi
if ((rsa)); then
  t0=$(ms)
  if "$edgekey" key create --algorithm rsa-2048 --out "$work/probe-rsa.key" >/dev/null 2>"$work/err"; then
    ok "create an RSA-2048 key" "$(($(ms) - t0)) ms (seconds on real chips: expected)"
  else
    bad "create an RSA-2048 key" "$(cat "$work/err")"
  fi
fi
if ((failures)); then echo "$failures check(s) failed"; exit 1; fi
echo "this TPM does what EdgeKey needs"
