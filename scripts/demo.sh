#!/usr/bin/env bash
# The main job on the built-in simulated dataset, end to end, with the same commands a user types:
# install, simulate a small breathing-lung dataset, train briefly, register the test pairs at chosen (lam, mu),
# evaluate, and sweep (lam, mu) over the trained range.
# Usage: bash scripts/demo.sh [OUT]      (default OUT=demo; an existing OUT is refused, nothing is overwritten)
# Knobs (environment): DEMO_PAIRS (8), DEMO_SIZE (64), DEMO_EPOCHS (12), DEMO_LR (1e-3), DEMO_GRID (5).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-demo}
if [ -e "$out" ]; then
    echo "demo: '$out' already exists; remove it or name another folder: bash scripts/demo.sh OTHER" >&2
    exit 1
fi
pairs=${DEMO_PAIRS:-8}
size=${DEMO_SIZE:-64}
epochs=${DEMO_EPOCHS:-12}
lr=${DEMO_LR:-1e-3}
grid=${DEMO_GRID:-5}
shape="[$size,$size,$size]"

bash scripts/install.sh
start=$SECONDS
step() { echo; echo "=== demo: $* ($((SECONDS - start)) s)"; }

step "1/5 simulating $pairs breathing-lung pairs at ${size}^3 in $out/data"
python scripts/make_synthetic.py --output_dir "$out/data" --num_pairs "$pairs" --spatial_size "$shape" --seed 0 \
    --preview True >/dev/null

common=(--dataset_dir "$out/data" --spatial_size "$shape" --num_workers 0)

step "2/5 training the hyper-conditioned network for $epochs epochs (lam, mu ~ U[0,1]^2 per sample)"
python -m monai.bundle run training --meta_file configs/metadata.json --config_file configs/train.json \
    "${common[@]}" --ckpt_dir "$out/models" --output_dir "$out/train" --epochs "$epochs" --val_interval 4 \
    --learning_rate "$lr"

step "3/5 registering the test pairs at lam=0.083, mu=0.03"
python -m monai.bundle run --meta_file configs/metadata.json --config_file configs/inference.json \
    "${common[@]}" --ckpt_dir "$out/models" --output_dir "$out/inference" --lam 0.083 --mu 0.03

step "4/5 evaluating the test pairs at lam=0.083, mu=0.03"
python -m monai.bundle run --meta_file configs/metadata.json \
    --config_file "['configs/inference.json','configs/evaluate.json']" \
    "${common[@]}" --ckpt_dir "$out/models" --output_dir "$out/evaluation" --lam 0.083 --mu 0.03

step "5/5 sweeping (lam, mu) on a ${grid}x${grid} grid over the trained range"
python -m monai.bundle run sweep --meta_file configs/metadata.json \
    --config_file "['configs/inference.json','configs/sweep.json']" \
    "${common[@]}" --ckpt_dir "$out/models" --output_dir "$out/sweep" --grid_size "$grid" --refine_steps 10

echo
echo "=== demo: done in $((SECONDS - start)) s. Outputs:"
echo "  simulated data + previews : $out/data (previews/*.png)"
echo "  trained model             : $out/models/model.pt, $out/models/model.json (TensorBoard logs: $out/train)"
echo "  registrations             : $out/inference (per pair: transform.nii.gz (ITK field, mm), warped image (HU)/mask, preview.png)"
echo "  evaluation                : $out/evaluation/metrics.csv, metrics.json"
echo "  sweep                     : $out/sweep/sweep.csv, summary.json, heatmap PNGs"
python - "$out" <<'EOF'
import json, sys
out = sys.argv[1]
mean = json.load(open(f"{out}/evaluation/metrics.json")).get("mean", {})
print("  mean test metrics at (0.083, 0.03):", {k: round(v, 3) if isinstance(v, float) else v for k, v in mean.items()})
best = json.load(open(f"{out}/sweep/summary.json")).get("best", {})
shown = ("dice_mean", "tre_mm", "folding_percent", "sd_log_jacobian", "network_dice_mean", "network_tre_mm")
metrics = {k: round(v, 3) for k, v in best.get("mean", {}).items() if k in shown and isinstance(v, float)}
print(f"  sweep optimum: lam={best.get('lam')}, mu={best.get('mu')}:", metrics)
EOF
