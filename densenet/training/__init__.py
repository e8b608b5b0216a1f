"""Training: the configuration (the paper's recipes), the training loop, evaluation, distributed
processes, the memory estimate and the run-folder lock."""
from .config import ConfigError, TrainConfig, paper_recipe, resolve_config
from .evaluate import EvalCounts, evaluate, evaluate_tta, topk_correct
from .loop import TrainingStopped, load_run_config, train
from .memory import MemoryLimitError, estimate_memory
from .runlock import RunLock, RunLockError

__all__ = ["ConfigError", "TrainConfig", "paper_recipe", "resolve_config", "EvalCounts", "evaluate", "evaluate_tta",
           "topk_correct", "TrainingStopped", "load_run_config", "train", "MemoryLimitError", "estimate_memory", "RunLock",
           "RunLockError"]
