"""Eval suites: a YAML list of tasks (data, labels, modality, protocol, options), run against one model.

A task that cannot be evaluated (missing labels, a class absent from the training split, a model without the
tower, ...) is recorded as failed with its one-line reason and the other tasks still run.

Example (configs/evals/demo.yaml)::

    name: brain-tissue
    n_boot: 1000
    tasks:
      - name: tissue_probe
        data: {dir: data/mni_patches, train: train, val: val, test: test}
        modality: image
        kind: binary
        label: tissue
        classes: [grey, white]
        protocol: logistic
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from medfm.evals.data import LabelSpec, extract_labels, index_split
from medfm.evals.metrics import MetricError
from medfm.evals.protocols.base import FeatureSplit, ProtocolError, ProtocolResult, Row, TaskInfo
from medfm.evals.scoring import TASK_KINDS, score

PROTOCOLS = ("logistic", "mae", "knn", "fewshot", "zeroshot", "retrieval", "prognosis", "segmentation", "generation")
Protocol = Literal["logistic", "mae", "knn", "fewshot", "zeroshot", "retrieval", "prognosis", "segmentation",
                   "generation"]
DENSE_PROTOCOLS = ("segmentation", "generation")  # kind == protocol; scored by their own metrics, not scoring.py


@dataclass
class TaskData:
    dir: str
    train: str = "train"
    val: str | None = "val"  # null: hyper-parameters are chosen on a patient hold-out of train
    test: str = "test"


@dataclass
class TaskConfig:
    name: str
    data: TaskData
    modality: str
    protocol: Protocol
    kind: str = "binary"  # or segmentation / generation for those protocols
    label: str = ""  # meta.labels field (class name or id); survival: the time field
    labels: list[str] = field(default_factory=list)  # multilabel findings (0/1 fields)
    classes: list[str] = field(default_factory=list)  # class names in id order; binary default [negative, positive]
    event: str = ""  # survival: the 0/1 event field
    drop_missing: bool = False
    prompts: str = ""  # zero-shot prompt file (YAML/JSON), relative to the suite file
    masks: str = ""  # segmentation: shard dir of label maps, same keys and splits as data.dir (evals/dense.py)
    options: dict = field(default_factory=dict)  # protocol options (see evals/protocols/*.py dataclasses)
    metrics: list[str] = field(default_factory=list)  # subset of the kind's metrics to report ([] = all)
    max_samples: int = 0  # evaluate on the first N samples of each split (cheap periodic evals); 0 = all

    def validate(self):
        if self.protocol in DENSE_PROTOCOLS or self.kind in DENSE_PROTOCOLS:
            if self.kind != self.protocol:
                raise ValueError(f"kind: protocol {self.protocol} goes with kind: {self.protocol} (got {self.kind!r})")
            if self.protocol == "segmentation" and not self.masks:
                raise ValueError("masks: a segmentation task needs the shard dir of its label maps")
            if self.protocol == "segmentation" and len(self.classes) < 2:
                raise ValueError("classes: a segmentation task needs its label-map class names in id order "
                                 "(background first)")
            return
        if self.kind not in TASK_KINDS:
            raise ValueError(f"kind: expected one of {list(TASK_KINDS)}, got {self.kind!r}")
        if self.protocol == "retrieval":
            return
        if self.kind == "multilabel" and not self.labels:
            raise ValueError("labels: a multilabel task needs its finding fields")
        if self.kind != "multilabel" and not self.label:
            raise ValueError(f"label: a {self.kind} task needs the meta.labels field to read")
        if self.kind == "survival" and (not self.event or self.protocol != "prognosis"):
            raise ValueError("a survival task needs event: <field> and protocol: prognosis")
        if self.protocol == "prognosis" and self.kind != "survival":
            raise ValueError("protocol prognosis needs kind: survival")
        if self.protocol == "zeroshot" and not self.prompts:
            raise ValueError("zeroshot needs prompts: <file with templates and classes/findings>")
        if self.kind in ("multiclass", "ordinal") and len(self.classes) < 2:
            raise ValueError(f"classes: a {self.kind} task needs its class names in id order")


@dataclass
class EvalSuite:
    tasks: list[TaskConfig]
    name: str = "suite"
    n_boot: int = 1000
    seed: int = 0
    specificity: float = 0.9  # operating point of sensitivity@spec
    batch_size: int = 32
    cache_dir: str = ""  # feature cache ("" = <out>/features)
    text_tokenizer: str = "auto"  # tower | bytes | auto: what pretrain's train.tokenizer was (features.py)
    data_root: str = ""  # relative data.dir / masks resolve against this (itself relative to the suite file)
    base_dir: str = ""  # set by load_suite: relative paths in tasks resolve against the suite file

    def validate(self):
        names = [t.name for t in self.tasks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"tasks: duplicate task name {dup[0]!r}")
        if not self.tasks:
            raise ValueError("tasks: at least one task is required")


def load_suite(path, overrides=()) -> EvalSuite:
    from medfm.configs.registry import locate
    from medfm.schema import load_yaml

    suite = load_yaml(path, EvalSuite, overrides)
    suite.base_dir = suite.base_dir or str(locate(path).resolve().parent)
    return suite


def _resolve(suite: EvalSuite, p: str) -> str:
    return p if not p or Path(p).is_absolute() or not suite.base_dir else str(Path(suite.base_dir) / p)


def _data_dir(suite: EvalSuite, p: str) -> str:
    """A task's shard directory: relative to ``data_root`` when the suite sets one, else to the suite file."""
    if p and not Path(p).is_absolute() and suite.data_root:
        return str(Path(_resolve(suite, suite.data_root)) / p)
    return _resolve(suite, p)


@dataclass
class TaskResult:
    task: str
    protocol: str
    kind: str
    modality: str
    status: str  # ok | failed
    rows: list[Row] = field(default_factory=list)
    error: str = ""
    info: dict = field(default_factory=dict)
    predictions: object = None  # scoring.Predictions (curves in the report)
    outputs: dict = field(default_factory=dict)  # dense protocols' raw outputs: label maps / generated texts
    seconds: float = 0.0


class _Features:
    """Per-run memo of extracted splits, so tasks sharing data and modality extract once."""

    def __init__(self, model, model_hash, suite: EvalSuite, out_dir, accelerator):
        from medfm.evals.features import ExtractOptions

        self.model, self.hash, self.acc = model, model_hash, accelerator
        cache = suite.cache_dir or (str(Path(out_dir) / "features") if out_dir else None)
        self.opts = ExtractOptions(batch_size=suite.batch_size, cache_dir=cache, text_tokenizer=suite.text_tokenizer)
        self.indexes, self.memo = {}, {}

    def index(self, directory, split):
        if (directory, split) not in self.indexes:
            self.indexes[(directory, split)] = index_split(directory, split)
        return self.indexes[(directory, split)]

    def get(self, directory, split, modality, positions, collate=None):
        from medfm.evals.features import ExtractOptions, extract

        key = (directory, split, modality, tuple(np.asarray(positions).tolist()), repr(collate))
        if key not in self.memo:
            opts = ExtractOptions(self.opts.batch_size, collate, self.opts.cache_dir, self.opts.text_tokenizer)
            self.memo[key] = extract(self.model, self.hash, self.index(directory, split), modality, positions, opts,
                                     self.acc)
        return self.memo[key]


def _labelled_split(task: TaskConfig, feats: _Features, directory: str, split: str, use: str,
                    suite_seed: int = 0) -> FeatureSplit:
    index = feats.index(directory, split)
    spec = LabelSpec(task.name, task.kind, task.label, tuple(task.labels), tuple(task.classes), task.event,
                     task.drop_missing)
    y, event, keep = extract_labels(spec, index)
    if task.max_samples and len(keep) > task.max_samples:
        # A seeded random subset, not the first N: shards are often written class by class.
        sub = np.sort(np.random.default_rng([suite_seed, len(keep)]).choice(len(keep), task.max_samples,
                                                                            replace=False))
        keep, y = keep[sub], y[sub]
        event = None if event is None else event[sub]
    f = feats.get(directory, split, task.modality, keep, task.options.get("collate"))
    x = f.pooled if use == "pooled" else f.embed
    return FeatureSplit(x, y, index.patients[keep], [index.keys[p] for p in keep], event)


def _options(cls, task: TaskConfig, drop=("collate",)):
    from medfm.schema import from_dict

    return from_dict(cls, {k: v for k, v in task.options.items() if k not in drop}, f"{task.name}.options")


def run_task(task: TaskConfig, suite: EvalSuite, feats: _Features, main: bool = True) -> TaskResult:
    """Extract (on every process), then fit and score (on the main process only)."""
    from medfm.evals.protocols import fewshot, knn, linear, prognosis, retrieval, zeroshot

    directory = _data_dir(suite, task.data.dir)
    if task.protocol == "segmentation":
        return _run_segmentation(task, suite, feats, directory, main)
    if task.protocol == "generation":
        return _run_generation(task, suite, feats, directory, main)
    info_task = TaskInfo(task.name, task.kind, LabelSpec(task.name, task.kind, task.label, tuple(task.labels),
                                                         tuple(task.classes)).class_names)
    if task.protocol == "retrieval":
        index = feats.index(directory, task.data.test)
        if "text" not in feats.model.towers:
            raise ProtocolError(f"task {task.name}: retrieval needs a text tower (model has {list(feats.model.towers)})")
        has_text = np.array([("text" in (m.get("modalities") or [])) and (task.modality in (m.get("modalities") or []))
                             for m in index.metas])
        pos = np.flatnonzero(has_text)
        if task.max_samples and len(pos) > task.max_samples:
            pos = np.sort(np.random.default_rng(suite.seed).choice(pos, task.max_samples, replace=False))
        if len(pos) < 2:
            raise ProtocolError(f"task {task.name}: fewer than 2 {task.data.test} samples have both "
                                f"{task.modality} and text")
        items = feats.get(directory, task.data.test, task.modality, pos)
        texts = feats.get(directory, task.data.test, "text", pos)
        if not main:
            return TaskResult(task.name, task.protocol, task.kind, task.modality, "ok")
        opts = dict(task.options)
        from medfm.evals.data import read_samples

        strings = [smp.text for smp in read_samples(index, pos)]  # identical texts: one positive set
        res = retrieval.retrieval(items.embed, texts.embed, index.patients[pos], modality=task.modality,
                                  ks=opts.get("ks", (1, 5, 10)), n_boot=suite.n_boot, seed=suite.seed,
                                  texts=strings)
        return TaskResult(task.name, task.protocol, task.kind, task.modality, "ok", res.rows, info=res.info)

    use = "embed" if task.protocol == "zeroshot" else "pooled"
    test = _labelled_split(task, feats, directory, task.data.test, use, suite.seed)
    train = val = None
    if task.protocol != "zeroshot":
        train = _labelled_split(task, feats, directory, task.data.train, use, suite.seed)
        val = _labelled_split(task, feats, directory, task.data.val, use, suite.seed) if task.data.val else None
    # Zero-shot prompt embeddings on every process: under ZeRO-3 each text forward gathers partitioned parameters
    # collectively, so a forward on the main process alone would wait for the others forever.
    zs = _zero_shot_inputs(task, suite, feats, info_task) if task.protocol == "zeroshot" else None
    if not main:
        return TaskResult(task.name, task.protocol, task.kind, task.modality, "ok")
    if task.protocol == "fewshot":
        res = fewshot.few_shot(info_task, train, val, test, _options(fewshot.FewShotOptions, task), suite.n_boot,
                               suite.seed)
        return TaskResult(task.name, task.protocol, task.kind, task.modality, "ok", res.rows, info=res.info)
    if task.protocol == "logistic":
        pred, info = linear.logistic_probe(info_task, train, val, test, _options(linear.LogisticOptions, task))
    elif task.protocol == "mae":
        pred, info = linear.mae_linear_probe(info_task, train, val, test, _options(linear.MAEProbeOptions, task))
    elif task.protocol == "knn":
        pred, info = knn.knn_probe(info_task, train, val, test, _options(knn.KNNOptions, task))
    elif task.protocol == "prognosis":
        pred, info = prognosis.cox_prognosis(task.name, train, val, test, _options(prognosis.CoxOptions, task))
    elif task.protocol == "zeroshot":
        prompts, encode, scale = zs
        pred, info = zeroshot.zero_shot(info_task, test, prompts, encode, logit_scale=scale)
    else:  # unreachable: the config's Literal rejects unknown protocols
        raise ProtocolError(f"task {task.name}: unknown protocol {task.protocol!r}")
    table = score(pred, n_boot=suite.n_boot, seed=suite.seed, specificity=suite.specificity,
                  only=task.metrics or None)
    rows = [Row(m, est) for m, est in table.items()]
    return TaskResult(task.name, task.protocol, task.kind, task.modality, "ok", rows, info=info, predictions=pred)


def _zero_shot_inputs(task: TaskConfig, suite: EvalSuite, feats: _Features, info_task: TaskInfo):
    """(prompts, memoised text encoder already holding every prompt's embedding, CLIP logit scale), computed with
    the same forwards on every process (ZeRO-3: the scale is a partitioned [1] parameter, gathered here too)."""
    from medfm.evals.features import text_encoder
    from medfm.evals.protocols import zeroshot
    from medfm.model_zoo.layers import whole_params

    prompts = zeroshot.load_prompts(_resolve(suite, task.prompts))
    encode_once = text_encoder(feats.model, tokenizer=suite.text_tokenizer)
    memo: dict[tuple, np.ndarray] = {}

    def encode(texts):
        key = tuple(texts)
        if key not in memo:
            memo[key] = encode_once(list(texts))
        return memo[key]

    zeroshot.zero_shot_weights(info_task, prompts, encode)  # every prompt forward, on every process
    with whole_params([feats.model.logit_scale]):
        scale = float(feats.model.logit_scale.detach().float().exp().clamp(max=100).item())
    return prompts, encode, scale


def _subset(task: TaskConfig, n: int, seed: int, pos=None) -> np.ndarray:
    pos = np.arange(n) if pos is None else np.asarray(pos)
    if task.max_samples and len(pos) > task.max_samples:
        pos = np.sort(np.random.default_rng([seed, len(pos)]).choice(pos, task.max_samples, replace=False))
    return pos


def _run_segmentation(task: TaskConfig, suite: EvalSuite, feats: _Features, directory: str, main: bool):
    """UNETR-style decoder on the frozen tower's tokens of several depths; Dice / HD95 per class."""
    from medfm.evals.dense import default_layers, extract_dense, vit_tower
    from medfm.evals.protocols import segmentation as seg

    opts = _options(seg.SegmentationOptions, task)
    tower = vit_tower(feats.model, task.modality)
    patch = tower.patch_size if task.modality == "volume" else (tower.patch_size,) * 2
    n_stages = len(seg.upsampling_stages(patch))
    layers = list(opts.layers) or default_layers(len(tower.blocks), n_stages)
    if len(layers) != n_stages:
        raise ProtocolError(f"task {task.name}: options.layers needs {n_stages} blocks (one per x2 stage of patch "
                            f"size {list(patch)}), got {layers}")
    masks_dir = _data_dir(suite, task.masks)

    def dense(split):
        index = feats.index(directory, split)
        return extract_dense(feats.model, index, feats.index(masks_dir, split), task.modality, layers,
                             len(task.classes), _subset(task, len(index), suite.seed), suite.batch_size,
                             task.options.get("collate"), feats.acc)

    train, test = dense(task.data.train), dense(task.data.test)
    val = dense(task.data.val) if task.data.val else None
    if not main:
        return TaskResult(task.name, task.protocol, task.kind, task.modality, "ok")
    res = seg.segmentation_probe(task.name, list(task.classes), train, val, test, patch, tower.in_chans, opts,
                                 suite.n_boot, suite.seed)
    res.info["layers"] = layers
    return TaskResult(task.name, task.protocol, task.kind, task.modality, "ok", res.rows, info=res.info,
                      outputs={"pred": res.predictions, "true": test.masks, "spacing": test.spacing,
                               "keys": test.keys})


def _run_generation(task: TaskConfig, suite: EvalSuite, feats: _Features, directory: str, main: bool):
    """Reports from the model's caption decoder (greedy) on the test split, scored against each sample's text."""
    from medfm.evals.features import text_tokenizer_kind
    from medfm.evals.generate import GenerationOptions, generate_reports
    from medfm.evals.protocols.generation import KeywordLabeller, generation_metrics

    opts = _options(GenerationOptions, task)
    opts.tokenizer = opts.tokenizer or suite.text_tokenizer
    index = feats.index(directory, task.data.test)
    has_text = [i for i, m in enumerate(index.metas)
                if {"text", task.modality} <= set(m.get("modalities") or [])]
    if not has_text:
        raise ProtocolError(f"task {task.name}: no {task.data.test} sample has both {task.modality} and text")
    pos = _subset(task, len(index), suite.seed, has_text)
    hyps, refs = generate_reports(feats.model, index, task.modality, pos, opts, suite.batch_size,
                                  task.options.get("collate"), feats.acc)
    if not main:
        return TaskResult(task.name, task.protocol, task.kind, task.modality, "ok")
    labeller = KeywordLabeller(dict(opts.findings)) if opts.findings else None
    res = generation_metrics(refs, hyps, index.patients[pos], labeller, n_boot=suite.n_boot, seed=suite.seed)
    examples = [{"key": index.keys[p], "reference": r, "generated": h} for p, r, h in list(zip(pos, refs, hyps))[:5]]
    res.info.update(tokenizer=text_tokenizer_kind(feats.model, opts.tokenizer), max_new_tokens=opts.max_new_tokens,
                    examples=examples)
    return TaskResult(task.name, task.protocol, task.kind, task.modality, "ok", res.rows, info=res.info,
                      outputs={"generated": hyps, "reference": refs, "keys": [index.keys[p] for p in pos]})


def run_suite(suite: EvalSuite, model, model_hash: str, out_dir=None, accelerator=None,
              progress: bool = True) -> list[TaskResult]:
    """Every task of the suite; failures are caught per task (status "failed", error = one line)."""
    from medfm.evals.features import get_accelerator

    accelerator = accelerator or get_accelerator()
    main = accelerator.is_main_process
    feats = _Features(model, model_hash, suite, out_dir, accelerator)
    results = []
    for task in suite.tasks:
        t0 = time.perf_counter()
        try:
            res = run_task(task, suite, feats, main)
        except (ProtocolError, MetricError, ValueError, KeyError, FileNotFoundError) as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            res = TaskResult(task.name, task.protocol, task.kind, task.modality, "failed", error=msg)
        except RuntimeError as exc:  # e.g. a tower rejecting the input shape: still one task's failure
            tb = traceback.extract_tb(exc.__traceback__)[-1]
            res = TaskResult(task.name, task.protocol, task.kind, task.modality, "failed",
                             error=f"{type(exc).__name__}: {str(exc).splitlines()[0]} ({Path(tb.filename).name}:"
                                   f"{tb.lineno})")
        res.seconds = time.perf_counter() - t0
        if progress and main:
            status = "ok" if res.status == "ok" else f"FAILED: {res.error}"
            print(f"[eval] {task.name} ({task.protocol}) {status} in {res.seconds:.1f}s", flush=True)
        results.append(res)
    return results


__all__ = ["EvalSuite", "PROTOCOLS", "ProtocolResult", "TaskConfig", "TaskData", "TaskResult", "load_suite",
           "run_suite", "run_task"]
