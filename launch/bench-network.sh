#!/usr/bin/env bash
# `moe bench` on 2 ranks over a simulated cluster link, next to the same bench over shared
# memory, in one invocation. Two network namespaces joined by a veth pair stand for two
# machines; `tc` shapes each direction of the pair with a token bucket (tbf) at RATE, and with
# DELAY (one way) where the kernel has netem. A plain TCP transfer checks that the shaping really
# limits the rate. Prints one JSON line:
#   {"link": {...}, "shared_memory": {step_ms, communication_ms, tokens_per_sec, ...},
#    "network": {...}, "step_ratio": network step_ms / shared-memory step_ms}
#
#   launch/bench-network.sh                      # RATE=10gbit
#   RATE=1gbit launch/bench-network.sh -- --precision fp32 --set moe.dispatch_chunks=1
#
# Variables: RATE (tc rate, default 10gbit), DELAY (e.g. 100us; needs netem), MOE (binary,
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

tag="bn$$"
nsA="${tag}a"; nsB="${tag}b"
subnet="10.$(( $$ % 200 + 20 )).$(( ($$ / 200) % 250 )).0"
base="${subnet%.0}"
ipA="$base.1"; ipB="$base.2"
work="$(mktemp -d)"
cleanup() { ip netns del "$nsA" 2>/dev/null; ip netns del "$nsB" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

if ! ip netns add "$nsA" 2>/dev/null || ! ip netns add "$nsB" 2>/dev/null; then
    echo "bench-network: network namespaces are not allowed here (needs root and CAP_SYS_ADMIN); nothing was measured" >&2
    exit 77
fi
ip link add "${tag}va" type veth peer name "${tag}vb" && ip link set "${tag}va" netns "$nsA" && ip link set "${tag}vb" netns "$nsB" \
    || { echo "bench-network: cannot create a veth pair here" >&2; exit 77; }
ip -n "$nsA" addr add "$ipA/24" dev "${tag}va" && ip -n "$nsB" addr add "$ipB/24" dev "${tag}vb"
for ns in "$nsA" "$nsB"; do ip -n "$ns" link set lo up; done
ip -n "$nsA" link set "${tag}va" up && ip -n "$nsB" link set "${tag}vb" up

# Shaping: a token bucket on each side's egress (so both directions are limited). The bucket
# holds about 4 ms of traffic, enough for the kernel's timer granularity at any of these rates.
rate_bits=$(python3 -c "
import re, sys
m = re.fullmatch(r'([0-9.]+)([kmg]?)bit', '$rate'.lower())
if not m: sys.exit('bench-network: RATE must look like 10gbit, 500mbit or 1gbit')
print(int(float(m[1]) * {'': 1, 'k': 1e3, 'm': 1e6, 'g': 1e9}[m[2]]))") || exit 1
burst=$(( rate_bits / 8 / 250 > 65536 ? rate_bits / 8 / 250 : 65536 ))
delay_note="none"
for side in "$nsA ${tag}va" "$nsB ${tag}vb"; do
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

# The launch agent mpirun uses instead of ssh: "agent HOST command line".
cat > "$work/agent.sh" <<AGENT
#!/bin/sh
host="\$1"; shift
case "\$host" in
  $ipA) ns=$nsA ;;
  $ipB) ns=$nsB ;;
  *) echo "agent: unknown host \$host" >&2; exit 1 ;;
esac
exec ip netns exec "\$ns" unshare --uts sh -c "hostname \$ns; \$*"
AGENT
chmod +x "$work/agent.sh"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
common=(--timeout 900 -np 2 -x OPENBLAS_NUM_THREADS=1 -x OMP_NUM_THREADS=1)

echo "bench-network: shared memory ..." >&2
shared=$(mpirun "${common[@]}" --bind-to core --mca btl_vader_single_copy_mechanism none "$moe" "${bench_args[@]}" | tail -1) \
    || { echo "bench-network: the shared-memory bench failed" >&2; exit 1; }
# Each namespace's daemon would bind its one rank to "its" first core, the same core for both:
# the ranks are left unbound instead (the kernel spreads them over the two cores).
echo "bench-network: over the link ..." >&2
network=$(ip netns exec "$nsA" unshare --uts sh -c 'hostname "$0"; exec "$@"' "$nsA" \
    mpirun "${common[@]}" --host "$ipA,$ipB" --bind-to none --mca plm_rsh_agent "$work/agent.sh" \
        --mca btl tcp,self --mca btl_tcp_if_include "$subnet/24" --mca oob_tcp_if_include "$subnet/24" \
        "$moe" "${bench_args[@]}" | tail -1) \
    || { echo "bench-network: the bench over the link failed" >&2; exit 1; }
python3 - "$rate" "$delay_note" "$measured" "$shared" "$network" <<'PY'
import json, sys
rate, delay, measured, shared, network = sys.argv[1:6]
def summary(text):
    run = json.loads(text)
    keys = ("precision", "tokens_per_sec", "step_ms", "communication_ms", "step_ms_by_part", "mfu")
    return {key: run[key] for key in keys if key in run}
shared, network = summary(shared), summary(network)
print(json.dumps({"link": {"rate": rate, "delay": delay, "measured_gbit_per_s": float(measured)},
                  "shared_memory": shared, "network": network,
                  "step_ratio": round(network["step_ms"] / shared["step_ms"], 3)}))
PY
