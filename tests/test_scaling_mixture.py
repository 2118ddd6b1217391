"""Mixture fit: a planted per-modality law L_m = E_m + B_m·(s_m·D)^-β_m is recovered from sweep-shaped rows, the
recommended mixture matches the planted law's own optimum, bad inputs fail in one line, and the CLI writes its
plot and JSON."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from medfm.launch.cli import main
from medfm.launch.mixture import fit_mixture, read_mixture_points
from medfm.schema import ConfigError

# Planted laws: image learns fast and saturates high, signal slowly toward a low floor.
LAWS = {"image": (1.0, 40.0, 0.45), "signal": (0.6, 8.0, 0.25)}


def planted_rows(noise=0.005, seed=0, shares=(0.25, 0.5, 0.75), budgets=(500, 1500, 4500)):
    rng = np.random.default_rng(seed)
    rows = []
    for d in budgets:
        for s in shares:  # s = share of source "mri" (image); the rest is "ecg" (signal)
            share = {"image": s, "signal": 1 - s}
            row = {"name": f"w32__d{d}__s{s}", "size": "w32", "samples": d, "status": "done",
                   "share/mri": s, "share/ecg": 1 - s, "share/image": s, "share/signal": 1 - s}
            for m, (e, b, beta) in LAWS.items():
                row[f"eval_loss/mae:{m}"] = (e + b * (share[m] * d) ** -beta) * np.exp(rng.normal(0, noise))
            rows.append(row)
    return rows


def write(path, rows):
    cols = list(rows[0])
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    return path


def true_optimum(d):
    s = np.linspace(0, 1, 200001)[1:-1]
    total = sum(e + b * (share * d) ** -beta for (e, b, beta), share in zip(LAWS.values(), (s, 1 - s)))
    return s[np.argmin(total)]


def test_planted_mixture_law_and_recommendation(tmp_path):
    pts = read_mixture_points([write(tmp_path / "r.csv", planted_rows())])
    assert pts.sources == ["mri", "ecg"] and pts.modalities == ["image", "signal"]
    assert pts.membership.tolist() == [[1, 0], [0, 1]]
    report, _ = fit_mixture(pts, target=20000, n_boot=20, seed=0)
    for m, (e, _b, beta) in LAWS.items():
        law = report.laws[m]
        assert abs(law["beta"] - beta) < 0.05, (m, law)
        assert abs(law["E"] - e) / e < 0.1, (m, law)
    s_true = true_optimum(20000)
    rec = report.recommended["sources"]["mri"]
    lo, hi = report.recommended["source_intervals"]["mri"]
    # Stated tolerance: the recommended share is within 0.05 of the planted law's optimum, which its interval covers.
    assert abs(rec - s_true) < 0.05 and lo - 0.01 <= s_true <= hi + 0.01, (rec, s_true, lo, hi)
    assert abs(report.recommended["sources"]["ecg"] + rec - 1) < 1e-9


def test_unidentified_floor_is_reported(tmp_path):
    rows = planted_rows(noise=0.0)
    for r in rows:  # signal loss a pure power law with no floor inside these budgets
        r["eval_loss/mae:signal"] = 8.0 * (r["share/signal"] * r["samples"]) ** -0.25
    report, _ = fit_mixture(read_mixture_points([write(tmp_path / "r.csv", rows)]), 20000, n_boot=10)
    assert any(w.startswith("signal: E →") for w in report.warnings), report.warnings


@pytest.mark.parametrize("mutate, expect", [
    (lambda rows: [dict(r, **{"share/mri": 0.5, "share/ecg": 0.5, "share/image": 0.5, "share/signal": 0.5})
                   for r in rows], "fewer distinct mixtures than sources"),
    (lambda rows: [{k: v for k, v in r.items() if not k.startswith("share/")} for r in rows],
     "no single-modality held-out losses with a share column"),
    (lambda rows: [dict(r, **{"eval_loss/mae:image": "x"}) for r in rows], "column 'eval_loss/mae:image'"),
    (lambda rows: [dict(r, status="failed(1)") for r in rows], "no finished points"),
])
def test_bad_mixture_input_is_one_line(tmp_path, capsys, mutate, expect):
    path = write(tmp_path / "r.csv", mutate(planted_rows()))
    with pytest.raises(ConfigError) as info:
        fit_mixture(read_mixture_points([path]), 1000, n_boot=2)
    assert expect in str(info.value) and "\n" not in str(info.value)
    assert main(["scaling", "mixture", str(path), "--target-samples", "1000", "--bootstrap", "2"]) == 2
    assert expect in capsys.readouterr().err


def test_cli_mixture_writes_plot_and_json(tmp_path, capsys):
    rows = planted_rows()
    a, b = write(tmp_path / "a.csv", rows[:5]), write(tmp_path / "b.csv", rows[5:])  # two sweeps' results
    rc = main(["scaling", "mixture", str(a), str(b), "--target-samples", "20000", "--bootstrap", "10",
               "--size", "w32", "--plot", str(tmp_path / "mix.png"), "--json", str(tmp_path / "mix.json")])
    out = capsys.readouterr().out
    assert rc == 0 and "recommended mixture at D = 2e+04" in out and "mri: share" in out
    assert (tmp_path / "mix.png").stat().st_size > 10_000
    report = json.loads((tmp_path / "mix.json").read_text())
    assert report["n_points"] == 9 and set(report["laws"]) == {"image", "signal"}
