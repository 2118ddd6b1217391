"""The demo corpus's labelled tasks: class names, captions and zero-shot prompts. The corpus and the demo's eval
suite read them from here; configs/evals/prompts/demo_*.yaml repeat two of them for ``medfm eval`` users, and
tests/test_evals_demo.py checks that they agree."""

from __future__ import annotations

from dataclasses import dataclass, field

TISSUES = ("grey matter", "white matter")
CAPTION_2D = "T1 MRI patch, mostly {tissue}, {side}, {level} {plane} slice"
CAPTION_3D = "T1 MRI block, mostly {tissue}, {side}, {level}"

RHYTHMS = ("regular", "irregular")
RATE_BANDS = ("60-100 bpm", "over 100 bpm")
CAPTION_ECG = "ECG lead MLII, {rhythm} rhythm, heart rate {band} ({hr} bpm)"

DIAGNOSES = ("benign", "malignant")


@dataclass
class TaskSpec:
    """One labelled evaluation task of the corpus (what the eval suite needs to run it)."""

    dataset: str
    modality: str
    label: str                       # key in meta.labels (integer class index)
    classes: list[str]
    prompts: dict[str, str] = field(default_factory=dict)  # class name -> zero-shot prompt ({} = no text pairs)
    caption_template: str | None = None
    derived_from: str = ""


TASKS = {
    "mri2d_tissue": TaskSpec("mri2d", "image", "tissue", list(TISSUES),
                             {t: f"T1 MRI patch, mostly {t}" for t in TISSUES}, CAPTION_2D,
                             "argmax of the mean nilearn MNI152 GM / WM probability over the patch"),
    "mri3d_tissue": TaskSpec("mri3d", "volume", "tissue", list(TISSUES),
                             {t: f"T1 MRI block, mostly {t}" for t in TISSUES}, CAPTION_3D,
                             "argmax of the mean nilearn MNI152 GM / WM probability over the block"),
    "ecg_rhythm": TaskSpec("ecg", "signal", "rhythm", list(RHYTHMS),
                           {r: f"ECG lead MLII, {r} rhythm" for r in RHYTHMS}, CAPTION_ECG,
                           "sleepecg.detect_heartbeats: irregular if any RR deviates > 15% from the window median"),
    "ecg_rate": TaskSpec("ecg", "signal", "rate", list(RATE_BANDS),
                         {b: f"ECG lead MLII, heart rate {b}" for b in RATE_BANDS}, CAPTION_ECG,
                         "sleepecg.detect_heartbeats: 60 / mean RR in the window, banded at 100 bpm"),
    "ehr_malignant": TaskSpec("ehr", "ehr", "malignant", list(DIAGNOSES), {}, None,
                              "the diagnosis column of scikit-learn's breast-cancer table (not an input event)"),
}
