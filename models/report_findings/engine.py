"""A small NegEx/ConText-style rule engine: findings in radiology report text, with status.

The rules (``rules.json``) are the model: finding phrases, negation / uncertainty
triggers that look forward (``pre``) or back (``post``), pseudo-triggers that look like
negations but are not (``no change in``), and terminators that end a trigger's scope
(``but``, ``however``, ``;``, the end of the sentence).  The engine:

1. splits the text into sentences (``.`` ``!`` ``?`` before a capital, a digit or the
   end, and line breaks; ``4.5 mm`` and ``vs. atelectasis`` do not split);
2. tokenizes each sentence into lower-case words plus ``?`` ``,`` ``;``;
3. finds each finding's phrases, leftmost-longest, whole words; an exclusion phrase
   (``pericardial effusion`` for pleural effusion) hides the words it covers, an
   ``absent_phrases`` match (``heart size is normal``) is the finding stated absent;
4. finds the triggers, leftmost-longest over all categories, dropping those inside a
   finding phrase;
5. gives a ``pre`` trigger the words after it, up to ``scope_window`` tokens, stopping
   at a terminator, at the next trigger, or at a comma followed by a word that starts a
   new statement (``, small right effusion``); a ``post`` trigger the words before it,
   up to ``post_scope_window`` tokens, with the same stops;
6. a finding inside a negation scope is ``absent``, else inside an uncertainty scope
   ``uncertain``, else ``present`` (an absent phrase is ``absent`` or ``uncertain``).

Everything is deterministic: the same rules and text give the same output.  The engine
is pure Python with no dependency outside the standard library.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PRESENT = "present"
ABSENT = "absent"
UNCERTAIN = "uncertain"
STATUSES = (PRESENT, ABSENT, UNCERTAIN)

NEGATION = "negation"
UNCERTAINTY = "uncertainty"
PSEUDO = "pseudo"
TERMINATION = "termination"

# Kinds of report section.  Mentions in CONTEXT sections (history, indication, reason for
# exam, technique, comparison, procedure) are never findings; IMPRESSION (impression,
# conclusion, opinion, summary) and ADDENDUM win over BODY (findings, report, unsectioned
# text).  An addendum ranks with the impression, not above it: it usually adds to the
# report ("also a small effusion") or speaks of one lesion among several, so a concept
# the impression states present stays present.
CONTEXT = "context"
BODY = "body"
IMPRESSION = "impression"
ADDENDUM = "addendum"
SECTION_KINDS = (CONTEXT, BODY, IMPRESSION, ADDENDUM)
_SECTION_RANK = {BODY: 1, IMPRESSION: 2, ADDENDUM: 2}
# Several statuses for one concept in the deciding section: present beats uncertain beats
# absent ("No right pneumothorax; small left pneumothorax" is a pneumothorax).
_STATUS_RANK = {PRESENT: 3, UNCERTAIN: 2, ABSENT: 1}

_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[?;,]")
# A sentence ends at . ! ? followed by white space and a capital letter or digit, or at the
# end of the text; and at every line break.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\[\"'])|\n+")
_GAP = "*"

# Kinds of finding match, in the order that wins a tie between matches of equal length.
_EXCLUSION, _ABSENT_PHRASE, _SYNONYM = 0, 1, 2


@dataclass(frozen=True)
class Token:
    text: str
    start: int
    end: int


@dataclass(frozen=True)
class Mention:
    """One finding stated in the text: where, and whether present, absent or uncertain."""

    finding: str
    status: str
    code: str
    meaning: str
    start: int
    end: int
    text: str
    sentence: int
    section: str = BODY  # the kind of section it is in: context, body, impression, addendum
    section_name: str = ""  # the section's header as written, lower case ("" before any)
    historical: bool = False  # "previously seen X", "X on the prior study"

    def to_dict(self) -> dict[str, Any]:
        return {
            "finding": self.finding,
            "status": self.status,
            "code": self.code,
            "meaning": self.meaning,
            "text_span": [self.start, self.end],
            "text": self.text,
            "sentence": self.sentence,
            "section": self.section,
            "section_name": self.section_name,
            "historical": self.historical,
        }


@dataclass(frozen=True)
class _Trigger:
    category: str  # NEGATION, UNCERTAINTY, PSEUDO or TERMINATION
    pre: bool
    post: bool
    first: int  # token indices, inclusive / exclusive
    last: int


Phrase = tuple[str, ...]


@dataclass(frozen=True)
class Section:
    """A part of a report: its kind, its header as written (lower case; ``""`` for the text
    before the first header or a report without headers), and where it lies in the text
    (``start`` is the header's first character, ``content`` the first after the header)."""

    kind: str
    name: str
    start: int
    content: int
    end: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "span": [self.start, self.end],
            "content_start": self.content,
        }


@dataclass(frozen=True)
class Finding:
    """One concept of a report, once: its status and the mention that decided it, with
    every mention of it outside the context sections."""

    decided_by: Mention
    mentions: tuple[Mention, ...]

    @property
    def finding(self) -> str:
        return self.decided_by.finding

    @property
    def status(self) -> str:
        return self.decided_by.status

    def to_dict(self) -> dict[str, Any]:
        out = self.decided_by.to_dict()
        out["mentions"] = [
            {
                "status": m.status,
                "section": m.section,
                "section_name": m.section_name,
                "text_span": [m.start, m.end],
                "text": m.text,
                "sentence": m.sentence,
                "historical": m.historical,
            }
            for m in self.mentions
        ]
        return out


@dataclass(frozen=True)
class ReportFindings:
    """What a whole report says: each concept once (:attr:`findings`), the mentions in the
    history / indication / technique / comparison sections apart (:attr:`indication`),
    and the sections it was read in."""

    findings: tuple[Finding, ...]
    indication: tuple[Mention, ...]
    sections: tuple[Section, ...]

    def statuses(self) -> set[tuple[str, str]]:
        return {(f.finding, f.status) for f in self.findings}

    def to_dict(self) -> dict[str, Any]:
        return {
            "findings": [f.to_dict() for f in self.findings],
            "indication": [m.to_dict() for m in self.indication],
            "sections": [s.to_dict() for s in self.sections],
        }


def tokenize(text: str) -> list[Token]:
    """Lower-case word tokens (letters and digits), and ``?`` ``,`` ``;`` as tokens."""
    lowered = text.lower().replace("\u2019", "'")
    return [Token(m.group(), m.start(), m.end()) for m in _TOKEN.finditer(lowered)]


def split_sentences(text: str) -> list[tuple[int, int]]:
    """(start, end) character offsets of the sentences of ``text``, blank ones left out."""
    spans: list[tuple[int, int]] = []
    start = 0
    for m in _SENTENCE_END.finditer(text):
        spans.append((start, m.start()))
        start = m.end()
    spans.append((start, len(text)))
    return [(a, b) for a, b in spans if text[a:b].strip()]


def _phrase(text: str) -> Phrase:
    """The token sequence of a rule phrase; ``*`` stands for a gap of a few words."""
    out: list[str] = []
    for k, part in enumerate(text.split(_GAP)):
        if k:
            out.append(_GAP)
        out.extend(t.text for t in tokenize(part))
    return tuple(out)


class RuleEngine:
    """Finds the findings of ``rules`` in text.  Build it once, call it on many reports."""

    def __init__(
        self,
        rules: Mapping[str, Any],
        codes: Mapping[str, Mapping[str, str]] | None = None,
        *,
        rules_sha256: str = "",
    ) -> None:
        self.rules = rules
        self.rules_sha256 = (
            rules_sha256 or hashlib.sha256(json.dumps(rules, sort_keys=True).encode()).hexdigest()
        )
        self.codes = dict(codes or {})
        self.scope_window = int(rules.get("scope_window", 8))
        self.post_scope_window = int(rules.get("post_scope_window", 6))
        self.gap_max = int(rules.get("gap_max", 3))
        self.gap_stop = frozenset(rules.get("gap_stop", ()))
        self.findings: dict[str, list[tuple[Phrase, int]]] = {}
        for name, spec in rules["findings"].items():
            patterns = [(_phrase(p), _SYNONYM) for p in spec.get("synonyms", ())]
            patterns += [(_phrase(p), _ABSENT_PHRASE) for p in spec.get("absent_phrases", ())]
            patterns += [(_phrase(p), _EXCLUSION) for p in spec.get("exclusions", ())]
            self.findings[name] = [(p, kind) for p, kind in patterns if p]
        # finding -> first word -> its patterns: only those are tried at a word
        self._by_first_word: dict[str, dict[str, list[tuple[Phrase, int]]]] = {}
        for name, pats in self.findings.items():
            index: dict[str, list[tuple[Phrase, int]]] = {}
            for pattern in pats:
                index.setdefault(pattern[0][0], []).append(pattern)
            self._by_first_word[name] = index
        triggers = rules["triggers"]
        # phrase -> (category, pre, post); a phrase in two categories keeps the first
        self.triggers: dict[Phrase, tuple[str, bool, bool]] = {}
        for category in (NEGATION, UNCERTAINTY):
            for direction in ("pre", "post"):
                for text in triggers[category][direction]:
                    phrase = _phrase(text)
                    cat, pre, post = self.triggers.get(phrase, (category, False, False))
                    if cat != category:
                        continue
                    self.triggers[phrase] = (
                        cat,
                        pre or direction == "pre",
                        post or direction == "post",
                    )
        for category, key in ((PSEUDO, "pseudo"), (TERMINATION, "termination")):
            for text in triggers[key]:
                self.triggers.setdefault(_phrase(text), (category, False, False))
        self.comma_termination = frozenset(triggers.get("comma_termination", ()))
        self._longest_trigger = max((len(p) for p in self.triggers), default=1)
        # "previously seen X", "X on the prior study": matched apart from the triggers
        # above, so they neither stop nor start a negation or uncertainty scope
        historical = triggers.get("historical", {})
        self.historical: dict[Phrase, tuple[bool, bool]] = {}
        for direction in ("pre", "post"):
            for text in historical.get(direction, ()):
                pre, post = self.historical.get(_phrase(text), (False, False))
                self.historical[_phrase(text)] = (
                    pre or direction == "pre",
                    post or direction == "post",
                )
        self._longest_historical = max((len(p) for p in self.historical), default=1)
        self._headers = _header_patterns(rules.get("sections", {}))

    # -- construction -------------------------------------------------------------------

    @classmethod
    def from_file(
        cls, path: str | Path, codes: Mapping[str, Mapping[str, str]] | None = None
    ) -> RuleEngine:
        data = Path(path).read_bytes()
        return cls(json.loads(data), codes, rules_sha256=hashlib.sha256(data).hexdigest())

    @classmethod
    def from_bundle(cls, bundle_dir: str | Path) -> RuleEngine:
        """The engine of a bundle folder: its ``configs/metadata.json`` ``gateway`` section
        names the rules file and maps each finding to its SNOMED CT code."""
        root = Path(bundle_dir)
        metadata = json.loads((root / "configs" / "metadata.json").read_text("utf-8"))
        section = metadata["gateway"]
        return cls.from_file(root / section.get("rules", "rules.json"), section["findings"])

    # -- inference ----------------------------------------------------------------------

    def __call__(self, text: str) -> list[dict[str, Any]]:
        """The findings of the report ``text``, one per concept, as plain dicts (see
        :meth:`Finding.to_dict`): what the gateway sends, one OBX each."""
        return [f.to_dict() for f in self.report(text).findings]

    def report(self, text: str) -> ReportFindings:
        """The report read as a whole: sections, then each concept once.

        A concept's status comes from the impression and addendum if either names it,
        else from the body (findings, report, unsectioned text); mentions in
        context sections (history, indication, technique, comparison) are never findings
        and are given apart as :attr:`ReportFindings.indication`.  Within the deciding
        section, a historical mention (``previously seen X``) gives way to a current
        one, and then present beats uncertain beats absent.
        """
        sections = self.sections(text)
        mentions = self._mentions(text, sections)
        by_finding: dict[str, list[Mention]] = {}
        for m in mentions:
            if m.section != CONTEXT:
                by_finding.setdefault(m.finding, []).append(m)
        found: list[Finding] = []
        for ms in by_finding.values():
            top = max(_SECTION_RANK[m.section] for m in ms)
            deciding = [m for m in ms if _SECTION_RANK[m.section] == top]
            current = [m for m in deciding if not m.historical] or deciding
            best = max(_STATUS_RANK[m.status] for m in current)
            chosen = next(m for m in current if _STATUS_RANK[m.status] == best)
            found.append(Finding(chosen, tuple(ms)))
        found.sort(key=lambda f: f.mentions[0].start)
        return ReportFindings(
            findings=tuple(found),
            indication=tuple(m for m in mentions if m.section == CONTEXT),
            sections=tuple(sections),
        )

    def mentions(self, text: str) -> list[Mention]:
        """Every mention of a finding, sentence by sentence, each with its section."""
        return self._mentions(text, self.sections(text))

    def statuses(self, text: str) -> set[tuple[str, str]]:
        """The distinct (finding, status) pairs of the mentions of ``text`` (whatever
        their section: the sentence-level measure)."""
        return {(m.finding, m.status) for m in self.mentions(text)}

    def sections(self, text: str) -> list[Section]:
        """The sections of a report (see :func:`find_sections`)."""
        return find_sections(text, self._headers)

    def _mentions(self, text: str, sections: Sequence[Section]) -> list[Mention]:
        out: list[Mention] = []
        for index, (start, end) in enumerate(_split_at_sections(text, sections)):
            section = _section_at(sections, start)
            out.extend(self._sentence(text, start, end, index, section))
        return out

    def _sentence(
        self, text: str, start: int, end: int, index: int, section: Section | None = None
    ) -> list[Mention]:
        tokens = [Token(t.text, t.start + start, t.end + start) for t in tokenize(text[start:end])]
        words = [t.text for t in tokens]
        matches: list[tuple[str, int, int, int]] = []  # finding, first, last, kind
        for finding, by_word in self._by_first_word.items():
            matches.extend(
                (finding, a, b, kind) for a, b, kind in self._match_finding(words, by_word)
            )
        covered = {i for _, a, b, kind in matches if kind != _EXCLUSION for i in range(a, b)}
        triggers = [
            t for t in self._match_triggers(words) if covered.isdisjoint(range(t.first, t.last))
        ]
        historical = self._match_historical(words)
        out: list[Mention] = []
        for finding, a, b, kind in sorted(matches, key=lambda m: (m[1], m[0])):
            if kind == _EXCLUSION:
                continue
            categories = self._categories(words, triggers, a, b)
            if kind == _ABSENT_PHRASE:
                status = UNCERTAIN if UNCERTAINTY in categories else ABSENT
            elif NEGATION in categories:
                status = ABSENT
            elif UNCERTAINTY in categories:
                status = UNCERTAIN
            else:
                status = PRESENT
            code = self.codes.get(finding, {})
            out.append(
                Mention(
                    finding=finding,
                    status=status,
                    code=code.get("snomed", ""),
                    meaning=code.get("meaning", ""),
                    start=tokens[a].start,
                    end=tokens[b - 1].end,
                    text=text[tokens[a].start : tokens[b - 1].end],
                    sentence=index,
                    section=section.kind if section is not None else BODY,
                    section_name=section.name if section is not None else "",
                    historical=self._in_historical_scope(words, historical, a, b),
                )
            )
        return out

    def _match_historical(self, words: Sequence[str]) -> list[tuple[int, int, bool, bool]]:
        """(first, last, pre, post) of the historical triggers, leftmost-longest."""
        out: list[tuple[int, int, bool, bool]] = []
        i = 0
        while i < len(words):
            for n in range(min(self._longest_historical, len(words) - i), 0, -1):
                found = self.historical.get(tuple(words[i : i + n]))
                if found is not None:
                    out.append((i, i + n, found[0], found[1]))
                    i += n
                    break
            else:
                i += 1
        return out

    def _in_historical_scope(
        self,
        words: Sequence[str],
        historical: Sequence[tuple[int, int, bool, bool]],
        first: int,
        last: int,
    ) -> bool:
        """Whether a historical trigger governs the finding words [first, last): the same
        windows as the other triggers, stopping at a terminator or a new statement."""
        for a, b, pre, post in historical:
            if pre and b <= first:
                stop = min(b + self.scope_window, len(words))
                stop = min(stop, self._comma_stop(words, b, stop), self._stop_word(words, b, stop))
                if first < stop:
                    return True
            if post and a >= last:
                begin = max(a - self.post_scope_window, 0)
                begin = max(begin, self._comma_begin(words, begin, a))
                if begin <= first and self._stop_word(words, last, a) == a:
                    return True
        return False

    def _stop_word(self, words: Sequence[str], begin: int, stop: int) -> int:
        """The first terminator (``but``, ``;`` …) in words[begin:stop], or ``stop``."""
        for i in range(begin, stop):
            if self.triggers.get((words[i],), ("",))[0] == TERMINATION:
                return i
        return stop

    def _match_finding(
        self, words: Sequence[str], index: Mapping[str, Sequence[tuple[Phrase, int]]]
    ) -> Iterable[tuple[int, int, int]]:
        """Leftmost-longest non-overlapping matches (first, last, kind) of one finding."""
        i = 0
        while i < len(words):
            best: tuple[int, int] | None = None  # (end, kind)
            for phrase, kind in index.get(words[i], ()):
                end = self._match_at(words, i, phrase)
                if end is not None and (
                    best is None or end > best[0] or (end == best[0] and kind < best[1])
                ):
                    best = (end, kind)
            if best is None:
                i += 1
                continue
            yield i, best[0], best[1]
            i = best[0]

    def _match_at(self, words: Sequence[str], i: int, phrase: Phrase) -> int | None:
        """The end of the longest match of ``phrase`` at ``words[i]``, or None."""
        if not phrase:
            return i
        head, rest = phrase[0], phrase[1:]
        if head == _GAP:
            best: int | None = None
            for skip in range(self.gap_max + 1):
                if skip and (
                    i + skip > len(words)
                    or not words[i + skip - 1].isalnum()
                    or words[i + skip - 1] in self.gap_stop
                ):
                    break
                end = self._match_at(words, i + skip, rest)
                if end is not None and (best is None or end > best):
                    best = end
            return best
        if i < len(words) and words[i] == head:
            return self._match_at(words, i + 1, rest)
        return None

    def _match_triggers(self, words: Sequence[str]) -> list[_Trigger]:
        out: list[_Trigger] = []
        i = 0
        while i < len(words):
            for n in range(min(self._longest_trigger, len(words) - i), 0, -1):
                found = self.triggers.get(tuple(words[i : i + n]))
                if found is not None:
                    out.append(_Trigger(found[0], found[1], found[2], i, i + n))
                    i += n
                    break
            else:
                i += 1
        return out

    def _categories(
        self, words: Sequence[str], triggers: Sequence[_Trigger], first: int, last: int
    ) -> set[str]:
        """The categories of the triggers whose scope holds the finding words [first, last)."""
        found: set[str] = set()
        for k, trig in enumerate(triggers):
            if trig.category not in (NEGATION, UNCERTAINTY):
                continue
            if trig.pre and trig.last <= first:
                stop = min(trig.last + self.scope_window, len(words))
                if k + 1 < len(triggers):
                    stop = min(stop, triggers[k + 1].first)
                stop = min(stop, self._comma_stop(words, trig.last, stop))
                if first < stop:
                    found.add(trig.category)
            if trig.post and trig.first >= last:
                begin = max(trig.first - self.post_scope_window, 0)
                if k > 0:
                    begin = max(begin, triggers[k - 1].last)
                begin = max(begin, self._comma_begin(words, begin, trig.first))
                if begin <= first:
                    found.add(trig.category)
        return found

    def _comma_stop(self, words: Sequence[str], begin: int, stop: int) -> int:
        """The first ``, <new statement>`` in words[begin:stop], or ``stop``."""
        for i in range(begin, stop - 1):
            if words[i] == "," and words[i + 1] in self.comma_termination:
                return i
        return stop

    def _comma_begin(self, words: Sequence[str], begin: int, stop: int) -> int:
        """Just after the last ``, <new statement>`` in words[begin:stop], or ``begin``."""
        for i in range(stop - 2, begin - 1, -1):
            if words[i] == "," and words[i + 1] in self.comma_termination:
                return i + 1
        return begin


# -- sections ---------------------------------------------------------------------------

# A header: at the start of a line, a section name followed by a colon (``Findings:``,
# ``CLINICAL HISTORY:``) or alone on its line (``IMPRESSION``, ``History``); or after the
# end of a sentence, a section name with a colon (``... no effusion. IMPRESSION: ...``).
_HeaderPatterns = tuple["re.Pattern[str]", "re.Pattern[str]", "re.Pattern[str]", dict[str, str]]


def _header_patterns(spec: Mapping[str, Sequence[str]]) -> _HeaderPatterns:
    kinds: dict[str, str] = {}
    for kind in SECTION_KINDS:
        for name in spec.get(kind, ()):
            kinds.setdefault(_header_key(name), kind)
    if not kinds:
        never = re.compile(r"(?!)")
        return never, never, never, kinds
    number = r"(?:[ \t]*(?:#[ \t]*)?\d{1,2})?"
    name = rf"(?P<name>(?:{_alternatives(kinds, str.lower)}){number})"
    line_start = re.compile(
        rf"^[ \t]*(?:[-*#\u2022]+[ \t]*)?{name}[ \t]*(?:(?::|[ \t]-[ \t])[ \t]*|\r?$)",
        re.IGNORECASE | re.MULTILINE,
    )
    # in the middle of a line, only names that are not also common words of a sentence
    # ("… Exam: limited by motion." is not the start of a section)
    weak = {_header_key(n) for n in spec.get("line_start_only", ())}
    strong = [k for k in kinds if k not in weak]
    name = rf"(?P<name>(?:{_alternatives(strong, str.lower)}){number})"
    in_line = re.compile(rf"(?<=[.!?])[ \t]+{name}[ \t]*:[ \t]*", re.IGNORECASE)
    # all capitals with a colon, anywhere after a space: ``… no effusion IMPRESSION: …``
    capitals = re.compile(
        rf"(?<=\s)(?P<name>(?:{_alternatives(strong, str.upper)}){number})[ \t]*:[ \t]*"
    )
    return line_start, in_line, capitals, kinds


def _alternatives(names: Iterable[str], case: Callable[[str], str]) -> str:
    """The header names as one regex alternation, longest first (``clinical history``
    before ``history``); words may be split by spaces or tabs, ``/`` by spaces too."""
    return "|".join(
        r"[ \t]*/[ \t]*".join(
            r"[ \t]+".join(re.escape(case(w)) for w in part.split()) for part in name.split("/")
        )
        for name in sorted(names, key=len, reverse=True)
    )


def _header_key(name: str) -> str:
    """A header's name as the rules list it: lower case, single spaces, no number."""
    words = re.sub(r"[\s#]+", " ", name.lower()).strip()
    return re.sub(r" ?\d{1,2}$", "", words).replace(" /", "/").replace("/ ", "/")


def find_sections(text: str, patterns: _HeaderPatterns) -> list[Section]:
    """The sections of a report, in order, covering the whole text.

    Headers are recognised at the start of a line (with a colon, or alone on the line)
    or, with a colon, after the end of a sentence or in capitals after a space; the
    names and their kinds are the rules' ``sections`` (those in its ``line_start_only``,
    words like ``exam`` or ``study``, only at the start of a line).  A line like
    ``Lungs: clear`` is not a header (organ subheadings are not in the rules), so it
    stays in its section.

    - A report without headers is all body.
    - The text before the first header (an exam title, an indication) is context when
      the report has a body header (FINDINGS, REPORT) or starts with a context header;
      otherwise (only IMPRESSION / ADDENDUM headers) it is the body.
    - In a report without a body header, a context section ends at the first blank line
      after its text, or, when its text starts on the header's line, at the first line
      that ends with a full stop, ``?`` or ``!``: what follows, until the next header,
      is body (dictations that go from ``Indication: …`` straight to the findings).
    """
    line_start, in_line, capitals, kinds = patterns
    headers: list[tuple[int, int, str, str]] = []  # start, content, kind, name
    for pattern in (line_start, in_line, capitals):
        for m in pattern.finditer(text):
            start = m.start("name")
            key = _header_key(m.group("name"))
            kind = kinds.get(key)
            # a header inside one already found (HISTORY in CLINICAL HISTORY:) is not one
            if kind is None or any(a <= start < b for a, b, _, _ in headers):
                continue
            headers.append((start, m.end(), kind, key))
    headers.sort()
    if not headers:
        return [Section(BODY, "", 0, 0, len(text))]
    has_body = any(kind == BODY for _, _, kind, _ in headers)
    preamble = CONTEXT if has_body or headers[0][2] == CONTEXT else BODY
    out: list[Section] = []
    if text[: headers[0][0]].strip():
        out.append(Section(preamble, "", 0, 0, headers[0][0]))
    for k, (start, content, kind, name) in enumerate(headers):
        end = headers[k + 1][0] if k + 1 < len(headers) else len(text)
        if kind == CONTEXT and not has_body:
            stop = _context_end(text, content, end)
            if stop < end and text[stop:end].strip():
                body = stop + len(text[stop:end]) - len(text[stop:end].lstrip())
                out.append(Section(kind, name, start, content, stop))
                out.append(Section(BODY, "", body, body, end))
                continue
        out.append(Section(kind, name, start, content, end))
    return out


_BLANK_LINE = re.compile(r"\n[ \t\r]*\n")
# a line that ends a statement: it ends with . ! ? or, not ending with , ; : / & - or
# "and"/"or"/"with" (a line wrapped in mid-sentence), it is followed by a capital or digit
_STATEMENT_AT_LINE_END = re.compile(
    r"(?:[.!?][ \t\r]*\n"
    r"|(?<=[^\s,;:/&\-])(?<!\band)(?<!\bor)(?<!\bwith)[ \t\r]*\n(?=[ \t]*[A-Z0-9]))"
)


def _context_end(text: str, content: int, end: int) -> int:
    """Where a context section ends in a report without a body header: at the first
    blank line after its text; and, when the header has text on its own line
    (``Indication: cough.``, ``Clinical: ?PE``), at the first line that ends a statement
    (see ``_STATEMENT_AT_LINE_END``: a line wrapped in mid-sentence goes on)."""
    stop = end
    blank = _BLANK_LINE.search(text, content, end)
    while blank is not None and not text[content : blank.start()].strip():
        blank = _BLANK_LINE.search(text, blank.end(), end)
    if blank is not None:
        stop = blank.start()
    line_end = text.find("\n", content, end)
    if text[content : line_end if line_end >= 0 else end].strip():
        m = _STATEMENT_AT_LINE_END.search(text, content, stop)
        if m is not None:
            stop = text.index("\n", m.start())
    return stop


def _section_at(sections: Sequence[Section], position: int) -> Section | None:
    for section in reversed(sections):
        if section.start <= position:
            return section
    return sections[0] if sections else None


def _split_at_sections(text: str, sections: Sequence[Section]) -> list[tuple[int, int]]:
    """The sentences of ``text``, also split where a header starts inside one (``… no
    effusion IMPRESSION: nodule``), so no trigger reaches across a header."""
    cuts = sorted(s.start for s in sections if s.start > 0)
    out: list[tuple[int, int]] = []
    for a, b in split_sentences(text):
        for cut in cuts:
            if a < cut < b and text[a:cut].strip() and text[cut:b].strip():
                out.append((a, cut))
                a = cut
        out.append((a, b))
    return out


def load(bundle_dir: str | Path | None = None) -> RuleEngine:
    """The engine of this bundle (or of ``bundle_dir``)."""
    return RuleEngine.from_bundle(bundle_dir or Path(__file__).resolve().parent)
