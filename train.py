"""Train or evaluate a trainer of this project with Dassl; the command line is CoOp's.

    python train.py --root DATA --seed 1 --trainer RAdaCoOp \
        --dataset-config-file configs/datasets/caltech101.yaml \
        --config-file configs/trainers/RAdaCoOp/vit_b16_ep50_ctxv1.yaml \
        --output-dir output/caltech101/RAdaCoOp/seed1 \
        DATASET.NUM_SHOTS 16 DATASET.SUBSAMPLE_CLASSES base

Trailing KEY VALUE pairs override the config (yacs). With --eval-only, --model-dir names a
training output folder; without --load-epoch its latest checkpoint is used.
"""

import argparse
import difflib
import logging
import os
import re
import sys

DASSL_INSTALL = (
    "Dassl is not installed. Install it from its repository:\n"
    "  git clone https://github.com/KaiyangZhou/Dassl.pytorch\n"
    f"  {sys.executable} -m pip install --no-deps --no-build-isolation -e Dassl.pytorch\n"
    "(see README.md, 'Installing Dassl')."
)

# yacs's message when a value's type is not its default's.
YACS_TYPE_MISMATCH = re.compile(
    r"Type mismatch \(<class '(\w+)'> vs\. <class '(\w+)'>\) with values \((.*) vs\. (.*)\) for config key: (\S+)$"
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=str, default="", help="path to the dataset root")
    parser.add_argument("--output-dir", type=str, default="", help="output directory")
    parser.add_argument("--resume", type=str, default="", help="checkpoint directory to resume from")
    parser.add_argument("--seed", type=int, default=-1, help="random seed (0 is a valid seed)")
    parser.add_argument("--source-domains", type=str, nargs="+", help="source domains (DA/DG)")
    parser.add_argument("--target-domains", type=str, nargs="+", help="target domains (DA/DG)")
    parser.add_argument("--transforms", type=str, nargs="+", help="data augmentation methods")
    parser.add_argument("--config-file", type=str, default="", help="trainer config file")
    parser.add_argument("--dataset-config-file", type=str, default="", help="dataset config file")
    parser.add_argument("--trainer", type=str, default="", help="name of the trainer")
    parser.add_argument("--backbone", type=str, default="", help="CLIP model name or weights file")
    parser.add_argument("--head", type=str, default="", help="name of the head")
    parser.add_argument("--eval-only", action="store_true", help="evaluation only")
    parser.add_argument("--model-dir", type=str, default="", help="load the model from this training output")
    parser.add_argument("--load-epoch", type=int, help="load the checkpoint of this epoch (default: latest)")
    parser.add_argument("--no-train", action="store_true", help="build the trainer but do not train")
    parser.add_argument("opts", default=None, nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return parser.parse_args(argv)


def setup_cfg(args):
    from dassl.config import get_cfg_default

    from trainers.config import extend_cfg, rule_of, widen_whole_numbers
    from trainers.errors import UserFacingError

    cfg = get_cfg_default()
    extend_cfg(cfg)
    for path in (args.dataset_config_file, args.config_file):
        if path and not os.path.isfile(path):
            raise UserFacingError(f"Config file {path} does not exist (run from the repository root).")
    try:
        if args.dataset_config_file:
            cfg.merge_from_file(args.dataset_config_file)
        if args.config_file:
            cfg.merge_from_file(args.config_file)
        overrides = {
            "DATASET.ROOT": os.path.expanduser(args.root) if args.root else None,
            "OUTPUT_DIR": args.output_dir or None,
            "RESUME": args.resume or None,
            "SEED": args.seed if args.seed >= 0 else None,
            "DATASET.SOURCE_DOMAINS": args.source_domains,
            "DATASET.TARGET_DOMAINS": args.target_domains,
            "INPUT.TRANSFORMS": args.transforms,
            "TRAINER.NAME": args.trainer or None,
            "MODEL.BACKBONE.NAME": args.backbone or None,
            "MODEL.HEAD.NAME": args.head or None,
        }
        for key, value in overrides.items():
            if value is not None:
                node, _, leaf = key.rpartition(".")
                (cfg if not node else _node(cfg, node))[leaf] = value
        cfg.merge_from_list(widen_whole_numbers(cfg, args.opts or []))
    except (KeyError, ValueError, AssertionError) as error:
        message = str(error.args[0] if error.args else error)
        if isinstance(error, KeyError) or "Non-existent" in message:
            raise UserFacingError(
                f"Unknown config key ({message}). Keys are declared in Dassl's defaults and trainers/config.py; "
                "check the spelling."
            ) from None
        mismatch = YACS_TYPE_MISMATCH.match(message)
        if mismatch:
            default_type, given_type, default, given, key = mismatch.groups()
            rule = rule_of(key)
            raise UserFacingError(
                f"{key} is {given} (a {given_type}); it must be {rule if rule else 'a ' + default_type}, "
                f"like its default {default}."
            ) from None
        raise UserFacingError(f"Bad config override: {message}. Overrides are KEY VALUE pairs.") from None
    cfg.freeze()
    return cfg


def _node(cfg, dotted):
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


def register_all(cfg):
    """Register this project's datasets and trainers in Dassl, then check cfg against them (check_names_and_values)."""
    from dassl.data.datasets import DATASET_REGISTRY
    from dassl.engine import TRAINER_REGISTRY

    import datasets.dassl_glue  # noqa: F401  (registers the datasets)
    import trainers.register  # noqa: F401  (registers the trainers)

    check_names_and_values(cfg, TRAINER_REGISTRY, DATASET_REGISTRY)


def check_names_and_values(cfg, trainer_registry, dataset_registry):
    """What must hold before the trainer is built: a known trainer and dataset, and every value in its range
    (trainers/config.py VALUE_RULES, and the PREC key the trainer reads)."""
    from trainers.config import check_values
    from trainers.errors import UserFacingError

    trainers = sorted(trainer_registry.registered_names())
    if not cfg.TRAINER.NAME:
        raise UserFacingError(f"--trainer is missing: name one of {', '.join(trainers)}.")
    if cfg.TRAINER.NAME not in trainers:
        raise UserFacingError(f"Unknown trainer {cfg.TRAINER.NAME!r}{_close_matches(cfg.TRAINER.NAME, trainers)}. "
                              f"Known trainers: {', '.join(trainers)}.")
    datasets = sorted(dataset_registry.registered_names())
    if cfg.DATASET.NAME not in datasets:
        raise UserFacingError(
            f"DATASET.NAME {cfg.DATASET.NAME!r} is not a registered dataset"
            f"{_close_matches(cfg.DATASET.NAME, datasets)}. "
            f"Registered: {', '.join(datasets)} (pass --dataset-config-file configs/datasets/<name>.yaml)."
        )
    check_values(cfg, prec_node=getattr(trainer_registry.get(cfg.TRAINER.NAME), "PREC_NODE", None))


def _close_matches(name, choices):
    by_lower = {choice.lower(): choice for choice in choices}
    close = [by_lower[m] for m in difflib.get_close_matches(name.lower(), list(by_lower), n=3, cutoff=0.6)]
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def make_output_dir(cfg):
    from trainers.errors import UserFacingError

    try:
        os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    except OSError as error:
        raise UserFacingError(
            f"OUTPUT_DIR (--output-dir) {cfg.OUTPUT_DIR} cannot be created ({error.strerror or error}): "
            "choose a folder you can write to."
        ) from None


def check_run_record(cfg, resolved=False):
    """A folder that already holds a run made with other settings is not silently reused. The run
    record holds the config a run used, its INPUT preprocessing resolved: before the trainer is
    built, `cfg` (the parsed config) is compared without the INPUT keys the backbone will set
    (backbone_input_keys); then the trainer's config (`resolved`) is compared in full."""
    from trainers.errors import UserFacingError
    from trainers.model.backbones import PREPROCESS_KEYS, backbone_input_keys
    from trainers.runs.results import config_differences, flatten_config, other_settings_message, read_run_record

    stored = read_run_record(cfg.OUTPUT_DIR).get("config")
    if not stored:
        return
    unknown = set() if resolved else set(backbone_input_keys(cfg))
    if "INPUT.PREPROCESS" not in stored:
        # Recorded before INPUT.PREPROCESS existed, as parsed: the backbone may have replaced these
        # values in that run, so they cannot be compared with the ones a run uses now.
        unknown.update(PREPROCESS_KEYS)
        if stored.get("INPUT.RESIZE_MODE") == "auto":
            unknown.add("RESIZE_MODE")
    ignored = {f"INPUT.{key}" for key in unknown}
    stored, current = ({key: value for key, value in config.items() if key not in ignored}
                       for config in (stored, flatten_config(cfg)))
    changed = config_differences(stored, current)
    if changed:
        raise UserFacingError(other_settings_message(cfg.OUTPUT_DIR, changed))


def _flush_log_per_line():
    """Dassl's logger tees stdout into log.txt through a buffered file: make it write every line
    at once, so that after a kill the log shows every epoch that finished."""
    log_file = getattr(sys.stdout, "file", None)
    if log_file is not None and hasattr(log_file, "reconfigure"):
        log_file.reconfigure(line_buffering=True)


def run(args):
    if int(os.environ.get("RANK", "0")) > 0:
        os.environ["TQDM_DISABLE"] = "1"  # tqdm reads it when imported: Dassl's progress bars from process 0 only
    import torch
    from dassl.engine import build_trainer
    from dassl.utils import collect_env_info, set_random_seed, setup_logger

    from trainers.runs import distributed
    from trainers.runs.results import flatten_config, write_run_record
    from trainers.runs.run_lock import lock_run_dir

    cfg = setup_cfg(args)
    register_all(cfg)
    make_output_dir(cfg)
    distributed.join_process_group(use_cuda=torch.cuda.is_available() and cfg.USE_CUDA)  # under torchrun
    # Under torchrun every process gets RANK; the first one speaks for the run folder.
    owns_run_dir = bool(cfg.OUTPUT_DIR) and os.environ.get("RANK", "0") == "0"
    if owns_run_dir:
        run_lock = lock_run_dir(cfg.OUTPUT_DIR)  # noqa: F841 - held until the process ends
    if cfg.OUTPUT_DIR:
        check_run_record(cfg)
    if cfg.SEED >= 0:
        set_random_seed(cfg.SEED)
    if distributed.is_main_process():
        setup_logger(cfg.OUTPUT_DIR)
        _flush_log_per_line()
    else:  # one log.txt and one console output; the other processes' errors still reach stderr
        sys.stdout = open(os.devnull, "w")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)
    if torch.cuda.is_available() and cfg.USE_CUDA:
        torch.backends.cudnn.benchmark = True  # as Dassl's train.py; the trainer turns it off under DETERMINISTIC
    print("Arguments:", " ".join(sys.argv[1:]))
    print("Config:\n" + str(cfg))
    print("Environment:\n" + collect_env_info())

    trainer = build_trainer(cfg)
    # The run record is the config the trainer runs with: its INPUT preprocessing resolved for the backbone.
    if cfg.OUTPUT_DIR:
        check_run_record(trainer.cfg, resolved=True)
    if owns_run_dir:
        write_run_record(cfg.OUTPUT_DIR, args.command_line, flatten_config(trainer.cfg))
    if args.eval_only:
        trainer.load_model(args.model_dir, epoch=args.load_epoch)
        trainer.test()
    elif not args.no_train:
        trainer.train()


def main(argv=None):
    args = parse_args(argv)
    args.command_line = list(sys.argv[1:] if argv is None else argv)  # stored with the run (run.json)
    try:
        import dassl  # noqa: F401
    except ImportError:
        print(f"error: {DASSL_INSTALL}", file=sys.stderr)
        return 2
    from datasets.errors import DatasetError
    from trainers.errors import UserFacingError

    try:
        run(args)
    except (UserFacingError, DatasetError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
