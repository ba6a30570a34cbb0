#!/usr/bin/env bash
# The release model in one command, on CPU: build the training set (realistic phantom pairs and pairs on a real
# chest CT), train the compact HyperUNet on the coarse grid, and score it on the held-out test pairs.
#
#   bash scripts/train_release.sh                      # defaults: release 0.4.0, 79 min on 2 shared CPU cores
#   PAIRS=40 EPOCHS=6 bash scripts/train_release.sh    # a short run
#   INSTALL=1 bash scripts/train_release.sh            # also copy model.pt / model.json into models/
#   INIT=models/model.pt EPOCHS=3 bash scripts/train_release.sh   # fine-tune a trained model instead of from scratch
#   DATA=release_work/data ...                         # reuse a dataset written by an earlier run
#
# Everything goes under $WORK (default release_work/, ignored by git; refused when it exists, unless OVERWRITE=1):
#   $WORK/data       the simulated Learn2Reg-layout dataset (make_synthetic.py --preset realistic)
#   $WORK/models     checkpoints, model.pt and its card model.json, split.json
#   $WORK/eval       training logs;  $WORK/test: per-pair metrics of the held-out test split (metrics.csv/json)
# models/ is only written with INSTALL=1 (the committed release is never replaced by accident); then update the
# sha256 in large_files.yml (the test tests/test_release_model.py checks it).
#
# Settings (environment variables):
#   PAIRS (60)  EPOCHS (40)  SEED (0)  REAL_CT (shared/data/real_ct/chest_ct_cropped.nii.gz in the nearest
#   ancestor folder of the bundle root, i.e. ../shared in CI; the pairs are all phantom-based when it is absent)  REAL_CT_FRACTION (0.25)  LR (1e-3)  VAL_INTERVAL (2)  THREADS (2, torch/OpenMP threads)
#   INIT (none: random initialisation; else a model.pt with its model.json, whose network must be the config's)
#   DATA (none: build the dataset into $WORK/data; else train on this existing dataset)
# The grid: images of 48 x 48 x 52 voxels of 7 x 5 x 7 mm (the Learn2Reg lung field of view), padded to 48 x 48 x 64
# for the network (multiples of 16); inference resamples any input to that grid (the card's pixdim).
set -euo pipefail
cd "$(dirname "$0")/.."

WORK=${WORK:-release_work}
PAIRS=${PAIRS:-60}
EPOCHS=${EPOCHS:-40}
SEED=${SEED:-0}
if [ -z "${REAL_CT:-}" ]; then  # ../shared next to the bundle root; a git worktree may sit deeper: nearest ancestor
    REAL_CT=../shared/data/real_ct/chest_ct_cropped.nii.gz
    dir=$PWD
    while [ "$dir" != / ]; do
        dir=$(dirname "$dir")
        if [ -f "$dir/shared/data/real_ct/chest_ct_cropped.nii.gz" ]; then
            REAL_CT=$dir/shared/data/real_ct/chest_ct_cropped.nii.gz
            break
        fi
    done
fi
REAL_CT_FRACTION=${REAL_CT_FRACTION:-0.25}
LR=${LR:-1e-3}
VAL_INTERVAL=${VAL_INTERVAL:-2}
THREADS=${THREADS:-2}
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

DATA=${DATA:-}
INIT=${INIT:-}
if [ -e "$WORK" ] && [ "${OVERWRITE:-0}" != 1 ]; then
    echo "train_release.sh: $WORK exists; remove it or set OVERWRITE=1 to replace it." >&2
    exit 1
fi
if [ -n "$DATA" ] && [ ! -f "$DATA/LungCT_dataset.json" ]; then
    echo "train_release.sh: DATA=$DATA holds no LungCT_dataset.json." >&2
    exit 1
fi
if [ -n "$INIT" ] && [ ! -f "$INIT" ]; then
    echo "train_release.sh: INIT=$INIT is not a file." >&2
    exit 1
fi
if [ -n "$DATA" ]; then DATA=$(cd "$DATA" && pwd); fi
if [ -n "$INIT" ]; then INIT=$(cd "$(dirname "$INIT")" && pwd)/$(basename "$INIT"); fi
rm -rf "$WORK"
mkdir -p "$WORK"

real_ct=()
if [ -f "$REAL_CT" ]; then
    real_ct=(--real_ct "$REAL_CT" --real_ct_fraction "$REAL_CT_FRACTION")
else
    echo "train_release.sh: no real CT at $REAL_CT; all pairs use the phantom." >&2
fi

start=$(date +%s)
if [ -z "$DATA" ]; then
    DATA=$WORK/data
    python scripts/make_synthetic.py --output_dir "$DATA" --num_pairs "$PAIRS" --spatial_size "[48,48,52]" \
        --seed "$SEED" --preset realistic "${real_ct[@]}"
    echo "train_release.sh: dataset written in $(( $(date +%s) - start )) s"
fi
init=()
if [ -n "$INIT" ]; then  # the network of INIT's card with its weights, in training mode
    init=(--network "\$elastic_hypermorph_bundle.model_card.load_trained_network('$INIT', device=@device).train()")
fi

python -m monai.bundle run training --meta_file configs/metadata.json --config_file configs/train.json \
    --dataset_dir "$DATA" --ckpt_dir "$WORK/models" --output_dir "$WORK/eval" \
    --spatial_size "[48,48,64]" --pixdim "[7.0,5.0,7.0]" --learning_rate "$LR" --epochs "$EPOCHS" \
    --val_interval "$VAL_INTERVAL" --num_workers 0 --seed "$SEED" --device cpu "${init[@]}"
echo "train_release.sh: trained in $(( $(date +%s) - start )) s (data included)"

# held-out accuracy: the test split (never trained on, not used for model selection), at the validation (lam, mu)
python -m monai.bundle run --config_file "['configs/inference.json','configs/evaluate.json']" \
    --dataset_dir "$DATA" --ckpt_dir "$WORK/models" --split test --output_dir "$WORK/test" \
    --lam 0.083 --mu 0.03 --num_workers 0 --device cpu
echo "train_release.sh: done in $(( $(date +%s) - start )) s; metrics in $WORK/test"

if [ "${INSTALL:-0}" = 1 ]; then
    cp "$WORK/models/model.pt" "$WORK/models/model.json" models/
    echo "train_release.sh: installed into models/; update the sha256 values in large_files.yml:"
    sha256sum models/model.pt models/model.json
fi
