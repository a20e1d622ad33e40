# Shared by the protocol scripts in scripts/rada/ (sourced, not run): environment defaults, the
# per-trainer default configs, argument checks and the command runner.
# DATA and OUTPUT, when relative, are relative to the directory the script is run from.

RADA_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# The scripts run train.py, which needs Dassl: install it into the chosen environment if it lacks it.
RADA_WITH_DASSL="${RADA_WITH_DASSL:-1}" source "$RADA_REPO/scripts/setup_env.sh"

DATA="${DATA:-./data}"
OUTPUT="${OUTPUT:-./output}"
TRAINER="${TRAINER:-RAdaCoOp}"
SHOTS="${SHOTS:-16}"
CFG="${CFG:-}"
# GPUS=N > 1 runs train.py in N processes through torchrun (one per GPU, or gloo on the CPU);
# TORCHRUN_ARGS replaces torchrun's default options (--standalone: one node, a free port), e.g.
# "--nnodes 2 --rdzv-backend c10d --rdzv-endpoint HOST:29500 --rdzv-id JOB" on each of two nodes.
GPUS="${GPUS:-1}"
TORCHRUN_ARGS="${TORCHRUN_ARGS:---standalone}"

# From the repo root the echoed commands read like CoOp's (train.py, configs/...); elsewhere they
# use absolute paths so that they still work when copied.
if [ "$PWD" -ef "$RADA_REPO" ]; then REPO_PREFIX=""; else REPO_PREFIX="$RADA_REPO/"; fi

# The one table of default configs: configs/trainers/<trainer>/<config>.yaml. CFG overrides it.
# Columns: trainer, config for base-to-new and few-shot, config for cross-dataset, config for the
# full fine-tuning protocol on ImageNet (dg_*.sh); - = the config of the second column.
TRAINER_CONFIGS="
ZeroshotCLIP  vit_b16                     -                                          -
CoOp          vit_b16_ep50_ctxv1          -                                          -
RAdaCoOp      vit_b16_ep50_ctxv1          -                                          -
RAda          vit_b16_ep5                 -                                          -
MaPLe         vit_b16_c2_ep5_batch4_2ctx  vit_b16_c2_ep5_batch4_2ctx_cross_datasets  -
RAdaMaPLe     vit_b16_c2_ep5_batch4_2ctx  vit_b16_c2_ep5_batch4_2ctx_cross_datasets  -
IVLP          vit_b16_c2_ep5_batch4_2ctx  -                                          -
RAdaIVLP      vit_b16_c2_ep5_batch4_2ctx  -                                          -
VPT           vit_b16_c2_ep5_batch4_4     -                                          -
PromptSRC     vit_b16_c2_ep20_batch4_4ctx  vit_b16_c2_ep20_batch4_4ctx_cross_datasets  -
RAdaPromptSRC vit_b16_c2_ep20_batch4_4ctx  vit_b16_c2_ep20_batch4_4ctx_cross_datasets  -
CoCoOp        vit_b16_c4_ep10_batch1_ctxv1  -                                        -
RAdaCoCoOp    vit_b16_c4_ep10_batch1_ctxv1  -                                        -
KgCoOp        vit_b16_ep100_ctxv1         -                                          -
RAdaKgCoOp    vit_b16_ep100_ctxv1         -                                          -
ProGrad       vit_b16_ep100               -                                          -
RAdaProGrad   vit_b16_ep100               -                                          -
CLIPAdapter   vit_b16_ep5                 -                                          -
RAdaAdapter   vit_b16_ep5                 -                                          -
CLIPLoRA      vit_b16_iters500_batch32    -                                          -
RAdaLoRA      vit_b16_iters500_batch32    -                                          -
FT            vit_b16_ep10                -                                          vit_b16_ep10_batch512
FLYP          vit_b16_ep10                -                                          vit_b16_ep10_batch512
RAdaFT        vit_b16_ep10                -                                          vit_b16_ep10_batch512
"
# Trainers with nothing to learn: every step of a protocol is an evaluation (--eval-only, no model dir).
TRAINING_FREE_TRAINERS="ZeroshotCLIP"

die() {
    echo "error: $*" >&2
    exit 1
}

# The calling script's header comment is its usage text.
print_usage() {
    awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"
}

# check_usage "DATASET SEED" "$@": handles -h/--help and too few arguments.
check_usage() {
    local names="$1"
    shift
    if [ "${1:-}" = -h ] || [ "${1:-}" = --help ]; then
        print_usage
        exit 0
    fi
    local wanted
    wanted=$(wc -w <<<"$names")
    if [ $# -lt "$wanted" ]; then
        print_usage >&2
        die "missing arguments: expected $names, got $# argument(s)"
    fi
}

yaml_stems() {
    local file stems=()
    for file in "$1"/*.yaml; do
        [ -e "$file" ] && stems+=("$(basename "$file" .yaml)")
    done
    if [ ${#stems[@]} -eq 0 ]; then echo "(none)"; else echo "${stems[*]}"; fi
}

known_trainers() {
    awk 'NF {printf "%s%s", sep, $1; sep = " "}' <<<"$TRAINER_CONFIGS"
}

check_dataset() {
    [ -f "$RADA_REPO/configs/datasets/$1.yaml" ] ||
        die "unknown dataset '$1': there is no configs/datasets/$1.yaml. Available datasets: $(yaml_stems "$RADA_REPO/configs/datasets")"
}

check_positive_integer() { # name value [why]
    [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer, got '$2'${3:+ ($3)}"
}

# DATASET.NUM_SHOTS for SHOTS: all means every training image (-1).
num_shots() {
    if [ "$SHOTS" = all ]; then echo -1; else echo "$SHOTS"; fi
}

# Checks shared by every script: seed, shots, LOADEP, data root and the trailing yacs options.
check_common() { # seed yacs-options...
    check_positive_integer SEED "$1" "Dassl's train.py ignores --seed 0; the papers use seeds 1 2 3"
    shift
    [ "$SHOTS" = all ] || check_positive_integer SHOTS "$SHOTS" "or all for every training image"
    check_positive_integer GPUS "$GPUS" "the number of processes (one per GPU) on this node"
    [ -z "${LOADEP:-}" ] || check_positive_integer LOADEP "$LOADEP" "the epoch of the checkpoint to load"
    [ -d "$DATA" ] || die "dataset root '$DATA' does not exist: set DATA to the folder that holds the datasets"
    if [ $(($# % 2)) -ne 0 ]; then
        die "arguments after the required ones are yacs options and come in KEY VALUE pairs; got $# word(s): $*"
    fi
}

# parse_args "DATASET SEED" "$@" (or "SEED" for the scripts that train on ImageNet): checks the
# arguments and sets DATASET, SEED and OPTS, the trailing yacs KEY VALUE pairs.
parse_args() {
    local names="$1"
    shift
    check_usage "$names" "$@"
    if [ "$names" = SEED ]; then
        DATASET=imagenet
    else
        DATASET="$1"
        shift
    fi
    SEED="$1"
    shift
    OPTS=("$@")
    check_dataset "$DATASET"
    check_common "$SEED" "$@"
}

# resolve_cfg PROTOCOL (base2new|fewshot|xd|dg): sets CFG from the table unless given, checks its YAML.
resolve_cfg() {
    if [ -z "$CFG" ]; then
        local row xd_cfg dg_cfg
        row="$(awk -v trainer="$TRAINER" '$1 == trainer' <<<"$TRAINER_CONFIGS")"
        [ -n "$row" ] ||
            die "unknown trainer '$TRAINER' and no CFG given. Known trainers: $(known_trainers). For another trainer set CFG to a config name in configs/trainers/$TRAINER/"
        read -r _ CFG xd_cfg dg_cfg <<<"$row"
        if [ "$1" = xd ] && [ "$xd_cfg" != - ]; then CFG="$xd_cfg"; fi
        if [ "$1" = dg ] && [ "$dg_cfg" != - ]; then CFG="$dg_cfg"; fi
    fi
    local config_dir="$RADA_REPO/configs/trainers/$TRAINER"
    if [ ! -d "$config_dir" ]; then
        die "no folder configs/trainers/$TRAINER/ for TRAINER=$TRAINER. Known trainers: $(known_trainers)"
    fi
    [ -f "$config_dir/$CFG.yaml" ] ||
        die "no trainer config configs/trainers/$TRAINER/$CFG.yaml. Available for $TRAINER: $(yaml_stems "$config_dir")"
}

is_training_free() {
    [[ " $TRAINING_FREE_TRAINERS " == *" $TRAINER "* ]]
}

# The results contract (is a run finished, how far it got, the re-run hint) is defined once, in
# trainers/runs/results.py; these functions ask it.
results_cli() {
    PYTHONPATH="$RADA_REPO${PYTHONPATH:+:$PYTHONPATH}" python -m trainers.runs.results "$@"
}

# Exit status 0 when DIR holds a finished run (read from all its logs).
run_finished() {
    results_cli finished "$1"
}

# How far an unfinished run got, for messages.
run_progress() {
    results_cli progress "$1"
}

# Decides, from DIR and the train.py arguments in TRAIN_ARGV, whether to run: exits 0 when DIR already
# holds the finished run, stops when DIR holds a run made with other settings, and with FORCE=1
# deletes DIR first.
check_run_dir() { # dir
    if [ "${FORCE:-0}" = 1 ] && [ -e "$1" ]; then
        echo "FORCE=1: deleting $1 to run it again."
        rm -rf -- "$1"
        return
    fi
    local status=0
    results_cli check "$1" "${TRAIN_ARGV[@]}" || status=$?
    case "$status" in
        0) exit 0 ;;
        1) ;;
        3) exit 1 ;;
        *) die "could not read the state of $1" ;;
    esac
}

# The command that (re)creates a missing run: the environment that selects the same folders and
# launcher, and this script's trailing yacs options, which the user gives every step alike.
rerun_hint() { # script args...
    local env=("GPUS=$GPUS")
    if [ "$TORCHRUN_ARGS" != --standalone ]; then env+=("TORCHRUN_ARGS=$TORCHRUN_ARGS"); fi
    env+=("DATA=$DATA" "OUTPUT=$OUTPUT" "TRAINER=$TRAINER" "CFG=$CFG" "SHOTS=$SHOTS")
    results_cli rerun "$@" "${OPTS[@]}" --prefix "$REPO_PREFIX" --env "${env[@]}"
}

# Evaluation scripts need the trained model first.
require_trained() { # train_dir script args...
    local train_dir="$1"
    shift
    [ -d "$train_dir" ] ||
        die "no trained model: $train_dir does not exist. Train it first with: $(rerun_hint "$@")"
    if [ -f "$train_dir/log.txt" ] && ! run_finished "$train_dir"; then
        die "the training run in $train_dir is unfinished (log reached: $(run_progress "$train_dir")). Finish it first with: $(rerun_hint "$@")"
    fi
}

# The program that runs train.py: python, or torchrun (as `python -m torch.distributed.run`, the
# environment's own) with GPUS processes when GPUS > 1 or TORCHRUN_ARGS is set.
launcher() {
    if [ "$GPUS" -gt 1 ] || [ "$TORCHRUN_ARGS" != --standalone ]; then
        local extra
        read -r -a extra <<<"$TORCHRUN_ARGS"
        LAUNCHER=(python -m torch.distributed.run --nproc_per_node "$GPUS" "${extra[@]}")
    else
        LAUNCHER=(python)
    fi
}

# Starts TRAIN_ARGV, the arguments of train.py (what it records with its run, and what check_run_dir
# compares), for DATASET and OUTPUT_DIR; scripts append to it. run_command puts the launcher before it.
start_command() { # dataset output_dir
    TRAIN_ARGV=(--root "$DATA"
        --seed "$SEED"
        --trainer "$TRAINER"
        --dataset-config-file "${REPO_PREFIX}configs/datasets/$1.yaml"
        --config-file "${REPO_PREFIX}configs/trainers/$TRAINER/$CFG.yaml"
        --output-dir "$2")
}

# Appends the flags that load the model trained in DIR (none for training-free trainers or an empty DIR).
add_eval_flags() { # model_dir
    TRAIN_ARGV+=(--eval-only)
    if ! is_training_free && [ -n "$1" ]; then
        TRAIN_ARGV+=(--model-dir "$1")
        if [ -n "${LOADEP:-}" ]; then TRAIN_ARGV+=(--load-epoch "$LOADEP"); fi
    fi
}

run_command() {
    launcher
    local words=("${LAUNCHER[@]}" "${REPO_PREFIX}train.py" "${TRAIN_ARGV[@]}") line
    printf -v line '%q ' "${words[@]}"
    echo "+ ${line% }"
    "${words[@]}"
}

# Trains (or, for training-free trainers, evaluates) into OUTPUT_DIR unless it holds a finished run.
run_training() { # output_dir yacs-options...
    local dir="$1"
    shift
    start_command "$DATASET" "$dir"
    if is_training_free; then TRAIN_ARGV+=(--eval-only); fi
    TRAIN_ARGV+=("$@")
    check_run_dir "$dir"
    run_command
}

# Evaluates the model of MODEL_DIR into OUTPUT_DIR unless it holds a finished run.
run_evaluation() { # model_dir output_dir yacs-options...
    local model_dir="$1" dir="$2"
    shift 2
    start_command "$DATASET" "$dir"
    add_eval_flags "$model_dir"
    TRAIN_ARGV+=("$@")
    check_run_dir "$dir"
    run_command
}
