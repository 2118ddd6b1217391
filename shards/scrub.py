"""Free-text de-identification (reports, captions, SR text, string labels): medfm's pattern scrubber.

HIPAA Safe Harbor identifiers that occur in radiology text, each replaced by a bracketed tag:
names ([NAME]: the source's own names/ids, names after titles, after role/communication cues and before
credentials, "Last, First" after a cue), record and accession numbers ([ID]: labelled ids, long digit runs, mixed
letter+digit codes), phone/fax numbers ([PHONE]), street addresses, PO boxes and ZIP codes ([ADDRESS]), every date
element finer than the year ([DATE]: ≥ 10 written formats), ages over 89 ("90+") and e-mail addresses ([EMAIL]).
Measured on the planted-PHI corpus of :mod:`medfm.shards.phi_corpus` against the previous scrubber and maintained
libraries in ``benchmarks/phi_scrub.py`` (results in docs/notes/shards-ingest.md).

Patterns, not a model: nothing is downloaded, the output is the same on every machine, and what it cannot catch
(a bare name with no cue, in running text) is stated in the notes rather than hoped away.
"""

from __future__ import annotations

import re

_MONTH = (r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|jun(?:e)?|jul(?:y)?|aug(?:ust)?|"
          r"sep(?:t(?:ember)?)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)\.?")
_DAY = r"(?:0?[1-9]|[12]\d|3[01])(?:st|nd|rd|th)?"
_DATE_PATTERNS = [
    r"\b\d{4}[-/.]\d{1,2}[-/.]\d{1,2}(?:[T ]\d{1,2}:\d{2}(?::\d{2})?)?\b",  # 2021-03-04, 2021-03-04T10:22
    r"\b\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4}\b",                   # 03/14/1951, 14.03.1951, 3-14-51
    r"\b(?:19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])(?:\d{4,6})?\b",  # 20210304 (DICOM DA / DT)
    rf"\b{_DAY}(?:\s+of)?[\s-]+{_MONTH},?[\s-]+\d{{2,4}}\b",   # 14 March 1951, 14-MAR-2019, 14th of March, 2019
    rf"\b{_MONTH}\s+{_DAY},?\s+\d{{2,4}}\b",                   # March 14, 1951, Mar 14 2019
    rf"\b{_MONTH}\s+{_DAY}\b(?!\s*(?:mm|cm|x|%))",            # March 14 (no year)
    rf"\b{_MONTH}\s+(?:of\s+)?(?:19|20)\d{{2}}\b",              # March 2019
    rf"\b{_DAY}\s+of\s+{_MONTH}",                             # 4th of July
    r"\b\d{1,2}/\d{1,2}\b(?=\s*(?:at|@)\s*\d)",               # 3/14 at 10:00
]
DATE_RE = re.compile("|".join(_DATE_PATTERNS), re.IGNORECASE)
EMAIL_RE = re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b")
PHONE_RE = re.compile(r"(?<![\w/.-])(?:\+?1[\s.-]?)?(?:\(\d{3}\)\s*|\d{3}[\s.-])\d{3}[\s.-]\d{4}(?:\s*(?:x|ext\.?)\s*\d{1,5})?"
                      r"(?![\w/-])", re.IGNORECASE)
_ID_LABEL = (r"(?:MRN|MR\s*#|MR\s+number|medical\s+record(?:\s+(?:number|no\.?|#))?|record\s*(?:#|no\.?|number)|"
             r"patient\s+id|pt\s+id|ID|acc(?:ession)?(?:\s*(?:#|no\.?|number))?|acc#|order\s*(?:#|no\.?|number)|"
             r"visit\s*(?:#|no\.?|number)|encounter\s*(?:#|no\.?)|account\s*(?:#|no\.?|number)|SSN|"
             r"social\s+security(?:\s+number)?|study\s*(?:#|no\.?))")
LABELLED_ID_RE = re.compile(rf"\b{_ID_LABEL}\s*[:#=]?\s*(?=[A-Z0-9-]*\d)[A-Z0-9][A-Z0-9-]{{2,15}}\b", re.IGNORECASE)
LONG_NUMBER_RE = re.compile(r"\b\d{6,}\b|\b\d{3}-\d{2}-\d{4}\b")
# letters and digits mixed, 5-12 chars, at least four digits (C5-C6, COVID-19, H1N1 are not ids): MRN-like codes (A12345B, 77Z3412, RAD2023-0045)
MIXED_ID_RE = re.compile(r"\b(?=(?:[A-Z-]*\d){4})(?=[A-Z0-9-]*[A-Z])[A-Z0-9](?:[A-Z0-9]|-(?=[A-Z0-9])){4,11}\b")
_AGE_UNIT = r"(?:years?|yrs?|y\.?o\.?|y/o|yo)"
AGE_OVER_89_RE = re.compile(
    rf"\b(?:(?:9\d|1[0-4]\d)(?:\s*|-){_AGE_UNIT}(?:[\s-]+old)?|(?:aged?|age:)\s*(?:9\d|1[0-4]\d)\b(?:\s*{_AGE_UNIT})?"
    rf"|(?:9\d|1[0-4]\d)(?=\s*(?:M|F|male|female)\b))", re.IGNORECASE)
_STREET = (r"(?:street|st|avenue|ave|road|rd|boulevard|blvd|lane|ln|drive|dr|court|ct|way|place|pl|terrace|ter|"
           r"circle|cir|parkway|pkwy|highway|hwy|square|sq|trail|trl)")
ADDRESS_RE = re.compile(
    rf"\b\d{{1,6}}\s+(?:[NSEW]\.?\s+)?(?:[A-Z][A-Za-z'-]+\s+){{1,3}}(?i:{_STREET})\b\.?"
    rf"(?:,?\s*(?i:apt|apartment|suite|ste|unit|#)\.?\s*[A-Z0-9-]+)?"
    rf"(?:,\s*[A-Z][A-Za-z.'-]+(?:\s+[A-Z][A-Za-z.'-]+)*)?(?:,?\s*[A-Z]{{2}}\b)?(?:\s+\d{{5}}(?:-\d{{4}})?)?"
    rf"|\bP\.?\s*O\.?\s+(?i:box)\s+\d+\b"
    rf"|\b(?:[A-Z][a-z]+(?:\s+[A-Z][a-z]+)?,\s*)?[A-Z]{{2}}\s+\d{{5}}(?:-\d{{4}})?\b")  # [City, ]ST 12345

_NAME_TOKEN = r"[A-Z][a-zA-Z'’-]+"
_FULL_NAME = rf"{_NAME_TOKEN}(?:\s+[A-Z]\.)?(?:\s+{_NAME_TOKEN}){{0,2}}"
TITLE_NAME_RE = re.compile(rf"\b(?:Dr|Mr|Mrs|Ms|Miss|Mx|Prof|Doctor|Nurse)\.?\s+{_FULL_NAME}")
# a cue that says a person's name follows (case-insensitive cue, capitalised name)
_CUES = (r"patient(?:\s+name)?|pt|name|signed\s+by|electronically\s+signed\s+by|dictated\s+by|transcribed\s+by|"
         r"read\s+by|reviewed\s+by|reported\s+by|interpreted\s+by|attending|radiologist|physician|referring"
         r"(?:\s+physician)?|resident|fellow|technologist|tech|cc|contact|daughter|son|wife|husband|mother|father|"
         r"spouse|sister|brother|guardian|discussed\s+with|communicated\s+to|called\s+to|notified|informed|"
         r"paged|results\s+given\s+to|spoke\s+with|per")
CUE_NAME_RE = re.compile(rf"(?i:\b(?:{_CUES}))\s*[:,-]?\s+(?:(?:Dr|Mr|Mrs|Ms)\.?\s+)?"
                         rf"(?:{_NAME_TOKEN},\s+{_NAME_TOKEN}|{_FULL_NAME})")
CREDENTIAL_NAME_RE = re.compile(rf"\b{_FULL_NAME},?\s+(?:MD|M\.D\.|DO|D\.O\.|RN|PhD|NP|PA-C|RT|FRCR|MBBS)\b")
# words a cue may be followed by that are not names (so "Patient Denies", "per Protocol" keep their words)
_NOT_NAMES = {"the", "a", "an", "was", "is", "has", "had", "denies", "reports", "states", "with", "without", "and",
              "in", "on", "at", "to", "for", "of", "no", "not", "history", "presents", "protocol", "request",
              "report", "study", "exam", "imaging", "department", "radiology", "emergency", "er", "ed", "icu",
              "clinic", "team", "service", "unit", "staff", "who", "after", "before", "underwent", "left", "right",
              "mri", "ct", "pet", "ultrasound", "x-ray", "contrast", "prior", "comparison", "findings",
              "impression", "positioned", "tolerated", "consent", "chart", "standard", "routine"}


# Name dictionary: given names and surnames of Faker's person providers (MIT; maintained; many locales), Latin
# script. Words that are also English or clinical words, and eponyms, are never treated as names by themselves.
NOT_A_NAME = set("""May June April August Will Mark Grant Hope Faith Joy Rose Iris Ruby Dawn Summer Autumn Page Chase
Bill Sunny Lane Long Young Little White Brown Green Black Gray Grey Bell Hill Wood King Price Rice Hall Ward Cook
Best Case Child Major Frank Guy Son Left Right Rich Sage Star Sky Storm Patient Doctor Nurse Normal Mass Bone Chest
Head Neck Back Foot Hand Arm Liver Heart Brain Spine Stone Post Early Late Bay Day Small Large Short Good Wise Strong
Sharp Sweet Lung Hart Lamb Fox Wolf Bird Swan Crane Mercy Given Noted Series Image Study Report Impression Findings
History Comparison Technique Clinical Indication Contrast Axial Coronal Sagittal North South East West New Old Low
High Free Gross Mild Moderate Severe Stable Chronic Acute Prior Stage Grade Type Class Level Note See Per Ray Gene
Cyst Nodule Tumor Cancer Lymphoma Disease Syndrome Fracture Sign Palsy Node Lobe Fossa Canal Duct Valve Vein Artery
Parkinson Hodgkin Wilms Crohn Baker Down Alzheimer Paget Cushing Addison Graves Hashimoto Barrett Colles Bankart
Hill-Sachs Monteggia Galeazzi Smith Jones Barton Bennett Boxer Charcot Wernicke Broca Sylvius Willis Luschka Morgagni
Bochdalek Meckel Zenker Klatskin Krukenberg Virchow Sister Mary Joseph Brodie Ewing Kaposi Burkitt Hurthle Warthin
Schmorl Scheuermann Perthes Osgood Schlatter Kienbock Preiser Sever Kohler Freiberg Baastrup Forestier Modic Tornwaldt
Thornwaldt Caroli Budd Chiari Dandy Walker Arnold Klippel Feil Sprengel Madelung Poland Marfan Ehlers Danlos Turner
Noonan Klinefelter Edwards Patau Angelman Prader Willi Williams Wilson Menkes Fahr Huntington Pick Creutzfeldt Jakob
Guillain Barre Lou Gehrig Tay Sachs Gaucher Niemann Fabry Hunter Hurler Morquio Pompe Whipple Hirschprung Hirschsprung
Peyronie Dupuytren Ledderhose Raynaud Buerger Takayasu Kawasaki Behcet Wegener Churg Strauss Sjogren Still Reiter
Bouchard Heberden Baker's Lisfranc Chopart Jones' Maisonneuve Tillaux Salter Harris Segond Stener Hoffa Bristow
Latarjet Neer Codman Hawkins Jobe Speed Yergason Phalen Tinel Finkelstein Allen Adson Roos Babinski Romberg Kernig
Brudzinski Murphy McBurney Rovsing Blumberg Cullen Grey-Turner Kehr Courvoisier Trousseau Chvostek Homans Virchow's
Mallory Weiss Boerhaave Zollinger Ellison Peutz Jeghers Gardner Turcot Lynch Cowden Carney Conn Cushing's Nelson
Sheehan Simmonds Kallmann Laron Hand Schuller Christian Letterer Siwe Erdheim Chester Rosai Dorfman Castleman Kikuchi
Kimura Waldenstrom Bence Reed Sternberg Auer Howell Jolly Heinz Pappenheimer Cabot Dohle Pelger Huet Chediak Higashi
Bernard Soulier Glanzmann Wiskott Aldrich DiGeorge Bruton Kostmann Shwachman Diamond Blackfan Fanconi Evans Felty
Caplan Hamman Rich Mendelson Loeffler Churg Goodpasture Alport Berger Fanconi's Bartter Gitelman Liddle""".split())
_EPONYM_NEXT = re.compile(r"\s+(?:disease|syndrome|tumou?r|lymphoma|fracture|cyst|sign|palsy|phenomenon|"
                          r"classification|score|criteria|node|lesion|deformity|ulcer|hernia|procedure|"
                          r"operation|view|line|angle|test|'s)\b", re.IGNORECASE)
_NAMES: tuple[frozenset, frozenset, frozenset] | None = None


def name_dictionary() -> tuple[frozenset, frozenset]:
    """(given names, surnames) of every Faker person provider (all locales; romanized lists where a locale has
    them), Latin script only; cached. Callers subtract :data:`NOT_A_NAME` where a word alone would be ambiguous."""
    global _NAMES
    if _NAMES is None:
        import importlib
        import pkgutil

        import faker.providers.person as people

        first, last = set(), set()
        for mod in pkgutil.iter_modules(people.__path__):
            try:
                prov = importlib.import_module(f"{people.__name__}.{mod.name}").Provider
            except (ImportError, AttributeError):
                continue
            for attr in dir(prov):
                if not (attr.startswith(("first_names", "first_romanized_names", "last_names",
                                         "last_romanized_names"))):
                    continue
                dest = first if attr.startswith("first") else last
                values = getattr(prov, attr)
                for n in (values if isinstance(values, (tuple, list, dict, set)) else ()):
                    n = str(n)
                    if len(n) >= 2 and n[:1].isupper() and n.replace("'", "").replace("-", "").isalpha() \
                            and n.isascii():
                        dest.add(n)
        _NAMES = (frozenset(first), frozenset(last), frozenset(first | last))
    return _NAMES[:2]


_PAIR_RE = re.compile(rf"\b({_NAME_TOKEN})((?:\s+[A-Z]\.)?\s+)({_NAME_TOKEN})\b")
_AFTER_WORD_RE = re.compile(rf"\b(by|with|to|from|and|per|for|saw|see|called|paged|asked)\s+({_NAME_TOKEN})\b")


def _dictionary_names(text: str) -> str:
    """Two capitalised words where the first is a known given name (or the second a known surname and the first a
    name too), and a known name alone after a preposition-like cue ("seen by Kevin"); eponyms ("Parkinson
    disease") and words in :data:`NOT_A_NAME` are left alone unless the pair is unambiguous."""
    first, last = name_dictionary()
    names = _NAMES[2]

    def pair(m: re.Match) -> str:
        a, b = m.group(1), m.group(3)
        if a.isupper() or b.isupper() or _EPONYM_NEXT.match(text, m.end()):
            return m.group(0)
        if a in first and a not in NOT_A_NAME and (b in names or b not in NOT_A_NAME):
            return "[NAME]"
        if b in last and b not in NOT_A_NAME and a in names:
            return "[NAME]"
        if a in first and b in last:  # "Maria Smith": both halves ambiguous alone, unambiguous together
            return "[NAME]"
        return m.group(0)

    text = _PAIR_RE.sub(pair, text)

    def single(m: re.Match) -> str:
        w = m.group(2)
        if w in names and w not in NOT_A_NAME and not _EPONYM_NEXT.match(text, m.end()):
            return f"{m.group(1)} [NAME]"
        return m.group(0)

    return _AFTER_WORD_RE.sub(single, text)


def _cue_sub(m: re.Match) -> str:
    text = m.group(0)
    head = re.match(rf"(?i:\b(?:{_CUES}))\s*[:,-]?\s+(?:(?:Dr|Mr|Mrs|Ms)\.?\s+)?", text)
    name = text[head.end():] if head else text
    words = re.findall(r"[A-Za-z'’-]+", name)
    if not words or words[0].lower() in _NOT_NAMES:
        return text
    return text[: head.end()] + "[NAME]" if head else "[NAME]"


def scrub_text(text: str, terms=()) -> str:
    """``text`` with identifiers replaced (module docstring); ``terms`` = names/ids the source's metadata revealed
    (the DICOM patient name and id, referring physician, institution), removed wherever they occur."""
    if not text:
        return text
    text = EMAIL_RE.sub("[EMAIL]", text)  # before names: a name inside an address must not break the match
    for term in sorted({str(t) for t in terms if t and len(str(t)) >= 2}, key=len, reverse=True):
        text = re.sub(rf"(?<![A-Za-z0-9]){re.escape(term)}(?![A-Za-z0-9])", "[NAME]", text, flags=re.IGNORECASE)
    text = LABELLED_ID_RE.sub("[ID]", text)
    text = PHONE_RE.sub("[PHONE]", text)
    text = DATE_RE.sub("[DATE]", text)
    text = AGE_OVER_89_RE.sub("90+", text)
    text = ADDRESS_RE.sub("[ADDRESS]", text)
    text = TITLE_NAME_RE.sub("[NAME]", text)
    text = CREDENTIAL_NAME_RE.sub("[NAME]", text)
    text = CUE_NAME_RE.sub(_cue_sub, text)
    text = _dictionary_names(text)
    text = LONG_NUMBER_RE.sub("[ID]", text)
    text = MIXED_ID_RE.sub("[ID]", text)
    return text
