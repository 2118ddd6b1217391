"""Single-process tests of the streaming loader: plans, mixing, collation, augmentation, order, resume, faults.

Ranks are simulated in-process (``ShardLoader(rank=r, world_size=w)``); the real torchrun worlds are in
test_shards_loader_dist.py.
"""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
from shards_loader_support import make_dataset, make_sample, plant_corruption

from medfm.schema import ConfigError, from_dict
from medfm.shards.augment import AugmentConfig, augment_sample
from medfm.shards.collate import ByteTokenizer, CollateConfig, collate
from medfm.shards.loader import LoaderConfig, ShardLoader, SourceConfig, build_loader
from medfm.shards.mix import allocate, normalize_weights, rng_for
from medfm.shards.plan import GroupConfig, PlanConfig, StepPlan, StepPlanner

# ------------------------------------------------------------------------------------------------------------------
# plans and mixing


def _groups():
    return [GroupConfig("img_txt", ["text", "image"], ["contrastive", "caption"], 0.5),
            GroupConfig("vol", ["volume"], ["mae"], 0.3), GroupConfig("sig", ["signal"], ["mae"], 0.2)]


def test_plan_all_is_union_in_canonical_order():
    p = StepPlanner(PlanConfig(policy="all", groups=_groups()))(7)
    assert p == StepPlan(7, ("image", "volume", "signal", "text"), ("contrastive", "caption", "mae"), "all")


def test_plan_round_robin_and_weighted_are_pure_functions_of_seed_and_step():
    rr = StepPlanner(PlanConfig(policy="round_robin", groups=_groups()))
    assert [rr(s).group for s in range(5)] == ["img_txt", "vol", "sig", "img_txt", "vol"]
    assert rr(0).modalities == ("image", "text")
    w1 = StepPlanner(PlanConfig(policy="weighted", groups=_groups(), seed=3))
    w2 = StepPlanner(PlanConfig(policy="weighted", groups=_groups(), seed=3))
    groups = [w1(s).group for s in range(4000)]
    assert groups == [w2(s).group for s in range(4000)]          # another "rank" computes the same plans
    assert [w1(s).group for s in range(3000, 3010)] == groups[3000:3010]  # no history needed (resume)
    freq = Counter(groups)
    for g, w in (("img_txt", 0.5), ("vol", 0.3), ("sig", 0.2)):
        assert abs(freq[g] / 4000 - w) < 0.03, freq
    other = [StepPlanner(PlanConfig(policy="weighted", groups=_groups(), seed=4))(s).group for s in range(200)]
    assert other != groups[:200]


@pytest.mark.parametrize("bad, msg", [
    ({"policy": "sometimes"}, "policy"),
    ({"groups": [{"name": "a", "modalities": ["xray"]}]}, "unknown modality"),
    ({"groups": [{"name": "a", "modalities": ["image"]}, {"name": "a", "modalities": ["text"]}]}, "duplicate"),
    ({"policy": "round_robin"}, "needs plan.groups"),
])
def test_plan_config_errors_name_the_field(bad, msg):
    with pytest.raises(ConfigError, match=msg):
        from_dict(PlanConfig, bad, "plan")


def test_allocate_counts_stay_within_one_of_the_target():
    w = normalize_weights([5, 2, 2, 1])
    total = np.zeros(4)
    for step in range(500):
        src = allocate(w, 16, 0, step)
        counts = np.bincount(src, minlength=4)
        assert np.all(np.abs(counts - 16 * w) < 1.0 + 1e-9), counts
        total += counts
        np.testing.assert_array_equal(src, allocate(w, 16, 0, step))
    np.testing.assert_allclose(total / total.sum(), w, atol=0.01)


# ------------------------------------------------------------------------------------------------------------------
# collate and augment


def test_collate_pads_masks_and_makes_dummies_for_absent_modalities():
    samples = [make_sample("a", ("image", "signal", "text"), seed=1, label=3),
               make_sample("b", ("ehr",), seed=2),
               make_sample("c", ("signal", "ehr", "text"), seed=3, label=1)]
    plan = StepPlan(0, ("image", "volume", "signal", "ehr", "text"), ("x",), "all")
    b = collate(samples, plan, CollateConfig(volume_size=[2, 3, 3]), ByteTokenizer(16))
    assert b["image"].shape == (3, 1, 8, 10) and b["image_present"].tolist() == [True, False, False]
    assert torch.all(b["image"][1:] == 0)
    assert b["volume"].shape == (3, 1, 2, 3, 3) and not b["volume_present"].any()
    t_a, t_c = samples[0].signal.shape[1], samples[2].signal.shape[1]
    assert b["signal"].shape == (3, 2, max(t_a, t_c))
    assert b["signal_valid"].sum(1).tolist() == [t_a, 0, t_c]
    assert b["signal_leads"].tolist() == [[True, True], [False, False], [True, True]]
    n_b, n_c = len(samples[1].ehr), len(samples[2].ehr)
    assert b["ehr_valid"].sum(1).tolist() == [0, n_b, n_c] and b["ehr_codes"].dtype == torch.long
    assert torch.equal(b["ehr_codes"][1, :n_b], torch.from_numpy(samples[1].ehr[:, 1]).long())
    assert b["text_present"].tolist() == [True, False, True] and not b["text_valid"][1].any()
    assert b["text"][0] == "report of a"
    assert b["keys"] == ["a", "b", "c"] and b["plan"] is plan
    assert b["labels"]["idx"][0] == 3 and math.isnan(b["labels"]["idx"][1]) and b["labels"]["idx"][2] == 1
    # a plan without a modality leaves its keys out
    b2 = collate(samples, StepPlan(1, ("ehr",), (), "g"), CollateConfig())
    assert "image" not in b2 and "text_ids" not in b2 and "ehr_codes" in b2


def test_collate_fixed_image_size_and_hu_window():
    s = make_sample("a", ("image", "volume"), seed=0)
    b = collate([s], StepPlan(0, ("image", "volume"), (), "all"),
                CollateConfig(image_size=[4, 12], image_channels=3, volume_size=[4, 6, 6]))
    assert b["image"].shape == (1, 3, 4, 12)
    assert torch.all(b["image"][0, :, :, 10:] == (0 - 0.5) / 0.25)  # zero-padded columns, normalised
    expected = np.clip((s.volume.astype(np.float32) + 1000) / 2000, 0, 1)
    np.testing.assert_allclose(b["volume"][0, 0].numpy(), expected, atol=1e-6)


def test_augment_is_seeded_and_masks_dropped_leads():
    s = make_sample("a", ("image", "signal", "ehr"), seed=5)
    cfg = AugmentConfig(enabled=True, image_flip_p=0.5, signal_lead_dropout_p=0.5, ehr_event_dropout_p=0.5)
    ccfg = CollateConfig(image_size=[6, 6], signal_length=10)
    a1 = augment_sample(s, rng_for(1, 2, 3), cfg, ccfg)
    a2 = augment_sample(s, rng_for(1, 2, 3), cfg, ccfg)
    assert np.array_equal(a1.image, a2.image) and np.array_equal(a1.signal, a2.signal)
    assert a1.image.shape == (6, 6, 1) and a1.signal.shape == (2, 10)
    assert s.image.shape == (8, 10, 1) and "lead_mask" not in s.meta["signal"]  # input untouched
    outs = [augment_sample(s, rng_for(k), cfg, ccfg) for k in range(40)]
    assert len({o.image.tobytes() for o in outs}) > 1
    for o in outs:
        mask = np.asarray(o.meta["signal"]["lead_mask"])
        assert mask.any() and np.all(o.signal[~mask] == 0)
        assert 1 <= len(o.ehr) <= len(s.ehr)
    b = collate(outs[:4], StepPlan(0, ("signal",), (), "g"), ccfg)
    assert b["signal_leads"].tolist() == [o.meta["signal"]["lead_mask"] for o in outs[:4]]


# ------------------------------------------------------------------------------------------------------------------
# the loader, ranks simulated in-process


def _run(cfg: LoaderConfig, world: int, epochs: int = 1, stop_at: int | None = None, state=None):
    """Per rank: list of (step, keys, resampled, image checksum) and the loader."""
    out = []
    for rank in range(world):
        ld = ShardLoader(cfg, rank=rank, world_size=world)
        if state is not None:
            ld.load_state_dict(state[rank])
        seq = []
        while ld.step < epochs * ld.steps_per_epoch and (stop_at is None or ld.step < stop_at):
            for b in ld:
                # the pixel checksum: augmented tensors must resume exactly too
                pix = float(b["image"].double().sum()) if "image" in b else None
                seq.append((b["plan"].step, b["keys"], b["resampled"].tolist(), pix))
                if stop_at is not None and ld.step >= stop_at:
                    break
        out.append((seq, ld))
    return out


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    d = tmp_path_factory.mktemp("loader") / "ds"
    keys = make_dataset(d, 37, prefix="ds", per_shard=5)
    return d, keys


def test_epoch_covers_every_sample_once_with_equal_steps(ds):
    d, keys = ds
    cfg = LoaderConfig(sources=[SourceConfig(str(d))], batch_size=3, num_workers=2, seed=1)
    runs = _run(cfg, world=2, epochs=2)
    spe = runs[0][1].steps_per_epoch
    assert spe == math.ceil(37 / 6)
    for seq, _ in runs:
        assert [s for s, *_ in seq] == list(range(2 * spe))      # equal, in order, for every rank
        assert all(len(k) == 3 for _, k, *_ in seq)
    for epoch in range(2):
        fresh, pads = [], []
        for seq, _ in runs:
            for _step, ks, rs, _ in seq[epoch * spe:(epoch + 1) * spe]:
                fresh += [k for k, r in zip(ks, rs) if not r]
                pads += [k for k, r in zip(ks, rs) if r]
        assert sorted(fresh) == sorted(keys)                      # exactly once
        assert len(pads) == spe * 6 - 37
    e0 = [k for seq, _ in runs for _, ks, *_ in seq[:spe] for k in ks]
    e1 = [k for seq, _ in runs for _, ks, *_ in seq[spe:] for k in ks]
    assert e0 != e1                                               # reshuffled each epoch


def test_no_shuffle_reads_in_manifest_order(ds):
    d, keys = ds
    (seq, _), = _run(LoaderConfig(sources=[SourceConfig(str(d))], batch_size=4, num_workers=0, shuffle=False,
                                  drop_last=True), world=1)
    assert [k for _, ks, *_ in seq for k in ks] == keys[:36]


def test_shuffle_window_keeps_shards_together(ds):
    d, keys = ds
    (seq, _), = _run(LoaderConfig(sources=[SourceConfig(str(d))], batch_size=5, num_workers=0,
                                  shuffle_window_shards=1, drop_last=True), world=1)
    order = [int(k.split("_")[1]) // 5 for _, ks, *_ in seq for k in ks]  # shard of each sample
    changes = sum(a != b for a, b in zip(order, order[1:]))
    assert changes <= 7  # one window = one shard: the shard changes only at window boundaries


def test_resume_reproduces_the_sequence_and_survives_a_world_size_change(ds):
    d, _ = ds
    cfg = LoaderConfig(sources=[SourceConfig(str(d))], batch_size=2, num_workers=2, seed=5,
                       augment=AugmentConfig(enabled=True, image_flip_p=0.5))
    full = _run(cfg, world=2, epochs=3)
    part = _run(cfg, world=2, epochs=3, stop_at=11)
    states = [json.loads(json.dumps(ld.state_dict())) for _, ld in part]  # JSON-safe, as in a checkpoint
    assert states[0]["step"] == 11
    resumed = _run(cfg, world=2, epochs=3, state=states)
    for r in range(2):
        tail = [x for x in full[r][0] if x[0] >= 11]
        assert resumed[r][0][: len(tail)] == tail
    # 4 ranks x 1 = the same global batch: the same global sequence, re-partitioned
    cfg4 = LoaderConfig(sources=[SourceConfig(str(d))], batch_size=1, num_workers=2, seed=5)
    resumed4 = _run(cfg4, world=4, epochs=3, state=[states[0]] * 4)

    def global_batches(runs, world):
        steps = {}
        for r, (seq, _) in enumerate(runs):
            for step, ks, *_ in seq:
                slots = steps.setdefault(step, {})
                for j, k in enumerate(ks):
                    slots[r + j * world] = k
        return {s: [v[i] for i in sorted(v)] for s, v in steps.items()}

    g2, g4 = global_batches(full, 2), global_batches(resumed4, 4)
    assert g4 and all(g4[s] == g2[s] for s in g4)
    with pytest.raises(ValueError, match="global_batch"):
        ShardLoader(LoaderConfig(sources=[SourceConfig(str(d))], batch_size=3, seed=5), rank=0,
                    world_size=2).load_state_dict(states[0])


def test_corrupt_shards_are_skipped_counted_and_replaced(tmp_path):
    d = tmp_path / "bad"
    keys = make_dataset(d, 30, prefix="g", per_shard=6)
    planted, lost = plant_corruption(d)
    cfg = LoaderConfig(sources=[SourceConfig(str(d))], batch_size=4, num_workers=2, seed=2, on_missing_shard="skip")
    runs = _run(cfg, world=2)
    lens = [len(seq) for seq, _ in runs]
    kept = 30 - lost["size_mismatch"] + 5  # the truncated and the garbage shard are left out before step 1
    assert lens[0] == lens[1] == runs[0][1].steps_per_epoch == math.ceil(kept / 8)
    in_order, total = Counter(), Counter()
    for seq, ld in runs:
        in_order.update(ld.bad_in_order.as_dict())
        total.update(ld.counters.as_dict())
        assert all(len(ks) == 4 for _, ks, *_ in seq)
        assert ld.lost() == {"bad": lost}
    assert dict(in_order) == planted
    assert all(total[r] >= n for r, n in planted.items()) and set(total) == set(planted)
    seen = [k for seq, _ in runs for _, ks, *_ in seq for k in ks]
    assert set(seen) <= set(keys) and len(set(seen)) == len(keys) - lost["size_mismatch"]


def test_everything_corrupt_fails_with_a_clear_error(tmp_path):
    d = tmp_path / "junk"
    make_dataset(d, 4, prefix="j", per_shard=4)
    ld = ShardLoader(LoaderConfig(sources=[SourceConfig(str(d))], batch_size=2, num_workers=0,
                                  max_replacements=3), rank=0, world_size=1)
    (d / "j-000000.tar").write_bytes(b"\0garbage" * 100)  # after the check before step 1: goes bad mid-run
    with pytest.raises(RuntimeError, match="bad samples in a row.*unreadable_shard"):
        next(iter(ld))


def test_weighted_mixing_with_group_plans(tmp_path):
    make_dataset(tmp_path / "it", 20, prefix="it", modalities=("image", "text"), per_shard=10)
    make_dataset(tmp_path / "vol", 9, prefix="vol", modalities=("volume",), per_shard=5)
    make_dataset(tmp_path / "sig", 6, prefix="sig", modalities=("signal",), per_shard=5)
    make_dataset(tmp_path / "ecg", 6, prefix="ecg", modalities=("signal", "text"), per_shard=5)
    groups = [{"name": "img_txt", "modalities": ["image", "text"], "objectives": ["contrastive"], "weight": 0.5},
              {"name": "vol", "modalities": ["volume"], "objectives": ["mae"], "weight": 0.3},
              {"name": "sig", "modalities": ["signal"], "objectives": ["mae"], "weight": 0.2}]
    cfg = {"sources": [{"path": str(tmp_path / "it")}, {"path": str(tmp_path / "vol")},
                       {"path": str(tmp_path / "sig"), "weight": 3}, {"path": str(tmp_path / "ecg"), "group": "sig"}],
           "batch_size": 4, "num_workers": 0, "mode": "resampled", "plan": {"policy": "weighted", "groups": groups}}
    runs = _run(build_loader(cfg, rank=0, world_size=1).config, world=2, stop_at=150)
    seq0, seq1 = runs[0][0], runs[1][0]
    assert [s for s, *_ in seq0] == [s for s, *_ in seq1] == list(range(150))
    groups_seen = Counter()
    src = Counter()
    for (_, k0, *_), (_, k1, *_) in zip(seq0, seq1):
        prefixes = {k.split("_")[0] for k in k0 + k1}
        if prefixes == {"it"}:
            groups_seen["img_txt"] += 1
        elif prefixes == {"vol"}:
            groups_seen["vol"] += 1
        else:
            assert prefixes <= {"sig", "ecg"}
            groups_seen["sig"] += 1
            src.update(k.split("_")[0] for k in k0 + k1)
    for g, w in (("img_txt", 0.5), ("vol", 0.3), ("sig", 0.2)):
        assert abs(groups_seen[g] / 150 - w) < 0.1, groups_seen
    assert abs(src["sig"] / (src["sig"] + src["ecg"]) - 0.75) < 0.05


def test_config_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="loader.batch_sise.*did you mean 'batch_size'"):
        from_dict(LoaderConfig, {"sources": [{"path": "x"}], "batch_sise": 3}, "loader")
    with pytest.raises(ConfigError, match="sources"):
        from_dict(LoaderConfig, {}, "loader")
    with pytest.raises(Exception, match="manifest.json: not found"):
        ShardLoader(LoaderConfig(sources=[SourceConfig(str(tmp_path))]), rank=0, world_size=1)


def test_pipe_url_source_reads_like_a_local_directory(ds, tmp_path):
    d, keys = ds
    local = _run(LoaderConfig(sources=[SourceConfig(str(d))], batch_size=4, num_workers=0, seed=3,
                              shuffle_window_shards=2), world=1)[0][0]
    url = _run(LoaderConfig(sources=[SourceConfig(f"pipe:cat {d}/{{name}}", name=d.name)], batch_size=4,
                            num_workers=0, seed=3, shuffle_window_shards=2), world=1)[0][0]
    assert url == local


def test_mixed_split_shards_are_filtered_by_sample(tmp_path):
    splits = ["train" if i % 3 else "val" for i in range(12)]
    keys = make_dataset(tmp_path / "m", 12, prefix="m", per_shard=4, splits=splits)
    (seq, _), = _run(LoaderConfig(sources=[SourceConfig(str(tmp_path / "m"))], split="val", batch_size=2,
                                  num_workers=0, drop_last=True), world=1)
    assert sorted(k for _, ks, *_ in seq for k in ks) == sorted(k for k, s in zip(keys, splits) if s == "val")
    shutil.rmtree(tmp_path / "m")


def test_a_shard_failing_mid_run_is_counted_not_fatal(tmp_path):
    d = tmp_path / "miss"
    make_dataset(d, 12, prefix="m", per_shard=4)
    loaders = [ShardLoader(LoaderConfig(sources=[SourceConfig(str(d))], batch_size=3, num_workers=0), rank=r,
                           world_size=2) for r in range(2)]
    (d / "m-000001.tar").unlink()  # after the check before step 1: gone mid-run
    runs = [list(ld) for ld in loaders]
    assert [len(seq) for seq in runs] == [2, 2]
    assert sum(ld.bad_in_order.counts["missing_shard"] for ld in loaders) == 4


def test_example_mix_config_parses():
    from pathlib import Path

    from medfm.schema import load_yaml

    cfg = load_yaml(Path(__file__).parent.parent / "configs/loader/multimodal_mix.yaml", LoaderConfig)
    assert [g.weight for g in cfg.plan.groups] == [0.5, 0.2, 0.2, 0.1] and cfg.sources[2].weight == 3
    planner = StepPlanner(cfg.plan)
    assert Counter(planner(s).group for s in range(1000))["image_text"] > 400


def test_iterating_does_not_touch_the_global_torch_rng(ds):
    d, _ = ds
    ld = ShardLoader(LoaderConfig(sources=[SourceConfig(str(d))], batch_size=4, num_workers=2), rank=0, world_size=1)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    for _ in ld:
        pass
    assert torch.equal(torch.rand(3), expected)
