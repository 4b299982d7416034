"""The repository config file (repository.json): version policies and rollouts. No gRPC here.

    {"models": {"cifar10": {
        "version_policy": "latest:1",                   which versions to load (optional)
        "labels": {"stable": 1, "canary": 2},          version labels (optional)
        "traffic": {"stable": 90, "canary": 10},       split of requests naming no version (optional)
        "shadow": {"version": "canary", "percent": 10} copy of live traffic (optional)
    }}}

Traffic keys are labels or version numbers ("2"); the percents must sum to 100. The shadow's
`version` is a label or a number. Parsing checks the file's shape; `check_against` checks it
against the versions on disk. Either raises ConfigError with every problem found, each named
by its place in the file (models.cifar10.traffic: ...), so an operator can fix them in one go.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

MODEL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# A letter first, so that a label is never taken for a version number (V2's model_version carries both).
LABEL_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
MODEL_KEYS = ("version_policy", "labels", "traffic", "shadow")
SHADOW_KEYS = ("version", "percent")
PERCENT_TOLERANCE = 1e-6


class ConfigError(ValueError):
    """The file cannot be put in force; the message lists every problem."""


@dataclass(frozen=True)
class VersionPolicy:
    """latest:N | all | specific:V1,V2"""

    kind: str
    count: int = 1
    versions: frozenset[int] = frozenset()

    @classmethod
    def parse(cls, text: str) -> "VersionPolicy":
        text = text.strip().lower()
        try:
            if text == "all":
                return cls("all")
            kind, _, arg = text.partition(":")
            if kind == "latest":
                count = int(arg or 1)
                if count < 1:
                    raise ValueError
                return cls("latest", count=count)
            if kind == "specific":
                return cls("specific", versions=frozenset(int(v) for v in arg.split(",") if v.strip()))
        except ValueError:
            pass
        raise ValueError(f"bad version policy {text!r}: expected latest:N, all or specific:V1,V2")

    def select(self, versions: list[int]) -> list[int]:
        ordered = sorted(versions)
        if self.kind == "all":
            return ordered
        if self.kind == "latest":
            return ordered[-self.count:]
        return [v for v in ordered if v in self.versions]

    def __str__(self) -> str:
        if self.kind == "latest":
            return f"latest:{self.count}"
        if self.kind == "specific":
            return "specific:" + ",".join(map(str, sorted(self.versions)))
        return self.kind


@dataclass(frozen=True)
class TrafficShare:
    version: int
    label: str  # the label that named it in the file, "" when named by number
    percent: float

    def __str__(self) -> str:
        return f"{self.label}(v{self.version})" if self.label else f"v{self.version}"


@dataclass(frozen=True)
class ShadowPolicy:
    version: int
    label: str
    percent: float

    def __str__(self) -> str:
        name = f"{self.label}(v{self.version})" if self.label else f"v{self.version}"
        return f"{name} {self.percent:g}%"


@dataclass(frozen=True)
class ModelRollout:
    """One model's labels, traffic split and shadow. Empty: every unnamed request goes to the newest."""

    labels: dict[str, int] = field(default_factory=dict)
    traffic: tuple[TrafficShare, ...] = ()  # newest version first (see `choose`)
    shadow: ShadowPolicy | None = None

    @property
    def empty(self) -> bool:
        return not (self.labels or self.traffic or self.shadow)

    def referenced_versions(self) -> frozenset[int]:
        """Versions this rollout routes to: kept loaded whatever the version policy says."""
        versions = set(self.labels.values()) | {share.version for share in self.traffic}
        if self.shadow is not None:
            versions.add(self.shadow.version)
        return frozenset(versions)

    def choose(self, point: float) -> TrafficShare:
        """The share owning `point` in [0, 100). Shares are laid out newest version first, so
        raising the newest version's percent keeps every request id it already had."""
        edge = 0.0
        for share in self.traffic:
            edge += share.percent
            if point < edge:
                return share
        return self.traffic[-1]  # rounding at the top end

    def labels_of(self, version: int) -> list[str]:
        return sorted(label for label, v in self.labels.items() if v == version)

    def traffic_percent(self, version: int) -> float:
        return sum(share.percent for share in self.traffic if share.version == version)

    def describe(self) -> str:
        if self.empty:
            return "none (unnamed requests go to the newest version)"
        parts = []
        if self.labels:
            parts.append("labels " + ", ".join(f"{k}=v{v}" for k, v in sorted(self.labels.items())))
        if self.traffic:
            parts.append("traffic " + ", ".join(f"{share} {share.percent:g}%" for share in self.traffic))
        else:
            parts.append("traffic: newest version")
        if self.shadow is not None:
            parts.append(f"shadow {self.shadow}")
        return "; ".join(parts)


EMPTY_ROLLOUT = ModelRollout()


def sticky_point(model: str, request_id: str) -> float:
    """Where a request falls in [0, 100): the same model and request id always fall on the same
    point (a retry lands on the same version); no id: a random point."""
    if not request_id:
        return random.random() * 100.0
    digest = hashlib.blake2b(f"{model}\0{request_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") * 100.0 / 2**64


@dataclass(frozen=True)
class ModelSettings:
    policy: VersionPolicy | None = None  # None: the server's --version-policy
    rollout: ModelRollout = EMPTY_ROLLOUT


@dataclass(frozen=True)
class RepositoryConfig:
    models: dict[str, ModelSettings] = field(default_factory=dict)

    def policy_for(self, name: str, default: VersionPolicy) -> VersionPolicy:
        settings = self.models.get(name)
        return settings.policy if settings is not None and settings.policy is not None else default

    def rollout_for(self, name: str) -> ModelRollout:
        settings = self.models.get(name)
        return settings.rollout if settings is not None else EMPTY_ROLLOUT

    def rollouts(self) -> dict[str, ModelRollout]:
        return {name: s.rollout for name, s in sorted(self.models.items()) if not s.rollout.empty}

    def referenced(self) -> set[tuple[str, int]]:
        return {(name, v) for name, rollout in self.rollouts().items() for v in rollout.referenced_versions()}

    @classmethod
    def parse(cls, text: str) -> "RepositoryConfig":
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"not valid JSON: {exc}") from None
        problems: list[str] = []
        if not isinstance(raw, dict):
            raise ConfigError("expected a JSON object {\"models\": {...}}")
        unknown = sorted(set(raw) - {"models"})
        if unknown:
            problems.append(f"unknown key(s) {', '.join(map(repr, unknown))}: expected only \"models\"")
        entries = raw.get("models", {})
        if not isinstance(entries, dict):
            raise ConfigError(f"models: expected an object of model name -> settings, got {_kind(entries)}")
        models = {}
        for name, entry in entries.items():
            settings = _parse_model(name, entry, problems)
            if settings is not None:
                models[name] = settings
        if problems:
            raise ConfigError("; ".join(problems))
        return cls(models)

    def check_against(self, on_disk: dict[str, dict[int, Path]]) -> None:
        """Every model with a rollout is in the repository, and every version it names is on disk.
        (A policy alone may name a model not published yet.)"""
        problems = []
        for name, rollout in self.rollouts().items():
            versions = on_disk.get(name)
            if versions is None:
                known = ", ".join(sorted(on_disk)) or "none"
                problems.append(f"models.{name}: unknown model (the repository has: {known})")
                continue
            have = ", ".join(map(str, sorted(versions)))
            for where, version in _references(rollout):
                if version not in versions:
                    problems.append(f"models.{name}.{where}: version {version} is not in the repository "
                                    f"({name} has {have})")
        if problems:
            raise ConfigError("; ".join(problems))


def describe_changes(old: RepositoryConfig, new: RepositoryConfig, default_policy: VersionPolicy) -> list[str]:
    """One line per model whose version policy or rollout differs, before -> after (for the log)."""
    lines = []
    for name in sorted(set(old.models) | set(new.models)):
        policy_before, policy_after = old.policy_for(name, default_policy), new.policy_for(name, default_policy)
        if policy_before != policy_after:
            lines.append(f"{name}: version policy {policy_before} -> {policy_after}")
        before, after = old.rollout_for(name), new.rollout_for(name)
        if before != after:
            lines.append(f"{name}: rollout {before.describe()} -> {after.describe()}")
    return lines


def _kind(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def _references(rollout: ModelRollout) -> list[tuple[str, int]]:
    found = [(f"labels.{label}", version) for label, version in sorted(rollout.labels.items())]
    found += [(f"traffic.{share.label or share.version}", share.version) for share in rollout.traffic]
    if rollout.shadow is not None:
        found.append(("shadow.version", rollout.shadow.version))
    return found


def _version_number(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return None
    return value


def _percent(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
        return None
    return float(value)


def _parse_model(name: str, entry: object, problems: list[str]) -> ModelSettings | None:
    where = f"models.{name}"
    if not MODEL_NAME_PATTERN.match(name):
        problems.append(f"{where}: not a valid model name")
        return None
    if not isinstance(entry, dict):
        problems.append(f"{where}: expected an object, got {_kind(entry)}")
        return None
    unknown = sorted(set(entry) - set(MODEL_KEYS))
    if unknown:
        problems.append(f"{where}: unknown key(s) {', '.join(map(repr, unknown))} "
                        f"(expected {', '.join(MODEL_KEYS)})")
    policy = None
    if "version_policy" in entry:
        try:
            policy = VersionPolicy.parse(str(entry["version_policy"]))
        except ValueError as exc:
            problems.append(f"{where}.version_policy: {exc}")
    labels = _parse_labels(where, entry.get("labels", {}), problems)
    traffic = _parse_traffic(where, entry.get("traffic", {}), labels, problems)
    shadow = _parse_shadow(where, entry["shadow"], labels, problems) if "shadow" in entry else None
    return ModelSettings(policy, ModelRollout(labels, traffic, shadow))


def _parse_labels(where: str, raw: object, problems: list[str]) -> dict[str, int]:
    if not isinstance(raw, dict):
        problems.append(f"{where}.labels: expected an object of label -> version, got {_kind(raw)}")
        return {}
    labels = {}
    for label, value in raw.items():
        if not LABEL_PATTERN.match(label):
            problems.append(f"{where}.labels: {label[:70]!r} is not a valid label (a letter, then up to 63 "
                            "letters, digits, '_', '-', '.')")
            continue
        version = _version_number(value)
        if version is None:
            problems.append(f"{where}.labels.{label}: expected a version number >= 1, got {json.dumps(value)}")
            continue
        labels[label] = version
    return labels


def _resolve_reference(where: str, ref: object, labels: dict[str, int], problems: list[str]) -> tuple[int, str] | None:
    """A label or a version number (an int, or digits in a JSON key) -> (version, label or "")."""
    if isinstance(ref, str) and ref.isdigit():
        ref = int(ref)
    if isinstance(ref, str):
        if ref in labels:
            return labels[ref], ref
        known = ", ".join(sorted(labels)) or "none"
        problems.append(f"{where}: unknown label {ref[:70]!r} (labels: {known})")
        return None
    version = _version_number(ref)
    if version is None:
        problems.append(f"{where}: expected a label or a version number >= 1, got {json.dumps(ref)}")
        return None
    return version, ""


def _parse_traffic(where: str, raw: object, labels: dict[str, int], problems: list[str]) -> tuple[TrafficShare, ...]:
    where = f"{where}.traffic"
    if not isinstance(raw, dict):
        problems.append(f"{where}: expected an object of label (or version) -> percent, got {_kind(raw)}")
        return ()
    shares: dict[int, TrafficShare] = {}
    total, complete = 0.0, True
    for ref, value in raw.items():
        resolved = _resolve_reference(f"{where}.{ref}", ref, labels, problems)
        percent = _percent(value)
        if percent is None:
            problems.append(f"{where}.{ref}: expected a percent in 0..100, got {json.dumps(value)}")
        if resolved is None or percent is None:
            complete = False
            continue
        version, label = resolved
        if version in shares:
            problems.append(f"{where}: version {version} is named twice ({shares[version]} and {ref})")
            complete = False
            continue
        shares[version] = TrafficShare(version, label, percent)
        total += percent
    if shares and complete and abs(total - 100.0) > PERCENT_TOLERANCE:
        problems.append(f"{where}: the percents sum to {total:g}, not 100")
    return tuple(sorted(shares.values(), key=lambda share: -share.version))


def _parse_shadow(where: str, raw: object, labels: dict[str, int], problems: list[str]) -> ShadowPolicy | None:
    where = f"{where}.shadow"
    if not isinstance(raw, dict):
        problems.append(f"{where}: expected an object {{\"version\": label or number, \"percent\": 0..100}}, "
                        f"got {_kind(raw)}")
        return None
    unknown = sorted(set(raw) - set(SHADOW_KEYS))
    if unknown:
        problems.append(f"{where}: unknown key(s) {', '.join(map(repr, unknown))} (expected version, percent)")
    missing = [key for key in SHADOW_KEYS if key not in raw]
    if missing:
        problems.append(f"{where}: missing {' and '.join(missing)}")
        return None
    resolved = _resolve_reference(f"{where}.version", raw["version"], labels, problems)
    percent = _percent(raw["percent"])
    if percent is None:
        problems.append(f"{where}.percent: expected a percent in 0..100, got {json.dumps(raw['percent'])}")
    if resolved is None or percent is None:
        return None
    return ShadowPolicy(resolved[0], resolved[1], percent)
