# Shell helpers for a fleet on loopback: swtpm devices, a demo CA, the registration authority
# and an mTLS mosquitto, all on free 127.0.0.1 ports, all stopped by lb_cleanup (set as the EXIT
# trap by lb_init). Sourced by scripts/demo and Examples/factory/provision-batch.sh.
#   lb_init                 $LB_WORK, the EXIT trap (KEEP_DEMO=1 keeps the directory)
#   lb_swtpm NAME           a swtpm whose TCTI string is printed
#   lb_ca                   $LB_WORK/ca.pem, ca.key
#   lb_ra ARGS...           edgekey-ra with a server certificate from the CA; $LB_RA_URL; its
#                           registry in $LB_WORK/registry.db, its CRL in $LB_WORK/crl.pem
#   lb_devices MANIFEST     adds a factory manifest's devices to the registry
#   lb_broker               mosquitto requiring client certificates from the CA; $LB_BROKER_PORT
#   lb_wait_port PORT
LB_PIDS=()

lb_init() {
  LB_WORK=$(mktemp -d /tmp/edgekey-loopback.XXXXXX)
  trap lb_cleanup EXIT
}

# SIGTERM, then SIGKILL after two seconds: a parent that blocked SIGTERM (some test runners do)
# passes the block on to everything started from here, and the TERM would wait forever.
lb_stop() {
  kill "$1" 2>/dev/null || return 0
  for _ in $(seq 20); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$1" 2>/dev/null || true
}

lb_cleanup() {
  for pid in "${LB_PIDS[@]}"; do lb_stop "$pid"; done
  for f in "$LB_WORK"/*.swtpm.pid; do [[ -f "$f" ]] && lb_stop "$(cat "$f")"; done
  wait 2>/dev/null || true
  if [[ -n "${KEEP_DEMO:-}" ]]; then echo "kept $LB_WORK"; else rm -rf "$LB_WORK"; fi
}

lb_free_port() { # a port whose successor is free too (swtpm takes two)
  # Below the kernel's ephemeral range (32768 and up), where outgoing connections never leave
  # ports in TIME_WAIT (the swtpm TCTI opens one per TPM command: a busy machine has thousands),
  # and tested with SO_REUSEADDR as the servers bind. As Tests/Support's PortFinder, in a range
  # of its own (the harness takes 20000-32699), so that tests and the scripts they run never race.
  local port
  port=$(python3 -c 'import random, socket
def free(p):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", p))
        return True
    except OSError:
        return False
    finally:
        s.close()
for _ in range(500):
    p = random.randrange(10000, 19999)
    if free(p) and free(p + 1):
        print(p)
        break') || true
  [ -n "$port" ] || { echo "loopback: no free pair of ports found" >&2; return 1; }
  echo "$port"
}

lb_wait_port() { for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done; return 1; }

lb_swtpm() {
  local dir="$LB_WORK/$1.tpm" port attempt
  mkdir -p "$dir"
  # A port found free can be taken before swtpm binds it (tests run side by side): try again.
  for attempt in 1 2 3 4 5; do
    port=$(lb_free_port) || continue
    if swtpm socket --tpm2 --tpmstate dir="$dir" --server type=tcp,port="$port",bindaddr=127.0.0.1 \
      --ctrl type=tcp,port=$((port + 1)),bindaddr=127.0.0.1 --flags not-need-init,startup-clear \
      --pid file="$LB_WORK/$1.swtpm.pid" --daemon; then
      echo "swtpm:host=127.0.0.1,port=$port"
      return 0
    fi
    echo "loopback: swtpm could not start on port $port (attempt $attempt of 5)" >&2
  done
  return 1
}

lb_ca() {
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 365 -subj "/CN=EdgeKey Demo CA" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
    -keyout "$LB_WORK/ca.key" -out "$LB_WORK/ca.pem" 2>/dev/null
}

lb_cert() { # NAME EKU [SAN]: $LB_WORK/NAME.pem and NAME.key from the CA
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$1" \
    -keyout "$LB_WORK/$1.key" -out "$LB_WORK/$1.csr" 2>/dev/null
  printf 'extendedKeyUsage=%s\n' "$2" >"$LB_WORK/$1.ext"
  [[ -n "${3:-}" ]] && printf 'subjectAltName=%s\n' "$3" >>"$LB_WORK/$1.ext"
  openssl x509 -req -in "$LB_WORK/$1.csr" -CA "$LB_WORK/ca.pem" -CAkey "$LB_WORK/ca.key" -CAcreateserial \
    -days 30 -extfile "$LB_WORK/$1.ext" -out "$LB_WORK/$1.pem" 2>/dev/null
}

lb_ra() {
  local port
  lb_cert ra serverAuth "DNS:localhost,IP:127.0.0.1"
  port=$(lb_free_port)
  "$EDGEKEY_RA" --listen "127.0.0.1:$port" --tls-cert "$LB_WORK/ra.pem" --tls-key "$LB_WORK/ra.key" \
    --ca-cert "$LB_WORK/ca.pem" --ca-key "$LB_WORK/ca.key" --log "$LB_WORK/issued.jsonl" \
    --registry "$LB_WORK/registry.db" --crl-out "$LB_WORK/crl.pem" "$@" \
    >"$LB_WORK/ra.log" 2>&1 &
  LB_PIDS+=($!)
  lb_wait_port "$port" || { cat "$LB_WORK/ra.log"; return 1; }
  touch "$LB_WORK/issued.jsonl"
  LB_RA_URL="https://localhost:$port"
}

# lb_devices FILE: imports a factory manifest (CSV or JSON lines) into the RA's registry.
lb_devices() {
  "$EDGEKEY_RA" admin --registry "$LB_WORK/registry.db" import "$1"
}

lb_broker() {
  lb_cert localhost serverAuth "DNS:localhost,IP:127.0.0.1"
  LB_BROKER_PORT=$(lb_free_port)
  # mosquitto started as root drops to its own user: it must be able to read its files.
  chmod 755 "$LB_WORK"
  chmod 644 "$LB_WORK/localhost.key" "$LB_WORK/localhost.pem" "$LB_WORK/ca.pem"
  printf '%s\n' "listener $LB_BROKER_PORT 127.0.0.1" "cafile $LB_WORK/ca.pem" "certfile $LB_WORK/localhost.pem" \
    "keyfile $LB_WORK/localhost.key" "require_certificate true" "use_identity_as_username true" \
    "allow_anonymous false" >"$LB_WORK/mosquitto.conf"
  mosquitto -c "$LB_WORK/mosquitto.conf" >"$LB_WORK/mosquitto.log" 2>&1 &
  LB_PIDS+=($!)
  lb_wait_port "$LB_BROKER_PORT" || { cat "$LB_WORK/mosquitto.log"; return 1; }
}
