#!/usr/bin/env bash
# tools/run-demo.sh [OUT_DIR] — set up, build conmim-shard, and run its demo: it makes a
# small synthetic ImageNet-style folder, shards it, verifies the result and prints a
# summary. OUT_DIR defaults to ./demo-out.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${1:-$PWD/demo-out}"

bash tools/setup.sh
# shellcheck source=tools/env.sh
source tools/env.sh
echo "==> cargo build --release --bin conmim-shard"
cargo build --release --bin conmim-shard
echo "==> conmim-shard demo --out $out"
exec target/release/conmim-shard demo --out "$out"
