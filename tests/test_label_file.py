"""Label files (densenet.data.label_file): CheXpert and ChestX-ray14 layouts with their real column
names, uncertain-label policies, splits by patient, and the bad inputs of issue 25."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from densenet.data import DataError
from densenet.data.label_file import read_label_file, split_by_group

CHEXPERT_LABELS = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
                   "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
                   "Fracture", "Support Devices"]
CHEXPERT_HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS]
# the real Data_Entry_2017.csv header: its last two fields hold commas inside brackets, and a trailing comma
NIH_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
              "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(path)


def _chexpert(tmp_path: Path, rows: list[list[str]]) -> Path:
    lines = [",".join(CHEXPERT_HEADER)]
    for i, labels in enumerate(rows):
        rel = f"CheXpert-v1.0-small/train/patient{i // 2:05d}/study1/view{i % 2 + 1}_frontal.jpg"
        _png(tmp_path / rel)
        lines.append(",".join([rel, "Female", "68", "Frontal", "AP", *labels]))
    csv = tmp_path / "train.csv"
    csv.write_text("\n".join(lines) + "\n")
    return csv


def _cells(**values: str) -> list[str]:
    return [values.get(name.replace(" ", "_"), "") for name in CHEXPERT_LABELS]


def test_a_chexpert_file_loads_with_its_real_columns_and_each_uncertainty_policy(tmp_path):
    others = {name.replace(" ", "_"): "0.0" for name in CHEXPERT_LABELS}  # a fourth row that fills every column
    others.update(Pneumonia="-1.0", Support_Devices="1.0")
    csv = _chexpert(tmp_path, [_cells(Cardiomegaly="1.0", Edema="-1.0"), _cells(No_Finding="1.0"),
                               _cells(Edema="0.0", Fracture="1.0"), _cells(**others)])
    by_policy = {p: read_label_file(csv, uncertain=p) for p in ("ones", "zeros", "ignore")}
    table = by_policy["ignore"]
    assert table.layout == "columns" and table.labels == CHEXPERT_LABELS  # Sex, Age, views: not labels
    assert table.groups == ["patient00000", "patient00000", "patient00001", "patient00001"]  # from the paths
    edema, cardio = CHEXPERT_LABELS.index("Edema"), CHEXPERT_LABELS.index("Cardiomegaly")
    assert table.targets[0, cardio] == 1 and math.isnan(table.targets[0, edema])
    assert by_policy["ones"].targets[0, edema] == 1 and by_policy["zeros"].targets[0, edema] == 0
    assert table.targets[2, edema] == 0 and table.targets[1, cardio] == 0  # 0.0 and blank: negative
    assert all(p.is_file() for p in table.paths)
    assert "4 images, 14 labels" in repr(table)


def test_a_chestxray14_file_loads_with_its_real_columns(tmp_path):
    rows = [("00000001_000.png", "Cardiomegaly", "1"), ("00000001_001.png", "Cardiomegaly|Emphysema", "1"),
            ("00000002_000.png", "No Finding", "2"), ("00000003_000.png", "Hernia|Effusion|Infiltration", "3")]
    lines = [NIH_HEADER] + [f"{name},{labels},0,{pid},58,M,PA,2682,2749,0.143,0.143," for name, labels, pid in rows]
    (tmp_path / "Data_Entry_2017.csv").write_text("\n".join(lines) + "\n")
    for name, _, _ in rows:
        _png(tmp_path / "images" / name)
    table = read_label_file(tmp_path / "Data_Entry_2017.csv", image_root=tmp_path / "images")
    assert table.layout == "joined"
    assert table.labels == ["Cardiomegaly", "Effusion", "Emphysema", "Hernia", "Infiltration"]
    assert table.groups == ["1", "1", "2", "3"]
    assert table.targets.tolist() == [[1, 0, 0, 0, 0], [1, 0, 1, 0, 0], [0, 0, 0, 0, 0], [0, 1, 0, 1, 1]]


def _simple(tmp_path: Path, lines: list[str], images: bool = True) -> Path:
    if images:
        for line in lines[1:]:
            _png(tmp_path / line.split(",")[0])
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    return tmp_path / "labels.csv"


@pytest.mark.parametrize("lines, match", [
    (["path,a,b", "x.png,1,0", "y.png,1,maybe"], "row 3, column 'b': unknown label value 'maybe'"),
    (["path,a,b", "x.png,1,", "y.png,0,"], "column 'b' is blank in every row"),
    (["path,a,", "x.png,1,", "y.png,0,"], None),  # a trailing comma: an unnamed blank column, ignored
    (["path,a,b,c,d,e,f,g,h,i,j", *[f"{k}.png,1,0,1,0,1,0,1,0,1,{v}" for k, v in enumerate("0101010101")],
      "z.png,1,0,1,0,1,0,1,0,1,2"], "row 12, column 'j': unknown label value '2'"),
    (["path,a", "x.png,1", "x.png,0"], "rows 2 and 3 name the same image 'x.png'"),
    (["file,labels", "x.png,No Finding|a"], "'No Finding' together with other labels"),
    (["path,a,split", "x.png,1,train", "y.png,0,holdout"], "unknown split 'holdout'"),
    (["Path,a,split", "patient00001/s1/x.png,1,train", "patient00001/s2/y.png,0,test"],
     "'patient00001' \\(test, train; rows 2, 3\\).*one side"),
])
def test_bad_label_files_are_named(tmp_path, lines, match):
    csv = _simple(tmp_path, lines)
    if match is None:
        assert read_label_file(csv).labels == ["a"]
        return
    with pytest.raises(DataError, match=match):
        read_label_file(csv)


def test_an_all_blank_label_column_that_is_asked_for_is_an_error(tmp_path):
    csv = _simple(tmp_path, ["path,a,b", "x.png,1,", "y.png,0,"])
    with pytest.raises(DataError, match="label column 'b' is blank in every row"):
        read_label_file(csv, label_columns=["a", "b"])


def test_missing_images_are_counted_and_named_or_skipped(tmp_path):
    lines = ["path,a"] + [f"img{i}.png,{i % 2}" for i in range(9)]
    csv = _simple(tmp_path, lines)
    for i in range(7):
        (tmp_path / f"img{i}.png").unlink()
    with pytest.raises(DataError, match=r"7 of 9 rows .* row 2: img0.png, .* and 2 more; .*--skip-bad"):
        read_label_file(csv)
    table = read_label_file(csv, skip_bad=True)
    assert [p.name for p in table.paths] == ["img7.png", "img8.png"] and len(table.skipped) == 7
    assert table.targets[:, 0].tolist() == [1, 0]


def test_the_group_split_keeps_each_patient_on_one_side_and_spreads_rare_labels(tmp_path):
    rng = np.random.default_rng(1)
    lines = ["Image Index,Finding Labels,Patient ID"]
    for patient in range(120):
        for view in range(int(rng.integers(1, 4))):
            found = [name for name, p in (("Common", 0.5), ("Rare", 0.08)) if rng.random() < p] or ["No Finding"]
            lines.append(f"{patient:05d}_{view:03d}.png,{'|'.join(found)},{patient}")
    csv = _simple(tmp_path, lines, images=False)
    table = read_label_file(csv, check_files=False)
    parts = split_by_group(table, seed=3)
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(len(table)))
    side = {}
    for name, idx in parts.items():
        for i in idx:
            assert side.setdefault(table.groups[i], name) == name  # no patient on two sides
    rare = table.labels.index("Rare")
    total = table.targets[:, rare].sum()
    for name, frac in (("train", 0.8), ("val", 0.1), ("test", 0.1)):
        assert abs(len(parts[name]) / len(table) - frac) < 0.06, name
        assert table.targets[parts[name], rare].sum() >= 1, name  # the rare label reaches every split
        assert abs(table.targets[parts[name], rare].sum() / total - frac) < 0.15, name
    again = split_by_group(table, seed=3)
    assert all(np.array_equal(parts[k], again[k]) for k in parts)  # seeded
    assert not all(np.array_equal(parts[k], split_by_group(table, seed=4)[k]) for k in parts)


def test_a_split_column_is_used_as_given(tmp_path):
    csv = _simple(tmp_path, ["path,a,split", "x.png,1,train", "y.png,0,valid", "z.png,1,test", "w.png,0,Train"])
    parts = split_by_group(read_label_file(csv))
    assert {k: v.tolist() for k, v in parts.items()} == {"train": [0, 3], "val": [1], "test": [2]}


def test_unknown_policy_and_missing_file(tmp_path):
    with pytest.raises(DataError, match="uncertain='maybe': choose one of ones, zeros, ignore"):
        read_label_file(tmp_path / "x.csv", uncertain="maybe")
    with pytest.raises(DataError, match="does not exist"):
        read_label_file(tmp_path / "x.csv")
