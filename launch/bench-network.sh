#!/usr/bin/env bash
# `moe bench` on 2 ranks (RANKS_PER_HOST=2: 4, two per "machine") over a simulated cluster
# link, next to the same bench over shared memory, in one invocation. Two network namespaces joined by a veth pair stand for two
# machines; `tc` shapes each direction of the pair with a token bucket (tbf) at RATE, and with
# DELAY (one way) where the kernel has netem. A plain TCP transfer checks that the shaping really
# limits the rate. Prints one JSON line:
#   {"link": {...}, "shared_memory": {step_ms, communication_ms, tokens_per_sec, ...},
#    "network": {...}, "step_ratio": network step_ms / shared-memory step_ms}
#
#   launch/bench-network.sh                      # RATE=10gbit
#   RATE=1gbit launch/bench-network.sh -- --precision fp32 --set moe.dispatch_chunks=1
#
# Variables: RATE (tc rate, default 10gbit), DELAY (e.g. 100us; needs netem), RANKS_PER_HOST
# (ranks in each namespace, default 1), MOE (binary,
# default .build/release/moe), STEPS (timed bench steps, default 20). Arguments after `--` go to
# `moe bench`. Needs root (network namespaces); exits 77 with a message where they are not allowed.
set -uo pipefail
cd "$(dirname "$0")/.."
moe="$(realpath "${MOE:-.build/release/moe}")"
rate="${RATE:-10gbit}"
delay="${DELAY:-}"
steps="${STEPS:-20}"
[[ "${1:-}" == "--" ]] && shift
bench_args=(bench --steps "$steps" "$@")
[[ -x "$moe" ]] || { echo "bench-network: no moe binary at $moe (swift build -c release)" >&2; exit 1; }

source launch/namespaces.sh
work="$(mktemp -d)"
trap 'namespace_pair_remove; rm -rf "$work"' EXIT
namespace_pair "bn$$" "$work" || { status=$?; echo "bench-network: nothing was measured" >&2; exit "$status"; }

# Shaping: a token bucket on each side's egress (so both directions are limited). The bucket
# holds about 4 ms of traffic, enough for the kernel's timer granularity at any of these rates.
rate_bits=$(python3 -c "
import re, sys
m = re.fullmatch(r'([0-9.]+)([kmg]?)bit', '$rate'.lower())
if not m: sys.exit('bench-network: RATE must look like 10gbit, 500mbit or 1gbit')
print(int(float(m[1]) * {'': 1, 'k': 1e3, 'm': 1e6, 'g': 1e9}[m[2]]))") || exit 1
burst=$(( rate_bits / 8 / 250 > 65536 ? rate_bits / 8 / 250 : 65536 ))
delay_note="none"
for side in "$nsA $vethA" "$nsB $vethB"; do
    set -- $side
    if [[ -n "$delay" ]]; then
        if ip netns exec "$1" tc qdisc add dev "$2" root handle 1: netem delay "$delay" 2>/dev/null; then
            ip netns exec "$1" tc qdisc add dev "$2" parent 1:1 handle 10: tbf rate "$rate" burst "$burst" latency 100ms || exit 1
            delay_note="$delay"
        else
            delay_note="not applied: this kernel has no netem"
            ip netns exec "$1" tc qdisc add dev "$2" root tbf rate "$rate" burst "$burst" latency 100ms || exit 1
        fi
    else
        ip netns exec "$1" tc qdisc add dev "$2" root tbf rate "$rate" burst "$burst" latency 100ms || exit 1
    fi
done
echo "bench-network: link $rate (burst $burst bytes), delay $delay_note" >&2

# A plain transfer over the shaped link: 4 s of TCP from A to B, measured at the receiver.
cat > "$work/transfer.py" <<'PY'
import socket, sys, time
role, host = sys.argv[1], sys.argv[2]
if role == "server":
    server = socket.socket(); server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((host, 5201)); server.listen(1); print("ready", flush=True)
    connection, _ = server.accept(); received = 0; started = None
    while chunk := connection.recv(1 << 20):
        started = started or time.time(); received += len(chunk)
    print(f"{received * 8 / (time.time() - started) / 1e9:.2f}")
else:
    client = socket.create_connection((host, 5201)); block = b"\0" * (1 << 20); end = time.time() + 4
    while time.time() < end: client.sendall(block)
    client.close()
PY
ip netns exec "$nsB" python3 "$work/transfer.py" server "$ipB" > "$work/received" &
server=$!
for _ in $(seq 100); do grep -q ready "$work/received" 2>/dev/null && break; sleep 0.1; done
ip netns exec "$nsA" python3 "$work/transfer.py" client "$ipB" || { echo "bench-network: the plain transfer failed" >&2; exit 1; }
wait "$server"
measured=$(tail -1 "$work/received")
echo "bench-network: plain TCP transfer over the link: $measured Gbit/s" >&2

export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
common=(--timeout 900 -x OPENBLAS_NUM_THREADS=1 -x OMP_NUM_THREADS=1)

echo "bench-network: shared memory ..." >&2
ranks=$(( 2 * ${RANKS_PER_HOST:-1} ))
bind=$([[ $ranks -le $(nproc) ]] && echo core || echo none)   # more ranks than cores: unbound
shared=$(mpirun "${common[@]}" -np "$ranks" --oversubscribe --bind-to "$bind" "$moe" "${bench_args[@]}" | tail -1) \
    || { echo "bench-network: the shared-memory bench failed" >&2; exit 1; }
echo "bench-network: over the link ..." >&2
network=$(namespace_mpirun "${common[@]}" "$moe" "${bench_args[@]}" | tail -1) \
    || { echo "bench-network: the bench over the link failed" >&2; exit 1; }
python3 - "$rate" "$delay_note" "$measured" "$shared" "$network" <<'PY'
import json, sys
rate, delay, measured, shared, network = sys.argv[1:6]
def summary(text):
    run = json.loads(text)
    keys = ("ranks", "precision", "tokens_per_sec", "step_ms", "communication_ms", "step_ms_by_part", "expert_mib_sent_per_rank", "mfu")
    return {key: run[key] for key in keys if key in run}
shared, network = summary(shared), summary(network)
print(json.dumps({"link": {"rate": rate, "delay": delay, "measured_gbit_per_s": float(measured)},
                  "shared_memory": shared, "network": network,
                  "step_ratio": round(network["step_ms"] / shared["step_ms"], 3)}))
PY
