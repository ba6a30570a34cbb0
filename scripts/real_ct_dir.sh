# Sourced by train_release.sh and score_release.sh (from the bundle root): REAL_CT_DIR, when not set, is
# shared/data/real_ct in the nearest ancestor folder of the bundle root (../shared in CI; a git worktree may sit
# deeper), else ../shared/data/real_ct, which the scripts then report absent.
if [ -z "${REAL_CT_DIR:-}" ]; then
    REAL_CT_DIR=../shared/data/real_ct
    dir=$PWD
    while [ "$dir" != / ]; do
        dir=$(dirname "$dir")
        if [ -d "$dir/shared/data/real_ct" ]; then
            REAL_CT_DIR=$dir/shared/data/real_ct
            break
        fi
    done
fi
