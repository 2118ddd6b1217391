"""Run tracking on rank 0: mlflow (imported lazily), a metrics.jsonl in the run directory, and a tqdm bar.

Params are the flattened resolved config; metrics per step; tags (git commit, manifest hashes, world size);
artifacts (resolved config, loss-curve PNG). The default tracking URI is a sqlite file in the run directory. A
tracking failure (server down, network) warns once and training continues with tracking off: a run never dies
for its logs. metrics.jsonl is always written, so the numbers survive without mlflow.
"""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
from pathlib import Path

from medfm.schema.atomic import atomic_write


def flatten(d, prefix: str = "") -> dict[str, str]:
    """Nested dict/list -> {"a.b.0.c": str(value)} (mlflow params are strings of at most 6000 chars)."""
    out: dict[str, str] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(d, (list, tuple)) and d and any(isinstance(v, (dict, list, tuple)) for v in d):
        for i, v in enumerate(d):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = str(d)[:6000]
    return out


def drop_rows_after(path: Path, step: int) -> dict[str, list[tuple[int, float]]]:
    """Keep only the rows of steps <= ``step`` in metrics.jsonl (atomically) and return their history.

    A restart resumes from its last checkpoint and replays the steps after it; their rows from the killed attempt
    are dropped here, so the file holds one row per step (the replayed rows replace them)."""
    history: dict[str, list[tuple[int, float]]] = {}
    if not path.is_file():
        return history
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a kill mid-write
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(line)
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    history.setdefault(k, []).append((row["step"], float(v)))
    atomic_write(path, "".join(line + "\n" for line in kept))
    return history


class Tracker:
    """No-op on every rank but 0."""

    def __init__(self, cfg, run_dir, rank: int, params: dict, tags: dict, total_steps: int, start_step: int = 0,
                 progress: bool = True):
        self.cfg = cfg
        self.rank = rank
        self.run_dir = Path(run_dir)
        self.history: dict[str, list[tuple[int, float]]] = {}
        self._mlflow = None
        self._run_id = None
        self._warned = False
        self._bar = None
        if rank != 0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.history = drop_rows_after(self.run_dir / "metrics.jsonl", start_step)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a")
        if cfg.enabled:
            self._start_mlflow(params, tags)
        if progress and total_steps > start_step:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="pretrain", unit="step", dynamic_ncols=True,
                             file=sys.stderr)

    @property
    def uri(self) -> str:
        return self.cfg.uri or f"sqlite:///{(self.run_dir / 'mlflow.db').resolve()}"

    @property
    def run_id(self) -> str | None:
        return self._run_id

    def _fail(self, what: str, exc: Exception) -> None:
        if not self._warned:
            warnings.warn(f"mlflow tracking at {self.uri} failed ({what}: {type(exc).__name__}: {exc}); "
                          "training continues without mlflow (metrics.jsonl still written)", stacklevel=2)
            self._warned = True
        self._mlflow = None

    def _start_mlflow(self, params: dict, tags: dict) -> None:
        # Fail fast on an unreachable server instead of mlflow's default minutes of retries.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(math.ceil(self.cfg.timeout_s))))
        try:
            import mlflow

            mlflow.set_tracking_uri(self.uri)
            if self.uri.startswith("sqlite:") and mlflow.get_experiment_by_name(self.cfg.experiment) is None:
                # A local store keeps its artifacts beside its database (the run or sweep directory); mlflow's
                # default artifact root is ./mlruns of whatever directory the run was started from.
                db = Path(self.uri[len("sqlite:///"):]) if self.uri.startswith("sqlite:///") else self.run_dir / "x"
                mlflow.create_experiment(self.cfg.experiment,
                                         artifact_location=(db.parent / "mlartifacts").resolve().as_uri())
            mlflow.set_experiment(self.cfg.experiment)
            run = mlflow.start_run(run_name=self.cfg.run_name or None)
            self._run_id = run.info.run_id
            self._mlflow = mlflow
            self._supersede(mlflow)
            items = list(params.items())
            for i in range(0, len(items), 100):  # mlflow's batch limit
                mlflow.log_params(dict(items[i:i + 100]))
            mlflow.set_tags(tags)
        except Exception as exc:  # noqa: BLE001 - any tracking failure must not stop training
            self._fail("start", exc)

    def _supersede(self, mlflow) -> None:
        """One mlflow run per training run, one row per step: a restart's new run first gets the kept history
        (metrics.jsonl up to the resumed step), and the killed attempt's run, whose rows after that step are
        replayed, is tagged and soft-deleted (``mlflow gc`` purges it; restorable until then)."""
        from mlflow.entities import Metric

        marker = self.run_dir / "mlflow_run_id"
        client = mlflow.MlflowClient()
        rows = [Metric(k, v, 0, step) for k, pts in self.history.items() for step, v in pts if math.isfinite(v)]
        for i in range(0, len(rows), 1000):  # mlflow's batch limit
            client.log_batch(self._run_id, metrics=rows[i:i + 1000])
        old = marker.read_text().strip() if marker.is_file() else ""
        if old and old != self._run_id:
            try:
                client.set_tag(old, "medfm.superseded_by", self._run_id)
                client.delete_run(old)
            except Exception as exc:  # noqa: BLE001 - the old run may live in another store or be gone
                warnings.warn(f"mlflow: could not supersede the earlier attempt's run {old}: {exc}", stacklevel=2)
        atomic_write(marker, self._run_id)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.rank != 0:
            return
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self._jsonl.flush()
        for k, v in clean.items():
            self.history.setdefault(k, []).append((step, v))
        if self._mlflow is not None:
            try:
                self._mlflow.log_metrics({k: v for k, v in clean.items() if math.isfinite(v)}, step=step)
            except Exception as exc:  # noqa: BLE001
                self._fail("log_metrics", exc)

    def progress(self, step: int, postfix: dict | None = None) -> None:
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            if postfix:
                self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def loss_curve(self, path: Path) -> Path | None:
        """PNG of every loss over steps."""
        series = {k: v for k, v in self.history.items() if k.startswith("loss/")}
        if not series:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for k, pts in sorted(series.items()):
            ax.plot([s for s, _ in pts], [v for _, v in pts], label=k[len("loss/"):])
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_yscale("log" if all(v > 0 for pts in series.values() for _, v in pts) else "linear")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def finish(self, status: str = "FINISHED", artifacts: tuple = ()) -> None:
        if self.rank != 0:
            return
        if self._bar is not None:
            self._bar.close()
        self._jsonl.close()
        curve = self.loss_curve(self.run_dir / "loss_curve.png")
        if self._mlflow is None:
            return
        try:
            if self.cfg.artifacts:
                for a in (*artifacts, curve):
                    if a is not None and Path(a).is_file():
                        self._mlflow.log_artifact(str(a))
            self._mlflow.end_run(status=status)
        except Exception as exc:  # noqa: BLE001
            self._fail("finish", exc)
