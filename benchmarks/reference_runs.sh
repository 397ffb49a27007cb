#!/usr/bin/env bash
# The reference `gmv bench` runs of docs/performance.md, each 60 s through a Mosquitto that
# the bench starts itself; their JSON reports land in benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
gmv=.venv/bin/gmv
out=benchmarks/results
$gmv bench --rate 17000000 --batch-orders 100000 --orders 1000000000 --duration 60 \
  --json $out/bench-binary.json
$gmv bench --rate 3000000 --batch-orders 10000 --encoding json --duration 60 \
  --json $out/bench-json.json
$gmv bench --rate 583000 --batch-orders 10000 --duration 60 --json $out/bench-peak.json
$gmv bench --rate 583000 --shape festival --batch-orders 10000 --duration 60 \
  --json $out/bench-festival.json
