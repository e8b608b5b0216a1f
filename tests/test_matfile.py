"""The MATLAB 5 reader (densenet/data/matfile.py) element by element (issue #20: tests that kill the
mutants that survived test_data.py and test_fuzz.py): every numeric type and class, both byte orders,
padding after odd-sized elements, empty matrices, and each kind of damage refused with its reason."""
from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import scipy.io

from densenet.data.errors import DataError, DataNotFound, ExpansionRefused
from densenet.data.matfile import read_mat_arrays

DTYPES = ["i1", "u1", "i2", "u2", "i4", "u4", "f4", "f8", "i8", "u8"]


# ----------------------------------------------------------------------------------- a small MAT writer
def tag(mdtype: int, data: bytes, order: str = "<") -> bytes:
    """A data element with an 8-byte tag, padded to 8 bytes."""
    return struct.pack(order + "II", mdtype, len(data)) + data + b"\0" * (-len(data) % 8)


def small(mdtype: int, data: bytes, order: str = "<", count: int | None = None) -> bytes:
    """A small data element: byte count in the upper half of the first word, up to 4 bytes of data."""
    return struct.pack(order + "I", ((len(data) if count is None else count) << 16) | mdtype) + data.ljust(4, b"\0")


def matrix(name: bytes, values: np.ndarray | bytes, vtype: int | None = None, dims=None, klass: int = 6,
           flags: bytes | None = None, order: str = "<") -> bytes:
    """A miMATRIX element: array flags (class ``klass``), dimensions, name, real part (column-major)."""
    if isinstance(values, np.ndarray):
        dims = values.shape if dims is None else dims
        vtype = vtype or {"i1": 1, "u1": 2, "i2": 3, "u2": 4, "i4": 5, "u4": 6, "f4": 7, "f8": 9, "i8": 12, "u8": 13}[
            values.dtype.str[1:]]
        values = values.astype(values.dtype.newbyteorder(order)).tobytes(order="F")
    body = tag(6, struct.pack(order + "II", klass, 0), order) if flags is None else flags
    body += tag(5, struct.pack(f"{order}{len(dims)}i", *dims), order)
    body += tag(1, name, order) if len(name) > 4 else small(1, name, order)
    body += tag(vtype, values, order)
    return tag(14, body, order)


def matfile(path, *elements: bytes, order: str = "<"):
    header = b"MATLAB 5.0 MAT-file, written by a test".ljust(116, b" ") + b"\0" * 8
    header += struct.pack(order + "H", 0x0100) + (b"IM" if order == "<" else b"MI")
    path.write_bytes(header + b"".join(elements))
    return path


def compressed(element: bytes, cut: int = 0) -> bytes:
    """A miCOMPRESSED element (not padded), its zlib stream ``cut`` bytes short."""
    z = zlib.compress(element)
    z = z[: len(z) - cut]
    return struct.pack("<II", 15, len(z)) + z


# ----------------------------------------------------------------------------------- what is read
@pytest.mark.parametrize("compress", [False, True])
def test_every_numeric_type_with_long_names_and_odd_sizes(tmp_path, compress):
    """scipy writes each dtype in its own class and storage type; names longer than 4 bytes and odd
    byte counts need the padding after each element right."""
    rng = np.random.default_rng(0)
    arrays = {f"values_{d}": (rng.integers(-100, 100, (3, 5)) if d[0] == "i" else rng.integers(0, 200, (3, 5))).astype(d)
              for d in DTYPES}
    arrays["values_f8"] = rng.normal(size=(3, 5))
    arrays["cube"] = rng.integers(0, 255, (2, 3, 5), dtype=np.uint8)
    scipy.io.savemat(tmp_path / "a.mat", {**arrays, "text": "skipped", "empty": np.zeros((0, 3))},
                     do_compression=compress)
    got = read_mat_arrays(tmp_path / "a.mat", (*arrays, "empty", "text", "absent"))
    assert sorted(got) == sorted([*arrays, "empty"])
    for name, a in arrays.items():
        assert got[name].dtype == a.dtype and got[name].shape == a.shape, name
        np.testing.assert_array_equal(got[name], a)
    assert got["empty"].shape == (0, 3)


@pytest.mark.parametrize("order", ["<", ">"])
def test_both_byte_orders_and_storage_narrower_than_the_class(tmp_path, order):
    """A double matrix stored as uint8 (as MATLAB saves integers in doubles) in either byte order comes
    back as float64 in native order; classes 6-15 map to their dtypes."""
    values = np.arange(6, dtype=np.uint8).reshape(2, 3)
    elements = [matrix(b"d", values, klass=6, order=order), matrix(b"big16", np.arange(6, dtype=np.int16).reshape(3, 2),
                                                                   klass=10, order=order)]
    classes = {6: "f8", 7: "f4", 8: "i1", 9: "u1", 10: "i2", 11: "u2", 12: "i4", 13: "u4", 14: "i8", 15: "u8"}
    elements += [matrix(f"class{k}".encode(), np.array([[1, 2]], np.uint8), klass=k, order=order) for k in classes]
    path = matfile(tmp_path / "o.mat", *elements, order=order)
    got = read_mat_arrays(path, ("d", "big16", *[f"class{k}" for k in classes]))
    assert got["d"].dtype == np.float64 and got["d"].dtype.isnative
    np.testing.assert_array_equal(got["d"], values)
    np.testing.assert_array_equal(got["big16"], np.arange(6).reshape(3, 2))
    for k, d in classes.items():
        assert got[f"class{k}"].dtype == np.dtype(d) and got[f"class{k}"].tolist() == [[1, 2]], k


def test_variables_that_are_not_numeric_matrices_are_skipped(tmp_path):
    path = matfile(tmp_path / "s.mat",
                   matrix(b"cell", np.array([[1]], np.uint8), klass=1),  # a cell array's class
                   matrix(b"chars", np.array([[65]], np.uint8), klass=4),
                   matrix(b"cplx", np.array([[1]], np.uint8), flags=tag(6, struct.pack("<II", 6 | 0x0800, 0))),
                   tag(2, b"not a matrix"),
                   matrix(b"x", np.array([[7]], np.uint8)))
    got = read_mat_arrays(path, ("cell", "chars", "cplx", "x"))
    assert list(got) == ["x"] and got["x"].tolist() == [[7.0]]


def test_flags_of_one_word_are_enough(tmp_path):
    path = matfile(tmp_path / "f.mat", matrix(b"x", np.array([[3]], np.uint8), flags=small(6, struct.pack("<I", 6))))
    assert read_mat_arrays(path, ("x",))["x"].tolist() == [[3.0]]


def test_reading_stops_once_every_variable_is_found(tmp_path):
    path = matfile(tmp_path / "t.mat", matrix(b"x", np.array([[1]], np.uint8)), struct.pack("<II", 14, 10_000))
    assert list(read_mat_arrays(path, ("x",))) == ["x"]
    with pytest.raises(DataError, match="runs past the end"):
        read_mat_arrays(path, ("x", "y"))


# ----------------------------------------------------------------------------------- what is refused
def flags_ok() -> bytes:
    return tag(6, struct.pack("<II", 6, 0))


DAMAGED = {
    "small element over 4 bytes": (small(14, b"abcd", count=5), "corrupt small element \\(5 bytes\\)"),
    "flags of the wrong type": (matrix(b"x", np.zeros((1, 1), np.uint8), flags=tag(5, struct.pack("<II", 6, 0))),
                                "array flags missing"),
    "flags too short": (matrix(b"x", np.zeros((1, 1), np.uint8), flags=small(6, b"\x06\0\0")), "array flags missing"),
    "dimensions of the wrong type": (tag(14, flags_ok() + tag(6, struct.pack("<2i", 1, 1)) + small(1, b"x") + tag(2, b"\0")),
                                     "dimensions missing"),
    "name of the wrong type": (tag(14, flags_ok() + tag(5, struct.pack("<2i", 1, 1)) + small(2, b"x") + tag(2, b"\0")),
                               "name missing"),
    "negative dimension": (matrix(b"x", b"\0" * 2, 2, dims=(2, -1)), "impossible dimensions \\(2, -1\\)"),
    "one dimension": (matrix(b"x", b"\0" * 2, 2, dims=(2,)), "impossible dimensions \\(2,\\)"),
    "more values than dimensions": (matrix(b"x", b"\0" * 5, 2, dims=(2, 2)), "holds 5 values for dimensions \\(2, 2\\)"),
    "fewer values than dimensions": (matrix(b"x", b"\0" * 3, 2, dims=(2, 2)), "holds 3 values for dimensions \\(2, 2\\)"),
    "partial value": (matrix(b"x", b"\0" * 7, 9, dims=(1, 1)), "holds 7 bytes, not a whole number of"),
    "unknown storage type": (matrix(b"x", b"\0" * 8, 8, dims=(1, 1)), "data type code 8, not a numeric MATLAB type"),
    "element tag cut": (tag(14, flags_ok() + tag(5, struct.pack("<2i", 1, 1)) + struct.pack("<I", 1)),
                        "an element tag runs past the end"),
    "element longer than the file": (struct.pack("<II", 14, 64) + b"\0" * 8, "an element of 64 bytes runs past the end"),
    "compressed, corrupt": (struct.pack("<II", 15, 12) + b"not zlib at all!", "corrupt compressed variable"),
    "compressed, cut short": (compressed(matrix(b"x", np.arange(1600).astype(np.uint8).reshape(40, 40)), cut=30),
                              "truncated compressed variable"),
    "compressed, tag cut": (compressed(b"\x0e\0\0"), "truncated compressed variable"),
}


@pytest.mark.parametrize("damage", DAMAGED)
def test_damaged_variables_are_refused_with_the_reason(tmp_path, damage):
    element, reason = DAMAGED[damage]
    path = matfile(tmp_path / "d.mat", element)
    with pytest.raises(DataError, match=f"^{tmp_path / 'd.mat'}: .*{reason}"):
        read_mat_arrays(path, ("x", "y"))


def test_a_compressed_variable_claiming_too_much_is_refused_before_inflating(tmp_path):
    """The inflated size is checked against the expansion limit from the inner tag, before inflating."""
    inner = struct.pack("<II", 14, 1 << 30) + b"\0" * 1000  # claims 1 GiB, holds 1 kB
    path = matfile(tmp_path / "bomb.mat", compressed(inner))
    with pytest.raises(ExpansionRefused, match="a compressed variable: 1,073,741,832 bytes from .*a possible zip bomb"):
        read_mat_arrays(path, ("x",))


def test_files_that_are_not_matlab_5(tmp_path):
    with pytest.raises(DataNotFound, match="file missing"):
        read_mat_arrays(tmp_path / "none.mat", ("x",))
    (tmp_path / "h5.mat").write_bytes(b"MATLAB 7.3 MAT-file" + b"\0" * 200)
    with pytest.raises(DataError, match="MATLAB 7.3 \\(HDF5\\) file; save it in MATLAB 5 format"):
        read_mat_arrays(tmp_path / "h5.mat", ("x",))
    good = matfile(tmp_path / "g.mat").read_bytes()
    for name, data in [("short", good[:127]), ("text", b"x" + good[1:]), ("order", good[:126] + b"XX")]:
        (tmp_path / f"{name}.mat").write_bytes(data)
        with pytest.raises(DataError, match="not a MATLAB 5 .mat file"):
            read_mat_arrays(tmp_path / f"{name}.mat", ("x",))
    (tmp_path / "folder.mat").mkdir()
    with pytest.raises(DataError, match="cannot read"):
        read_mat_arrays(tmp_path / "folder.mat", ("x",))
    assert read_mat_arrays(tmp_path / "g.mat", ("x",)) == {}


def test_a_cut_compressed_variable_says_how_much_is_there(tmp_path):
    inner = matrix(b"x", np.arange(1600).astype(np.uint8).reshape(40, 40))
    z = zlib.compress(inner)[:-30]
    have = len(zlib.decompressobj().decompress(z)) - 8
    path = matfile(tmp_path / "c.mat", struct.pack("<II", 15, len(z)) + z)
    with pytest.raises(DataError, match=rf"truncated compressed variable \({have:,} of {len(inner) - 8:,} bytes\)$"):
        read_mat_arrays(path, ("x",))


def test_a_compressed_variable_one_byte_short(tmp_path):
    inner = matrix(b"x", np.arange(6, dtype=np.uint8).reshape(2, 3))
    n = len(inner) - 8
    path = matfile(tmp_path / "s.mat", compressed(inner[:-1]))  # a whole zlib stream of one byte less
    with pytest.raises(DataError, match=rf"truncated compressed variable \({n - 1:,} of {n:,} bytes\)$"):
        read_mat_arrays(path, ("x",))
