#!/usr/bin/env bash
# Ironroot demo (`make demo` / `make demo-down`): the whole chain on one
# machine with no TPM and no HSM — a software TPM (swtpm) with EK
# certificates from a private CA, a SoftHSM2 token holding the CA keys, the
# server, the agent, and a workload fetching its SVIDs over the Workload API.
#
#   simulator/demo.sh up     start everything (state under .demo/), print what happened
#   simulator/demo.sh down   stop every process the demo started and remove .demo/
#
# `up` leaves everything running and writes .demo/env; `. .demo/env` then
# lets both CLIs, tpm2-tools, pkcs11-tool and any go-spiffe program use it.
# DEMO_DIR overrides the state directory, DEMO_BIN the binaries (bin/),
# DEMO_SERVER_PORT, DEMO_HEALTH_PORT and DEMO_TPM_PORT the ports.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="${DEMO_DIR:-$repo/.demo}"
bin="${DEMO_BIN:-$repo/bin}"
td="example.org"
port="${DEMO_SERVER_PORT:-18081}"
health_port="${DEMO_HEALTH_PORT:-$((port + 1))}"
tpm_port="${DEMO_TPM_PORT:-$((port + 100))}"

say() { printf '\033[1m%s\033[0m\n' "$*"; }
die() { echo "demo: $*" >&2; exit 1; }

# stop_pidfile stops the process whose pid is in $1 if it is one the demo
# started (its command line names the demo directory), then removes the file.
stop_pidfile() {
	local pidfile="$1" pid
	[[ -f "$pidfile" ]] || return 0
	pid="$(tr -dc '0-9' <"$pidfile")"
	if [[ -n "$pid" && -r "/proc/$pid/cmdline" ]] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF "$dir"; then
		kill -TERM "$pid" 2>/dev/null || true
		for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
		kill -KILL "$pid" 2>/dev/null || true
	fi
	rm -f "$pidfile"
}

# marker marks the directory as the demo's own; down removes nothing else.
marker=".ironroot-demo"

down() {
	[[ -d "$dir" ]] || return 0
	if [[ -n "$(ls -A "$dir")" && ! -f "$dir/$marker" ]]; then
		die "$dir was not made by the demo; not removing it"
	fi
	# Agent first, swtpm last: each depends on the next. swtpm.pid is also
	# where the hardware smoke demo (ironroot-sim demo) records its swtpm.
	for p in agent server swtpm; do stop_pidfile "$dir/$p.pid"; done
	rm -rf "$dir"
}

# start NAME LOG CMD...: runs CMD detached (own session, survives make),
# records its pid.
start() {
	local name="$1" log="$2"
	shift 2
	setsid "$@" >"$log" 2>&1 </dev/null &
	echo $! >"$dir/$name.pid"
}

# wait_for DESC SECONDS CMD...: polls CMD until it succeeds.
wait_for() {
	local desc="$1" secs="$2"
	shift 2
	for _ in $(seq $((secs * 10))); do
		if "$@" >/dev/null 2>&1; then return 0; fi
		sleep 0.1
	done
	die "$desc did not come up in ${secs}s"
}

up() {
	for b in ironroot-server ironroot-agent ironroot-sim; do
		[[ -x "$bin/$b" ]] || die "$bin/$b missing: run 'make demo' (it builds bin/ first)"
	done
	# Running twice works: the previous demo is stopped and replaced.
	down
	mkdir -p "$dir"/{tpm,hsm,server,agent,ekroots,workload}
	touch "$dir/$marker"
	chmod 700 "$dir/server"

	say "1. Manufacturing a software TPM (swtpm) with EK certificates from a private CA"
	"$bin/ironroot-sim" tpm manufacture -dir "$dir/tpm" | tee "$dir/tpm/manufacture.txt" | sed 's/^/   /'
	cp "$dir/tpm/ca/ca/swtpm-localca-rootca-cert.pem" "$dir/tpm/ca/ca/issuercert.pem" "$dir/ekroots/"
	# TCP, so that tpm2-tools (swtpm TCTI) can reach it too.
	start swtpm "$dir/tpm/swtpm.log" "$bin/ironroot-sim" tpm serve -dir "$dir/tpm" -tcp "127.0.0.1:$tpm_port"
	wait_for "swtpm" 10 grep -q '^address:' "$dir/tpm/swtpm.log"
	tpm_addr="tcp://127.0.0.1:$tpm_port"

	say "2. Creating a SoftHSM2 token for the CA keys"
	eval "$("$bin/ironroot-sim" hsm init -dir "$dir/hsm" -label ironroot-ca)"
	export SOFTHSM2_CONF
	echo "   token: ironroot-ca   SOFTHSM2_CONF=$SOFTHSM2_CONF"

	say "3. Starting ironroot-server (CA and JWT keys generated on the token)"
	cat >"$dir/server/server.hcl" <<EOF
server {
  trust_domain = "$td"
  bind_address = "127.0.0.1"
  bind_port    = $port
  socket_path  = "$dir/server/api.sock"
  data_dir     = "$dir/server/data"
  hsm          = "$HSM_URI"
  log_level    = "info"
}
node_attestation {
  tpm {
    ek_root_dir = "$dir/ekroots"
  }
}
health_checks {
  listener_enabled = true
  bind_port        = $health_port
}
EOF
	start server "$dir/server/server.log" "$bin/ironroot-server" run -config "$dir/server/server.hcl"
	srv=(-socketPath "$dir/server/api.sock")
	wait_for "ironroot-server" 20 "$bin/ironroot-server" healthcheck "${srv[@]}"
	"$bin/ironroot-server" bundle show "${srv[@]}" >"$dir/bundle.pem"

	say "4. Starting ironroot-agent (attests with the software TPM)"
	start agent "$dir/agent/agent.log" "$bin/ironroot-agent" run \
		-serverAddress "127.0.0.1:$port" -tpm "$tpm_addr" -trustBundle "$dir/bundle.pem" \
		-socketPath "$dir/agent/api.sock" -dataDir "$dir/agent/data" -trustDomain "$td"
	wl=(-socketPath "$dir/agent/api.sock")
	wait_for "ironroot-agent" 30 test -s "$dir/agent/data/agent_svid.pem"
	agent_id="$("$bin/ironroot-server" agent list "${srv[@]}" | sed -n 's/^SPIFFE ID *: //p' | head -n1)"
	[[ -n "$agent_id" ]] || die "the agent did not attest (see $dir/agent/agent.log)"
	manufacturer="$("$bin/ironroot-server" agent show "${srv[@]}" -spiffeID "$agent_id" | sed -n 's/^Selector *: tpm:manufacturer:\(.*\)$/\1/p')"

	say "5. Registering a node alias (tpm:manufacturer:$manufacturer) and a workload entry for uid $(id -u)"
	"$bin/ironroot-server" entry create "${srv[@]}" -node -spiffeID "spiffe://$td/node/swtpm" \
		-selector "tpm:manufacturer:$manufacturer" >/dev/null
	"$bin/ironroot-server" entry create "${srv[@]}" -parentID "spiffe://$td/node/swtpm" \
		-spiffeID "spiffe://$td/demo/workload" -selector "unix:uid:$(id -u)" -dns demo.example.org >/dev/null
	wait_for "the workload SVID" 15 "$bin/ironroot-agent" api fetch x509 "${wl[@]}" -silent

	say "6. Fetching the workload's SVIDs through the Workload API"
	"$bin/ironroot-agent" api fetch x509 "${wl[@]}" -write "$dir/workload" >"$dir/workload/x509.txt"
	"$bin/ironroot-agent" api fetch jwt "${wl[@]}" -audience demo >"$dir/workload/jwt.txt"
	token="$(awk '/^token\(/ {getline; gsub(/[ \t]/, ""); print; exit}' "$dir/workload/jwt.txt")"
	"$bin/ironroot-agent" api validate jwt "${wl[@]}" -audience demo -svid "$token" >"$dir/workload/validate.txt"

	cat >"$dir/env" <<EOF
export SPIFFE_ENDPOINT_SOCKET='unix://$dir/agent/api.sock'
export IRONROOT_SERVER_SOCKET='$dir/server/api.sock'
export IRONROOT_SERVER_ADDRESS='127.0.0.1:$port'
export IRONROOT_TRUST_BUNDLE='$dir/bundle.pem'
export IRONROOT_TPM='$tpm_addr'
export TPM2TOOLS_TCTI='swtpm:host=127.0.0.1,port=$tpm_port'
export SOFTHSM2_CONF='$SOFTHSM2_CONF'
export IRONROOT_HSM_URI='$HSM_URI'
EOF

	echo
	say "The agent"
	echo "   agent ID : $agent_id"
	echo "   EK hash  : ${agent_id##*/}"
	echo "   node selectors:"
	"$bin/ironroot-server" agent show "${srv[@]}" -spiffeID "$agent_id" | sed -n 's/^Selector *: /     /p'
	say "The workload's X509-SVID"
	sed 's/^/   /' "$dir/workload/x509.txt" | grep -v '^   Writing'
	echo "   files    : $dir/workload/svid.0.pem, svid.0.key, bundle.0.pem"
	if command -v openssl >/dev/null; then
		openssl x509 -in "$dir/workload/svid.0.pem" -noout -subject -issuer -enddate -ext subjectAltName 2>/dev/null | sed 's/^/   /'
	fi
	say "The workload's JWT-SVID (audience demo)"
	sed 's/^/   /' "$dir/workload/validate.txt"
	say "CA keys in the HSM (never leave the token)"
	"$bin/ironroot-server" ca show "${srv[@]}" | sed 's/^/   /'
	echo
	say "Everything is running. To use it:"
	echo "   . $dir/env"
	echo "   bin/ironroot-agent api fetch x509          # the workload's SVID"
	echo "   bin/ironroot-server entry show -socketPath \$IRONROOT_SERVER_SOCKET"
	echo "   pkcs11-tool --module /usr/lib/softhsm/libsofthsm2.so --token-label ironroot-ca --list-objects"
	echo "   tpm2_getcap properties-fixed               # the software TPM (TPM2TOOLS_TCTI is set)"
	echo "   make demo-down                             # stop everything, remove $dir"
}

case "${1:-}" in
up) up ;;
down)
	down
	echo "demo: stopped and removed $dir"
	;;
*)
	echo "usage: $0 up|down" >&2
	exit 2
	;;
esac
