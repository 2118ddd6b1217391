"""Shared test plumbing: the real sample files every reader is proven on.

They ship inside the packages of the `dev`/`demo` extras, which `make test` installs, so a missing one is a broken
environment, not a reason to skip: the test fails with the package to install (a skipped reader test proves nothing).
"""

from __future__ import annotations

import pytest
from slurm_cluster import slurm_cluster  # noqa: F401  (a real one-node SLURM cluster, for any test that names it)

from medfm.shards import realdata

# Every real file the demo corpus (and the suites built on it) reads.
DEMO_REAL = ["dicom_ct", "dicom_mr", "dicom_enhanced_ct", "dicom_enhanced_mr", "dicom_radiograph", "dicom_ecg",
             "dicom_mr_series_dir", "nifti_anatomical", "nifti_mni152", "edf_generator", "ecg_mitbih",
             "table_stanford_heart"]


def require_real(names) -> None:
    """Fail (never skip) when a real sample file is missing, naming the package that ships it."""
    missing = []
    for name in names:
        try:
            realdata.require(name)
        except realdata.RealDataMissing as exc:
            missing.append(str(exc))
    if missing:
        pytest.fail("; ".join(missing) + " (`make test` installs the dev extra)", pytrace=False)


# torch.distributed's env:// variables. A test that trains in-process makes a world of one
# (medfm.pretrain.engine.init_distributed sets them in os.environ, and the process group keeps listening on
# MASTER_PORT); a later test's subprocess that inherits them joins that "world" and dies with EADDRINUSE.
DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _no_leaked_world_env():
    import os

    saved = {k: os.environ.get(k) for k in DIST_ENV}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def demo_real_data():
    require_real(DEMO_REAL)
