"""Default tracking (a sqlite store in the run directory): params, metrics and artifacts stay inside the run
directory, whatever directory the run was started from (mlflow's own default would litter ./mlruns)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from pretrain_support import make_shards, run_config  # noqa: E402


def test_local_sqlite_tracking_keeps_artifacts_in_run_dir(tmp_path, monkeypatch):
    import mlflow

    from medfm.pretrain.config import RunConfig
    from medfm.pretrain.train import run
    from medfm.schema import from_dict

    shards = make_shards(tmp_path / "shards", n=8, modalities=("image", "text"))
    run_dir = tmp_path / "run"
    cfg = run_config(run_dir, shards, [{"name": "mae:image"}], ("image", "text"), steps=2,
                     train={"strategy": "ddp"}, tracking={"enabled": True, "experiment": "local-test"})
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert run(from_dict(RunConfig, cfg)).status == "finished"
    assert not (elsewhere / "mlruns").exists()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("local-test")
    assert exp.artifact_location.startswith((run_dir / "mlartifacts").resolve().as_uri())
    (r,) = client.search_runs([exp.experiment_id])
    assert r.data.params["train.steps"] == "2" and "loss/mae:image" in r.data.metrics
    names = {a.path for a in client.list_artifacts(r.info.run_id)}
    assert {"config.yaml", "loss_curve.png"} <= names


def test_a_resumed_run_has_one_row_per_step_in_metrics_and_mlflow(tmp_path):
    import json

    import mlflow

    from medfm.pretrain.config import RunConfig
    from medfm.pretrain.train import run
    from medfm.schema import from_dict

    shards = make_shards(tmp_path / "shards", n=8, modalities=("image", "text"))
    run_dir = tmp_path / "run"
    cfg = run_config(run_dir, shards, [{"name": "mae:image"}], ("image", "text"), steps=4,
                     train={"strategy": "ddp"}, checkpoint={"every": 2, "keep": 3, "final": True},
                     tracking={"enabled": True, "experiment": "replay"})
    assert run(from_dict(RunConfig, cfg)).status == "finished"
    cfg["checkpoint"]["resume"] = "step2"  # replays steps 3 and 4, as a restart after a kill at step 4 does
    assert run(from_dict(RunConfig, cfg)).status == "finished"
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("replay")
    (live,) = client.search_runs([exp.experiment_id])  # the killed attempt's run is superseded
    steps = [m.step for m in client.get_metric_history(live.info.run_id, "loss/mae:image")]
    assert sorted(steps) == [1, 2, 3, 4]
