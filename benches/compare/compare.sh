#!/usr/bin/env bash
# Runs the report's shapes through this crate, oneDNN and PyTorch on this machine, single
# threaded by default (THREADS=N for more), and prints GB/s side by side. Not run by CI.
# Needs: g++ and Debian's libdnnl-dev for oneDNN; `pip install torch` for PyTorch (each is
# skipped when missing).
set -uo pipefail
cd "$(dirname "$0")"
threads=${THREADS:-1}
out=$(mktemp -d)

cargo run --release --quiet --example report -- --csv --threads "$threads" > "$out/ours.csv"
if g++ -O2 -std=c++17 onednn.cpp -ldnnl -o "$out/onednn" 2>/dev/null; then
    OMP_NUM_THREADS=$threads "$out/onednn" > "$out/onednn.csv"
else
    echo "oneDNN: not built (apt-get install libdnnl-dev)" >&2
fi
if python3 -c 'import torch' 2>/dev/null; then
    THREADS=$threads python3 torch_bn.py > "$out/torch.csv"
else
    echo "PyTorch: not installed (pip install torch)" >&2
fi

python3 - "$out" <<'PY'
import csv, os, sys
out = sys.argv[1]
tables = {}
for tool in ["ours", "onednn", "torch"]:
    path = os.path.join(out, tool + ".csv")
    if os.path.exists(path):
        for row in csv.reader(open(path)):
            if len(row) == 4:
                tables.setdefault(tuple(row[:3]), {})[tool] = row[3]
print("| shape | layout | op | batchnorm GB/s | oneDNN GB/s | PyTorch GB/s |")
print("|---|---|---|---|---|---|")
for key in sorted(tables):
    t = tables[key]
    print("| " + " | ".join(key) + " | " + " | ".join(t.get(k, "-") for k in ["ours", "onednn", "torch"]) + " |")
PY
