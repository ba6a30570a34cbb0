#!/usr/bin/env bash
# Held-out accuracy of a trained model: the rows of the model card's accuracy table. The network alone
# (--instance_steps 0) and the network + instance optimisation (the inference defaults) at the card's validation
# (lam, mu), on three sets of simulated pairs with known motion, none of them trained on or used for model selection:
#   realistic  the test split of the release dataset (DATA, default release_work/data: train_release.sh's)
#   default    the test split (5 pairs) of 24 pairs of the default (gentler) generator, seed 777
#   real_ct    4 realistic-preset pairs on the real chest CT as exhale anatomy, seed 999 (all pairs)
#
#   bash scripts/score_release.sh models                    # the committed release
#   bash scripts/score_release.sh release_work/models OUT   # a new training; OUT default release_work/score/<dir name>
#
# The default and real_ct sets are built once into release_work/heldout/ (reused when present). Per set and mode,
# metrics.csv/json land in OUT/<set>/<network|optimised>; OUT/summary.md is the table (mean TRE mm, lung Dice,
# % J<=0, SDlogJ). Settings: LAM (0.083), MU (0.03), THREADS (2), REAL_CT (as in train_release.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL_DIR=${1:?usage: score_release.sh MODEL_DIR [OUT]}
MODEL_DIR=$(cd "$MODEL_DIR" && pwd)
OUT=${2:-release_work/score/$(basename "$MODEL_DIR")}
DATA=${DATA:-release_work/data}
HELDOUT=release_work/heldout
LAM=${LAM:-0.083}
MU=${MU:-0.03}
THREADS=${THREADS:-2}
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ ! -f "$MODEL_DIR/model.pt" ] || [ ! -f "$MODEL_DIR/model.json" ]; then
    echo "score_release.sh: $MODEL_DIR holds no model.pt with its model.json." >&2
    exit 1
fi
if [ -e "$OUT" ]; then
    echo "score_release.sh: $OUT exists; remove it or name another output folder." >&2
    exit 1
fi
if [ -z "${REAL_CT:-}" ]; then  # the nearest ancestor folder holding shared/data/real_ct/, as train_release.sh
    REAL_CT=""
    dir=$PWD
    while [ "$dir" != / ]; do
        dir=$(dirname "$dir")
        if [ -f "$dir/shared/data/real_ct/chest_ct_cropped.nii.gz" ]; then
            REAL_CT=$dir/shared/data/real_ct/chest_ct_cropped.nii.gz
            break
        fi
    done
fi

if [ ! -f "$HELDOUT/default/LungCT_dataset.json" ]; then
    python scripts/make_synthetic.py --output_dir "$HELDOUT/default" --num_pairs 24 --spatial_size "[48,48,52]" \
        --seed 777
fi
sets=("default:$HELDOUT/default:test")
if [ -f "$DATA/LungCT_dataset.json" ]; then
    sets=("realistic:$DATA:test" "${sets[@]}")
else
    echo "score_release.sh: no release dataset at $DATA; the realistic set is left out." >&2
fi
if [ -n "$REAL_CT" ]; then
    if [ ! -f "$HELDOUT/real_ct/LungCT_dataset.json" ]; then
        python scripts/make_synthetic.py --output_dir "$HELDOUT/real_ct" --num_pairs 4 --spatial_size "[48,48,52]" \
            --seed 999 --preset realistic --real_ct "$REAL_CT" --real_ct_fraction 1.0
    fi
    sets+=("real_ct:$HELDOUT/real_ct:all")
else
    echo "score_release.sh: no real CT found; the real_ct set is left out." >&2
fi

mkdir -p "$OUT"
for entry in "${sets[@]}"; do
    IFS=: read -r name dataset split <<< "$entry"
    for mode in network optimised; do
        steps=()
        if [ "$mode" = network ]; then steps=(--instance_steps 0); fi
        python -m monai.bundle run --config_file "['configs/inference.json','configs/evaluate.json']" \
            --dataset_dir "$dataset" --ckpt_dir "$MODEL_DIR" --split "$split" --output_dir "$OUT/$name/$mode" \
            --lam "$LAM" --mu "$MU" --num_workers 0 --device cpu "${steps[@]}"
    done
done

python - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
lines = ["| set | pairs | mode | TRE before mm | TRE mm | Dice before | Dice | % J<=0 | SDlogJ |", "|---|---|---|---|---|---|---|---|---|"]
for metrics in sorted(out.glob("*/*/metrics.json")):
    result = json.loads(metrics.read_text())
    mean = result["mean"]
    lines.append(f"| {metrics.parts[-3]} | {len(result['pairs'])} | {metrics.parts[-2]} | {mean['tre_before_mm']:.2f} | "
                 f"{mean['tre_mm']:.2f} | {mean['dice_before']:.3f} | {mean['dice_mean']:.3f} | "
                 f"{mean['folding_percent']:.3f} | {mean['sd_log_jacobian']:.3f} |")
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
