#!/usr/bin/env bash
# The Autobahn|Testsuite fuzzing client (RFC 6455 + RFC 7692) against:
#   direct         the demo echo backend itself;
#   upgate-splice  the same backend through a splice route (must grade exactly
#                  like direct, case by case: a splice changes no byte);
#   upgate-fanout  a fan-out route with client_messages: forward over that echo
#                  backend, so the route echoes a lone client and the suite
#                  judges upgate's own WebSocket endpoint (0 FAILED, 0
#                  NON-STRICT; UNIMPLEMENTED only for deflate offers declined
#                  on purpose);
#   upgate-frames  a `mode: frames` route over the same backend: upgate's
#                  endpoint towards the client, its client towards the backend
#                  (same grades as fan-out).
# wstest is Python 2.7 only: it is installed into target/autobahn/ from the
# pins beside this script, with the machine image's pyenv CPython 2.7.18.
#   tests/autobahn/run.sh            # all but 9.* (limits/performance); of the deflate
#                                    # cases 12.* and 13.*, sub-cases 1, 3, 5 and 11 (every
#                                    # parameter set, payloads of 16 B to 8 KiB)
#   AUTOBAHN_CASES='["7.*"]' tests/autobahn/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
here=tests/autobahn
out=target/autobahn
mkdir -p "$out"

py27="$(pyenv root 2>/dev/null || echo /root/.pyenv)/versions/2.7.18/bin/python2.7"
if [ ! -x "$out/py27/bin/wstest" ]; then
  if [ ! -x "$py27" ]; then
    echo "autobahn: no CPython 2.7.18 at $py27 (wstest runs on Python 2.7 only)" >&2
    exit 1
  fi
  echo "== installing wstest (Python 2.7) into $out"
  rm -rf "$out/py3" "$out/py27"
  python3 -m venv "$out/py3"
  "$out/py3/bin/pip" install -q virtualenv==20.21.1
  "$out/py3/bin/virtualenv" -q -p "$py27" "$out/py27"
  "$out/py27/bin/pip" install -q --disable-pip-version-check --only-binary=cryptography -r "$here/requirements-wstest-py27.txt" 2>&1 | grep -v DEPRECATION || true
  "$out/py27/bin/pip" install -q --disable-pip-version-check --no-deps autobahntestsuite==25.10.1 2>&1 | grep -v DEPRECATION || true
fi
"$out/py27/bin/wstest" -a

cargo build --locked --bin upgate
bin=target/debug/upgate
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

# Waits until FILE has a line matching REGEX and prints the first capture.
await_line() {
  local file=$1 regex=$2
  for _ in $(seq 1 200); do
    if line=$(grep -Eo "$regex" "$file" | head -1) && [ -n "$line" ]; then
      echo "$line" | sed -E "s#$regex#\\1#"
      return 0
    fi
    sleep 0.05
  done
  echo "autobahn: no line matching $regex in $file:" >&2
  cat "$file" >&2
  return 1
}

"$bin" demo-backend --listen 127.0.0.1:0 >"$out/echo.log" 2>&1 &
pids+=($!)
echo_addr=$(await_line "$out/echo.log" 'ws://([0-9.]+:[0-9]+)')

cat >"$out/routes.yaml" <<YAML
listen:
  - addr: 127.0.0.1:0
server: { watch_interval: 0s }
pools:
  echo: { backends: ['ws://$echo_addr'] }
routes:
  - { name: splice, path: /splice, pool: echo, strip_prefix: true }
  - { name: frames, path: /frames, pool: echo, strip_prefix: true, mode: frames, max_message: 16777216, compression: true, client_rate: 1000000 }
  - name: fanout
    path: /fanout
    pool: echo
    mode: fanout
    strip_prefix: true
    client_messages: forward
    client_rate: 1000000
    compression: true
    max_message: 16777216
    linger: 0s
    # One channel per connection: a shared one could hand a case the echo of
    # the previous case's last message (it happened once in CI, 7.3.1).
    channel: header:Sec-WebSocket-Key
    channel_opens_per_ip: 1000000
YAML
RUST_LOG=warn,upgate=info "$bin" --config "$out/routes.yaml" >"$out/gateway.log" 2>&1 &
pids+=($!)
gw=$(await_line "$out/gateway.log" 'listening on http://([0-9.]+:[0-9]+)')

cases=${AUTOBAHN_CASES:-'["1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*", "10.*", "12.*.1$", "12.*.3$", "12.*.5$", "12.*.11$", "13.*.1$", "13.*.3$", "13.*.5$", "13.*.11$"]'}
cat >"$out/spec.json" <<JSON
{
  "outdir": "reports",
  "servers": [
    {"agent": "direct", "url": "ws://$echo_addr/"},
    {"agent": "upgate-splice", "url": "ws://$gw/splice"},
    {"agent": "upgate-fanout", "url": "ws://$gw/fanout"},
    {"agent": "upgate-frames", "url": "ws://$gw/frames"}
  ],
  "cases": $cases,
  "exclude-cases": ["9.*"],
  "exclude-agent-cases": {}
}
JSON
rm -rf "$out/reports"
echo "== wstest fuzzingclient: direct ws://$echo_addr, upgate ws://$gw"
start=$(date +%s)
(cd "$out" && py27/bin/wstest -m fuzzingclient -s spec.json >wstest.log 2>&1) || {
  tail -30 "$out/wstest.log" >&2
  exit 1
}
echo "   took $(( $(date +%s) - start )) s"
python3 "$here/report.py" "$out/reports/index.json"
