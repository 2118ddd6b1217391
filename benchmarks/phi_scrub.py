"""Free-text scrubbers on the planted-PHI corpus (medfm.shards.phi_corpus): recall per identifier kind and
over-redaction of clinical phrases, for the previous medfm scrubber, the current one, and maintained libraries that
work offline (scrubadub's default detectors; presidio-analyzer's pattern recognizers, no spaCy model), alone and
chained after medfm's.

    python benchmarks/phi_scrub.py [--docs 200] [--png phi_recall.png]

Names are measured without the DICOM header terms medfm also passes (those catch the patient's own name always).
"""

from __future__ import annotations

import argparse
import re
import time

from medfm.shards.phi_corpus import evaluate, make_corpus
from medfm.shards.scrub import scrub_text as medfm_scrub


def previous_scrub(text: str) -> str:
    """medfm's scrubber before issue #14 (shards/deid.py at fdaba94), verbatim, as the baseline."""
    date = re.compile("|".join([
        r"\b\d{4}[-/.]\d{1,2}[-/.]\d{1,2}\b", r"\b\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4}\b",
        r"\b(?:19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\b",
        r"\b\d{1,2}(?:st|nd|rd|th)?\s+(?:jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]*\.?,?\s+\d{2,4}\b",
        r"\b(?:jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]*\.?\s+\d{1,2}(?:st|nd|rd|th)?,?\s+\d{2,4}\b"]),
        re.IGNORECASE)
    text = re.sub(r"\b[\w.+-]+@[\w-]+\.[\w.-]+\b", "[EMAIL]", text)
    text = date.sub("[DATE]", text)
    text = re.sub(r"\b(?:MRN|ID|Acc(?:ession)?)?[:#\s]*[A-Z]{0,3}\d{6,}\b", "[ID]", text, flags=re.IGNORECASE)
    return re.sub(r"(?:\+?\d[\d\s().-]{7,}\d)", "[ID]", text)


def scrubadub_scrub():
    import scrubadub

    scrubber = scrubadub.Scrubber()
    return scrubber.clean


def presidio_scrub():
    """presidio-analyzer's predefined pattern recognizers called directly: no NlpEngine, so no spaCy model."""
    from presidio_analyzer import predefined_recognizers as pr

    names = ["EmailRecognizer", "PhoneRecognizer", "DateRecognizer", "UsSsnRecognizer", "UrlRecognizer",
             "IpRecognizer", "MedicalLicenseRecognizer", "UsLicenseRecognizer", "UsBankRecognizer",
             "UsPassportRecognizer", "CreditCardRecognizer", "IbanRecognizer", "UsItinRecognizer"]
    recs = [getattr(pr, n)() for n in names if hasattr(pr, n)]

    def scrub(text: str) -> str:
        spans = []
        for rec in recs:
            spans += [(r.start, r.end) for r in rec.analyze(text, rec.supported_entities, None) if r.score >= 0.3]
        for s, e in sorted(spans, key=lambda x: -x[0]):
            text = text[:s] + "[PHI]" + text[e:]
        return text

    return scrub


def chain(*fns):
    def run(text):
        for f in fns:
            text = f(text)
        return text

    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=200)
    ap.add_argument("--png", default=None)
    args = ap.parse_args(argv)
    docs = make_corpus(args.docs)
    scrubbers = {"medfm before #14": previous_scrub, "medfm patterns": medfm_scrub}
    for label, make in (("scrubadub", scrubadub_scrub), ("presidio patterns", presidio_scrub)):
        try:
            fn = make()
        except Exception as exc:  # not installed: the row says so
            print(f"{label}: unavailable ({exc.__class__.__name__}: {exc})")
            continue
        scrubbers[label] = fn
        scrubbers[f"medfm + {label}"] = chain(medfm_scrub, fn)
    results, rates = {}, {}
    for label, fn in scrubbers.items():
        t = time.perf_counter()
        results[label] = evaluate(fn, docs)
        rates[label] = len(docs) / (time.perf_counter() - t)
    kinds = sorted(k for k in next(iter(results.values())) if not k.startswith("benign:"))
    benign = sorted(k for k in next(iter(results.values())) if k.startswith("benign:"))
    print(f"{len(docs)} documents; recall = planted identifiers fully removed; kept = clinical phrases unchanged\n")
    print("| kind | n | " + " | ".join(scrubbers) + " |")
    print("|---|---|" + "---|" * len(scrubbers))
    for k in kinds:
        n = results["medfm patterns"][k]["planted"]
        print(f"| {k} | {n} | " + " | ".join(f"{results[s][k]['removed'] / n:.2f}" for s in scrubbers) + " |")
    tot = {s: sum(results[s][k]["removed"] for k in kinds) / sum(results[s][k]["planted"] for k in kinds)
           for s in scrubbers}
    print("| **all identifiers** | | " + " | ".join(f"**{tot[s]:.3f}**" for s in scrubbers) + " |")
    for k in benign:
        n = results["medfm patterns"][k]["total"]
        print(f"| kept {k[7:]} | {n} | " + " | ".join(f"{results[s][k]['kept'] / n:.2f}" for s in scrubbers) + " |")
    print("| docs/s | | " + " | ".join(f"{rates[s]:.0f}" for s in scrubbers) + " |")
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(10, 4))
        w = 0.8 / len(scrubbers)
        for j, s in enumerate(scrubbers):
            ax.bar([i + j * w for i in range(len(kinds))],
                   [results[s][k]["removed"] / results[s][k]["planted"] for k in kinds], w, label=s)
        ax.set_xticks([i + 0.4 - w / 2 for i in range(len(kinds))], kinds, rotation=30, ha="right")
        ax.set_ylabel("recall (planted identifiers removed)")
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.png, dpi=120)
        print(f"plot: {args.png}")


if __name__ == "__main__":
    main()
