"""The protocol as data: arms, visits and windows, eligibility parameters, randomization,
sites, reminder offsets and deviation thresholds, validated when loaded."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, tzinfo
from functools import cached_property
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from domain.errors import ProtocolError


@dataclass(frozen=True)
class Arm:
    code: str
    name: str
    receives_dose: bool


@dataclass(frozen=True)
class Visit:
    code: str
    target_day: int
    window_before: int
    window_after: int
    names: tuple[tuple[str, str], ...] = ()  # (language, the visit's name in it)

    def name_in(self, language: str) -> str:
        """How a reminder names the visit in ``language`` (its code when not given)."""
        return dict(self.names).get(language, self.code)


@dataclass(frozen=True)
class AromataseInhibitor:
    drug: str  # the generic name, as the record keeps it
    daily_dose_mg: float
    brand_names: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        """The generic name, then the brand names."""
        return (self.drug, *self.brand_names)


@dataclass(frozen=True)
class EligibilityRules:
    stage_choices: tuple[str, ...]  # every stage a screening may record
    stages: tuple[str, ...]  # the eligible ones
    zubrod_max: int
    ai_min_days_before_registration: int
    ai_min_planned_days_after_registration: int
    analgesic_min_stable_days: int
    b12_washout_min_days: int
    substance_abuse_exclusion_days: int
    menopause_min_months_since_last_period: int
    menopause_age_without_fsh: int
    aromatase_inhibitors: tuple[AromataseInhibitor, ...]

    @cached_property
    def generic_names(self) -> dict[str, str]:
        """Each name of the aromatase inhibitors, case-folded, to its generic name (that of
        the first inhibitor that bears it)."""
        names: dict[str, str] = {}
        for ai in self.aromatase_inhibitors:
            for name in ai.names:
                names.setdefault(name.casefold(), ai.drug)
        return names


@dataclass(frozen=True)
class Randomization:
    ratio: tuple[tuple[str, int], ...]
    block_sizes: tuple[int, ...]
    strata: tuple[str, ...]


@dataclass(frozen=True)
class Site:
    id: str
    name: str
    coordinator_email: str
    participant_prefix: str = ""  # every participant id of the site starts with it
    coordinator_language: str = "en"  # of the emails to the site coordinator
    time_zone: str = "UTC"  # an IANA name: the site's calendar, whose day a time falls on

    @property
    def zone(self) -> tzinfo:
        return ZoneInfo(self.time_zone)


def calendar_day(value: date, zone: tzinfo) -> date:
    """A date as it is, or the day in ``zone`` of a time (an instant: UTC when written
    without a zone)."""
    if not isinstance(value, datetime):
        return value
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).astimezone(zone).date()


@dataclass(frozen=True)
class ReminderOffset:
    kind: str
    relative_to: str
    days: int


@dataclass(frozen=True)
class DeviationThresholds:
    max_missed_dose_fraction: float
    adherence_min_expected_doses: int


@dataclass(frozen=True)
class Protocol:
    study_id: str
    title: str
    languages: tuple[str, ...]
    arms: tuple[Arm, ...]
    dose_mcg: float
    visits: tuple[Visit, ...]
    eligibility: EligibilityRules
    randomization: Randomization
    sites: tuple[Site, ...]
    reminders: tuple[ReminderOffset, ...]
    deviations: DeviationThresholds
    treatment_ends_at: str  # the visit that closes the treatment period

    def arm(self, code: str) -> Arm:
        return next(a for a in self.arms if a.code == code)

    def visit(self, code: str) -> Visit | None:
        return next((v for v in self.visits if v.code == code), None)

    def site(self, site_id: str) -> Site | None:
        return next((s for s in self.sites if s.id == site_id), None)

    def day_at(self, site_id: str | None, now: date) -> date:
        """The day it is at ``now`` at a site, by its time zone (UTC's for a site the
        protocol doesn't list): the day a visit's status, its reminders and a casebook's
        signature are judged by there, and the day a time recorded there falls on (a
        date is its own day)."""
        site = self.site(site_id) if site_id else None
        return calendar_day(now, site.zone if site is not None else UTC)

    def day_span(self, now: datetime) -> tuple[date, date]:
        """The earliest and the latest of the sites' days at ``now`` (UTC's among them)."""
        days = [self.day_at(site_id, now) for site_id in (None, *self.site_ids)]
        return min(days), max(days)

    @property
    def visit_codes(self) -> tuple[str, ...]:
        return tuple(v.code for v in self.visits)

    @property
    def site_ids(self) -> tuple[str, ...]:
        return tuple(s.id for s in self.sites)


class _Reader:
    """Reads typed values from nested mappings, naming the dotted key on error."""

    def __init__(self, data: Mapping[str, Any], path: str = "") -> None:
        if not isinstance(data, Mapping):
            raise ProtocolError(f"{path or 'protocol'}: expected a table")
        self.data = data
        self.path = path

    def _key(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def raw(self, key: str) -> Any:
        if key not in self.data:
            raise ProtocolError(f"{self._key(key)}: missing")
        return self.data[key]

    def typed(self, key: str, kind: type | tuple[type, ...], label: str) -> Any:
        value = self.raw(key)
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise ProtocolError(f"{self._key(key)}: expected {label}")
        if not isinstance(value, kind):
            raise ProtocolError(f"{self._key(key)}: expected {label}")
        return value

    def text(self, key: str) -> str:
        value: str = self.typed(key, str, "a string")
        if not value:
            raise ProtocolError(f"{self._key(key)}: must not be empty")
        return value

    def integer(self, key: str, minimum: int | None = None) -> int:
        value: int = self.typed(key, int, "an integer")
        if minimum is not None and value < minimum:
            raise ProtocolError(f"{self._key(key)}: must be at least {minimum}")
        return value

    def number(self, key: str) -> float:
        return float(self.typed(key, (int, float), "a number"))

    def flag(self, key: str) -> bool:
        value: bool = self.typed(key, bool, "true or false")
        return value

    def table(self, key: str) -> _Reader:
        return _Reader(self.raw(key), self._key(key))

    def tables(self, key: str) -> list[_Reader]:
        items = self.typed(key, list, "a list of tables")
        if not items:
            raise ProtocolError(f"{self._key(key)}: must not be empty")
        return [_Reader(item, f"{self._key(key)}[{i}]") for i, item in enumerate(items)]

    def strings(self, key: str) -> tuple[str, ...]:
        items = self.typed(key, list, "a list of strings")
        if not items or not all(isinstance(i, str) and i for i in items):
            raise ProtocolError(f"{self._key(key)}: expected a non-empty list of strings")
        return tuple(items)

    def optional_strings(self, key: str) -> tuple[str, ...]:
        return self.strings(key) if key in self.data else ()

    def ints(self, key: str) -> tuple[int, ...]:
        items = self.typed(key, list, "a list of integers")
        if not items or not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
            raise ProtocolError(f"{self._key(key)}: expected a non-empty list of integers")
        return tuple(items)


def _unique(values: list[str], key: str) -> None:
    if len(set(values)) != len(values):
        raise ProtocolError(f"{key}: codes must be unique")


def _prefixes(sites: tuple[Site, ...]) -> None:
    """Either every site has a participant id prefix or none has, and no prefix starts
    another (an id must name one site)."""
    prefixes = [s.participant_prefix for s in sites if s.participant_prefix]
    if prefixes and len(prefixes) != len(sites):
        raise ProtocolError("sites: give every site a participant_prefix, or none")
    for i, a in enumerate(prefixes):
        for j, b in enumerate(prefixes):
            if i != j and b.startswith(a):
                raise ProtocolError(f"sites: participant_prefix {a!r} starts {b!r}")


def _arms(root: _Reader) -> tuple[Arm, ...]:
    arms = tuple(
        Arm(t.text("code"), t.text("name"), t.flag("receives_dose")) for t in root.tables("arms")
    )
    _unique([a.code for a in arms], "arms")
    return arms


def _visits(root: _Reader, languages: tuple[str, ...]) -> tuple[Visit, ...]:
    visits = tuple(
        Visit(t.text("code"), t.integer("target_day", 0), t.integer("window_before", 0),
              t.integer("window_after", 0), _names(t, languages))
        for t in root.tables("visits")
    )
    _unique([v.code for v in visits], "visits")
    days = [v.target_day for v in visits]
    if days != sorted(days):
        raise ProtocolError("visits: must be listed in order of target_day")
    return visits


def _names(visit: _Reader, languages: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    if "names" not in visit.data:
        return ()
    names = visit.table("names")
    unknown = set(names.data) - set(languages)
    if unknown:
        raise ProtocolError(f"{names.path}: {min(unknown)!r} is not a language of the study")
    return tuple((language, names.text(language)) for language in languages
                 if language in names.data)


def _eligibility(root: _Reader) -> EligibilityRules:
    e = root.table("eligibility")
    choices = e.strings("stage_choices")
    stages = e.strings("stages")
    for stage in stages:
        if stage not in choices:
            raise ProtocolError(f"eligibility.stages: {stage!r} is not one of "
                                f"{', '.join(choices)} (eligibility.stage_choices)")
    inhibitors = _aromatase_inhibitors(e)
    return EligibilityRules(
        stage_choices=choices,
        stages=stages,
        zubrod_max=e.integer("zubrod_max", 0),
        ai_min_days_before_registration=e.integer("ai_min_days_before_registration", 0),
        ai_min_planned_days_after_registration=e.integer("ai_min_planned_days_after_registration", 0),
        analgesic_min_stable_days=e.integer("analgesic_min_stable_days", 0),
        b12_washout_min_days=e.integer("b12_washout_min_days", 0),
        substance_abuse_exclusion_days=e.integer("substance_abuse_exclusion_days", 0),
        menopause_min_months_since_last_period=e.integer("menopause_min_months_since_last_period", 0),
        menopause_age_without_fsh=e.integer("menopause_age_without_fsh", 0),
        aromatase_inhibitors=inhibitors,
    )


def _aromatase_inhibitors(e: _Reader) -> tuple[AromataseInhibitor, ...]:
    inhibitors = tuple(
        AromataseInhibitor(t.text("drug"), t.number("daily_dose_mg"),
                           t.optional_strings("brand_names"))
        for t in e.tables("aromatase_inhibitors")
    )
    # A drug is named by its generic or a brand name in any case: no name may mean two drugs.
    generic: dict[str, str] = {}
    for ai in inhibitors:
        for name in ai.names:
            if generic.setdefault(name.casefold(), ai.drug) != ai.drug:
                raise ProtocolError(f"eligibility.aromatase_inhibitors: {name!r} names both "
                                    f"{generic[name.casefold()]} and {ai.drug}")
    return inhibitors


def _randomization(root: _Reader, arms: tuple[Arm, ...]) -> Randomization:
    r = root.table("randomization")
    ratio_table = r.table("ratio")
    ratio = tuple((a.code, ratio_table.integer(a.code, 1)) for a in arms)
    unknown = set(ratio_table.data) - {a.code for a in arms}
    if unknown:
        raise ProtocolError(f"randomization.ratio: unknown arm {min(unknown)!r}")
    block_sizes = r.ints("block_sizes")
    unit = sum(n for _, n in ratio)
    for size in block_sizes:
        if size <= 0 or size % unit:
            raise ProtocolError(
                f"randomization.block_sizes: {size} is not a positive multiple of {unit}"
            )
    strata = r.strings("strata")
    if strata != ("site_id",):
        raise ProtocolError("randomization.strata: only ['site_id'] is supported")
    return Randomization(ratio, block_sizes, strata)


def _time_zone(site: _Reader) -> str:
    name = site.text("time_zone")
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ProtocolError(f"{site.path}.time_zone: {name!r} is not an IANA time zone "
                            "(such as America/New_York)") from None
    return name


def _reminders(root: _Reader) -> tuple[ReminderOffset, ...]:
    offsets = []
    for t in root.table("reminders").tables("offsets"):
        relative_to = t.text("relative_to")
        if relative_to not in ("target", "window_open"):
            raise ProtocolError(f"{t.path}.relative_to: must be 'target' or 'window_open'")
        offsets.append(ReminderOffset(t.text("kind"), relative_to, t.integer("days")))
    _unique([o.kind for o in offsets], "reminders.offsets")
    return tuple(offsets)


def protocol_from_mapping(data: Mapping[str, Any]) -> Protocol:
    """Builds a Protocol from parsed TOML, raising ProtocolError that names the bad key."""
    root = _Reader(data)
    study = root.table("study")
    arms = _arms(root)
    sites = tuple(
        Site(t.text("id"), t.text("name"), t.text("coordinator_email"),
             t.text("participant_prefix") if "participant_prefix" in t.data else "",
             t.text("coordinator_language") if "coordinator_language" in t.data else "en",
             _time_zone(t) if "time_zone" in t.data else "UTC")
        for t in root.tables("sites")
    )
    _unique([s.id for s in sites], "sites")
    _prefixes(sites)
    deviations = root.table("deviations")
    fraction = deviations.number("max_missed_dose_fraction")
    if not 0 <= fraction <= 1:
        raise ProtocolError("deviations.max_missed_dose_fraction: must be between 0 and 1")
    languages = study.strings("languages")
    for i, site in enumerate(sites):
        if site.coordinator_language not in languages:
            raise ProtocolError(f"sites[{i}].coordinator_language: must be one of "
                                f"{', '.join(languages)}")
    visits = _visits(root, languages)
    dose = root.table("dose")
    treatment_ends_at = dose.text("treatment_ends_at")
    if treatment_ends_at not in {v.code for v in visits}:
        raise ProtocolError(f"dose.treatment_ends_at: {treatment_ends_at!r} is not a visit")
    return Protocol(
        study_id=study.text("id"),
        title=study.text("title"),
        languages=languages,
        arms=arms,
        dose_mcg=dose.number("dose_mcg"),
        visits=visits,
        eligibility=_eligibility(root),
        randomization=_randomization(root, arms),
        sites=sites,
        reminders=_reminders(root),
        deviations=DeviationThresholds(fraction, deviations.integer("adherence_min_expected_doses", 0)),
        treatment_ends_at=treatment_ends_at,
    )
