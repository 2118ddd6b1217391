"""The loader in real torchrun worlds: 2 ranks (gloo) x 2 DataLoader workers each.

Three launches share one module-scoped set of fixtures: (1) an epoch-mode run over a directory with planted corrupt
shards, (2) a weighted-plan, weighted-mix resampled run that snapshots its state mid-way, (3) a run resumed from that
snapshot. Every launch has a subprocess timeout, so a hang fails the test instead of blocking CI.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from shards_loader_support import make_dataset, plant_corruption

from medfm.pretrain.world_env import env_outside_world

pytestmark = pytest.mark.slow

HELPER = Path(__file__).with_name("shards_loader_support.py")
TIMEOUT_S = 240


def _torchrun(tmp: Path, name: str, loader: dict, **spec) -> list[dict]:
    spec_path = tmp / f"{name}.json"
    out = str(tmp / f"{name}-rank{{rank}}.json")
    spec_path.write_text(json.dumps({"loader": loader, "out": out, **spec}))
    env = {**env_outside_world(), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HELPER.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(HELPER),
           str(spec_path)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"torchrun {name} did not finish in {TIMEOUT_S}s (hang?):\n{(exc.stderr or '')[-3000:]}")
    assert proc.returncode == 0, f"torchrun {name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return [json.loads(Path(out.format(rank=r)).read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("loader_dist")


def test_epochs_cover_every_good_sample_once_despite_planted_corruption(tmp):
    keys = make_dataset(tmp / "bad", 40, prefix="g", per_shard=6)
    planted, lost = plant_corruption(tmp / "bad")
    loader = {"sources": [{"path": str(tmp / "bad")}], "batch_size": 3, "num_workers": 2, "seed": 7,
              "on_missing_shard": "skip"}
    ranks = _torchrun(tmp, "epochs", loader, epochs=2)
    spe = ranks[0]["steps_per_epoch"]
    assert spe == -(-(40 - lost["size_mismatch"] + 5) // 6)  # bad shards left out before step 1, counted
    assert all(r["state"]["lost"] == {"bad": lost} for r in ranks)
    for r in ranks:
        assert [s["step"] for s in r["steps"]] == list(range(2 * spe))  # equal step counts on both ranks
        assert all(len(s["keys"]) == 3 for s in r["steps"])
    good = 40 - lost["size_mismatch"]
    for epoch in range(2):
        fresh = [k for r in ranks for s in r["steps"][epoch * spe:(epoch + 1) * spe]
                 for k, rs in zip(s["keys"], s["resampled"]) if not rs]
        assert len(fresh) == len(set(fresh)) == good and set(fresh) <= set(keys)  # disjoint, exactly once
    for r in ranks:
        for a, b in zip(ranks[0]["steps"], r["steps"]):
            assert (a["step"], a["group"], a["modalities"]) == (b["step"], b["group"], b["modalities"])
    # each corrupt sample counted once per epoch at its place in the order, summed over ranks (an all_gather)
    assert ranks[0]["all_bad_in_order"] == {k: 2 * v for k, v in planted.items()}
    total = Counter(ranks[0]["counters"]) + Counter(ranks[1]["counters"])
    assert dict(total) == ranks[0]["all_counters"] and set(total) == set(planted)


@pytest.fixture(scope="module")
def mixed(tmp):
    make_dataset(tmp / "it", 30, prefix="it", modalities=("image", "text"), per_shard=8)
    make_dataset(tmp / "vol", 12, prefix="vol", modalities=("volume",), per_shard=5)
    make_dataset(tmp / "sig", 10, prefix="sig", modalities=("signal",), per_shard=5)
    make_dataset(tmp / "ecg", 10, prefix="ecg", modalities=("signal", "text"), per_shard=5)
    groups = [{"name": "img_txt", "modalities": ["image", "text"], "objectives": ["contrastive"], "weight": 0.5},
              {"name": "vol", "modalities": ["volume"], "objectives": ["mae"], "weight": 0.3},
              {"name": "sig", "modalities": ["signal", "text"], "objectives": ["mae"], "weight": 0.2}]
    loader = {"sources": [{"path": str(tmp / "it")}, {"path": str(tmp / "vol")},
                          {"path": str(tmp / "sig"), "weight": 1, "group": "sig"},
                          {"path": str(tmp / "ecg"), "weight": 3, "group": "sig"}],
              "batch_size": 4, "num_workers": 2, "seed": 11, "mode": "resampled",
              "plan": {"policy": "weighted", "groups": groups, "seed": 11},
              "augment": {"enabled": True, "signal_lead_dropout_p": 0.3}}
    return loader, _torchrun(tmp, "mixed", loader, stop_at=200, snapshot_at=80)


def test_plans_agree_across_ranks_and_mixing_follows_the_weights(mixed):
    _, ranks = mixed
    a, b = ranks[0]["steps"], ranks[1]["steps"]
    assert [s["step"] for s in a] == [s["step"] for s in b] == list(range(200))
    groups, sources = Counter(), Counter()
    for sa, sb in zip(a, b):
        assert (sa["group"], sa["modalities"]) == (sb["group"], sb["modalities"])  # same towers on every rank
        prefixes = {k.split("_")[0] for k in sa["keys"] + sb["keys"]}
        expected = {"img_txt": {"it"}, "vol": {"vol"}, "sig": {"sig", "ecg"}}[sa["group"]]
        assert prefixes <= expected
        groups[sa["group"]] += 1
        if sa["group"] == "sig":
            sources.update(k.split("_")[0] for k in sa["keys"] + sb["keys"])
            # the "signal"-only source has no text: it must show up masked, not missing
            for s in (sa, sb):
                assert s["present"]["text"] == [not k.startswith("sig_") for k in s["keys"]]
    for g, w in (("img_txt", 0.5), ("vol", 0.3), ("sig", 0.2)):
        assert abs(groups[g] / 200 - w) < 0.1, groups
    assert abs(sources["ecg"] / (sources["ecg"] + sources["sig"]) - 0.75) < 0.05, sources


def test_resume_from_a_mid_run_state_reproduces_the_sequence(tmp, mixed):
    loader, ranks = mixed
    snapshots = {str(r["rank"]): r["snapshot"] for r in ranks}
    assert all(s["step"] == 80 for s in snapshots.values())
    (tmp / "snap.json").write_text(json.dumps(snapshots))
    resumed = _torchrun(tmp, "resumed", loader, stop_at=200, resume_state=str(tmp / "snap.json"))
    for r in range(2):
        tail = [s for s in ranks[r]["steps"] if s["step"] >= 80]
        assert resumed[r]["steps"] == tail
