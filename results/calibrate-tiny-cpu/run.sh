#!/usr/bin/env bash
# From a sync run's log to an async prediction, checked against the async run, on the tiny CPU example:
#   1. `stalecast train` in sync mode: the run a user already has (its metrics.jsonl and trace);
#   2. `stalecast calibrate` from that run alone: profile.yaml and profile.calibration.yaml;
#   3. the prediction config: the example in async mode with hardware.profile = the calibrated profile and the
#      sync run's own groups (the lengths calibrate fitted), nothing taken from the async run;
#   4. `stalecast train` in async mode (another seed), then `stalecast validate --trace` against it, with the sync
#      run as the speedup's baseline, at validate's default tolerances (the 10 % targets).
#   bash results/calibrate-tiny-cpu/run.sh   (from the repo root; ~5 minutes on 2 cores, nothing else running)
set -eu
cd "$(dirname "$0")/../.."
out=results/calibrate-tiny-cpu
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
stalecast train examples/tiny_cpu.yaml --set pipeline.mode=sync --set pipeline.interruptible=false \
  --out "$work/sync" > "$out/train-sync.log" 2>&1
stalecast calibrate "$work/sync" --format stalecast --out "$out/profile.yaml" --force > "$out/calibrate.log" 2>&1
python3 - "$out" <<'PY'
import sys, yaml
out = sys.argv[1]
cfg = yaml.safe_load(open("examples/tiny_cpu.yaml"))
cal = yaml.safe_load(open(f"{out}/profile.calibration.yaml"))
cfg["hardware"]["profile"] = "profile.yaml"  # resolved beside this config
for key in ("prompt_len", "response_len"):
    del cfg["workload"][key]
cfg["workload"]["groups"] = cal["workload"]["groups"]  # the sync run's groups, replayed in order
cfg["workload"]["groups_in_order"] = True
yaml.safe_dump(cfg, open(f"{out}/predict.yaml", "w"), sort_keys=False)
PY
stalecast train examples/tiny_cpu.yaml --set seed=1 --out "$work/async" > "$out/train-async.log" 2>&1
set +e
stalecast validate "$out/predict.yaml" --trace "$work/async/trace" --sync-trace "$work/sync/trace" \
  --out "$out/validate" --force > "$out/validate-run.log" 2>&1
echo "validate: exit $?"
cat "$out/validate-run.log"
