"""Run directories side by side: the paper's Table 2 / Table 3 layout and learning-curve overlays.

A run directory (``densenet train --out DIR``) holds ``report.json`` (final numbers), ``metrics.csv``
(one row per epoch) and ``config.yaml`` (the configuration, read here to say how a run differs
from the paper's recipe: data, epochs, subsets).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from ..errors import DenseNetError
from ..models import count_parameters, create_model, model_spec
from .paper import PAPER_EPOCHS, TABLE2, TABLE2_DATASETS, TABLE3

__all__ = [
    "DATASET_LABELS",
    "Run",
    "RunError",
    "load_run",
    "markdown_table",
    "render_csv",
    "render_markdown",
    "table_records",
]

DATASET_LABELS = {"cifar10": "C10", "cifar10+": "C10+", "cifar100": "C100", "cifar100+": "C100+", "svhn": "SVHN"}


class RunError(DenseNetError, ValueError):
    """A run directory that cannot be read: the message names the folder and the missing or bad file."""


@dataclass
class Run:
    """One finished run: its folder, ``report.json``, ``config.yaml`` (empty if absent) and metrics rows."""

    path: Path
    report: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)

    def __repr__(self) -> str:
        """One line: the folder, model, dataset and final test error (``report``, ``config`` and
        ``metrics`` hold the rest)."""
        error = self.report.get("test_error")
        return (f"Run({self.path}: {self.report.get('model', '?')} on {self.report.get('dataset', '?')}, "
                f"{len(self.metrics)} epochs logged" + ("" if error is None else f", test error {float(error):.2f}%") + ")")

    @property
    def model(self) -> str:
        return str(self.report["model"])

    @property
    def dataset(self) -> str:
        return str(self.report["dataset"])

    @property
    def label(self) -> str:
        return f"{self.path.name} ({self.model}, {self.dataset})"

    def deviations(self) -> list[str]:
        """How this run differs from the paper's experiment (data, epochs, subsets), in words."""
        notes = []
        if self.config and self.config.get("data") is None:
            notes.append("bundled CIFAR-10 sample")
        elif self.config.get("data"):
            notes.append(f"data {Path(str(self.config['data'])).name}")
        paper = PAPER_EPOCHS.get(self.dataset.rstrip("+"))
        if paper and self.report.get("epochs") != paper:
            notes.append(f"{self.report.get('epochs')} of {paper} epochs")
        for key, what in (("train_subset", "training"), ("test_subset", "test")):
            if self.config.get(key):
                notes.append(f"{self.config[key]} {what} images")
        if self.config.get("recipe") not in (None, "paper"):
            notes.append(f"recipe {self.config['recipe']}")
        if self.report.get("weights") == "average":
            notes.append("weight average")
        hardware = self.report.get("hardware") or self.report.get("device")
        if hardware:
            hours = self.report.get("train_seconds")
            notes.append(f"{hours / 3600:.1f} h on {hardware}" if hours else f"on {hardware}")
        return notes


def _number(value: str) -> float | None:
    return None if value in ("", None) else float(value)


def load_run(path: str | os.PathLike, *, need_metrics: bool = False) -> Run:
    """Read a run directory; RunError if it holds no (readable) ``report.json``, or, with
    ``need_metrics``, no ``metrics.csv``."""
    path = Path(path)
    if not path.is_dir():
        raise RunError(f"{path} is not a run directory (no such folder)")
    report_path = path / "report.json"
    if not report_path.is_file():
        hint = " (the run has not finished, or was stopped)" if (path / "metrics.csv").is_file() else ""
        raise RunError(f"{path} holds no report.json{hint}; give the --out folder of a finished `densenet train`")
    try:
        report = json.loads(report_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"{report_path} is not valid JSON: {e}") from None
    missing = [k for k in ("model", "dataset", "parameters", "test_error") if not isinstance(report, dict) or k not in report]
    if missing:
        raise RunError(f"{report_path} is not a densenet run report (missing {', '.join(missing)})")
    config: dict[str, Any] = {}
    if (path / "config.yaml").is_file():
        try:
            loaded = yaml.safe_load((path / "config.yaml").read_text())
        except yaml.YAMLError as e:
            raise RunError(f"{path / 'config.yaml'} is not valid YAML: {e}") from None
        config = loaded if isinstance(loaded, dict) else {}
    metrics: list[dict[str, Any]] = []
    metrics_path = path / "metrics.csv"
    if metrics_path.is_file():
        try:
            with metrics_path.open(newline="") as f:
                for row in csv.DictReader(f):
                    metrics.append({k: (int(v) if k == "epoch" else _number(v)) for k, v in row.items() if k})
        except (ValueError, TypeError) as e:
            raise RunError(f"{metrics_path} is not a densenet metrics file: {e}") from None
    if need_metrics and not metrics:
        raise RunError(f"{path} holds no per-epoch metrics (metrics.csv missing or empty)")
    return Run(path, report, config, metrics)


def _architecture(name: str) -> tuple[int | str, int | str, int | None]:
    """(depth, growth rate, parameters with a 10-class classifier for CIFAR layouts / 1000 for
    ImageNet, as the paper counts them); '?' for names the registry does not know."""
    try:
        spec = model_spec(name)
    except (TypeError, ValueError):
        return "?", "?", None
    with torch.device("meta"):
        params = count_parameters(create_model(name))
    return spec.depth, spec.growth_rate, params


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def table_records(runs: Sequence[Run], *, all_paper_rows: bool = False) -> dict[str, list[dict[str, Any]]]:
    """Rows of the comparison tables, grouped as ``{"table2": [...], "table3": [...], "other": [...]}``.

    Table 2 (CIFAR/SVHN): one row per model, for each dataset our test error (%) (the mean when
    several runs share a cell), the number of runs, and the paper's error. Table 3 (ImageNet):
    single-crop top-1/top-5 error against the paper's. Other datasets (``folder``): one row per run.
    ``all_paper_rows`` adds the paper's models that have no run.
    """
    by_model: dict[str, dict[str, list[Run]]] = {}
    for run in runs:
        by_model.setdefault(run.model, {}).setdefault(run.dataset, []).append(run)
    table2, table3, other = [], [], []
    models = list(by_model)
    if all_paper_rows:
        models += [m for m in list(TABLE2) + list(TABLE3) if m not in by_model]
    for model in models:
        cells = by_model.get(model, {})
        depth, k, params = _architecture(model)
        base = {"model": model, "depth": depth, "k": k, "parameters": params}
        cifar = {d: rs for d, rs in cells.items() if d in TABLE2_DATASETS}
        if cifar or (model in TABLE2 and not cells):
            row = dict(base)
            paper = TABLE2.get(model, (None,) * len(TABLE2_DATASETS))
            for dataset, paper_error in zip(TABLE2_DATASETS, paper):
                rs = cifar.get(dataset, [])
                row[dataset] = _mean([float(r.report["test_error"]) for r in rs]) if rs else None
                row[f"{dataset}_runs"] = len(rs)
                row[f"{dataset}_paper"] = paper_error
            row["notes"] = _notes([r for rs in cifar.values() for r in rs])
            table2.append(row)
        rs = cells.get("imagenet", [])
        if rs or (model in TABLE3 and not cells):
            paper3 = TABLE3.get(model)
            table3.append({**base, "top1": _mean([float(r.report["test_error"]) for r in rs]) if rs else None,
                           "top1_paper": paper3[0] if paper3 else None,
                           "top5": _mean([float(r.report["test_top5_error"]) for r in rs]) if rs else None,
                           "top5_paper": paper3[2] if paper3 else None, "runs": len(rs), "notes": _notes(rs)})
        for dataset, rs in cells.items():
            if dataset not in TABLE2_DATASETS and dataset != "imagenet":
                for r in rs:
                    other.append({**base, "dataset": dataset, "top1": float(r.report["test_error"]),
                                  "top5": r.report.get("test_top5_error"), "run": str(r.path), "notes": _notes([r])})
    return {"table2": table2, "table3": table3, "other": other}


def _notes(runs: Sequence[Run]) -> str:
    parts = []
    for r in runs:
        deviations = r.deviations()
        parts.append(f"{DATASET_LABELS.get(r.dataset, r.dataset)} {r.path.name} ({float(r.report['test_error']):.2f})"
                     + (f": {', '.join(deviations)}" if deviations else ""))
    return "; ".join(parts)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table, columns padded to their widest cell."""
    cells = [list(map(str, header))] + [list(map(str, r)) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def _params(value: int | None) -> str:
    return "?" if value is None else f"{value / 1e6:.2f}M" if value >= 100_000 else f"{value:,}"


def render_markdown(records: dict[str, list[dict[str, Any]]]) -> str:
    """The tables as Markdown: error cells read "ours / paper" (test error in %; "-": no run / no number)."""
    parts = []
    if records["table2"]:
        header = (["model", "depth", "k", "params"] + [f"{DATASET_LABELS[d]} ours / paper" for d in TABLE2_DATASETS]
                  + ["runs and how they differ from the paper"])
        rows = [[r["model"], r["depth"], r["k"], _params(r["parameters"])]
                + [f"{_fmt(r[d])}{'' if r[d + '_runs'] < 2 else ' (mean of ' + str(r[d + '_runs']) + ')'} "
                   f"/ {_fmt(r[d + '_paper'])}"
                   for d in TABLE2_DATASETS] + [r["notes"] or "not run"] for r in records["table2"]]
        parts.append("Table 2 (test error, %; paper: Huang et al., CVPR 2017)\n\n" + markdown_table(header, rows))
    if records["table3"]:
        header = ["model", "depth", "k", "params", "top-1 ours / paper", "top-5 ours / paper",
                  "runs and how they differ from the paper"]
        rows = [[r["model"], r["depth"], r["k"], _params(r["parameters"]), f"{_fmt(r['top1'])} / {_fmt(r['top1_paper'])}",
                 f"{_fmt(r['top5'])} / {_fmt(r['top5_paper'])}", r["notes"] or "not run"] for r in records["table3"]]
        parts.append("Table 3 (ImageNet validation error, single crop, %)\n\n" + markdown_table(header, rows))
    if records["other"]:
        header = ["model", "dataset", "params", "top-1 error", "top-5 error", "run"]
        rows = [[r["model"], r["dataset"], _params(r["parameters"]), _fmt(r["top1"]), _fmt(r["top5"]), r["run"]]
                for r in records["other"]]
        parts.append("Other datasets (no number in the paper)\n\n" + markdown_table(header, rows))
    return "\n\n".join(parts) + "\n"


def render_csv(records: dict[str, list[dict[str, Any]]]) -> str:
    """The tables as one CSV in Table 2's layout, one row per model: for each dataset our error (%),
    the number of runs it averages and the paper's error (empty: no run / no number); ImageNet
    top-1/top-5 columns for Table 3 models; runs on other datasets as rows of their own."""
    columns = ["model", "depth", "k", "parameters"]
    for d in TABLE2_DATASETS:
        columns += [f"{d}_error", f"{d}_runs", f"{d}_paper"]
    columns += ["imagenet_top1_error", "imagenet_top1_paper", "imagenet_top5_error", "imagenet_top5_paper",
                "imagenet_runs", "other_dataset", "other_top1_error", "notes"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="")
    writer.writeheader()
    def keep(r):
        return {k: ("" if v is None else v) for k, v in r.items() if k in columns}
    for r in records["table2"]:
        writer.writerow(keep({**r, **{f"{d}_error": r[d] for d in TABLE2_DATASETS}}))
    for r in records["table3"]:
        writer.writerow(keep({**r, "imagenet_top1_error": r["top1"], "imagenet_top1_paper": r["top1_paper"],
                              "imagenet_top5_error": r["top5"], "imagenet_top5_paper": r["top5_paper"],
                              "imagenet_runs": r["runs"]}))
    for r in records["other"]:
        writer.writerow(keep({**r, "other_dataset": r["dataset"], "other_top1_error": r["top1"]}))
    return buffer.getvalue()
