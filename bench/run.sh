#!/usr/bin/env bash
# Runs the side-by-side benchmark: installs nginx, HAProxy and Caddy from
# Debian packages if missing, builds release binaries, raises limits, and runs
# the suite with this process (load generator) pinned to core 1.
#   bench/run.sh                      # full run: 3 rounds × 5 s, scenarios a–g
#   bench/run.sh --rounds 1 --duration 2 --scenarios a,d --huge 0   # quick look
#   bench/run.sh fanout               # fan-out: 10,000 clients on one feed, direct vs upgate
#   bench/run.sh fanout --rates 20,50,100 --rounds 1
#   bench/run.sh auth                 # JWT verification per handshake: ES256, RS256 vs no auth
#   bench/run.sh resume               # frames + resume: from a backend's SIGKILL to each moved session's next echo
set -euo pipefail
cd "$(dirname "$0")/.."

cmd=suite
if [ "${1:-}" = fanout ] || [ "${1:-}" = auth ] || [ "${1:-}" = resume ]; then
  cmd=$1
  shift
fi

need=()
if [ "$cmd" = suite ]; then
  command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
  command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
  command -v caddy >/dev/null 2>&1 || need+=(caddy)
fi
command -v taskset >/dev/null 2>&1 || need+=(util-linux)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  # Debian may start the packaged services; the suite runs its own instances.
  systemctl stop nginx haproxy caddy 2>/dev/null || true
fi

cargo build --release --locked --bin upgate --bin upgate-bench --bin upgate-bench-backend

# Many sockets: descriptors, ephemeral ports, accept backlog, TIME_WAIT reuse.
ulimit -n 1048576 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
echo "open-file limit: $(ulimit -n)" >&2
sysctl -qw net.ipv4.ip_local_port_range="1024 65535" 2>/dev/null || true
sysctl -qw net.ipv4.tcp_tw_reuse=1 2>/dev/null || true
# Keep the wider ephemeral range away from the ports the suite listens on,
# and from the demo's (8080, 8443, 9901, and its backends on 9001, 9002 and
# 9101), which would otherwise be taken by client sockets now and then after a run.
sysctl -qw net.ipv4.ip_local_reserved_ports=8080,8443,9001,9002,9101,9901,18000-19999 2>/dev/null || true
sysctl -qw net.core.somaxconn=65535 2>/dev/null || true
sysctl -qw net.ipv4.tcp_max_syn_backlog=65535 2>/dev/null || true

mkdir -p bench/results
exec taskset -c 1 target/release/upgate-bench "$cmd" "$@"
