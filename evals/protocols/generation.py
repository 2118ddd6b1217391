"""Report generation metrics: corpus BLEU-4 (Papineni et al.), ROUGE-L (LCS F-measure, Lin 2004), and
finding-level F1 from a keyword labeller with NegEx-style negation, so a report that says "no effusion" is not
credited for "effusion".

Generation itself (the model's caption decoder) is the caller's; this module scores text against text.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from medfm.evals import metrics as M
from medfm.evals.bootstrap import bootstrap_ci
from medfm.evals.protocols.base import ProtocolError, ProtocolResult, Row

_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens (punctuation dropped), the usual normalisation for report metrics."""
    return _TOKEN.findall(text.lower())


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu(references: Sequence[str], hypotheses: Sequence[str], max_n: int = 4) -> float:
    """Corpus-level BLEU with uniform weights and the brevity penalty (one reference per hypothesis); 0 when some
    n-gram order has no match (no smoothing), as the original definition."""
    if len(references) != len(hypotheses) or not references:
        raise M.MetricError(f"BLEU needs equal, non-zero numbers of references and hypotheses "
                            f"({len(references)} vs {len(hypotheses)})")
    matches, totals = [0] * max_n, [0] * max_n
    ref_len = hyp_len = 0
    for ref, hyp in zip(references, hypotheses):
        r, h = tokenize(ref), tokenize(hyp)
        ref_len, hyp_len = ref_len + len(r), hyp_len + len(h)
        for n in range(1, max_n + 1):
            hc, rc = _ngrams(h, n), _ngrams(r, n)
            matches[n - 1] += sum(min(c, rc[g]) for g, c in hc.items())  # clipped counts
            totals[n - 1] += max(len(h) - n + 1, 0)
    if hyp_len == 0 or min(matches) == 0:
        return 0.0
    log_p = sum(math.log(m / t) for m, t in zip(matches, totals)) / max_n
    bp = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return float(bp * math.exp(log_p))


def _lcs(a: list[str], b: list[str]) -> int:
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(reference: str, hypothesis: str, beta: float = 1.0) -> float:
    """Sentence ROUGE-L F-measure: LCS-based precision and recall combined with weight ``beta`` (1 = F1, as the
    rouge-score package)."""
    r, h = tokenize(reference), tokenize(hypothesis)
    lcs = _lcs(r, h)
    if lcs == 0:
        return 0.0
    p, rec = lcs / len(h), lcs / len(r)
    return float((1 + beta**2) * p * rec / (rec + beta**2 * p))


@dataclass
class KeywordLabeller:
    """Finding → keywords; a mention is negated when a negation cue occurs within ``window`` tokens before it in the
    same sentence (the core rule of NegEx / the CheXpert labeller)."""

    findings: dict[str, list[str]]
    negations: list[str] = field(default_factory=lambda: ["no", "not", "without", "negative", "free", "absent",
                                                          "resolved", "denies", "excluded"])
    window: int = 5

    def __post_init__(self):
        if not self.findings:
            raise ProtocolError("keyword labeller needs at least one finding with keywords")
        self._kw = {f: [tokenize(k) for k in kws] for f, kws in self.findings.items()}
        self._neg = set(self.negations)

    def label(self, text: str) -> np.ndarray:
        """0/1 vector over findings (in dict order): 1 when some keyword is mentioned without a negation."""
        out = np.zeros(len(self._kw), dtype=np.int64)
        for sentence in re.split(r"[.;\n]+", text.lower()):
            toks = tokenize(sentence)
            for j, kws in enumerate(self._kw.values()):
                for kw in kws:
                    for i in range(len(toks) - len(kw) + 1):
                        if toks[i:i + len(kw)] == kw and not (self._neg & set(toks[max(0, i - self.window):i])):
                            out[j] = 1
        return out

    def label_all(self, texts: Sequence[str]) -> np.ndarray:
        return np.stack([self.label(t) for t in texts]) if texts else np.zeros((0, len(self._kw)), np.int64)


def generation_metrics(references: Sequence[str], hypotheses: Sequence[str], groups, labeller: KeywordLabeller | None,
                       n_boot: int = 1000, seed: int = 0) -> ProtocolResult:
    """BLEU-4 and ROUGE-L (and finding F1 when a labeller is given) with patient-level bootstrap CIs."""
    refs, hyps = np.asarray(list(references), dtype=object), np.asarray(list(hypotheses), dtype=object)
    rows = [Row("bleu4", bootstrap_ci(lambda r, h: corpus_bleu(list(r), list(h)), [refs, hyps], groups=groups,
                                      n_boot=n_boot, seed=seed, bounds=(0.0, 1.0))),
            Row("rouge_l", bootstrap_ci(np.mean, [np.array([rouge_l(r, h) for r, h in zip(refs, hyps)])],
                                        groups=groups, n_boot=n_boot, seed=seed, bounds=(0.0, 1.0)))]
    if labeller is not None:
        y_ref, y_hyp = labeller.label_all(list(refs)), labeller.label_all(list(hyps))
        for avg in ("micro", "macro"):
            rows.append(Row(f"finding_f1_{avg}", bootstrap_ci(lambda a, b, avg=avg: M.f1(a, b, avg), [y_ref, y_hyp],
                                                              groups=groups, n_boot=n_boot, seed=seed,
                                                              bounds=(0.0, 1.0))))
    return ProtocolResult(rows, None, {"n": len(refs)})
