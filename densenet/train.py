"""One training run, top to bottom: data, model, SGD with the paper's schedule, checkpoints, logs.

A run directory holds ``config.yaml`` (the resolved configuration), ``metrics.csv`` (one row per
epoch), ``curves.png``, TensorBoard events under ``tensorboard/``, ``checkpoint.pt`` (and the one
before it, ``checkpoint.prev.pt``) and, at the end, ``report.json``.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import signal
import sys
import time
from contextlib import ExitStack, closing, contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from .atomic import atomic_write_text
from .checkpoint import CheckpointError, load_checkpoint, save_rotating
from .config import RUNTIME_KEYS, ConfigError, TrainConfig, check_keys_and_types, milestones, validate
from .curves import plot_curves
from .distributed import PEER_HINT, Dist, is_peer_failure, setup, teardown
from .evaluate import evaluate, topk_correct
from .registry import create_model, model_spec
from .memory import check_memory, estimate_memory
from .runlock import RunLock
from .sync_bn import convert_sync_batchnorm
from .weights import load_state_dict, read_state_dict

__all__ = ["train", "TrainingStopped", "RUN_FILES", "resolve_device", "build_model", "learning_rate"]

RUN_FILES = ("config.yaml", "metrics.csv", "curves.png", "checkpoint.pt", "checkpoint.prev.pt", "report.json", "tensorboard")
METRIC_COLUMNS = ("epoch", "train_loss", "train_error", "val_error", "test_error", "test_top5_error", "lr", "seconds", "images_per_s")


class TrainingStopped(RuntimeError):
    """The run stopped before its last epoch (a signal, or a loss that is not finite)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when present, else CPU; otherwise any device string torch accepts."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for but CUDA is not available on this machine; use --device cpu")
    return device


def learning_rate(config: TrainConfig, epoch: int) -> float:
    """lr of the given epoch (0-based): ``lr`` times ``lr_gamma`` for every milestone passed."""
    return config.lr * config.lr_gamma ** sum(epoch >= m for m in milestones(config))


def build_model(config: TrainConfig, num_classes: int) -> nn.Module:
    extra = {"memory_efficient": True} if config.memory_efficient else {}
    return create_model(config.model, num_classes=num_classes, drop_rate=config.drop_rate, **extra)


# ---------------------------------------------------------------------------- run directory
def prepare_run_dir(out: Path, *, resume: bool, force: bool) -> None:
    """Refuse to mix two runs in one folder unless ``force`` (which clears the old run's files)."""
    existing = [name for name in RUN_FILES if (out / name).exists()]
    if resume:
        return
    if existing and not force:
        raise ConfigError(
            f"{out} already holds a run ({', '.join(existing)}); continue it with --resume {out}, "
            f"choose another --out, or start over with --force (deletes those files)"
        )
    for name in existing:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def load_run_config(out: Path, overrides: dict[str, Any]) -> TrainConfig:
    """The configuration of the run in ``out``; ``overrides`` may change only how it runs."""
    path = out / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"cannot resume: {out} holds no run ({path} is missing)")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot resume: {path} is not valid YAML: {e}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"cannot resume: {path} does not hold a configuration mapping")
    check_keys_and_types(values, str(path))
    changed = sorted(k for k, v in overrides.items() if k not in RUNTIME_KEYS and values.get(k) != v)
    if changed:
        raise ConfigError(
            f"cannot resume {out} with a changed {', '.join(changed)} (the run was started with "
            + ", ".join(f"{k}={values.get(k)!r}" for k in changed)
            + f"); only {', '.join(sorted(RUNTIME_KEYS - {'out'}))} may change on resume"
        )
    values.update({k: v for k, v in overrides.items() if k in RUNTIME_KEYS})
    values["out"] = str(out)
    config = TrainConfig(**values)
    validate(config)
    return config


def write_epoch_logs(out: Path, writer: Any, config: TrainConfig, history: list[dict]) -> None:
    """After each epoch: ``metrics.csv`` and ``curves.png`` rewritten from the whole history, and the
    epoch's scalars added to TensorBoard."""
    write_metrics_csv(out / "metrics.csv", history)
    plot_curves(out / "curves.png", [(config.model, history)], title=f"{config.model} on {config.dataset}")
    row = history[-1]
    for key in ("train_loss", "train_error", "val_error", "test_error", "lr", "images_per_s"):
        if row.get(key) is not None:
            writer.add_scalar(key, row[key], row["epoch"])
    writer.flush()


def write_metrics_csv(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in METRIC_COLUMNS})
    atomic_write_text(path, buffer.getvalue())


@contextmanager
def stop_on_signals() -> Iterator[dict]:
    """Turn SIGINT/SIGTERM into a flag the loop checks between steps (restored on exit)."""
    flag: dict[str, int | None] = {"signal": None}

    def handler(signum, frame):  # noqa: ANN001
        flag["signal"] = signum

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: leave signals alone
            pass
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def configure_runtime(config: TrainConfig, device: torch.device) -> None:
    if config.threads:
        torch.set_num_threads(config.threads)
    if config.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(config.seed)


def check_precision(config: TrainConfig, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, whether a gradient scaler is needed) for ``config.amp`` on ``device``."""
    if config.amp == "off":
        return None, False
    if config.amp == "fp16":
        if device.type != "cuda":
            raise ConfigError("--amp fp16 needs a CUDA GPU (float16 training with a gradient scaler); "
                              "on a CPU use --amp bf16 or --amp off")
        return torch.float16, True
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"--amp bf16: {torch.cuda.get_device_name(device)} does not support bfloat16; use --amp fp16")
    return torch.bfloat16, False


def on_main(dd: Dist, fn: Callable[[], Any]) -> Any:
    """``fn()`` run by rank 0 alone, its result (or its ConfigError/CheckpointError) on every rank,
    so that no rank waits for a peer that has already failed."""
    result: tuple[str, Any] = ("ok", None)
    if dd.main:
        try:
            result = ("ok", fn())
        except (ConfigError, CheckpointError, OSError) as e:
            result = ("error", f"{type(e).__name__}: {e}" if isinstance(e, OSError) else str(e))
    result = dd.broadcast(result)
    if result[0] == "error":
        raise ConfigError(result[1] if dd.main else f"rank 0 stopped: {result[1]}")
    return result[1]


def has_checkpoint(out: Path) -> bool:
    return any((out / name).exists() for name in ("checkpoint.pt", "checkpoint.prev.pt"))


# ---------------------------------------------------------------------------- the run
def train(config: TrainConfig, *, resume: bool = False, force: bool = False) -> dict[str, Any]:
    """Run (or continue, with ``resume``) the experiment ``config`` describes; return its report.

    Under ``torchrun`` every process calls this: each takes ``batch_size / world_size`` images of
    every (global) batch, gradients are averaged by DistributedDataParallel, metrics are summed over
    processes, and rank 0 alone writes the run directory.
    """
    validate(config)
    model_spec(config.model)  # unknown model: fail before reading any data
    dd, device_name = setup(config.device, config.dist_backend, config.dist_timeout)
    clean = False
    try:
        report = _train(config, dd, device_name, resume=resume, force=force)
        clean = True
        return report
    except Exception as e:
        if dd.enabled and is_peer_failure(e):
            raise TrainingStopped(f"rank {dd.rank} of {dd.world_size}: {PEER_HINT} ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''})", 4) from None
        raise
    finally:
        teardown(dd, clean)


def _train(config: TrainConfig, dd: Dist, device_name: str, *, resume: bool, force: bool) -> dict[str, Any]:
    if config.batch_size % dd.world_size:
        raise ConfigError(f"batch_size {config.batch_size} (the global batch) is not divisible by the "
                          f"{dd.world_size} processes; each process takes batch_size / world_size images per step")
    device = resolve_device(device_name)
    amp_dtype, use_scaler = check_precision(config, device)
    out = Path(config.out)
    if dd.restart > 0:  # torchrun restarted the job after a worker failed: continue from the last checkpoint
        resume = has_checkpoint(out)
        force = not resume
    with ExitStack() as held:
        if dd.main:
            if resume and not out.is_dir():
                raise ConfigError(f"cannot resume: {out} does not exist")
            out.mkdir(parents=True, exist_ok=True)
        # one training per run folder (a dead process's lock goes with it); taken before any file is touched
        on_main(dd, lambda: held.enter_context(RunLock(out)) and None)
        return _run(config, dd, device, amp_dtype, use_scaler, out, resume=resume, force=force)


def _run(config: TrainConfig, dd: Dist, device: torch.device, amp_dtype: torch.dtype | None, use_scaler: bool,
         out: Path, *, resume: bool, force: bool) -> dict[str, Any]:
    from .data import build_data  # imported here: the model library does not need the data stack

    on_main(dd, lambda: prepare_run_dir(out, resume=resume, force=force))
    checkpoint = on_main(dd, lambda: load_checkpoint_for_resume(out)) if resume else None
    configure_runtime(config, device)

    data = build_data(
        config.dataset, config.data, batch_size=config.batch_size, eval_batch_size=config.eval_batch_size,
        val_size=config.val_size or None, seed=config.seed, workers=config.workers, image_size=config.image_size,
        train_subset=config.train_subset, test_subset=config.test_subset, download=config.download,
    )
    model = build_model(config, data.num_classes)
    if config.init and checkpoint is None:
        load_state_dict(model, read_state_dict(config.init), strict=False)
    if config.freeze_features:
        model.features.requires_grad_(False)
    if config.sync_bn:
        convert_sync_batchnorm(model)
    if config.memory_check:  # stop now, with advice, rather than be killed by the OS minutes later
        estimate = estimate_memory(model, config.batch_size // dd.world_size, data.image_size,
                                   amp=amp_dtype is not None, name=config.model)
        check_memory(estimate, device=device, processes=1 if device.type == "cuda" else dd.local_world_size)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    # the dense blocks compute in channels_last, so their weight gradients come in that layout; under
    # DDP the weights take it too, so that gradients match DDP's buckets without a copy
    model.to(device, memory_format=torch.channels_last if dd.enabled else memory_format)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
                                weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)

    start_epoch, start_step, history, partial = 0, 0, [], {}
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        if "scaler" in checkpoint and use_scaler:
            scaler.load_state_dict(checkpoint["scaler"])
        start_epoch, start_step = checkpoint["epoch"], checkpoint["step"]
        history, partial = checkpoint["history"], checkpoint["partial"]
        ranks = checkpoint.get("rng_per_rank") or [checkpoint["rng"]]
        if len(ranks) == dd.world_size:
            set_rng_state(ranks[dd.rank])
        else:  # another number of processes: fresh per-rank streams (only dropout draws from them)
            torch.manual_seed(config.seed + 1000 * dd.rank + 1_000_003 * (start_epoch * 100_000 + start_step))
    else:
        on_main(dd, lambda: atomic_write_text(out / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False)))
        if dd.enabled:
            torch.manual_seed(config.seed + dd.rank)  # same initial weights (rank 0's are broadcast), own dropout streams
    step_model: nn.Module = model
    if dd.enabled:
        # buffers (BN running statistics) start as rank 0's; with synchronised BN they stay equal
        # on every rank, without it rank 0's are sent to the others before every forward
        step_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                         forward_sync_buffers=not config.sync_bn)

    data_info = {"dataset": config.dataset, "num_classes": data.num_classes, "class_names": list(data.class_names),
                 "mean": list(data.mean), "std": list(data.std), "image_size": data.image_size}

    def snapshot(epoch: int, step: int, partial: dict) -> None:
        """Everything needed to continue bit-identically from batch ``step`` of ``epoch`` (every rank
        calls it; rank 0 writes)."""
        if not all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point()):
            raise TrainingStopped(f"the weights or BN statistics became NaN or infinite at epoch {epoch + 1}, step {step}: the run "
                                  f"diverged; the last good checkpoint in {out} is kept (try a lower --lr)", 3)
        rngs = dd.gather(rng_state())

        def write() -> None:  # the new file complete on disk before the old one becomes checkpoint.prev.pt
            save_rotating(out, {
                "format": "densenet-checkpoint-v1", "config": config.to_dict(), "model_config": model_config(model),
                "data": data_info, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "epoch": epoch, "step": step, "partial": partial,
                "history": history, "rng": rngs[0], "rng_per_rank": rngs, "world_size": dd.world_size,
            })

        on_main(dd, write)

    def evaluate_all(loader: Any) -> dict[str, float]:
        """Loss and errors over the whole set: each rank scores its shard, the counts are summed."""
        r = evaluate(model, loader.batches(0, rank=dd.rank, world_size=dd.world_size), device)
        if not dd.enabled:
            return r
        n = r["images"]
        local = [r["loss"] * n, round(n * (1 - r["top1_error"] / 100)), round(n * (1 - r["top5_error"] / 100)), n] if n else [0, 0, 0, 0]
        loss, c1, c5, n = dd.sum(local, device)
        if n == 0:
            return {"loss": math.nan, "top1_error": math.nan, "top5_error": math.nan, "images": 0}
        return {"loss": loss / n, "top1_error": 100 * (1 - c1 / n), "top5_error": 100 * (1 - c5 / n), "images": int(n)}

    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    writer = SummaryWriter(str(out / "tensorboard"), purge_step=start_epoch + 1) if dd.main else None
    num_params = sum(p.numel() for p in model.parameters())
    quiet = config.quiet or not dd.main
    log = (lambda msg: print(msg, flush=True)) if config.quiet else tqdm.write
    if not dd.main:
        log = lambda msg: None  # noqa: E731 - rank 0 speaks for the job
    if start_epoch == 0 and start_step == 0:
        log(f"{config.model} ({num_params:,} parameters) on {config.dataset}: {data.train.num_images} training images, "
            f"{config.epochs} epochs of {data.train.num_batches} steps, batch {config.batch_size}"
            + (f" ({dd.world_size} processes x {config.batch_size // dd.world_size}, {dd.backend})" if dd.enabled else "")
            + f", device {device}" + (f", amp {config.amp}" if amp_dtype else ""))
    else:
        log(f"resuming {out} at epoch {start_epoch + 1}, step {start_step}"
            + (f" ({dd.world_size} processes)" if dd.enabled else ""))

    try:
        with stop_on_signals() as stop:
            for epoch in range(start_epoch, config.epochs):
                lr = learning_rate(config, epoch)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                model.train()
                if config.freeze_features:
                    model.features.eval()  # a frozen feature extractor keeps its BN statistics
                step0 = start_step if epoch == start_epoch else 0
                acc = partial if (epoch == start_epoch and partial) else {"loss": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}
                partial = {}
                bar = tqdm(total=data.train.num_batches, initial=step0, disable=quiet, leave=False,
                           desc=f"epoch {epoch + 1}/{config.epochs}", unit="step", dynamic_ncols=True, file=sys.stderr)
                t0 = time.perf_counter()
                seconds_before = acc["seconds"]
                with closing(data.train.batches(epoch, start=step0, rank=dd.rank, world_size=dd.world_size)) as batches:
                    for step, (images, labels) in enumerate(batches, start=step0):
                        images = images.to(device, non_blocking=True, memory_format=memory_format)
                        labels = labels.to(device, non_blocking=True)
                        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                            logits = step_model(images)
                            loss = F.cross_entropy(logits, labels)
                        # one small all-reduce: the global batch's loss and hits, and whether any rank was signalled
                        n = labels.numel()
                        loss_sum, hits, seen, signalled = dd.sum(
                            [float(loss.detach()) * n, topk_correct(logits.detach(), labels, (1,))[0], n,
                             float(bool(stop["signal"]))], device)
                        if not math.isfinite(loss_sum):
                            raise TrainingStopped(
                                f"the training loss became {loss_sum / seen} at epoch {epoch + 1}, step {step + 1}: the run "
                                f"diverged; the last good checkpoint in {out} is kept (try a lower --lr)", 3)
                        optimizer.zero_grad(set_to_none=True)
                        scaler.scale(loss).backward()
                        scaler.step(optimizer)
                        scaler.update()
                        acc["loss"] += loss_sum
                        acc["correct"] += int(hits)
                        acc["seen"] += int(seen)
                        signum = stop["signal"] or (signal.SIGTERM if signalled else None)
                        elapsed = seconds_before + time.perf_counter() - t0
                        bar.update(1)
                        bar.set_postfix(loss=f"{acc['loss'] / acc['seen']:.3f}", err=f"{100 * (1 - acc['correct'] / acc['seen']):.1f}%",
                                        lr=f"{lr:g}", img_s=f"{acc['seen'] / max(elapsed, 1e-9):.0f}", refresh=False)
                        last = step + 1 == data.train.num_batches
                        if not last and (signum or (config.checkpoint_every and (step + 1) % config.checkpoint_every == 0)):
                            snapshot(epoch, step + 1, {**acc, "seconds": elapsed})
                        if signum and not last:
                            raise TrainingStopped(f"stopped by signal {signum} at epoch {epoch + 1}, step {step + 1}; "
                                                  f"checkpoint written; continue with: densenet train --resume {out}", 128 + signum)
                bar.close()
                seconds = seconds_before + time.perf_counter() - t0
                row = {"epoch": epoch + 1, "train_loss": acc["loss"] / max(acc["seen"], 1),
                       "train_error": 100.0 * (1 - acc["correct"] / max(acc["seen"], 1)), "lr": lr,
                       "seconds": round(seconds, 3), "images_per_s": round(acc["seen"] / max(seconds, 1e-9), 2)}
                if data.val is not None:
                    row["val_error"] = evaluate_all(data.val)["top1_error"]
                test = evaluate_all(data.test)
                row.update(test_error=test["top1_error"], test_top5_error=test["top5_error"])
                history.append(row)
                snapshot(epoch + 1, 0, {})
                if dd.main:
                    write_epoch_logs(out, writer, config, history)
                log(f"epoch {epoch + 1}/{config.epochs}: loss {row['train_loss']:.4f}, train error {row['train_error']:.2f}%, "
                    + (f"val error {row['val_error']:.2f}%, " if "val_error" in row else "")
                    + f"test error {row['test_error']:.2f}%, lr {lr:g}, {row['images_per_s']:.1f} img/s")
                signum = dd.sum([float(bool(stop["signal"]))], device)[0] and (stop["signal"] or signal.SIGTERM)
                if signum and epoch + 1 < config.epochs:
                    raise TrainingStopped(f"stopped by signal {signum} after epoch {epoch + 1}; continue with: "
                                          f"densenet train --resume {out}", 128 + signum)
    finally:
        if writer is not None:
            writer.close()

    report = make_report(config, history, num_params, str(device))
    if dd.enabled:
        report["processes"] = dd.world_size
    on_main(dd, lambda: atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n"))
    log(f"done: final test error {report['test_error']:.2f}% (top-5 {report['test_top5_error']:.2f}%); run in {out}")
    return report


def model_config(model: nn.Module) -> dict:
    config = getattr(model, "config", None)
    return config() if callable(config) else {}


def load_checkpoint_for_resume(out: Path) -> dict:
    """The newest readable checkpoint of the run: ``checkpoint.pt``, else the one before it
    (a kill between rotating and writing leaves only ``checkpoint.prev.pt``)."""
    errors = []
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        try:
            state = load_checkpoint(out / name)
        except CheckpointError as e:
            errors.append(str(e))
            continue
        if name != "checkpoint.pt":
            print(f"warning: {errors[0]}; resuming from the previous checkpoint {out / name}", file=sys.stderr)
        return state
    raise ConfigError(f"cannot resume {out}: {'; '.join(errors)}; the files in {out} were left as they are")


def make_report(config: TrainConfig, history: list[dict], num_params: int, device: str) -> dict[str, Any]:
    last = history[-1]
    report = {
        "model": config.model, "dataset": config.dataset, "parameters": num_params, "epochs": len(history),
        "test_error": last["test_error"], "test_top5_error": last["test_top5_error"],
        "test_accuracy": 100.0 - last["test_error"], "final_train_loss": last["train_loss"],
        "train_seconds": round(sum(r["seconds"] for r in history), 1), "device": device,
        "torch": torch.__version__, "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    vals = [(r["val_error"], r["epoch"]) for r in history if r.get("val_error") is not None]
    if vals:
        best, epoch = min(vals)
        report.update(best_val_error=best, best_val_epoch=epoch, final_val_error=vals[-1][0])
    if not all(math.isfinite(r["test_error"]) for r in history):
        report["warning"] = "some test errors are not finite (empty test set?)"
    return report
