"""The configs the demo hands to the other parts: the pretraining run config, read from the YAML recipe
``configs/pretrain/demo.yaml`` (through ``medfm.configs``) with the demo's paths and step budget as dotted overrides,
and the eval suite, derived from the corpus's labelled tasks (medfm.demo.tasks, via the corpus summary)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from medfm.configs import ROOT as RECIPES
from medfm.schema import apply_overrides, load_yaml

PRETRAIN_RECIPE = "pretrain/demo.yaml"

# Tasks the demo evaluates: (corpus task, protocols). The image task is the headline "pretrained vs random init"
# comparison; volume and signal are reported the same way.
EVAL_TASKS = {
    "mri2d_tissue": ("logistic", "fewshot", "knn", "zeroshot", "retrieval"),
    "mri3d_tissue": ("logistic", "fewshot", "zeroshot"),
    "ecg_rhythm": ("logistic", "fewshot"),
    "ecg_rate": ("logistic", "fewshot"),
}
FEWSHOT = {"shots": [1, 2, 4, 8], "repeats": 10}


def pretrain_config(corpus: dict, run_dir: Path, steps: int) -> dict:
    """The demo's run config: the recipe, with each source's path set to the corpus dataset of the same name, the
    run directory, ``steps`` and a checkpoint every max(10, steps // 3) steps (values JSON-quoted so a path is
    never read as a YAML number, bool or comment)."""
    from medfm.pretrain.config import RunConfig

    recipe = load_yaml(RECIPES / PRETRAIN_RECIPE)
    ds = corpus["datasets"]
    sources = [{**s, "path": str(Path(ds[s["name"]]).resolve())} for s in recipe["data"]["sources"]]
    return apply_overrides(recipe, [f"run_dir={json.dumps(str(run_dir))}", f"data.sources={json.dumps(sources)}",
                                    f"train.steps={int(steps)}", f"checkpoint.every={max(10, steps // 3)}"], RunConfig)


def _write_if_changed(path: Path, text: str) -> Path:
    """Write only when the content differs, so a file's mtime says when its content last changed (stage reuse)."""
    if not (path.is_file() and path.read_text() == text):
        path.write_text(text)
    return path


def eval_suite(corpus: dict, out: Path, protocols_of: dict | None = None, *, name: str = "demo", n_boot: int = 500,
               batch_size: int = 64) -> Path:
    """``<out>/eval_suite.yaml`` (and a prompts file per task with prompts): the protocols of ``protocols_of``
    (default EVAL_TASKS) on the corpus's tasks, rewritten only when its content changes (its mtime decides whether
    earlier eval reports are reused). benchmarks/gpu_check.py writes its smaller suite with this too."""
    tasks = []
    for task_name, protocols in (EVAL_TASKS if protocols_of is None else protocols_of).items():
        t = corpus["tasks"][task_name]
        data = {"dir": str(Path(corpus["datasets"][t["dataset"]]).resolve())}
        prompts = None
        if t.get("prompts"):
            prompts = (out / f"prompts_{task_name}.yaml").resolve()
            _write_if_changed(prompts, yaml.safe_dump({"templates": ["{}"],
                                                       "classes": {c: [t["prompts"][c]] for c in t["classes"]}}))
        for proto in protocols:
            if proto in ("zeroshot", "retrieval") and prompts is None:
                continue
            task = {"name": f"{task_name}_{proto}", "data": data, "modality": t["modality"], "kind": "binary",
                    "label": t["label"], "classes": list(t["classes"]), "protocol": proto}
            if proto == "zeroshot":
                task["prompts"] = str(prompts)
            if proto == "fewshot":
                task["options"] = dict(FEWSHOT)
            tasks.append(task)
    suite = {"name": name, "n_boot": n_boot, "seed": 0, "batch_size": batch_size, "tasks": tasks}
    return _write_if_changed(out / "eval_suite.yaml", yaml.safe_dump(suite, sort_keys=False))
