"""No silent data loss: a deleted, garbage or truncated shard is an error naming it before step 1 (or, with
``on_missing_shard: skip``, a counted loss in the state and the fingerprint); a member whose bytes differ from the
manifest's per-member checksum is a counted skip, never trained on."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from shards_loader_support import make_dataset

from medfm.pretrain.world_env import env_outside_world
from medfm.shards.loader import LoaderConfig, ShardLoader, SourceConfig
from medfm.shards.preflight import ShardCheckError

# Mixed-split shards, as the demo's mri2d set has: the loader scans them per sample, where bad shards used to vanish.
SPLITS = ["train" if i % 4 else "val" for i in range(24)]


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    d = tmp_path_factory.mktemp("pre") / "ds"
    make_dataset(d, 24, prefix="p", per_shard=6, splits=SPLITS)
    return d


def _copy(clean, tmp_path) -> Path:
    d = tmp_path / "ds"
    shutil.copytree(clean, d)
    return d


def _loader(d, **kw) -> ShardLoader:
    return ShardLoader(LoaderConfig(sources=[SourceConfig(str(d))], batch_size=3, num_workers=0, **kw),
                       rank=0, world_size=1)


def _delete(path: Path):
    path.unlink()


def _garbage_same_size(path: Path):
    path.write_bytes(np.random.default_rng(1).bytes(path.stat().st_size))


def _garbage(path: Path):
    path.write_bytes(np.random.default_rng(2).bytes(3000))


def _truncate_mid_member(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 100])


@pytest.mark.parametrize("damage, reason", [(_delete, "missing_shard"), (_garbage_same_size, "unreadable_shard"),
                                            (_garbage, "size_mismatch"), (_truncate_mid_member, "size_mismatch")])
def test_a_bad_shard_is_an_error_naming_it_or_a_counted_loss(clean, tmp_path, damage, reason):
    full = len(_loader(clean).sources[0])
    fingerprint = _loader(clean).sources[0].fingerprint
    d = _copy(clean, tmp_path)
    damage(d / "p-000001.tar")
    with pytest.raises(ShardCheckError, match=rf"p-000001.tar: {reason}.*on_missing_shard=skip"):
        _loader(d)
    ld = _loader(d, on_missing_shard="skip")
    src = ld.sources[0]
    in_split = json.loads((d / "manifest.json").read_text())["shards"][1]["splits"]["train"]
    assert src.lost == {reason: in_split} and len(src) == full - in_split
    assert ld.lost() == {"ds": {reason: in_split}} and ld.state_dict()["lost"] == ld.lost()
    assert src.fingerprint != fingerprint  # a resume onto the damaged set is noticed
    keys = [k for b in ld for k in b["keys"]]
    assert keys and not any(k.startswith("p_") and 6 <= int(k.split("_")[1]) < 12 for k in keys)
    # a clean set keeps its fingerprint under skip (nothing dropped): checkpoints of older runs still resume
    assert _loader(clean, on_missing_shard="skip").sources[0].fingerprint == fingerprint


def _flip_npy_data(path: Path, key: str) -> None:
    """Overwrite the last bytes of ``key``'s image.npy inside the tar: it still decodes, to other pixels."""
    from medfm.shards.stream import index_tar

    key_, members = next(s for s in index_tar(str(path)).samples if s[0] == key)
    _, offset, size = next(m for m in members if m[0] == "image.npy")
    with open(path, "r+b") as f:
        f.seek(offset + size - 8)
        f.write(b"\x01\x02\x03\x04\x05\x06\x07\x08")


def test_npy_bytes_that_decode_but_differ_from_the_manifest_are_a_counted_skip(clean, tmp_path):
    d = _copy(clean, tmp_path)
    _flip_npy_data(d / "p-000000.tar", "p_1")
    ld = _loader(d)
    keys = [k for _ in range(2) for b in ld for k in b["keys"]]
    assert "p_1" not in keys
    # met once per epoch at its own place in the order (2 epochs), plus any replacement draws that hit it
    assert ld.bad_in_order.counts["checksum_mismatch"] == 2 and ld.counters.counts["checksum_mismatch"] >= 2


def test_a_manifest_without_member_checksums_still_loads(clean, tmp_path):
    d = _copy(clean, tmp_path)
    manifest = json.loads((d / "manifest.json").read_text())
    for s in manifest["shards"]:
        del s["members"]
    (d / "manifest.json").write_text(json.dumps(manifest))
    ld = _loader(d)
    assert ld.sources[0].checksums is None and len(list(ld)) == ld.steps_per_epoch


def test_pretrain_exits_1_with_one_line_naming_the_shard(tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).parent))
    import yaml
    from pretrain_support import make_shards, run_config

    from medfm.launch.cli import main

    data = Path(make_shards(tmp_path / "shards", n=8, modalities=("image",), per_shard=4))
    (data / "ds-000001.tar").unlink()
    cfg = run_config(tmp_path / "run", str(data), [{"name": "mae:image"}], ("image",), batch=4, steps=1,
                     train={"strategy": "ddp"})
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["pretrain", str(tmp_path / "run.yaml")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ds-000001.tar: missing_shard" in err[0], err


def test_skip_mode_run_reports_the_loss_in_log_metrics_and_checkpoint(tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).parent))
    from pretrain_support import make_shards, run_config

    from medfm.pretrain.config import RunConfig
    from medfm.pretrain.train import run
    from medfm.schema import from_dict

    data = Path(make_shards(tmp_path / "shards", n=12, modalities=("image",), per_shard=4))
    (data / "ds-000002.tar").write_bytes(b"not a tar")
    cfg = run_config(tmp_path / "run", str(data), [{"name": "mae:image"}], ("image",), batch=4, steps=2,
                     train={"strategy": "ddp"}, checkpoint={"final": True})
    cfg["data"]["on_missing_shard"] = "skip"
    assert run(from_dict(RunConfig, cfg)).status == "finished"
    assert "4 samples left out before step 1" in capsys.readouterr().err
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["lost/shards/size_mismatch"] == 4
    client = json.loads((tmp_path / "run" / "checkpoints" / "step2" / "client" / "rank0.json").read_text())
    assert client["data_lost"] == {"shards": {"size_mismatch": 4}} and client["loader"]["lost"] == client["data_lost"]


def test_launch_stops_on_a_bad_shard_before_starting_ranks(tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).parent))
    import yaml
    from pretrain_support import make_shards, run_config

    from medfm.launch.cli import main

    data = Path(make_shards(tmp_path / "shards", n=8, modalities=("image",), per_shard=4))
    (data / "ds-000000.tar").write_bytes(b"junk")
    cfg = run_config(tmp_path / "run", str(data), [{"name": "mae:image"}], ("image",), batch=4, steps=1,
                     train={"strategy": "ddp"})
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["launch", str(tmp_path / "run.yaml"), "--nproc-per-node", "2", "--max-restarts", "3",
                 "--dry-run"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ds-000000.tar: size_mismatch" in err[0], err


@pytest.mark.slow
def test_mid_run_skips_are_summed_over_ranks_in_logs_and_checkpoint(tmp_path):
    """2 ranks (torchrun, DDP): a shard with bad samples (valid tar, right size) is met by both ranks; the logged
    ``skipped_<reason>`` and the checkpoint's ``skipped_all_ranks`` are the sum of the ranks' own counters."""
    import subprocess

    sys.path.insert(0, str(Path(__file__).parent))
    from pretrain_support import make_shards, run_config
    from test_pretrain_loop import _plant_bad_shard

    data = Path(make_shards(tmp_path / "shards", n=8, modalities=("image",), per_shard=4))
    _plant_bad_shard(data)
    cfg = run_config(tmp_path / "run", str(data), [{"name": "mae:image"}], ("image",), batch=2, steps=6,
                     train={"strategy": "ddp"}, checkpoint={"final": True})
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"phases": [{"config": cfg}], "out": str(tmp_path / "out.json")}))
    helper = Path(__file__).with_name("pretrain_support.py")
    env = {**env_outside_world(), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(helper.parent)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(helper), str(spec)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ck = tmp_path / "run" / "checkpoints" / "step6" / "client"
    per_rank = [json.loads((ck / f"rank{r}.json").read_text()) for r in range(2)]
    summed: dict[str, int] = {}
    for c in per_rank:
        for k, v in c["loader"]["counters"].items():
            summed[k] = summed.get(k, 0) + v
    assert all(c["loader"]["counters"] for c in per_rank), per_rank  # both ranks met bad samples
    assert per_rank[0]["skipped_all_ranks"] == per_rank[1]["skipped_all_ranks"] == summed
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {k[len("skipped_"):]: v for k, v in last.items() if k.startswith("skipped_") and k != "skipped_steps"} \
        == summed
