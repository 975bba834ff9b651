#!/usr/bin/env bash
# server_rss.sh — resident memory of a real ironroot-server holding N
# registration entries (default 1,000; target ≤ 60 MB).
#
# It builds ironroot-server and ironroot-sim, makes a SoftHSM token in a
# temporary directory, runs the server from flags with a SQLite store there,
# creates N entries through the CLI (`entry create -data`), lets the entry
# cache catch up, and prints VmRSS and VmHWM from /proc/<pid>/status. The
# server is stopped and the directory removed on exit, also on failure.
#
#   test/bench/server_rss.sh [N]
set -euo pipefail

n=${1:-1000}
root=$(cd "$(dirname "$0")/../.." && pwd)
export PATH=$PATH:/usr/local/go/bin
work=$(mktemp -d /tmp/ironroot-rss-XXXXXX)
pid=""
cleanup() {
	if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
		kill -TERM "$pid"
		wait "$pid" 2>/dev/null || true
	fi
	rm -rf "$work"
}
trap cleanup EXIT

cd "$root"
CGO_ENABLED=1 go build -o "$work/bin/" ./cmd/ironroot-server ./cmd/ironroot-sim
eval "$("$work/bin/ironroot-sim" hsm init -dir "$work/softhsm" -label rss-bench)"
export SOFTHSM2_CONF

# A self-signed certificate stands in for the TPM manufacturer roots: this
# measurement attests no node.
mkdir -p "$work/ek-roots"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=bench-ek-root \
	-keyout "$work/ek-root.key" -out "$work/ek-roots/root.pem" 2>/dev/null
cat >"$work/server.hcl" <<EOF
node_attestation {
  tpm {
    ek_root_dir = "$work/ek-roots"
  }
}
EOF

sock="$work/admin/api.sock"
"$work/bin/ironroot-server" run -config "$work/server.hcl" -bindAddress 127.0.0.1 -serverPort 0 \
	-socketPath "$sock" -dataDir "$work/data" -hsm "$HSM_URI" -logLevel warn &
pid=$!

for _ in $(seq 100); do
	if "$work/bin/ironroot-server" healthcheck -socketPath "$sock" >/dev/null 2>&1; then
		break
	fi
	kill -0 "$pid" || { echo "server exited during start-up" >&2; exit 1; }
	sleep 0.1
done
"$work/bin/ironroot-server" healthcheck -socketPath "$sock" >/dev/null

rss() { awk -v k="$1:" '$1 == k { print $2 }' "/proc/$pid/status"; }
idle_kb=$(rss VmRSS)

# N workload entries under 10 agents, created in one -data call.
agent() { printf 'spiffe://example.org/ironroot/agent/tpm/%064x' "$1"; }
{
	echo '{"entries": ['
	for ((i = 0; i < n; i++)); do
		[[ $i -gt 0 ]] && echo ','
		printf '{"spiffe_id":"spiffe://example.org/workload/%d","parent_id":"%s","selectors":[{"type":"unix","value":"uid:%d"},{"type":"unix","value":"path:/usr/bin/app%d"}],"dns_names":["w%d.example.org"]}' \
			"$i" "$(agent $((i % 10)))" "$((1000 + i))" "$i" "$i"
	done
	echo ']}'
} >"$work/entries.json"
"$work/bin/ironroot-server" entry create -socketPath "$sock" -data "$work/entries.json" >/dev/null
count=$("$work/bin/ironroot-server" entry show -socketPath "$sock" -output json | grep -c '"spiffe_id"')
sleep 1 # the entry cache applies the change feed; let the GC settle too

printf 'entries: %d\n' "$count"
mb() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
printf 'VmRSS idle: %d KiB (%s MiB)\n' "$idle_kb" "$(mb "$idle_kb")"
printf 'VmRSS with %d entries: %d KiB (%s MiB)\n' "$count" "$(rss VmRSS)" "$(mb "$(rss VmRSS)")"
printf 'VmHWM (peak): %d KiB (%s MiB)\n' "$(rss VmHWM)" "$(mb "$(rss VmHWM)")"
