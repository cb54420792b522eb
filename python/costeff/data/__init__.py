"""Data: the task registry (offline Rotten Tomatoes, local GLUE TSVs, any CSV), tokenization, loaders."""
from costeff.data.encoding import GlobalBatchSampler, make_loader, tokenize
from costeff.data.tasks import TASKS, DataError, TaskSpec, get_task, hash_split, load_task

__all__ = ["TASKS", "DataError", "GlobalBatchSampler", "TaskSpec", "get_task", "hash_split", "load_task", "make_loader", "tokenize"]
