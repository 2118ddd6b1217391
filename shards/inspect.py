"""``medfm shards inspect DIR [--sheet out.png]``: what a shard directory holds (counts per modality / split,
sizes, skipped inputs by reason) and a contact sheet: middle axial slices of volumes, images, the first leads of
signals, EHR event timelines and report snippets, one tile per sample."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

from medfm.shards.manifest import load_manifest
from medfm.shards.sample import SampleError, decode_sample
from medfm.shards.verify import iter_tar_samples


def summary(directory) -> str:
    m = load_manifest(directory)
    t = m["totals"]
    total_bytes = sum(s["bytes"] for s in m["shards"])
    lines = [f"{directory}: {t.get('samples', 0)} samples in {len(m['shards'])} shards, "
             f"{total_bytes / 1e6:.2f} MB, schema {m['schema']}",
             f"de-identification: {'applied (' + str(m['deid'].get('profile')) + ')' if m['deid'].get('applied') else 'NOT applied: identifiable'}"]
    lines.append("modalities: " + (", ".join(f"{k}={v}" for k, v in t.get("modalities", {}).items()) or "-"))
    for split, mods in t.get("split_modalities", {}).items():
        pats = t.get("patients", {}).get(split, 0)
        lines.append(f"  {split:<5} {t['splits'].get(split, 0):>6} samples, {pats} patients: "
                     + ", ".join(f"{k}={v}" for k, v in mods.items()))
    if m.get("skipped"):
        lines.append("skipped inputs: " + ", ".join(f"{k}={v}" for k, v in m["skipped"].items()))
    src = m.get("sources", {})
    if src.get("inputs"):
        lines.append("inputs: " + ", ".join(f"{k}={v}" for k, v in src["inputs"].items()))
    if src.get("reports", {}).get("sr_documents"):
        lines.append("SR reports: " + ", ".join(f"{k}={v}" for k, v in src["reports"].items()))
    if m.get("warnings"):
        lines.append(f"third-party warnings: {sum(m['warnings'].values())} of {len(m['warnings'])} kinds")
        lines.extend(f"  {n:>5}  {k}" for k, n in sorted(m["warnings"].items(), key=lambda kv: -kv[1])[:10])
    dropped = m.get("labels", {}).get("dropped_columns")
    if dropped:
        lines.append("undeclared index columns dropped: " + ", ".join(f"{k}={v}" for k, v in dropped.items()))
    for name, vocab in m.get("vocabularies", {}).items():
        lines.append(f"vocabulary {name}: {len(vocab)} codes")
    for s in m["shards"]:
        lines.append(f"  {s['name']}  {s['samples']:>5} samples  {s['bytes'] / 1e6:8.2f} MB  {s['sha256'][:12]}")
    return "\n".join(lines)


def _tile(ax, sample, vocab):
    ax.set_xticks([])
    ax.set_yticks([])
    title = f"{sample.key[:14]} [{sample.meta['split']}]"
    if sample.volume is not None:
        v = sample.volume.astype(np.float32)
        axis = int(np.argmin(v.shape)) if min(v.shape) == 1 else 0  # single-slice sagittal/coronal volumes
        sl = np.take(v, v.shape[axis] // 2, axis=axis)
        if sample.meta["volume"]["units"] == "HU":
            sl = np.clip((sl + 160.0) / 400.0, 0, 1)  # soft-tissue window W400 L40 for display
        ax.imshow(sl, cmap="gray", origin="lower")
        title += f"\nvolume {'x'.join(map(str, v.shape))}"
    elif sample.image is not None:
        img = sample.image
        ax.imshow(img[..., 0] if img.shape[2] == 1 else img, cmap="gray" if img.shape[2] == 1 else None)
        title += f"\nimage {img.shape[0]}x{img.shape[1]}"
    elif sample.signal is not None:
        sig, fs = sample.signal, sample.meta["signal"]["fs"]
        n = min(sig.shape[1], int(fs * 5))
        t = np.arange(n) / fs
        for i in range(min(3, sig.shape[0])):
            x = sig[i, :n]
            ax.plot(t, (x - x.mean()) / (x.std() + 1e-6) + 4 * i, lw=0.5)
        title += f"\nsignal {sig.shape[0]}x{sig.shape[1]} @{fs:g}Hz"
    elif sample.ehr is not None:
        e = sample.ehr
        ax.scatter(e[:, 0], e[:, 1], s=6)
        title += f"\nehr {len(e)} events"
    if sample.text:
        ax.text(0.02, 0.02, textwrap.fill(sample.text[:120], 30), transform=ax.transAxes, fontsize=5, va="bottom",
                color="yellow" if sample.image is not None or sample.volume is not None else "black")
        if sample.modalities == ["text"]:
            title += "\ntext"
    ax.set_title(title, fontsize=6)


def contact_sheet(directory, out_png, max_samples: int = 48, cols: int = 8) -> int:
    """Draw up to ``max_samples`` samples (spread over modalities) into ``out_png``; returns the tile count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory = Path(directory)
    m = load_manifest(directory)
    per_mod: dict[str, list] = {}
    quota = max(1, max_samples // 4)
    for shard in m["shards"]:
        for members in iter_tar_samples(directory / shard["name"]):
            try:
                s = decode_sample(members)
            except SampleError:
                continue
            lead = s.modalities[0]
            if len(per_mod.setdefault(lead, [])) < quota:
                per_mod[lead].append(s)
    chosen = [s for lst in per_mod.values() for s in lst][:max_samples]
    if not chosen:
        raise ValueError(f"{directory}: no decodable samples to draw")
    rows = (len(chosen) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.8, rows * 2.0), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, s in zip(axes.flat, chosen):
        ax.axis("on")
        _tile(ax, s, m.get("vocabularies", {}))
    fig.tight_layout()
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return len(chosen)
