#!/usr/bin/env bash
# Held-out accuracy of a trained model: the rows of the model card's accuracy table. The network alone
# (--instance_steps 0) and the network + instance optimisation (the inference defaults) at the card's validation
# (lam, mu), on four sets of simulated pairs with known motion, none of them trained on or used for model selection:
#   heldout_anatomy  4 realistic-preset (breath-hold) pairs at the full Learn2Reg grid (192 x 192 x 208 voxels of
#              1.75 x 1.25 x 1.75 mm) on the real chest CT that no release trained on (HELDOUT_CT, default
#              nsclc_r01_001.nii.gz of shared/data/real_ct; train_release.sh leaves it out), seed 999 (all pairs)
#   realistic  the test split of the release dataset (DATA, default release_work/data: train_release.sh's)
#   default    the test split (5 pairs) of 24 pairs of the default (gentler) generator, seed 777
#   real_ct    4 realistic-preset pairs on chest_ct_cropped.nii.gz as exhale anatomy, seed 999 (all pairs; a new
#              motion on an anatomy that release 0.4.0 and 0.5.0 trained on)
#
#   bash scripts/score_release.sh models                    # the committed release
#   bash scripts/score_release.sh release_work/models OUT   # a new training; OUT default release_work/score/<dir name>
#
# The heldout_anatomy, default and real_ct sets are built once into HELDOUT (default release_work/heldout/; reused
# when present; the two on real CTs in folders named with the simulator's lung-mask rule, e.g. real_ct_lungrule2). Per set and mode,
# metrics.csv/json land in OUT/<set>/<network|optimised>; OUT/summary.md is the table (mean TRE mm, lung Dice,
# % J<=0, SDlogJ). Settings: LAM (0.083), MU (0.03), THREADS (2), REAL_CT_DIR (as in train_release.sh), HELDOUT_CT,
# SETS (default "heldout_anatomy realistic default real_ct": the sets to score), MODES (default "network optimised";
# "identity" adds the instance optimisation from the identity, without the network: what the network's start saves).
# The full-grid set takes minutes per pair to build and to optimise on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL_DIR=${1:?usage: score_release.sh MODEL_DIR [OUT]}
MODEL_DIR=$(cd "$MODEL_DIR" && pwd)
OUT=${2:-release_work/score/$(basename "$MODEL_DIR")}
DATA=${DATA:-release_work/data}
HELDOUT=${HELDOUT:-release_work/heldout}
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
source scripts/real_ct_dir.sh  # REAL_CT_DIR: the nearest ancestor's shared/data/real_ct unless set, as train_release.sh
REAL_CT=$REAL_CT_DIR/chest_ct_cropped.nii.gz
HELDOUT_CT=${HELDOUT_CT:-$REAL_CT_DIR/nsclc_r01_001.nii.gz}
SETS=${SETS:-heldout_anatomy realistic default real_ct}
MODES=${MODES:-network optimised}
for mode in $MODES; do
    case $mode in network|optimised|identity) ;; *)
        echo "score_release.sh: MODES names $mode; valid: network optimised identity." >&2; exit 1;; esac
done

# the sets simulated on a real CT follow the simulator's lung mask (its breathing force, keypoints and masks), so
# their folders carry its rule: a set built before the rule changed is never reused (the benchmark's pair cache
# is keyed the same way)
RULE=
case " $SETS " in *" heldout_anatomy "*|*" real_ct "*)  # only the sets on real CTs need the rule (a Python start-up)
    RULE=_lungrule$(python -c "from elastic_hypermorph_bundle.simulation.real_ct import LUNG_MASK_RULE; print(LUNG_MASK_RULE)");;
esac
sets=()
for name in $SETS; do
    case $name in
    heldout_anatomy)
        if [ -z "$HELDOUT_CT" ] || [ ! -f "$HELDOUT_CT" ]; then
            echo "score_release.sh: no held-out chest CT (HELDOUT_CT=$HELDOUT_CT); the heldout_anatomy set is left out." >&2
            continue
        fi
        if [ ! -f "$HELDOUT/heldout_anatomy$RULE/LungCT_dataset.json" ]; then
            python scripts/make_synthetic.py --output_dir "$HELDOUT/heldout_anatomy$RULE" --num_pairs 4 --seed 999 \
                --spatial_size "[192,192,208]" --preset realistic --real_ct "$HELDOUT_CT" --real_ct_fraction 1.0
        fi
        sets+=("heldout_anatomy:$HELDOUT/heldout_anatomy$RULE:all");;
    realistic)
        if [ ! -f "$DATA/LungCT_dataset.json" ]; then
            echo "score_release.sh: no release dataset at $DATA; the realistic set is left out." >&2
            continue
        fi
        sets+=("realistic:$DATA:test");;
    default)
        if [ ! -f "$HELDOUT/default/LungCT_dataset.json" ]; then
            python scripts/make_synthetic.py --output_dir "$HELDOUT/default" --num_pairs 24 \
                --spatial_size "[48,48,52]" --seed 777
        fi
        sets+=("default:$HELDOUT/default:test");;
    real_ct)
        if [ -z "$REAL_CT" ] || [ ! -f "$REAL_CT" ]; then
            echo "score_release.sh: no real CT found; the real_ct set is left out." >&2
            continue
        fi
        if [ ! -f "$HELDOUT/real_ct$RULE/LungCT_dataset.json" ]; then
            python scripts/make_synthetic.py --output_dir "$HELDOUT/real_ct$RULE" --num_pairs 4 \
                --spatial_size "[48,48,52]" --seed 999 --preset realistic --real_ct "$REAL_CT" --real_ct_fraction 1.0
        fi
        sets+=("real_ct:$HELDOUT/real_ct$RULE:all");;
    *)
        echo "score_release.sh: SETS names $name; valid: heldout_anatomy realistic default real_ct." >&2
        exit 1;;
    esac
done

mkdir -p "$OUT"
for entry in "${sets[@]}"; do
    IFS=: read -r name dataset split <<< "$entry"
    for mode in $MODES; do
        extra=()
        if [ "$mode" = network ]; then extra=(--instance_steps 0); fi
        if [ "$mode" = identity ]; then extra=(--init identity); fi
        python -m monai.bundle run --config_file "['configs/inference.json','configs/evaluate.json']" \
            --dataset_dir "$dataset" --ckpt_dir "$MODEL_DIR" --split "$split" --output_dir "$OUT/$name/$mode" \
            --lam "$LAM" --mu "$MU" --num_workers 0 --device cpu "${extra[@]}"
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
