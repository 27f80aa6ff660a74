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
from collections.abc import Iterable, Mapping, Sequence
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

    def to_dict(self) -> dict[str, Any]:
        return {
            "finding": self.finding,
            "status": self.status,
            "code": self.code,
            "meaning": self.meaning,
            "text_span": [self.start, self.end],
            "text": self.text,
            "sentence": self.sentence,
        }


@dataclass(frozen=True)
class _Trigger:
    category: str  # NEGATION, UNCERTAINTY, PSEUDO or TERMINATION
    pre: bool
    post: bool
    first: int  # token indices, inclusive / exclusive
    last: int


Phrase = tuple[str, ...]


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
        """The findings of ``text`` as plain dicts (see :meth:`Mention.to_dict`)."""
        return [m.to_dict() for m in self.mentions(text)]

    def mentions(self, text: str) -> list[Mention]:
        out: list[Mention] = []
        for index, (start, end) in enumerate(split_sentences(text)):
            out.extend(self._sentence(text, start, end, index))
        return out

    def statuses(self, text: str) -> set[tuple[str, str]]:
        """The distinct (finding, status) pairs of ``text``."""
        return {(m.finding, m.status) for m in self.mentions(text)}

    def _sentence(self, text: str, start: int, end: int, index: int) -> list[Mention]:
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
                )
            )
        return out

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


def load(bundle_dir: str | Path | None = None) -> RuleEngine:
    """The engine of this bundle (or of ``bundle_dir``)."""
    return RuleEngine.from_bundle(bundle_dir or Path(__file__).resolve().parent)
