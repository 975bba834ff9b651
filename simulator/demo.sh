#!/usr/bin/env bash
# Ironroot hardware smoke demo (`make demo` / `make demo-down`).
#
#   simulator/demo.sh up     run bin/ironroot-sim demo -dir .demo (make builds bin/ first)
#   simulator/demo.sh down   stop a swtpm a demo left running and remove .demo/
#
# DEMO_DIR overrides the state directory (default .demo in the repository).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="${DEMO_DIR:-$repo/.demo}"
bin="$repo/bin/ironroot-sim"

# stop_leftover stops the swtpm whose pid a demo left in $dir/swtpm.pid, but
# only if that process is a swtpm serving a state inside $dir.
stop_leftover() {
	local pidfile="$dir/swtpm.pid" pid
	[[ -f "$pidfile" ]] || return 0
	pid="$(tr -dc '0-9' <"$pidfile")"
	if [[ -n "$pid" && -r "/proc/$pid/cmdline" ]] &&
		tr '\0' '\n' <"/proc/$pid/cmdline" | grep -q "^dir=$dir/" &&
		[[ "$(basename "$(tr '\0' '\n' <"/proc/$pid/cmdline" | head -n1)")" == swtpm ]]; then
		echo "demo: stopping swtpm (pid $pid)"
		kill -TERM "$pid" 2>/dev/null || true
		for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
		kill -KILL "$pid" 2>/dev/null || true
	fi
	rm -f "$pidfile"
}

case "${1:-}" in
up)
	if [[ ! -x "$bin" ]]; then
		echo "demo: $bin missing: run 'make demo' (it builds bin/ first)" >&2
		exit 1
	fi
	exec "$bin" demo -dir "$dir"
	;;
down)
	if [[ -d "$dir" ]]; then
		if [[ -n "$(ls -A "$dir")" && ! -f "$dir/.ironroot-demo" ]]; then
			echo "demo: $dir was not made by the demo; not removing it" >&2
			exit 1
		fi
		stop_leftover
		rm -rf "$dir"
		echo "demo: removed $dir"
	else
		echo "demo: nothing to remove ($dir does not exist)"
	fi
	;;
*)
	echo "usage: $0 up|down" >&2
	exit 2
	;;
esac
