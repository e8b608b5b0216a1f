"""Build the bundled sample ``densenet/assets/cifar10-sample.zip`` from the CIFAR-10 JPEG zip.

    python -m densenet.data.make_sample /work/shared/data/cifar10-jpeg.zip

Takes the first 100 training and 20 test images of every class (the JPEG bytes unchanged) into a
zip with the same layout, ``train/<class>/NNNN.jpg`` and ``test/<class>/NNNN.jpg``.
"""
from __future__ import annotations

import argparse
import os
import zipfile
from pathlib import Path

from .build import SAMPLE_PATH
from .folder import scan_tree

PER_CLASS = {"train": 100, "test": 20}


def make_sample(source: str | os.PathLike, out: str | os.PathLike = SAMPLE_PATH) -> Path:
    trees = scan_tree(source, ("train", "test"))
    out = Path(out)
    tmp = out.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as z:
        for split, n in PER_CLASS.items():
            tree = trees[split]
            for label, cls in enumerate(tree.class_names):
                files = [f for f, y in zip(tree.files, tree.labels) if y == label][:n]
                for f in files:
                    info = zipfile.ZipInfo(f"{split}/{cls}/{f.rsplit('/', 1)[-1]}", date_time=(2020, 1, 1, 0, 0, 0))
                    z.writestr(info, tree.read(f))
    os.replace(tmp, out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="cifar10-jpeg.zip (or a folder with train/ and test/)")
    p.add_argument("--out", default=str(SAMPLE_PATH))
    print(make_sample(p.parse_args().source, p.parse_args().out))


if __name__ == "__main__":
    main()
