#!/usr/bin/env bash
# The release model in one command, on CPU: build the training set (realistic phantom pairs and pairs on four real
# chest CTs), fine-tune an earlier release's compact HyperUNet on the coarse grid, and score it on the held-out test pairs.
#
#   bash scripts/train_release.sh                      # defaults: release 0.5.2 (fine-tunes 0.5.0 for 24 epochs, see
#                                                      # INIT; 44 min on 2 CPU cores shared with other jobs, THREADS=1)
#   INIT=0.4.0 EPOCHS=6 bash scripts/train_release.sh  # release 0.5.0's recipe (its data simulated by this code)
#   PAIRS=40 EPOCHS=2 bash scripts/train_release.sh    # a short run
#   INSTALL=1 bash scripts/train_release.sh            # also copy model.pt / model.json into models/
#   INIT=none EPOCHS=40 bash scripts/train_release.sh  # from random initialisation (release 0.4.0's recipe, with
#                                                      # HYPER_SAMPLING=uniform REAL_CTS=chest_ct_cropped PAIRS=60 REAL_CT_FRACTION=0.25)
#   DATA=release_work/data ...                         # reuse a dataset written by an earlier run
#   AMORTISED_PAIRS=16 bash scripts/train_release.sh   # amortised optimisation: the optimisation's fields of 16
#                                                      # training pairs at 10 (lam, mu) as targets (off by default)
#
# Everything goes under $WORK (default release_work/, ignored by git; refused when it exists, unless OVERWRITE=1):
#   $WORK/data       the simulated Learn2Reg-layout dataset (make_synthetic.py --preset realistic)
#   $WORK/models     checkpoints, model.pt and its card model.json, split.json
#   $WORK/eval       training logs;  $WORK/test: per-pair metrics of the held-out test split (metrics.csv/json)
# models/ is only written with INSTALL=1 (the committed release is never replaced by accident); then update the
# sha256 in large_files.yml (the test tests/test_release_model.py checks it).
#
# Settings (environment variables):
#   PAIRS (80)  EPOCHS (6)  SEED (0)  LR (1e-3)  VAL_INTERVAL (2)  THREADS (2, torch/OpenMP threads)
#   HYPER_SAMPLING (log_uniform: (lam, mu) drawn uniformly in log space between 1e-4 and 1, which spends more samples
#     where the elastic parameters change the field most; uniform: release 0.4.0's)
#   REAL_CT_DIR (shared/data/real_ct in the nearest ancestor folder of the bundle root, i.e. ../shared in CI; the pairs
#     are all phantom-based when it is absent)  REAL_CTS (the CTs of REAL_CT_DIR used, without .nii.gz, taken in turn
#     by the real-CT pairs; default "lidc_idri_0001 lidc_idri_0002 fourdlung_113_phase40 chest_ct_cropped": the fifth,
#     nsclc_r01_001, is HELD OUT of training entirely, for score_release.sh)  REAL_CT_FRACTION (0.5)
#   INIT (0.5.0 or 0.4.0: that release's model.pt and model.json, read from this repository's history (commits
#     4c1ec02, f7cc9a0);
#     none: random initialisation; else a model.pt with its model.json, whose network must be the config's)
#   DATA (none: build the dataset into $WORK/data; else train on this existing dataset)
#   SPLIT_FILE (none: the seeded split; else a split.json to train, validate and test on, e.g. a smaller train split)
#   AMORTISED_PAIRS (0: off; N: build the amortised optimisation's targets of the first N training pairs into
#     $WORK/targets.npz, scripts/amortised_targets.py at its default 10 (lam, mu), about 3 s per pair and point)
#     AMORTISED_TARGETS (a cache built before, instead)  AMORTISED_WEIGHT (1)  AMORTISED_FRACTION (0.5)
#     AMORTISED_MASK (false; true: the error over the fixed lung mask): the --amortised_* ids of configs/train.json
# The grid: images of 48 x 48 x 52 voxels of 7 x 5 x 7 mm (the Learn2Reg lung field of view), padded to 48 x 48 x 64
# for the network (multiples of 16); inference resamples any input to that grid (the card's pixdim).
set -euo pipefail
cd "$(dirname "$0")/.."

WORK=${WORK:-release_work}
PAIRS=${PAIRS:-80}
EPOCHS=${EPOCHS:-24}
SEED=${SEED:-0}
source scripts/real_ct_dir.sh  # REAL_CT_DIR: the nearest ancestor's shared/data/real_ct unless set
REAL_CTS=${REAL_CTS:-lidc_idri_0001 lidc_idri_0002 fourdlung_113_phase40 chest_ct_cropped}
REAL_CT_FRACTION=${REAL_CT_FRACTION:-0.5}
HYPER_SAMPLING=${HYPER_SAMPLING:-log_uniform}
LR=${LR:-1e-3}
VAL_INTERVAL=${VAL_INTERVAL:-2}
THREADS=${THREADS:-2}
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

DATA=${DATA:-}
SPLIT_FILE=${SPLIT_FILE:-}
AMORTISED_PAIRS=${AMORTISED_PAIRS:-0}
AMORTISED_TARGETS=${AMORTISED_TARGETS:-}
AMORTISED_WEIGHT=${AMORTISED_WEIGHT:-1.0}
AMORTISED_FRACTION=${AMORTISED_FRACTION:-0.5}
AMORTISED_MASK=${AMORTISED_MASK:-false}
INIT=${INIT:-0.5.0}
if [ "$INIT" = none ]; then INIT=""; fi
case $INIT in  # a release by its version: the commit that holds its weights
    0.5.0) INIT_COMMIT=4c1ec02;;
    0.4.0) INIT_COMMIT=f7cc9a0;;
    *) INIT_COMMIT="";;
esac
if [ -e "$WORK" ] && [ "${OVERWRITE:-0}" != 1 ]; then
    echo "train_release.sh: $WORK exists; remove it or set OVERWRITE=1 to replace it." >&2
    exit 1
fi
if [ -n "$DATA" ] && [ ! -f "$DATA/LungCT_dataset.json" ]; then
    echo "train_release.sh: DATA=$DATA holds no LungCT_dataset.json." >&2
    exit 1
fi
for name in SPLIT_FILE AMORTISED_TARGETS; do
    if [ -n "${!name}" ] && [ ! -f "${!name}" ]; then
        echo "train_release.sh: $name=${!name} is not a file." >&2
        exit 1
    fi
done
if [ -n "$INIT_COMMIT" ] && ! git cat-file -e "$INIT_COMMIT:models/model.pt" 2>/dev/null; then
    echo "train_release.sh: INIT=$INIT needs this repository's git history (commit $INIT_COMMIT); pass INIT=PATH/model.pt or INIT=none." >&2
    exit 1
fi
if [ -n "$INIT" ] && [ -z "$INIT_COMMIT" ] && [ ! -f "$INIT" ]; then
    echo "train_release.sh: INIT=$INIT is not a file." >&2
    exit 1
fi
real_ct=()
if [ -d "$REAL_CT_DIR" ]; then
    names=()
    for name in $REAL_CTS; do
        if [ ! -f "$REAL_CT_DIR/$name.nii.gz" ]; then
            echo "train_release.sh: REAL_CTS names $name, but $REAL_CT_DIR/$name.nii.gz is not a file." >&2
            exit 1
        fi
        names+=("\"$(cd "$REAL_CT_DIR" && pwd)/$name.nii.gz\"")
    done
    real_ct=(--real_ct "[$(IFS=,; echo "${names[*]}")]" --real_ct_fraction "$REAL_CT_FRACTION")
else
    echo "train_release.sh: no real CT folder at $REAL_CT_DIR; all pairs use the phantom." >&2
fi
if [ -n "$DATA" ]; then DATA=$(cd "$DATA" && pwd); fi
for name in SPLIT_FILE AMORTISED_TARGETS; do
    if [ -n "${!name}" ]; then printf -v "$name" '%s' "$(cd "$(dirname "${!name}")" && pwd)/$(basename "${!name}")"; fi
done
if [ -n "$INIT" ] && [ -z "$INIT_COMMIT" ]; then INIT=$(cd "$(dirname "$INIT")" && pwd)/$(basename "$INIT"); fi
rm -rf "$WORK"
mkdir -p "$WORK"
if [ -n "$INIT_COMMIT" ]; then  # the weights and card of that release, as committed
    mkdir -p "$WORK/init"
    git show "$INIT_COMMIT:models/model.pt" > "$WORK/init/model.pt"
    git show "$INIT_COMMIT:models/model.json" > "$WORK/init/model.json"
    INIT=$(cd "$WORK/init" && pwd)/model.pt
fi

start=$(date +%s)
if [ -z "$DATA" ]; then
    DATA=$WORK/data
    python scripts/make_synthetic.py --output_dir "$DATA" --num_pairs "$PAIRS" --spatial_size "[48,48,52]" \
        --seed "$SEED" --preset realistic "${real_ct[@]}"
    echo "train_release.sh: dataset written in $(( $(date +%s) - start )) s"
fi
split=()
if [ -n "$SPLIT_FILE" ]; then split=(--split_file "$SPLIT_FILE"); fi
if [ "$AMORTISED_PAIRS" != 0 ] && [ -z "$AMORTISED_TARGETS" ]; then
    AMORTISED_TARGETS=$WORK/targets.npz
    python scripts/amortised_targets.py --dataset_dir "$DATA" --output "$AMORTISED_TARGETS" --spatial_size "[48,48,64]" \
        --pixdim "[7.0,5.0,7.0]" --max_pairs "$AMORTISED_PAIRS" --seed "$SEED" ${SPLIT_FILE:+--split_file "$SPLIT_FILE"}
    echo "train_release.sh: amortised targets written in $(( $(date +%s) - start )) s (data included)"
fi
amortised=()
if [ -n "$AMORTISED_TARGETS" ]; then
    amortised=(--amortised_targets "$AMORTISED_TARGETS" --amortised_weight "$AMORTISED_WEIGHT"
               --amortised_fraction "$AMORTISED_FRACTION" --amortised_mask "$AMORTISED_MASK")
fi
init=()
if [ -n "$INIT" ]; then  # the network of INIT's card with its weights, in training mode
    init=(--network "\$__import__('elastic_hypermorph_bundle.model_card').model_card.load_trained_network('$INIT', device='cpu').train()")
fi

python -m monai.bundle run training --meta_file configs/metadata.json --config_file configs/train.json \
    --dataset_dir "$DATA" --ckpt_dir "$WORK/models" --output_dir "$WORK/eval" \
    --spatial_size "[48,48,64]" --pixdim "[7.0,5.0,7.0]" --learning_rate "$LR" --epochs "$EPOCHS" \
    --val_interval "$VAL_INTERVAL" --hyper_sampling "$HYPER_SAMPLING" --num_workers 0 --seed "$SEED" --device cpu \
    "${split[@]}" "${amortised[@]}" "${init[@]}"
echo "train_release.sh: trained in $(( $(date +%s) - start )) s (data included)"

# held-out accuracy: the test split (never trained on, not used for model selection), at the validation (lam, mu),
# the network alone (+ instance optimisation, and the held-out anatomy: scripts/score_release.sh)
python -m monai.bundle run --config_file "['configs/inference.json','configs/evaluate.json']" \
    --dataset_dir "$DATA" --ckpt_dir "$WORK/models" --split test --output_dir "$WORK/test" "${split[@]}" \
    --lam 0.083 --mu 0.03 --instance_steps 0 --num_workers 0 --device cpu
echo "train_release.sh: done in $(( $(date +%s) - start )) s; metrics in $WORK/test"

if [ "${INSTALL:-0}" = 1 ]; then
    cp "$WORK/models/model.pt" "$WORK/models/model.json" models/
    echo "train_release.sh: installed into models/; update the sha256 values in large_files.yml:"
    sha256sum models/model.pt models/model.json
fi
