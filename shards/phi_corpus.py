"""A planted-PHI corpus: synthetic radiology report sentences with known identifiers, to measure text scrubbers.

Every document is built from templates with slots; each filled slot is recorded as a :class:`Planted` item
(kind + the substrings that must not survive scrubbing). Clinical phrases that look like identifiers to a careless
pattern (measurements, vertebral levels, eponyms, ages under 90, scores) are planted too, as :class:`Benign`
items that must survive unchanged: the over-redaction measure. All values are invented; the generator is seeded,
so the corpus is the same on every machine.

Kinds: name, given_name, surname, mrn (5-10 digits and letters), accession, phone, address, date (11 formats),
age_over_89, email.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

FIRST = ["John", "Mary", "Maria", "Wei", "Aisha", "Kevin", "Olga", "Rahul", "Fatima", "Hans", "Chloe", "Diego",
         "Priya", "Liam", "Sven", "Ngozi", "Yuki", "Pedro", "Ingrid", "Omar"]
LAST = ["Smith", "O'Brien", "Gonzalez", "Zhang", "Okafor", "Nguyen", "Kowalski", "Patel", "Johansson", "Dubois",
        "Rossi", "Haddad", "MacLeod", "Fitzgerald", "Abernathy", "Castellano", "Lindqvist", "Thornbury", "Varga",
        "Whitcombe"]
STREETS = ["Main Street", "Elm Ave", "Oak Lane", "Harbor Blvd", "Maple Drive", "Cedar Court", "Hillcrest Road"]
CITIES = [("Springfield", "IL", "62704"), ("Riverton", "WY", "82501"), ("Fairview", "OR", "97024")]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]

BENIGN = {
    "measurement": ["5 mm nodule", "3.2 x 2.1 cm mass", "SUVmax 4.2", "1.5 T scanner", "HU 45", "12 mm"],
    "anatomy_code": ["C5-C6 disc bulge", "L4/L5 level", "T2-weighted images", "segment VII", "S1 nerve root"],
    "score": ["BI-RADS 4", "Gleason 3+4", "grade 2", "TI-RADS 3", "Image 12 of 40"],
    "eponym": ["Parkinson disease", "Hodgkin lymphoma", "Wilms tumor", "Crohn disease", "Baker cyst"],
    "age_under_90": ["70-year-old", "aged 45", "63 yo"],
}


@dataclass
class Planted:
    kind: str
    value: str
    must_vanish: list[str]


@dataclass
class Benign:
    kind: str
    value: str


@dataclass
class Document:
    text: str
    planted: list[Planted] = field(default_factory=list)
    benign: list[Benign] = field(default_factory=list)


def _mrn(r: random.Random) -> str:
    n = r.randint(5, 10)
    style = r.randrange(4)
    digits = "".join(r.choice("0123456789") for _ in range(n))
    if style == 0:
        return digits
    letters = "ABCDEFGHJKLMNPRSTUVWXYZ"
    if style == 1:
        return r.choice(letters) + digits[1:]
    if style == 2:
        return digits[:-1] + r.choice(letters)
    i = r.randint(1, n - 2)
    return digits[:i] + r.choice(letters) + digits[i + 1:]


def _date(r: random.Random, i: int) -> str:
    y, m, d = r.randint(1925, 2023), r.randint(1, 12), r.randint(1, 28)
    mon = MONTHS[m - 1]
    return [f"{m:02d}/{d:02d}/{y}", f"{y}-{m:02d}-{d:02d}", f"{mon} {d}, {y}", f"{d} {mon[:3]} {y}",
            f"{d:02d}.{m:02d}.{y}", f"{m}/{d}/{y % 100:02d}", f"{y}{m:02d}{d:02d}", f"{d:02d}-{mon[:3].upper()}-{y}",
            f"{mon[:3]} {d} {y}", f"{d}th of {mon}, {y}", f"{mon} {y}"][i % 11]


def _phone(r: random.Random, i: int) -> tuple[str, str]:
    a, b, c = r.randint(201, 989), r.randint(200, 989), r.randint(1000, 9999)
    forms = [f"({a}) {b}-{c}", f"{a}-{b}-{c}", f"+1 {a} {b} {c}", f"{a}.{b}.{c}", f"{a}-{b}-{c} ext 12"]
    sep = ["-", "-", " ", ".", "-"][i % 5]
    return forms[i % 5], f"{b}{sep}{c}"


def _address(r: random.Random, i: int) -> tuple[str, list[str]]:
    num = r.randint(2, 9999)
    street = r.choice(STREETS)
    city, st, zip_ = r.choice(CITIES)
    forms = [(f"{num} {street}", [f"{num} {street.split()[0]}"]),
             (f"{num} {street}, {city}, {st} {zip_}", [f"{num} {street.split()[0]}", zip_]),
             (f"PO Box {num}", [f"Box {num}"]),
             (f"{num} {street}, Apt 4B", [f"{num} {street.split()[0]}"])]
    return forms[i % len(forms)]


def _age(r: random.Random, i: int) -> str:
    a = r.randint(90, 104)
    return [f"{a}-year-old", f"aged {a}", f"age: {a}", f"{a} yo", f"{a} y/o", f"{a} years old"][i % 6]


def _acc(r: random.Random, i: int) -> tuple[str, str]:
    v = [f"Z{r.randint(10000, 99999)}", f"RAD{r.randint(2000, 2025)}-{r.randint(1000, 9999)}",
         f"{r.randint(10000, 9999999)}", f"A{r.randint(100000, 999999)}"][i % 4]
    label = ["Acc#", "Accession:", "ACC", "accession number"][i % 4]
    return f"{label} {v}", v


def make_corpus(n_docs: int = 80, seed: int = 0) -> list[Document]:
    r = random.Random(seed)
    docs = []
    for i in range(n_docs):
        first, last = r.choice(FIRST), r.choice(LAST)
        first2, last2 = r.choice(FIRST), r.choice(LAST)
        doc = Document("")
        parts: list[str] = []

        def plant(kind, value, vanish=None, doc=doc):
            doc.planted.append(Planted(kind, value, vanish or [value]))
            return value

        def benign(kind, doc=doc):
            v = r.choice(BENIGN[kind])
            doc.benign.append(Benign(kind, v))
            return v

        # The planted identifiers the templates below share (drawn where they stand, so the corpus is unchanged).
        def name(a=first, b=last, fmt="{a} {b}"):
            return plant("name", fmt.format(a=a, b=b), [a, b])

        def date(i=i):
            return plant("date", _date(r, i))

        def age(i=i):
            return plant("age_over_89", _age(r, i))

        def phone(i=i):
            ph, local = _phone(r, i)
            return plant("phone", ph, [ph, local])

        t = i % 10
        if t in (0, 6):
            acc_text, acc_v = _acc(r, i)
            parts.append(f"CLINICAL HISTORY: {age()} with cough. Patient: {name()}. MRN: {plant('mrn', _mrn(r))}. "
                         f"{plant('accession', acc_text, [acc_v])}." if t == 0 else
                         f"Comparison: CT of {date()}. {plant('accession', acc_text, [acc_v])}. "
                         f"Record number {plant('mrn', _mrn(r))}.")
        elif t == 1:
            parts.append(f"Findings discussed with Dr. {plant('surname', last2)} by telephone at {phone()} on "
                         f"{date()}.")
        elif t == 2:
            parts.append(f"Electronically signed by {name()}, MD on {date()}.")
        elif t == 3:
            email = f"{first.lower()}.{last.lower().replace(chr(39), '')}@clinic-{i}.org"
            parts.append(f"Referring physician: {name(fmt='{b}, {a}')}. Contact {plant('email', email)}.")
        elif t == 4:
            addr, vanish = _address(r, i)
            address = plant("address", addr, vanish)
            parts.append(f"Patient lives at {address}. Emergency contact: daughter {name(first2, last2)}, "
                         f"phone {phone()}.")
        elif t == 5:
            parts.append(f"{name()} is a {age()} woman with {benign('eponym')}.")
        elif t == 7:
            parts.append(f"Results communicated to {name()}, RN at 10:42 on {date()}.")
        elif t == 8:
            parts.append(f"Mrs. {plant('surname', last)} returns for follow-up; DOB {date()}. "
                         f"Seen today by {plant('given_name', first2)} from the wound team.")
        else:
            mrn = _mrn(r)
            parts.append(f"Ms {name()} (MRN {plant('mrn', mrn)}) tolerated the procedure; the patient, {age()}, "
                         f"was discharged to {plant('address', *_address(r, i))}.")
        parts.append(f"There is a {benign('measurement')} near the {benign('anatomy_code')}; {benign('score')}. "
                     f"Compared with a {benign('age_under_90')} reference.")
        doc.text = " ".join(parts)
        docs.append(doc)
    return docs


def evaluate(scrub, docs: list[Document]) -> dict:
    """Per kind: planted items, items whose every ``must_vanish`` substring is gone (recall), and for benign kinds
    items changed by the scrubber (over-redaction)."""
    out: dict[str, dict] = {}
    for doc in docs:
        text = scrub(doc.text)
        for p in doc.planted:
            row = out.setdefault(p.kind, {"planted": 0, "removed": 0})
            row["planted"] += 1
            row["removed"] += all(v not in text for v in p.must_vanish)
        for b in doc.benign:
            row = out.setdefault("benign:" + b.kind, {"kept": 0, "total": 0})
            row["total"] += 1
            row["kept"] += b.value in text
    return out
