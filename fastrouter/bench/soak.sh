#!/usr/bin/env bash
# Memory soak: router + echo workers + a closed-loop submitter for SECONDS (default 600),
# sampling the router's resident memory every 10 s. Usage: fastrouter/bench/soak.sh [BUILD_DIR] [SECONDS]
set -euo pipefail
build=${1:-fastrouter/build}
seconds=${2:-600}
dir=$(mktemp -d)
chmod 700 "$dir"
# A fresh key: the router and every peer do the handshake, as in production.
(umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$dir/key")
"$build/fastrouter" --listen "unix://$dir/r.sock" --auth-key-file "$dir/key" --quiet > "$dir/ready" &
router=$!
trap 'kill $router $echo 2>/dev/null; rm -rf "$dir"' EXIT
sleep 0.5
"$build/fastrouter_bench" echo "unix://$dir/r.sock" --workers 2 --key-file "$dir/key" &
echo=$!
sleep 0.3
rss() { awk '/VmRSS/{print $2}' "/proc/$router/status"; }
echo "t_s rss_kb"
echo "0 $(rss)"
"$build/fastrouter_bench" load "unix://$dir/r.sock" --masters 1 --size 1024 --seconds "$seconds" --key-file "$dir/key" > "$dir/load.json" &
load=$!
for ((t = 10; t <= seconds; t += 10)); do sleep 10; echo "$t $(rss)"; done
wait $load
sleep 1
echo "idle-after $(rss)"
cat "$dir/load.json"
