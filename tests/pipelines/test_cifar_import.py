"""CIFAR-FS and FC100 from a small copy of the official CIFAR-100 archive: the published splits,
counts, pixels, digests, --verify, resuming, and one-line refusals of bad archives."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from fake_benchmarks import (CIFAR100_COARSE, CIFAR100_FINE, CIFAR100_SUPERCLASS, cifar100_image,
                             evil_pickle, py2_pickle, write_cifar100_archive)
from data_cli_checks import one_line_refusal, refuses_bad_archive, run
from pipelines import safe_pickle, staging
from pipelines.cifar import import_cifar_fs
from pipelines.dataset import DatasetError, read_manifest

# Bertinetto et al.'s val and test classes (their split files; train is the other 64).
CIFAR_FS_VAL = ["beaver", "camel", "cattle", "crab", "crocodile", "beetle", "butterfly", "flatfish",
                "lamp", "maple_tree", "motorcycle", "otter", "sea", "shark", "television", "tractor"]
CIFAR_FS_TEST = ["baby", "bed", "bicycle", "chimpanzee", "fox", "leopard", "man", "pickup_truck",
                 "plain", "poppy", "rocket", "rose", "snail", "sweet_pepper", "table", "telephone",
                 "wardrobe", "whale", "woman", "worm"]
# Oreshkin et al.'s FC100 split: CIFAR-100 coarse label ids (TADAM's create_dataset_cifar100.py).
FC100_IDS = {"train": [1, 2, 3, 4, 5, 6, 9, 10, 15, 17, 18, 19], "val": [8, 11, 13, 16],
             "test": [0, 7, 12, 14]}


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """cifar-100-python.tar.gz with all 100 classes, one training and one test image each."""
    return write_cifar100_archive(tmp_path_factory.mktemp("cifar") / "cifar-100-python.tar.gz")


@pytest.fixture(scope="module")
def cifar_fs(archive: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("imports") / "cifar-fs"
    result = run("import", "cifar-fs", archive, "--out", out)
    assert result.exit_code == 0, result.output
    assert "cifar-fs, 20 superclasses, 100 classes, 200 images, 3x32x32" in result.output
    return out


def classes_by_split(out: Path) -> dict[str, set[str]]:
    rows = pq.read_table(out / "images.parquet", columns=["class_name", "split"]).to_pylist()
    found: dict[str, set[str]] = {}
    for row in rows:
        found.setdefault(row["split"], set()).add(row["class_name"])
    return found


def test_cifar_fs_is_the_published_split(cifar_fs: Path, archive: Path):
    found = classes_by_split(cifar_fs)
    assert found["val"] == set(CIFAR_FS_VAL) and found["test"] == set(CIFAR_FS_TEST)
    assert found["train"] == set(CIFAR100_FINE) - set(CIFAR_FS_VAL) - set(CIFAR_FS_TEST)
    manifest = read_manifest(cifar_fs)
    assert {s: (v["classes"], v["images"]) for s, v in manifest["splits"].items()} == {
        "train": (64, 128), "val": (16, 32), "test": (20, 40)}
    # Both of CIFAR-100's own files feed every split, and the alphabet column is the superclass.
    table = pq.read_table(cifar_fs / "images.parquet",
                          columns=["class_name", "alphabet", "source", "pixels"]).to_pylist()
    assert {r["source"].split("#")[0] for r in table} == {
        "cifar-100-python.tar.gz:cifar-100-python/train", "cifar-100-python.tar.gz:cifar-100-python/test"}
    assert all(r["alphabet"] == CIFAR100_SUPERCLASS[r["class_name"]] for r in table)
    # At 32x32 nothing is resampled: stored pixels are the archive's rows ([C, H, W] both).
    whale = CIFAR100_FINE.index("whale")
    rows = [r for r in table if r["class_name"] == "whale"]
    assert [r["source"].rsplit("/", 1)[1] for r in rows] == [f"train#{whale}", f"test#{whale}"]
    for image, row in enumerate(rows):  # image 0 is in the archive's train file, 1 in test
        assert np.array_equal(np.asarray(row["pixels"], np.uint8), cifar100_image(whale, image))
    definition = manifest["split_rule"]["definition"]
    assert definition["file"] == "pipelines/splits/cifar_fs.json" and "Bertinetto" in definition["paper"]
    source = manifest["sources"][0]
    assert source["sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest()
    assert source["official_release"] is False and source["images"] == 200
    assert manifest["duplicates_kept"] == 0 and manifest["preprocessing"]["normalization"] == \
        "train split mean/std"


def test_verify_and_info(cifar_fs: Path):
    result = run("info", cifar_fs, "--verify", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["verified"] is True and info["superclasses"] == 20
    assert info["splits"]["test"]["superclasses"] == sorted({CIFAR100_SUPERCLASS[c] for c in CIFAR_FS_TEST})
    text = run("info", cifar_fs).output
    assert "not the official release's digest" in text and "split rule:" in text
    damaged = cifar_fs.parent / "damaged"
    damaged.mkdir()
    for name in ("images.parquet", "images.arrow", "manifest.json"):
        (damaged / name).write_bytes((cifar_fs / name).read_bytes())
    arrow = bytearray((damaged / "images.arrow").read_bytes())
    arrow[5000] ^= 0xFF
    (damaged / "images.arrow").write_bytes(bytes(arrow))
    assert "images.arrow: sha256" in one_line_refusal(run("info", damaged, "--verify"))


def test_fc100_is_split_by_superclass(archive: Path, tmp_path: Path):
    result = run("import", "fc100", archive, "--out", tmp_path / "fc100", "--size", "16")
    assert result.exit_code == 0, result.output
    manifest = read_manifest(tmp_path / "fc100")
    for split, ids in FC100_IDS.items():
        assert manifest["splits"][split]["superclasses"] == sorted(CIFAR100_COARSE[i] for i in ids)
    found = classes_by_split(tmp_path / "fc100")
    for split, ids in FC100_IDS.items():
        assert found[split] == {c for c in CIFAR100_FINE if CIFAR100_COARSE.index(CIFAR100_SUPERCLASS[c]) in ids}
    assert {s: v["classes"] for s, v in manifest["splits"].items()} == {"train": 60, "val": 20, "test": 20}
    assert manifest["shape"] == [3, 16, 16] and manifest["kind"] == "fc100"


def test_unpacked_folder_gives_the_same_rows(archive: Path, cifar_fs: Path, tmp_path: Path):
    folder = write_cifar100_archive(tmp_path / "unpacked", unpacked=True)
    import_cifar_fs(folder.parent, tmp_path / "out")
    columns = ["pixels", "class_name", "split", "sha256"]
    assert pq.read_table(tmp_path / "out" / "images.parquet", columns=columns).equals(
        pq.read_table(cifar_fs / "images.parquet", columns=columns))
    sources = read_manifest(tmp_path / "out")["sources"]
    assert [Path(s["path"]).name for s in sources] == ["train", "test", "meta"]
    assert all(s["sha256"] == hashlib.sha256(Path(s["path"]).read_bytes()).hexdigest() for s in sources)


def test_interrupted_import_resumes_where_it_stopped(archive: Path, cifar_fs: Path, tmp_path: Path,
                                                     monkeypatch):
    monkeypatch.setattr(staging, "PART_ROWS", 10)  # a part every 5 classes
    out = tmp_path / "out"

    def interrupt(done: int, total: int) -> None:
        if done >= 64:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        import_cifar_fs(archive, out, progress=interrupt)
    parts = sorted(p.name for p in (out / staging.STAGING).glob("part-*.arrow"))
    assert parts and not (out / "manifest.json").exists()
    assert "an unfinished import" in one_line_refusal(run("info", out))
    seen, lines = [], []
    manifest = import_cifar_fs(archive, out, progress=lambda done, total: seen.append(done),
                               log=lines.append)
    assert lines and lines[0].startswith(f"resuming: {len(parts) * 5} of 100 classes")
    assert seen[0] == len(parts) * 10  # only the rest was converted
    assert not (out / staging.STAGING).exists()
    expected = read_manifest(cifar_fs)["files"]  # the same bytes as the import made in one go
    assert {n: f["sha256"] for n, f in manifest["files"].items()} == {n: f["sha256"] for n, f in expected.items()}
    # Parts of another import (other options) are discarded, not mixed in.
    with pytest.raises(KeyboardInterrupt):
        import_cifar_fs(archive, tmp_path / "other", progress=interrupt)
    lines.clear()
    import_cifar_fs(archive, tmp_path / "other", size=16, log=lines.append)
    assert lines[0].startswith("discarding the unfinished import")
    assert read_manifest(tmp_path / "other")["shape"] == [3, 16, 16]


def _renamed_whale(members: dict[str, bytes]) -> dict[str, bytes]:
    fine = [n.encode() for n in CIFAR100_FINE]
    fine[CIFAR100_FINE.index("whale")] = b"orca"
    coarse = [n.encode() for n in CIFAR100_COARSE]
    return {**members, "cifar-100-python/meta": py2_pickle({b"fine_label_names": fine,
                                                             b"coarse_label_names": coarse})}


BAD_ARCHIVES = {
    "truncated": (lambda m, a: a.read_bytes()[: len(a.read_bytes()) // 2],
                  "truncated or damaged archive"),
    "foreign": (lambda m, a: {"cifar-10-batches-py/data_batch_1": m["cifar-100-python/train"]},
                "not the CIFAR-100 python archive: no cifar-100-python/train"),
    "missing class": (lambda m, a: _renamed_whale(m),
                      "class 'whale' of the published CIFAR-FS split is not in the archive"),
    "zip slip": (lambda m, a: {**m, "cifar-100-python/../../evil.sh": b"rm -rf ~"},
                 "member 'cifar-100-python/../../evil.sh' points outside the archive"),
    "symlink": (lambda m, a: (m, {"cifar-100-python/link": "/etc/passwd"}),
                "member 'cifar-100-python/link' is a symbolic link"),
    "code in a pickle": (lambda m, a: {**m, "cifar-100-python/meta": evil_pickle()},
                         "the pickle asks for posix.system, which orch does not load"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARCHIVES))
def test_bad_archives_are_refused_in_one_line(case: str, archive: Path, tmp_path: Path):
    make, message = BAD_ARCHIVES[case]
    refuses_bad_archive(make, message, archive=archive, bad=tmp_path / "cifar-100-python.tar.gz",
                        command="cifar-fs")


def test_restricted_unpickler_admits_data_only():
    data = {"a": np.arange(6, dtype=np.uint8).reshape(2, 3), "b": [b"x", 1.5, (2,)], "c": {1}}
    for protocol in (2, 4, 5):
        loaded = safe_pickle.load(pickle.dumps(data, protocol=protocol), name="ok.pkl")
        assert np.array_equal(loaded["a"], data["a"]) and loaded["b"] == data["b"]
    with pytest.raises(DatasetError, match=r"objects\.pkl: the pickle asks for a NumPy array of Python objects"):
        safe_pickle.load(pickle.dumps(np.array([{}], dtype=object)), name="objects.pkl")
    with pytest.raises(DatasetError, match=r"x\.pkl: the pickle asks for builtins\.eval"):
        safe_pickle.load(b"\x80\x04cbuiltins\neval\nX\x01\x00\x00\x001\x85R.", name="x.pkl")
    with pytest.raises(DatasetError, match=r"t\.pkl: unreadable pickle"):
        safe_pickle.load(pickle.dumps(data)[:40], name="t.pkl")
