"""Outputs of one small deterministic pipeline (train -> resume -> eval -> release), as plain numbers.

``tests/test_same_outputs.py`` compares them with ``tests/data/golden_outputs.json``, which this module wrote on the
code before the #16 refactor (commit 4d7bcc8): ``python tests/golden_outputs.py OUT.json`` from that tree's venv.
Training is DDP in a world of one (fp32, CPU), 4 steps in two legs (2, then resume to 4); eval is a logistic probe,
zero-shot and retrieval suite with a fixed seed; release is the zoo entry of the final checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from pretrain_support import make_shards, run_config, write_cls_suite  # noqa: E402


def _weights_digest(path: Path) -> dict:
    from safetensors.torch import load_file

    state = load_file(str(path))
    return {k: [round(float(v.double().sum()), 6), round(float(v.double().abs().sum()), 6)]
            for k, v in sorted(state.items())}


def pipeline(root: Path) -> dict:
    from medfm.launch.cli import main
    from medfm.pretrain.config import RunConfig
    from medfm.pretrain.train import run
    from medfm.schema import from_dict

    shards = make_shards(root / "shards", n=16, modalities=("image", "text"))
    objectives = [{"name": "mae:image"}, {"name": "contrastive:image-text"}]
    legs = []
    for steps, resume in ((2, None), (4, "latest")):
        cfg = run_config(root / "run", shards, objectives, ("image", "text"), steps=steps,
                         train={"strategy": "ddp", "log_every": 1},
                         checkpoint={"every": 2, "final": True, **({"resume": resume} if resume else {})},
                         release={"licence": "CC-BY-4.0", "intended_use": "unit tests only"})
        res = run(from_dict(RunConfig, cfg))
        assert res.status == "finished", res
        legs.extend({k: round(float(v), 6) for k, v in row.items()} for row in res.losses)
    suite = write_cls_suite(root / "suite.yaml", shards, "golden", 20, ("logistic", "zeroshot", "retrieval"))
    assert main(["eval", str(root / "run"), "--suite", str(suite), "--out", str(root / "ev")]) == 0
    report = json.loads((root / "ev" / "report.json").read_text())
    results = sorted([r["task"], r["metric"], json.dumps(r.get("params"), sort_keys=True), round(r["value"], 6),
                      [round(c, 6) for c in r["ci"]] if r.get("ci") else None] for r in report["results"])
    zoo = root / "zoo"
    assert main(["release", str(root / "run"), "--name", "golden", "--version", "1", "--zoo", str(zoo),
                 "--eval", str(root / "ev" / "report.json")]) == 0
    rel = zoo / "golden" / "1"
    config = json.loads((rel / "config.json").read_text())
    return {"losses": legs, "eval": results, "release_weights": _weights_digest(rel / "model.safetensors"),
            "release_config_sha256": hashlib.sha256(json.dumps(config.get("model", config), sort_keys=True)
                                                    .encode()).hexdigest()}


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        out = pipeline(Path(tmp))
    Path(sys.argv[1]).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {sys.argv[1]}: {len(out['losses'])} steps, {len(out['eval'])} eval rows, "
          f"{len(out['release_weights'])} released tensors")
