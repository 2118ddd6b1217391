"""``medfm zoo release CHECKPOINT --name NAME --version V [--zoo DIR] [--eval REPORT.json] [--force]`` (also spelled
``medfm release``; the command line is in launch/commands.py).

Consolidates a training checkpoint (ZeRO-3 partitions or DDP), rebuilds the MultiModalModel from the resolved
config saved with it, and publishes it into a zoo in model_zoo's release format. The model card is assembled from
facts only: the architecture and parameter counts of the built model, the manifests of the shards it was trained on
(hashes, modality counts, de-identification stamp), the client state (steps, samples, commit), the FLOPs from
model_zoo, the eval report's rows with their CIs, and the licence / intended-use fields of the run config. A fact
that is not recorded anywhere is written as "not recorded", never invented.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from medfm.schema import ConfigError, from_dict

NOT_RECORDED = "not recorded"


def find_checkpoint(path: str | Path) -> tuple[Path, str]:
    """(checkpoints root, tag) from a run dir, a ``checkpoints`` dir or one ``stepN`` dir (latest when not named)."""
    from medfm.model_zoo import checkpoint_io

    try:
        return checkpoint_io.find_checkpoint(path)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def read_client(root: Path, tag: str) -> dict:
    from medfm.model_zoo import checkpoint_io

    try:
        return checkpoint_io.read_client(root, tag)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def read_eval_report(path: str | Path | None) -> dict | None:
    if path is None:
        return None
    p = Path(path)
    try:
        report = json.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"--eval {p}: file not found") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--eval {p}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(report, dict) or not isinstance(report.get("results"), list):
        raise ConfigError(f"--eval {p}: expected medfm eval's report.json (a 'results' list)")
    return report


def _source_manifests(config: dict) -> list[dict]:
    """Facts of every training source whose manifest is still readable."""
    from medfm.shards.manifest import ManifestError, load_manifest

    out = []
    for src in (config.get("data") or {}).get("sources", []):
        path = src.get("path", "")
        entry = {"name": src.get("name") or Path(path).name, "path": path, "weight": src.get("weight", 1.0)}
        try:
            m = load_manifest(path)
        except (ManifestError, OSError, ValueError):
            entry["readable"] = False
        else:
            entry.update(readable=True, totals=m.get("totals", {}), deid=m.get("deid", {}),
                         identifiable=bool(m.get("identifiable", False)), schema=m.get("schema"))
        out.append(entry)
    return out


def _eval_table(report: dict | None) -> list[str]:
    if report is None:
        return ["No evaluation report was given to `medfm release --eval`; no results are claimed."]
    from medfm.evals.report import format_ci

    lines = ["| task | protocol | metric | value | 95% CI | n (patients) |", "|---|---|---|---|---|---|"]
    for r in report["results"]:
        value = r.get("value")
        shown = f"{value:.4f}" if isinstance(value, (int, float)) else f"failed: {r.get('error', 'n/a')}"
        params = ", ".join(f"{k}={v}" for k, v in (r.get("params") or {}).items() if k != "repeats")
        metric = f"{r.get('metric', '')} ({params})" if params else r.get("metric", "")
        lines.append(f"| {r.get('task', '')} | {r.get('protocol', '')} | {metric} | {shown} | "
                     f"{format_ci(r) if isinstance(value, (int, float)) else ''} | {r.get('n', '')}"
                     + (f" ({r['n_patients']})" if r.get("n_patients") is not None else "") + " |")
    failed = [t for t in report.get("tasks", []) if isinstance(t, dict) and t.get("status") == "failed"]
    for t in failed:
        lines.append(f"\nTask `{t.get('task')}` failed: {t.get('error', 'no reason recorded')}")
    return lines


def build_card(name: str, version: str, model, config: dict, client: dict, sources: list[dict],
               report: dict | None, ckpt: str) -> tuple[str, dict]:
    """(Markdown model card, JSON-safe provenance) from recorded facts."""
    from medfm.model_zoo.flops import count_params

    rel = config.get("release") or {}
    towers = {m: count_params(t) for m, t in model.towers.items()}
    total = count_params(model)
    mcfg = config.get("model") or {}
    flops = client.get("train_flops")
    lines = [f"# {name} v{version}", "",
             "A medfm multimodal medical foundation model. Every fact below was read from the training checkpoint, "
             "its resolved config, the shard manifests and the evaluation report; nothing is hand-written.", "",
             "## Intended use", "",
             f"- Licence: {rel.get('licence') or NOT_RECORDED + ' (set release.licence in the run config)'}",
             f"- Intended use: {rel.get('intended_use') or NOT_RECORDED + ' (release.intended_use)'}",
             f"- Out of scope: {rel.get('out_of_scope') or NOT_RECORDED + ' (release.out_of_scope)'}", "",
             "## Architecture", "",
             f"- Parameters: {total:,} in all; embedding dimension {mcfg.get('embed_dim', NOT_RECORDED)}",
             "", "| tower | architecture | parameters |", "|---|---|---|"]
    for m, n in towers.items():
        spec = (mcfg.get("towers") or {}).get(m, {})
        lines.append(f"| {m} | {spec.get('arch', NOT_RECORDED)} {spec.get('overrides') or ''} | {n:,} |")
    extra_heads = [k for k in ("mae_decoders", "caption_decoder", "heads") if getattr(model, k, None) is not None]
    lines += ["", f"Also in the weights: {', '.join(extra_heads)}.", "", "## Training data", ""]
    for s in sources:
        fp = (client.get("manifests") or {}).get(s["name"], NOT_RECORDED)
        lines.append(f"- `{s['name']}` (weight {s['weight']}): manifest fingerprint `{fp}`")
        if s.get("readable"):
            tot = s["totals"]
            mods = ", ".join(f"{m} {c}" for m, c in (tot.get("modalities") or {}).items())
            splits = ", ".join(f"{k} {v}" for k, v in (tot.get("splits") or {}).items())
            deid = dict(s["deid"] or {})
            applied, profile = deid.pop("applied", False), deid.pop("profile", None)
            stamp = ", ".join(f"{k}: {v}" for k, v in deid.items()) or NOT_RECORDED
            lines += [f"  - samples {tot.get('samples', NOT_RECORDED)} ({splits}); modalities: {mods}",
                      f"  - de-identification: {'APPLIED' if applied else 'NOT APPLIED'}; "
                      f"profile: {profile or NOT_RECORDED}; stamp: {stamp}"
                      + ("; **the shards are marked identifiable**" if s["identifiable"] else "")]
        else:
            lines.append("  - manifest not readable at release time (path moved); only its fingerprint is known")
    train = config.get("train") or {}
    lines += ["", "## Training compute", "",
              f"- Optimizer steps: {client.get('step', NOT_RECORDED)}; samples seen: "
              f"{client.get('samples_seen', NOT_RECORDED)}; world size: {client.get('world_size', NOT_RECORDED)}",
              f"- Strategy: {train.get('strategy', NOT_RECORDED)}, precision {train.get('precision', NOT_RECORDED)}",
              f"- Training FLOPs (model FLOPs counted by the training loop): "
              f"{f'{flops:.3e}' if isinstance(flops, (int, float)) else NOT_RECORDED}",
              f"- Source commit: `{client.get('git_commit', NOT_RECORDED)}`; checkpoint `{ckpt}`",
              "", "## Evaluation", ""]
    lines += _eval_table(report)
    if report is not None:
        from medfm.evals.bootstrap import MIN_VALID_SHARE

        lines.append(f"\nSource: {report.get('source') or (report.get('model') or {}).get('source') or NOT_RECORDED}; CIs are 95% bootstrap intervals resampled "
                     "at patient level over the test set (few-shot: draws nested inside), clipped to the metric's "
                     f"range; 'unstable' = fewer than {MIN_VALID_SHARE:.0%} of the resamples had the metric defined. "
                     "Retrieval treats identical texts as one positive set and averages ties.")
    lines += ["", "## Resolved training config", "", "```yaml", yaml.safe_dump(config, sort_keys=False).rstrip(),
              "```", "", "## Files", "",
              "`model.safetensors` (weights, never pickle), `config.json` (rebuilds the towers and names their "
              "preprocessing), `checksums.sha256` (checked on every load).", ""]
    provenance = {"checkpoint": ckpt, "step": client.get("step"), "samples_seen": client.get("samples_seen"),
                  "world_size": client.get("world_size"), "git_commit": client.get("git_commit"),
                  "manifests": client.get("manifests", {}), "train_flops": flops, "parameters": total,
                  "training_config": config, "release": rel,
                  "eval": report["results"] if report is not None else None}
    return "\n".join(lines), provenance


def _preprocessing(sources: list[dict], config: dict) -> dict:
    """What inputs must look like: the shard preprocessing spec + the loader's collate settings."""
    from medfm.shards.manifest import load_manifest

    spec = {"collate": (config.get("data") or {}).get("collate", {})}
    for s in sources:
        if s.get("readable"):
            m = load_manifest(s["path"])
            spec[s["name"]] = {"preprocessing": m.get("preprocessing", {}), "vocabularies": m.get("vocabularies", {})}
    return spec


def release(checkpoint, name: str, version: str, zoo=None, eval_report=None, force: bool = False,
            log=print) -> Path:
    from medfm.model_zoo import MultiModalConfig, build_multimodal
    from medfm.model_zoo.checkpoint_io import consolidate, model_state_dict
    from medfm.model_zoo.zoo import Zoo

    root, tag = find_checkpoint(checkpoint)
    client = read_client(root, tag)
    config = client.get("config") or {}
    if "model" not in config:
        raise ConfigError(f"{root / tag}: its client state holds no resolved model config")
    report = read_eval_report(eval_report)
    zoo_obj = Zoo(zoo)
    ref = f"{name}:{version}"
    if not force and version in zoo_obj.read_index()["models"].get(name, {}):
        raise ConfigError(f"{ref} is already in the zoo {zoo_obj.root}; pass --force to replace it")
    log(f"consolidating {root / tag} ...")
    try:
        weights = model_state_dict(consolidate(root, tag))
    except ValueError as exc:  # incl. a file that would need unpickling: refused, one line
        raise ConfigError(str(exc)) from None
    mcfg = from_dict(MultiModalConfig, config["model"], "model")
    model = build_multimodal(mcfg)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ConfigError(f"{root / tag}: weights do not fit the saved model config (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]})")
    tokenizer = None
    if "text" in model.towers:  # the tokenizer training used (pretrain's build_data makes the same decision)
        from medfm.model_zoo.tokenizers import spec_from_run_config

        tokenizer = spec_from_run_config(model.towers["text"], config)
    sources = _source_manifests(config)
    card, provenance = build_card(name, version, model, config, client, sources, report, f"{root / tag}")
    dest = zoo_obj.publish(model, ref, config=mcfg, card=card, preprocessing=_preprocessing(sources, config),
                           force=force, summary=f"step {client.get('step')}, {provenance['parameters']:,} params",
                           extra=provenance, tokenizer=tokenizer)
    log(f"released {ref} -> {dest}")
    return dest
