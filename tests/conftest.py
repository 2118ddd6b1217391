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


@pytest.fixture
def demo_real_data():
    require_real(DEMO_REAL)
