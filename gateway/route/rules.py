"""Routing: which route a study or a message takes.  A pure function of the received
thing's attributes and the configured routes: no I/O, no clock, no logging.

:func:`decide` tries the routes in order; the first one whose conditions all hold wins.
No match means the object is stored, logged and not processed.

Matching, per condition key (all keys of a route must hold, AND):

- The route's ``dicom:`` conditions apply to DICOM studies, its ``hl7:`` conditions to HL7
  messages.  A route with only ``dicom:`` conditions never matches an HL7 message, and the
  other way round.
- An attribute may have several values: a DICOM study contributes the values of all its
  instances (Modality can be ``[CT, SR]``); an HL7 message the values of every repetition
  and every repeated segment (every OBX).  A condition holds when ANY value satisfies it.
  So in one study, ``{Modality: CT, BodyPartExamined: HEAD}`` also holds when the CT
  series is of the chest and another series is of the head.
- ``calling_ae`` is a DICOM pseudo-attribute: the calling AE title of the sender.
- scalar: equal.  Strings compare case-insensitively after trimming spaces.  A number
  written as a YAML number (``5``, ``2.5``) compares numerically with values that read as
  numbers (``"5"``, ``"5.0"``, ``"05"``); a quoted ``"5"`` compares as text.  An unquoted
  YAML boolean (``yes``/``no``/``on``/``off``/``true``/``false``) matches Y/YES/TRUE/ON
  (or N/NO/FALSE/OFF); quote such words to match them as text.
- list: any of its items, each compared as a scalar.
- ``{regex: PATTERN}``: :func:`re.search` with the pattern as written, so it may match
  anywhere in the value unless anchored (``^ADT``, ``^CT$``); case-sensitive unless the
  pattern says ``(?i)``.
- ``{present: true}``: the attribute has at least one non-empty value;
  ``{present: false}``: it has none (absent, or present but empty).

Values are never the empty string: builders in :mod:`gateway.route.attributes` drop
empty values, so "present but empty" and "absent" are the same here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from gateway.config import Route
from gateway.envelope import Kind

#: The DICOM pseudo-attribute naming the sender's calling AE title.
CALLING_AE = "calling_ae"

_TRUE = frozenset({"true", "yes", "y", "on"})
_FALSE = frozenset({"false", "no", "n", "off"})
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_SHOWN_VALUES = 5


@dataclass(frozen=True)
class Attributes:
    """What routing sees of one study or one message.

    ``values`` maps a DICOM keyword (``Modality``) or an HL7 path (``MSH-9``, ``OBR-4.1``)
    to the non-empty values seen, as strings, in first-seen order without duplicates.
    ``calling_ae`` is the sender's calling AE title (DICOM only; ``None`` when unknown).
    """

    kind: Kind
    values: Mapping[str, list[str]] = field(default_factory=dict)
    calling_ae: str | None = None

    def get(self, key: str) -> list[str]:
        """The values of ``key``; ``[]`` when absent.  HL7 segment ids are not
        case-sensitive (``msh-9`` is ``MSH-9``); ``calling_ae`` is the pseudo-attribute."""
        if self.kind == Kind.DICOM and key == CALLING_AE:
            return [self.calling_ae] if self.calling_ae else []
        if self.kind == Kind.HL7:
            key = key.strip().upper()
        return list(self.values.get(key, ()))


@dataclass(frozen=True)
class Decision:
    """The outcome of :func:`decide`.

    ``route`` is the matching route's name, or ``None``: stored, logged, not processed.
    ``run``/``send``/``forward`` are that route's models and destinations (empty without
    a match).  ``reasons`` has one human-readable line per route tried, in order, e.g.
    ``route 'chest-ct': Modality CT matches; BodyPartExamined HEAD not in [CHEST, LUNG]
    → no``.  Reasons quote attribute values: show them to the operator, keep them out of
    application logs.
    """

    route: str | None
    run: tuple[str, ...] = ()
    send: tuple[str, ...] = ()
    forward: tuple[str, ...] = ()
    reasons: tuple[str, ...] = ()

    @property
    def matched(self) -> bool:
        return self.route is not None


def decide(attrs: Attributes, routes: Sequence[Route]) -> Decision:
    """The first route in ``routes`` whose conditions for ``attrs.kind`` all hold.

    Routes after the first match are not tried (and get no reason line).
    """
    reasons: list[str] = []
    for route in routes:
        ok, why = route_matches(attrs, route)
        reasons.append(f"route '{route.name}': {why} → {'yes' if ok else 'no'}")
        if ok:
            return Decision(
                route=route.name,
                run=tuple(route.run),
                send=tuple(route.send),
                forward=tuple(route.forward),
                reasons=tuple(reasons),
            )
    return Decision(route=None, reasons=tuple(reasons))


def route_matches(attrs: Attributes, route: Route) -> tuple[bool, str]:
    """Whether every condition of ``route`` for ``attrs.kind`` holds, and why, as text
    (the conditions' explanations joined with ``; ``).  All conditions are evaluated so
    that the explanation is complete."""
    conditions = route.when.dicom if attrs.kind == Kind.DICOM else route.when.hl7
    if conditions is None:
        other = "HL7" if attrs.kind == Kind.DICOM else "DICOM"
        return False, f"{other} conditions only, this is {_kind_name(attrs.kind)}"
    if not conditions:
        return True, f"no {_kind_name(attrs.kind)} conditions (matches every one)"
    results = [condition_matches(attrs, key, cond) for key, cond in conditions.items()]
    return all(ok for ok, _ in results), "; ".join(why for _, why in results)


def condition_matches(attrs: Attributes, key: str, cond: Any) -> tuple[bool, str]:
    """One condition (scalar, list, ``{regex: ...}`` or ``{present: ...}``) on ``key``,
    and its explanation."""
    values = attrs.get(key)
    if isinstance(cond, dict) and "present" in cond:
        want = bool(cond["present"])
        has = bool(values)
        state = f"{key} present ({_show(values)})" if has else f"{key} absent"
        return has == want, f"{state}{'' if has == want else ', wanted ' + _presence(want)}"
    if not values:
        return False, f"{key} absent" + (" (calling AE unknown)" if key == CALLING_AE else "")
    if isinstance(cond, dict) and "regex" in cond:
        pattern = str(cond["regex"])
        regex = re.compile(pattern)
        hits = [v for v in values if regex.search(v)]
        if hits:
            return True, f"{key} {hits[0]} matches /{pattern}/"
        return False, f"{key} {_show(values)} does not match /{pattern}/"
    if isinstance(cond, list):
        hits = [v for v in values if any(scalar_equal(c, v) for c in cond)]
        shown = "[" + ", ".join(_text(c) for c in cond) + "]"
        if hits:
            return True, f"{key} {hits[0]} in {shown}"
        return False, f"{key} {_show(values)} not in {shown}"
    hits = [v for v in values if scalar_equal(cond, v)]
    if hits:
        return True, f"{key} {hits[0]} matches"
    return False, f"{key} {_show(values)} is not {_text(cond)}"


def scalar_equal(cond: Any, value: str) -> bool:
    """A scalar condition against one value (see the module docstring)."""
    if isinstance(cond, bool):
        return value.strip().casefold() in (_TRUE if cond else _FALSE)
    if isinstance(cond, int | float):
        number = _number(value)
        return number is not None and number == _number(str(cond))
    return str(cond).strip().casefold() == value.strip().casefold()


def _number(text: str) -> Decimal | None:
    text = text.strip()
    if not _NUMBER.fullmatch(text):
        return None
    try:
        return Decimal(text)
    except InvalidOperation:  # pragma: no cover - the pattern admits only valid numbers
        return None


def _text(cond: Any) -> str:
    if isinstance(cond, bool):
        return "true" if cond else "false"
    return str(cond)


def _show(values: list[str]) -> str:
    shown = ", ".join(values[:_SHOWN_VALUES])
    more = len(values) - _SHOWN_VALUES
    return f"{shown} (+{more} more)" if more > 0 else shown


def _presence(want: bool) -> str:
    return "present" if want else "absent"


def _kind_name(kind: Kind) -> str:
    return "DICOM" if kind == Kind.DICOM else "HL7"
