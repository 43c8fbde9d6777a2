#!/usr/bin/env bash
# SwiftMoE against plain PyTorch on the same model, side by side on this machine, in one go:
#   1. installs CPU PyTorch if it is missing (as launch/test.sh does);
#   2. trains the config's model in PyTorch (launch/peer_moe.py: one process, all cores, fp32 and
#      bf16 autocast with fused attention; the stronger is the peer), on the same global batch;
#   3. runs `moe bench` in its default configuration on all cores (one rank per core);
#   4. prints one JSON line: the CPU, both results and their ratio.
#
#   launch/bench-peer.sh                     # configs/bench.yaml
#   CONFIG=configs/tiny.yaml STEPS=5 launch/bench-peer.sh
#
# Environment: CONFIG (default configs/bench.yaml), MOE (default .build/release/moe), STEPS (timed
# steps of each, default 20), RANKS (default: the number of cores). Arguments after `--` go to
# `moe bench`. Progress goes to stderr, the JSON line to stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
config=${CONFIG:-configs/bench.yaml}
moe=${MOE:-.build/release/moe}
steps=${STEPS:-20}
ranks=${RANKS:-$(nproc)}
[[ "${1:-}" == "--" ]] && shift
[[ -x "$moe" ]] || { echo "bench-peer: no moe binary at $moe (swift build -c release)" >&2; exit 1; }
[[ -f "$config" ]] || { echo "bench-peer: no config at $config" >&2; exit 1; }

if ! python3 -c "import torch" 2>/dev/null; then
    echo "bench-peer: installing CPU PyTorch ..." >&2
    python3 -m pip install --quiet --disable-pip-version-check "torch==2.13.0+cpu" 2>/dev/null \
        || python3 -m pip install --quiet --disable-pip-version-check torch --index-url https://download.pytorch.org/whl/cpu 2>/dev/null \
        || python3 -m pip install --quiet --disable-pip-version-check torch \
        || { echo "bench-peer: could not install PyTorch" >&2; exit 1; }
fi

# The model as SwiftMoE resolves it (defaults filled in), for the PyTorch script. The global
# batch is SwiftMoE's: RANKS x train.batch_size sequences.
model=$("$moe" train --config "$config" --print-config | python3 -c '
import json, re, sys
section, values = None, {}
for line in sys.stdin:
    line = line.split("#")[0].rstrip()
    if not line.strip():
        continue
    if not line.startswith(" "):
        section = line.rstrip(":").strip()
        continue
    key, _, value = line.strip().partition(":")
    values[section + "." + key] = value.strip()
def number(key):
    return float(values[key])
# vocab_size 0: the vocabulary of the training file as moe reads it (header slot 3 of an llm.c token file), else bytes.
vocab = int(number("model.vocab_size"))
if not vocab:
    vocab = 256
    try:
        import struct
        with open(values["data.train"].strip(chr(34)), "rb") as f:
            magic, _, _, declared = struct.unpack("<4i", f.read(16))
        if magic == 20240520 and declared > 0:
            vocab = declared
    except (OSError, KeyError, struct.error):
        pass
print(json.dumps({
    "vocab": vocab, "context": int(number("model.context")), "width": int(number("model.width")),
    "layers": int(number("model.layers")), "heads": int(number("model.heads")),
    "ffn_hidden": int(number("model.ffn_hidden")), "moe_every": int(number("model.moe_every")),
    "experts": int(number("moe.experts")), "top_k": int(number("moe.top_k")),
    "capacity_factor": float(values["moe.capacity_factor"]) if values["moe.capacity_factor"] != "none" else 1e9,
    "balance_loss": number("moe.balance_loss"), "batch": int(number("train.batch_size")) * '"$ranks"',
}))')

echo "bench-peer: PyTorch on $(nproc) thread(s) ..." >&2
peer=$(python3 launch/peer_moe.py --model "$model" --steps "$steps" --threads "$(nproc)" | tail -1)
echo "bench-peer: moe bench on $ranks rank(s) ..." >&2
swift=$(mpirun --allow-run-as-root --oversubscribe --timeout 1800 -np "$ranks" --bind-to core \
        "$moe" bench --config "$config" --steps "$steps" "$@" | tail -1)

cpu=$(lscpu | sed -n 's/^Model name: *//p' | head -1)
python3 - "$cpu" "$peer" "$swift" <<'EOF'
import json, sys
cpu, peer, swift = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
print(json.dumps({
    "cpu": cpu,
    "cores": swift["ranks"],
    "swiftmoe": {key: swift.get(key) for key in ("tokens_per_sec", "precision", "kernels", "mfu", "step_ms", "global_batch_tokens")},
    "pytorch": peer,
    "ratio": round(swift["tokens_per_sec"] / peer["tokens_per_sec"], 3),
}))
EOF
