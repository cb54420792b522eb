"""The COST-EFF compression pipeline: teacher fine-tuning, multi-exit TA, exit-aware slenderization,
joint distillation, threshold sweep. Each stage is a function here and a `costeff` subcommand."""
