"""Sample encoding/validation, the writer, the manifest, splits and verify (no real files needed)."""

import io
import json
import tarfile

import numpy as np
import pytest
import webdataset as wds

from medfm.shards.manifest import SPLITS, load_manifest, split_for
from medfm.shards.sample import Sample, SampleError, decode_sample, encode_sample, make_meta
from medfm.shards.verify import verify
from medfm.shards.writer import DatasetWriter


def _meta(i=0, split="train", **blocks):
    return make_meta(patient_id=f"p{i}", study_id=f"s{i}", split=split, source={"format": "test", "file": "f"},
                     **blocks)


def _all_modalities(i=0, split="train"):
    rng = np.random.default_rng(i)
    meta = _meta(i, split,
                 image={"photometric": "RGB", "bits": 8, "shape": [6, 5, 3]},
                 volume={"spacing": [2.0, 1.0, 1.0], "orientation": "RAS", "units": "HU", "shape": [3, 4, 5]},
                 signal={"fs": 250.0, "leads": ["I", "II"], "units": ["mV", "mV"]},
                 ehr={"vocab": "ehr", "static": {"SEX": "F"}})
    return Sample(key=f"s{i}-0", meta=meta,
                  image=rng.integers(0, 255, (6, 5, 3), dtype=np.uint8),
                  volume=rng.integers(-1024, 3000, (3, 4, 5)).astype(np.int16),
                  signal=rng.standard_normal((2, 100)).astype(np.float32),
                  ehr=np.array([[-3.0, 2, 1.5, 1], [0.0, 3, 0, 0]], dtype=np.float32),
                  text="a report")


def test_round_trip_every_modality():
    s = _all_modalities()
    members = encode_sample(s)
    assert set(members) == {"__key__", "meta.json", "image.npy", "volume.npy", "signal.npy", "ehr.npy", "text.txt"}
    back = decode_sample(members)
    for m in ("image", "volume", "signal", "ehr"):
        np.testing.assert_array_equal(getattr(back, m), getattr(s, m))
        assert getattr(back, m).dtype == getattr(s, m).dtype
    assert back.text == "a report"
    assert back.meta["modalities"] == ["image", "volume", "signal", "ehr", "text"]


def _members():
    return encode_sample(_all_modalities())


@pytest.mark.parametrize("mutate,reason", [
    (lambda m: m.pop("meta.json"), "missing_meta"),
    (lambda m: m.__setitem__("volume.npy", m["volume.npy"][:-7]), "bad_npy"),
    (lambda m: m.__setitem__("meta.json", b"{not json"), "bad_meta"),
    (lambda m: m.__setitem__("foo.bin", b"x"), "unknown_modality"),
    (lambda m: m.pop("signal.npy"), "missing_member"),
    (lambda m: m.__setitem__("__key__", "a.b"), "bad_key"),
    (lambda m: m.__setitem__("text.txt", b"\xff\xfe\xfa"), "bad_text"),
])
def test_decode_rejects_with_stable_reason(mutate, reason):
    m = _members()
    mutate(m)
    with pytest.raises(SampleError) as e:
        decode_sample(m)
    assert e.value.reason == reason


def _npy(arr, allow_pickle=False):
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=allow_pickle)
    return buf.getvalue()


def test_decode_refuses_pickled_nonfinite_and_bad_shape():
    m = _members()
    m["signal.npy"] = _npy(np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(SampleError) as e:
        decode_sample(m)
    assert e.value.reason == "bad_npy"  # never unpickled
    m = _members()
    bad = np.zeros((2, 100), np.float32)
    bad[0, 3] = np.nan
    m["signal.npy"] = _npy(bad)
    with pytest.raises(SampleError) as e:
        decode_sample(m)
    assert e.value.reason == "nonfinite"
    m = _members()
    m["signal.npy"] = _npy(np.zeros((3, 100), np.float32))  # 3 leads, meta names 2
    with pytest.raises(SampleError) as e:
        decode_sample(m)
    assert e.value.reason == "bad_shape"
    m = _members()
    m["volume.npy"] = _npy(np.zeros((3, 4, 5), np.float64))
    with pytest.raises(SampleError) as e:
        decode_sample(m)
    assert e.value.reason == "bad_dtype"


def test_writer_rolls_shards_and_manifest_counts(tmp_path):
    w = DatasetWriter(tmp_path, max_samples=3)
    for i in range(7):
        w.add(_all_modalities(i, SPLITS[i % 3]))
    w.skip("x.dcm", "not_dicom", "bad")
    man = w.close(vocabularies={"ehr": ["<pad>", "<unk>", "A", "B"]})
    assert [s["samples"] for s in man["shards"]] == [3, 3, 1]
    assert man["totals"]["samples"] == 7 and man["totals"]["splits"] == {"train": 3, "val": 2, "test": 2}
    assert man["shards"][0]["modalities"]["volume"] == 3 and man["skipped"] == {"not_dicom": 1}
    assert load_manifest(tmp_path)["vocabularies"]["ehr"][2] == "A"
    assert not list(tmp_path.glob("*.tmp"))
    # plain webdataset reads the shards
    urls = [str(tmp_path / s["name"]) for s in man["shards"]]
    got = list(wds.WebDataset(urls, shardshuffle=False))
    assert len(got) == 7 and all(decode_sample(g).volume.shape == (3, 4, 5) for g in got)
    assert json.loads(got[0]["meta.json"])["patient_id"] == "p0"


def test_writer_byte_limit_and_refuses_existing(tmp_path):
    w = DatasetWriter(tmp_path, max_bytes=8000)
    for i in range(4):
        w.add(_all_modalities(i))
    man = w.close()
    assert len(man["shards"]) >= 2
    with pytest.raises(FileExistsError):
        DatasetWriter(tmp_path)


def test_writer_is_deterministic(tmp_path):
    hashes = []
    for d in ("a", "b"):
        w = DatasetWriter(tmp_path / d)
        for i in range(3):
            w.add(_all_modalities(i))
        hashes.append([s["sha256"] for s in w.close()["shards"]])
    assert hashes[0] == hashes[1]


def test_abort_leaves_no_partial_shard(tmp_path):
    with pytest.raises(RuntimeError):
        with DatasetWriter(tmp_path) as w:
            w.add(_all_modalities(0))
            raise RuntimeError("crash")
    assert not list(tmp_path.iterdir())


def test_split_is_patient_level_and_follows_ratios():
    ids = [f"p{i}" for i in range(3000)]
    splits = [split_for(p, {"train": 0.8, "val": 0.1, "test": 0.1}, seed=1) for p in ids]
    assert splits == [split_for(p, (0.8, 0.1, 0.1), seed=1) for p in ids]  # pure function
    frac = {s: splits.count(s) / len(ids) for s in SPLITS}
    assert 0.76 < frac["train"] < 0.84 and 0.07 < frac["val"] < 0.13
    assert split_for("p1", (0, 0, 1)) == "test"
    with pytest.raises(ValueError):
        split_for("p1", (1, 2))


def test_verify_catches_a_flipped_byte(tmp_path):
    w = DatasetWriter(tmp_path)
    for i in range(3):
        w.add(_all_modalities(i))
    man = w.close()
    assert verify(tmp_path)[0] == []
    path = tmp_path / man["shards"][0]["name"]
    data = bytearray(path.read_bytes())
    with tarfile.open(path) as tar:  # flip a byte inside the first volume payload
        info = next(i for i in tar.getmembers() if i.name.endswith("volume.npy"))
    data[info.offset_data + 200] ^= 0xFF
    path.write_bytes(bytes(data))
    problems, _ = verify(tmp_path)
    assert {p.reason for p in problems} == {"checksum_mismatch"}
    data[info.offset_data + 2] ^= 0xFF  # now also corrupt the npy magic: the sample itself is rejected
    path.write_bytes(bytes(data))
    reasons = {p.reason for p in verify(tmp_path)[0]}
    assert {"checksum_mismatch", "bad_npy", "count_mismatch"} <= reasons
