"""Multi-label datasets described by a CSV label file, in the two layouts chest X-ray users have.

- **One column per label** (CheXpert's ``train.csv``): 1 positive, 0 negative, -1 uncertain, blank
  not mentioned (read as negative). Label columns are found by their values (every filled cell 1, 0
  or -1), or named with ``label_columns``.
- **One column of labels joined by "|"** (ChestX-ray14's ``Data_Entry_2017.csv``: ``Image Index``,
  ``Finding Labels``, ``Patient ID``); the "no finding" value means no positive label.

Uncertain labels follow a policy: ``ones``, ``zeros``, or ``ignore`` (NaN in the targets: left out of
the loss and of the metrics for that label). The split comes from a split column when the file has
one, else from :func:`split_by_group`: seeded, no group (patient) on both sides, stratified over the
labels as far as groups allow. Image paths are relative to the CSV's folder or to ``image_root``.

    table = read_label_file("labels.csv", uncertain="ignore")
    parts = split_by_group(table, seed=0)         # {"train": indices, "val": ..., "test": ...}
"""
from __future__ import annotations

import csv
import math
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError, DataNotFound

__all__ = ["LabelTable", "UNCERTAIN_POLICIES", "read_label_file", "split_by_group"]

UNCERTAIN_POLICIES = ("ones", "zeros", "ignore")
PATH_COLUMNS = ("Path", "Image Index", "path", "image", "Image", "filename", "file")
JOINED_COLUMNS = ("Finding Labels", "labels", "Labels")
GROUP_COLUMNS = ("Patient ID", "patient_id", "PatientID", "subject_id")
SPLIT_COLUMNS = ("split", "Split")
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "test": "test", "testing": "test"}
NO_FINDING = "No Finding"
_LABEL_VALUES = {"1": 1.0, "1.0": 1.0, "0": 0.0, "0.0": 0.0, "-1": -1.0, "-1.0": -1.0, "": None}
_PATIENT_IN_PATH = re.compile(r"^(patient\d+)$", re.IGNORECASE)
_SHOWN = 5  # rows named in an error before "and N more"


@dataclass(frozen=True)
class LabelTable:
    """The rows of a label file. ``targets`` (N, L) float32: 1 positive, 0 negative, NaN ignored."""

    source: Path
    paths: list[Path]
    labels: list[str]
    targets: np.ndarray
    groups: list[str] | None
    split: list[str] | None
    layout: str  # "columns" or "joined"
    skipped: list[str]  # rows left out (missing images with skip_bad), as "row N: path"

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return (f"LabelTable({self.source.name}: {len(self)} images, {len(self.labels)} labels, {self.layout} layout"
                + (f", {len(set(self.groups))} groups" if self.groups else "") + ")")


def _rows_named(rows: Sequence[str]) -> str:
    shown = ", ".join(rows[:_SHOWN])
    return shown + (f" and {len(rows) - _SHOWN} more" if len(rows) > _SHOWN else "")


def _pick(header: list[str], given: str | None, candidates: Sequence[str], what: str, path: Path) -> str | None:
    if given is not None:
        if given not in header:
            raise DataError(f"{path}: no column {given!r} for the {what}; the columns are {', '.join(header)}")
        return given
    return next((c for c in candidates if c in header), None)


def _unknown_value(i: int, col: str, value: str) -> DataError:
    return DataError(f"row {i + 2}, column {col!r}: unknown label value {value!r}; a label cell holds 1 "
                     "(positive), 0 (negative), -1 (uncertain) or nothing (not mentioned)")


def _label_columns(header: list[str], rows: list[dict[str, str]], exclude: set[str]) -> list[str]:
    """Columns whose filled cells are all 1, 0 or -1 (at least one filled). A column that is at least half
    such values but holds others, or a named column blank in every row, is an error naming it."""
    found = []
    for col in header:
        if col in exclude or not col.strip():
            continue
        values = [(r[col] or "").strip() for r in rows]
        filled = [v for v in values if v]
        good = [v for v in filled if v in _LABEL_VALUES]
        if not filled:
            raise DataError(f"column {col!r} is blank in every row: if it is a label, no image has it (leave it out "
                            "by naming the label columns: label_columns / --label-columns)")
        if len(good) == len(filled):
            found.append(col)
        elif len(good) >= 0.5 * len(filled):
            i, bad = next((i, v) for i, v in enumerate(values) if v and v not in _LABEL_VALUES)
            raise _unknown_value(i, col, bad)
    return found


def read_label_file(
    path: str | Path, image_root: str | Path | None = None, uncertain: str = "zeros", *,
    label_columns: Sequence[str] | None = None, path_column: str | None = None, labels_column: str | None = None,
    group_column: str | None = None, split_column: str | None = None, no_finding: str = NO_FINDING,
    skip_bad: bool = False, check_files: bool = True,
) -> LabelTable:
    """Read a CSV label file (see the module docstring for the layouts and the policies)."""
    path = Path(path)
    if uncertain not in UNCERTAIN_POLICIES:
        raise DataError(f"uncertain={uncertain!r}: choose one of {', '.join(UNCERTAIN_POLICIES)}")
    if not path.is_file():
        raise DataNotFound(f"label file {path} does not exist")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        rows = list(reader)
    if not header or not rows:
        raise DataError(f"{path}: no rows; a label file has a header line and one row per image")
    path_col = _pick(header, path_column, PATH_COLUMNS, "image paths", path)
    if path_col is None:
        raise DataError(f"{path}: no image path column (looked for {', '.join(PATH_COLUMNS)}); "
                        "name it with path_column (--path-column)")
    joined_col = _pick(header, labels_column, JOINED_COLUMNS, "joined labels", path)
    group_col = _pick(header, group_column, GROUP_COLUMNS, "groups", path)
    split_col = _pick(header, split_column, SPLIT_COLUMNS, "split", path)
    root = Path(image_root) if image_root is not None else path.parent

    if joined_col is not None and label_columns is None:
        layout = "joined"
        cells = [[s.strip() for s in r[joined_col].split("|") if s.strip()] for r in rows]
        labels = sorted({s for c in cells for s in c if s != no_finding})
        if not labels:
            raise DataError(f"{path}: column {joined_col!r} names no label other than {no_finding!r}")
        index = {name: j for j, name in enumerate(labels)}
        targets = np.zeros((len(rows), len(labels)), dtype=np.float32)
        for i, c in enumerate(cells):
            if no_finding in c and len(c) > 1:
                raise DataError(f"row {i + 2}: {no_finding!r} together with other labels ({'|'.join(c)})")
            for s in c:
                if s != no_finding:
                    targets[i, index[s]] = 1.0
    else:
        layout = "columns"
        exclude = {c for c in (path_col, group_col, split_col, joined_col) if c}
        labels = list(label_columns) if label_columns is not None else _label_columns(header, rows, exclude)
        missing = [c for c in labels if c not in header]
        if missing:
            raise DataError(f"{path}: no label column {', '.join(map(repr, missing))}; the columns are {', '.join(header)}")
        if not labels:
            raise DataError(f"{path}: no label columns found (columns of 1 / 0 / -1 / blank, or one column of labels "
                            f"joined by '|' named one of {', '.join(JOINED_COLUMNS)}); name them with label_columns")
        uncertain_value = {"ones": 1.0, "zeros": 0.0, "ignore": math.nan}[uncertain]
        targets = np.zeros((len(rows), len(labels)), dtype=np.float32)
        for j, col in enumerate(labels):
            values = [r[col].strip() for r in rows]
            if not any(values):
                raise DataError(f"{path}: label column {col!r} is blank in every row; leave it out of label_columns "
                                "or fill it")
            for i, v in enumerate(values):
                if v not in _LABEL_VALUES:
                    raise _unknown_value(i, col, v)
                x = _LABEL_VALUES[v]
                targets[i, j] = 0.0 if x is None else uncertain_value if x == -1.0 else x

    names = [r[path_col].strip() for r in rows]
    seen: dict[str, int] = {}
    for i, n in enumerate(names):
        if not n:
            raise DataError(f"row {i + 2}: empty image path in column {path_col!r}")
        if n in seen:
            raise DataError(f"rows {seen[n] + 2} and {i + 2} name the same image {n!r}; each image appears once")
        seen[n] = i
    paths = [root / n for n in names]
    groups = [r[group_col].strip() for r in rows] if group_col else _groups_from_paths(names)
    split = None
    if split_col:
        split = []
        for i, r in enumerate(rows):
            v = r[split_col].strip().lower()
            if v not in SPLIT_NAMES:
                raise DataError(f"row {i + 2}, column {split_col!r}: unknown split {r[split_col]!r}; "
                                f"use one of {', '.join(sorted(set(SPLIT_NAMES)))}")
            split.append(SPLIT_NAMES[v])
        if groups:
            _check_split_groups(groups, split)

    keep = np.ones(len(rows), dtype=bool)
    skipped: list[str] = []
    if check_files:
        bad = [i for i, p in enumerate(paths) if not p.is_file()]
        if bad and not skip_bad:
            raise DataError(f"{len(bad)} of {len(rows)} rows of {path} name images that do not exist under {root}: "
                            f"{_rows_named([f'row {i + 2}: {names[i]}' for i in bad])}; fix the paths, give the image "
                            "folder (--image-root), or leave those rows out (--skip-bad)")
        keep[bad] = False
        skipped = [f"row {i + 2}: {names[i]}" for i in bad]
    idx = np.flatnonzero(keep)
    return LabelTable(path, [paths[i] for i in idx], labels, targets[idx], [groups[i] for i in idx] if groups else None,
                      [split[i] for i in idx] if split else None, layout, skipped)


def _groups_from_paths(names: list[str]) -> list[str] | None:
    """CheXpert's patient from its paths (``.../patient00001/study1/view1_frontal.jpg``), else None."""
    found = []
    for n in names:
        g = next((part for part in Path(n).parts if _PATIENT_IN_PATH.match(part)), None)
        if g is None:
            return None
        found.append(g)
    return found


def _check_split_groups(groups: list[str], split: list[str]) -> None:
    sides: dict[str, set[str]] = defaultdict(set)
    rows: dict[str, list[int]] = defaultdict(list)
    for i, (g, s) in enumerate(zip(groups, split)):
        sides[g].add(s)
        rows[g].append(i + 2)
    both = [g for g, s in sides.items() if len(s) > 1]
    if both:
        g = both[0]
        raise DataError(f"{len(both)} group(s) appear on more than one side of the file's split, for example "
                        f"{g!r} ({', '.join(sorted(sides[g]))}; rows {', '.join(map(str, rows[g][:_SHOWN]))}): "
                        "images of one patient must stay on one side; fix the split column")


def split_by_group(table: LabelTable, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0,
                   names: Sequence[str] = ("train", "val", "test")) -> dict[str, np.ndarray]:
    """Row indices per split: the file's own split when it has one, else a seeded split in which every
    group (or row, without groups) goes to one side, stratified over the labels: groups are placed
    rarest label first, each into the split that most lacks that label (Sechidis et al.'s iterative
    stratification, applied to groups)."""
    if table.split is not None:
        return {n: np.flatnonzero(np.array(table.split) == n) for n in names}
    if len(fractions) != len(names) or not math.isclose(sum(fractions), 1.0) or min(fractions) < 0:
        raise DataError(f"split fractions {tuple(fractions)} must be {len(names)} non-negative numbers summing to 1")
    groups = table.groups or [str(i) for i in range(len(table))]
    members: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    pos = np.nan_to_num(table.targets, nan=0.0) > 0
    rng = np.random.default_rng(seed)
    order = list(members)
    rng.shuffle(order)
    label_total = pos.sum(0).astype(float)
    want_rows = np.array(fractions, dtype=float) * len(table)
    want_labels = np.outer(fractions, label_total)  # (splits, labels)
    have_rows = np.zeros(len(names))
    have_labels = np.zeros_like(want_labels)
    group_pos = {g: pos[members[g]].sum(0) for g in order}

    def rarest(g: str) -> float:
        present = np.flatnonzero(group_pos[g])
        return float(label_total[present].min()) if present.size else math.inf

    order.sort(key=rarest)  # stable: the seeded shuffle breaks ties
    assignment: dict[str, int] = {}
    for g in order:
        present = np.flatnonzero(group_pos[g])
        if present.size:
            j = present[np.argmin(label_total[present])]
            need = want_labels[:, j] - have_labels[:, j]
        else:
            need = want_rows - have_rows
        candidates = np.flatnonzero(need == need.max())
        s = int(candidates[np.argmax((want_rows - have_rows)[candidates])])
        assignment[g] = s
        have_rows[s] += len(members[g])
        have_labels[s] += group_pos[g]
    out = {n: [] for n in names}
    for g, s in assignment.items():
        out[names[s]] += members[g]
    empty = [n for n, f in zip(names, fractions) if f > 0 and not out[n]]
    if empty:
        raise DataError(f"{len(members)} group(s) are too few to fill every split ({', '.join(empty)} empty); "
                        "give more images, fewer splits or a split column")
    return {n: np.array(sorted(v), dtype=np.int64) for n, v in out.items()}
