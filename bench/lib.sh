# Shared by the benchmark's shell scripts (sourced, not run): a scratch
# directory, the processes started into `pids` stopped on exit, and a wait
# for a loopback port to accept.
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# Waits up to 60 s for 127.0.0.1:$1 to accept a connection.
wait_port() {
  for _ in $(seq 1 600); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "port $1 never opened" >&2
  return 1
}
