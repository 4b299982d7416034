"""The model repository: <root>/<name>/<version>/model.onnx + model_card.json. No gRPC here.

Loads every model the version policy selects, routes (name, version) to a warmed-up version,
and rescans on demand (poller, ReloadModels RPC, SIGHUP): new versions are loaded and warmed
before they take traffic, then swapped in atomically; replaced and removed versions finish
what they have queued and are released. A version that fails to load never replaces one
that works.

Routing (version labels, the weighted traffic split, the shadow) follows the repository config
file (serving/repository_config.py), re-read on every scan: a file that cannot be put in force
is rejected as a whole and the last good one stays; a version the config in force routes to is
kept loaded (even when its directory is removed) until the config stops naming it.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from serving.batching import DynamicBatcher
from serving.drift import DriftReferenceError, DriftWindow, read_reference
from serving.errors import ConfigRejected, InvalidInput, ModelNotFound, ModelNotReady
from serving.memory import release_freed_memory
from serving.metrics import ServingMetrics
from serving.repository_config import (
    LABEL_PATTERN, MODEL_NAME_PATTERN, ConfigError, ModelRollout, RepositoryConfig, VersionPolicy,
    describe_changes, sticky_point,
)
from serving.runtime import CARD_FILE, MODEL_FILE, ModelLoadError, OnnxModel, RuntimeOptions
from serving.trust import ScoredRunner, Trust, TrustCardError

log = logging.getLogger(__name__)

REPOSITORY_CONFIG = "repository.json"
# How a request's version was chosen (the `route` label of classifier_routed_requests_total).
ROUTE_VERSION, ROUTE_LABEL, ROUTE_SPLIT, ROUTE_NEWEST = "version", "label", "split", "newest"
# Removing a version the config in force routes to is refused: its session keeps serving.
REMOVED_BUT_ROUTED = ("removed from disk, kept loaded: the rollout config in force routes to it "
                      "(move its labels, traffic and shadow elsewhere, then rescan)")


class VersionState(enum.Enum):
    LOADING = 1
    AVAILABLE = 2
    UNLOADING = 3
    FAILED = 4


@dataclass(frozen=True)
class BatchingOptions:
    max_batch_size: int = 64
    max_delay_s: float = 0.0
    max_queue_images: int = 1024


@dataclass(eq=False)
class ServedVersion:
    name: str
    version: int
    directory: Path
    state: VersionState
    fingerprint: tuple = ()
    error: str = ""
    model: OnnxModel | None = None
    batcher: DynamicBatcher | None = None
    trust: Trust | None = None  # calibration and the unsure rule, from the card
    window: DriftWindow | None = None  # what it served lately, for the drift scores
    loaded_at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class ModelRoutes:
    """One model's routing snapshot: its available versions and the rollout in force, swapped as
    one object, so a request never sees a rollout naming a version its snapshot lacks."""

    versions: dict[int, ServedVersion]
    rollout: ModelRollout

    @property
    def newest(self) -> int:
        return max(self.versions)

    @property
    def default_version(self) -> int:
        """What a request naming no version mostly gets: the largest traffic share (the newer on a
        tie), else the newest version."""
        if not self.rollout.traffic:
            return self.newest
        return max(self.rollout.traffic, key=lambda share: (share.percent, share.version)).version


@dataclass(slots=True)
class RouteRequest:
    """What a request asked for; routing it again (after a hot swap) gives the same answer."""

    model: str
    version: int = 0
    label: str = ""
    request_id: str = ""


@dataclass(slots=True)  # one per request: slots, not frozen, to keep it cheap
class Routed:
    served: ServedVersion
    how: str  # ROUTE_VERSION | ROUTE_LABEL | ROUTE_SPLIT | ROUTE_NEWEST
    label: str  # the label that chose the version ("" when none did)
    request: RouteRequest
    shadow: ServedVersion | None = None  # gets a sampled copy once `served` has answered
    shadow_percent: float = 0.0


def validate_model_name(name: str) -> str:
    if not MODEL_NAME_PATTERN.match(name):
        raise InvalidInput(
            f"model name {name[:80]!r} is not valid: use 1-64 letters, digits, '_', '-', '.', starting "
            "with a letter or digit",
            reason="bad_model_name",
        )
    return name


def fingerprint(directory: Path) -> tuple:
    """What changes when a version's files are replaced."""
    parts = []
    for name in (MODEL_FILE, CARD_FILE):
        try:
            st = (directory / name).stat()
            parts.append((name, st.st_size, st.st_mtime_ns, st.st_ino))
        except OSError:
            parts.append((name, None))
    return tuple(parts)


class ModelRepository:
    def __init__(
        self,
        root: Path,
        runtime: RuntimeOptions,
        batching: BatchingOptions,
        metrics: ServingMetrics,
        default_model: str,
        version_policy: str = "latest:1",
        config_path: Path | None = None,
        drift_window: int = 512,
    ):
        self.root = Path(root)
        self.runtime, self.batching, self.metrics = runtime, batching, metrics
        self.default_model = default_model
        self.default_policy = VersionPolicy.parse(version_policy)
        self.drift_window = drift_window
        self.config_path = Path(config_path) if config_path else self.root / REPOSITORY_CONFIG
        # A file named on purpose (--repository-config) must be there: a mistyped path must not
        # quietly mean "no rollout". Without one, no repository.json means the empty config.
        self._config_required = config_path is not None
        # Copy-on-write: readers take a snapshot without a lock; only scan() replaces them.
        self._routes: dict[str, ModelRoutes] = {}
        self._versions: dict[tuple[str, int], ServedVersion] = {}
        self._config = RepositoryConfig()  # the config in force
        self._config_accepted = False  # a config file, if there is one, has been put in force once
        self.config_error = ""  # why the file on disk is not the config in force ("" when it is)
        self._config_listeners: list[Callable[[RepositoryConfig], None]] = []
        self._scan_lock = threading.Lock()
        self._closed = False

    # ---- reading (hot path) -------------------------------------------------------------
    def route(self, name: str, version: int = 0, label: str = "", request_id: str = "") -> Routed:
        """The version to serve a request: a label names one; a version number names one; neither:
        the model's traffic split (sticky per request id) or, without one, the newest. Also the
        shadow version that gets a copy of the request, if any."""
        request = RouteRequest(name or self.default_model, version, label, request_id)
        routes = self._model_routes(request.model)
        if label:
            served, how = self._labelled(request.model, routes, label, version), ROUTE_LABEL
        elif version:
            served, how = self._numbered(request.model, routes, version), ROUTE_VERSION
        elif routes.rollout.traffic:
            share = routes.rollout.choose(sticky_point(request.model, request_id))
            served = self._available(request.model, routes, share.version, str(share))
            how, label = ROUTE_SPLIT, share.label
        else:
            served, how = routes.versions[routes.newest], ROUTE_NEWEST
        shadow = routes.rollout.shadow
        if shadow is None or shadow.version == served.version or shadow.version not in routes.versions:
            return Routed(served, how, label, request)
        return Routed(served, how, label, request, routes.versions[shadow.version], shadow.percent)

    def resolve(self, name: str, version: int = 0, label: str = "") -> ServedVersion:
        """The version a label or number names; neither: the one unnamed requests mostly get (the
        largest traffic share, else the newest). For metadata and readiness: no split, no shadow."""
        name = name or self.default_model
        routes = self._model_routes(name)
        if label:
            return self._labelled(name, routes, label, version)
        if version:
            return self._numbered(name, routes, version)
        return self._available(name, routes, routes.default_version, "the default")

    def _model_routes(self, name: str) -> ModelRoutes:
        routes = self._routes.get(name)
        if routes is None:
            validate_model_name(name)
            known = ", ".join(sorted(self._routes)) or "none"
            if any(key[0] == name for key in self._versions):
                raise ModelNotReady(f"model {name!r} has no available version yet: {self._state_words(name)}")
            raise ModelNotFound(f"model {name!r} is not in the repository (available: {known})")
        return routes

    def _numbered(self, name: str, routes: ModelRoutes, version: int) -> ServedVersion:
        served = routes.versions.get(version)
        if served is None:
            if version < 0:
                raise InvalidInput(f"model_version must be >= 0 (0: newest), got {version}", reason="bad_version")
            entry = self._versions.get((name, version))
            if entry is not None:
                raise ModelNotReady(f"model {name!r} version {version} is {entry.state.name}: {entry.error or 'not ready'}")
            raise ModelNotFound(
                f"model {name!r} has no version {version} (available: {', '.join(map(str, sorted(routes.versions)))})"
            )
        return served

    def _labelled(self, name: str, routes: ModelRoutes, label: str, version: int) -> ServedVersion:
        if version:
            raise InvalidInput(f"the request names version {version} and label {label[:40]!r}: name one",
                               reason="bad_version")
        if not LABEL_PATTERN.match(label):
            raise InvalidInput(f"version label {label[:40]!r} is not valid: a letter, then up to 63 letters, "
                               "digits, '_', '-', '.'", reason="bad_version")
        target = routes.rollout.labels.get(label)
        if target is None:
            known = ", ".join(sorted(routes.rollout.labels)) or "none"
            raise ModelNotFound(f"model {name!r} has no version label {label!r} (labels: {known})")
        return self._available(name, routes, target, f"label {label!r}")

    def _available(self, name: str, routes: ModelRoutes, version: int, why: str) -> ServedVersion:
        served = routes.versions.get(version)
        if served is None:  # the config in force only names available versions; a guard, not a path
            raise ModelNotReady(f"model {name!r}: {why} routes to version {version}, which is not available")
        return served

    def _state_words(self, name: str) -> str:
        return "; ".join(
            f"v{v.version} {v.state.name}" + (f" ({v.error})" if v.error else "")
            for key, v in sorted(self._versions.items()) if key[0] == name
        )

    def statuses(self) -> list[ServedVersion]:
        return [self._versions[key] for key in sorted(self._versions)]

    @property
    def config(self) -> RepositoryConfig:
        """The config in force (the last good one when the file on disk was rejected)."""
        return self._config

    def ready(self) -> bool:
        """SERVING: the default model has an available version, and the config file, if there is
        one, has been put in force (a server never routes by a config it was not given)."""
        return self.default_model in self._routes and self._config_accepted

    def check_config_in_force(self) -> None:
        """After a rescan asked for by a caller: tell them when the file on disk was not put in force."""
        if self.config_error:
            raise ConfigRejected(f"{self.config_error} (the versions were rescanned)")

    def not_ready_reason(self) -> str:
        if self.default_model not in self._routes:
            return f"default model {self.default_model!r} has no available version"
        return self.config_error or "no repository config is in force yet"

    def add_config_listener(self, listener: Callable[[RepositoryConfig], None]) -> None:
        """Called (on the scan thread) with each config put in force."""
        self._config_listeners.append(listener)

    # ---- scanning ------------------------------------------------------------------------
    def discover(self) -> dict[str, dict[int, Path]]:
        """Every valid version directory on disk: {name: {version: directory}}."""
        found: dict[str, dict[int, Path]] = {}
        if not self.root.is_dir():
            log.error("model repository %s is not a directory", self.root)
            return found
        root = self.root.resolve()
        for model_dir in sorted(self.root.iterdir()):
            if not model_dir.is_dir() or model_dir.name.startswith("."):
                continue
            if not MODEL_NAME_PATTERN.match(model_dir.name):
                log.warning("skipping %r: not a valid model name", model_dir.name)
                continue
            versions: dict[int, Path] = {}
            for version_dir in model_dir.iterdir():
                if not version_dir.name.isdigit() or not version_dir.is_dir() or int(version_dir.name) < 1:
                    continue  # temp dirs being published (e.g. ".3.tmp") are ignored
                resolved = version_dir.resolve()
                if not resolved.is_relative_to(root):
                    log.error("skipping %s: it points outside the repository (%s)", version_dir, resolved)
                    continue
                versions[int(version_dir.name)] = version_dir
            if versions:
                found[model_dir.name] = versions
        return found

    def scan(self) -> list[ServedVersion]:
        """Bring the served set and the routing in line with the disk; returns the statuses afterwards.

        Order: read the config file; load what it (or, if rejected, the config in force) wants;
        put it in force once every version it routes to is available; only then unload what
        nothing wants any more, so no request is routed to a version being released.
        """
        with self._scan_lock:
            if self._closed:
                return self.statuses()
            on_disk = self.discover()
            candidate = self._read_config(on_disk)
            wanted = self._wanted(on_disk, candidate or self._config)
            for key, directory in sorted(wanted.items()):
                current = self._versions.get(key)
                fp = fingerprint(directory)
                if current is not None and current.fingerprint == fp:
                    if current.error == REMOVED_BUT_ROUTED:  # its directory is back
                        current.error = ""
                    continue
                self._load(key, directory, fp, replacing=current)
            if candidate is not None:
                unavailable = self._unavailable_references(candidate)
                if unavailable:
                    self._reject(unavailable)
                    wanted = self._wanted(on_disk, self._config)
                else:
                    self._accept(candidate)
            pinned = self._config.referenced()
            for key in [k for k in self._versions if k not in wanted]:
                name, version = key
                if key in pinned:  # routed to but gone from disk: its session keeps serving
                    self._keep_removed(self._versions[key])
                    continue
                still_on_disk = version in on_disk.get(name, {})
                if still_on_disk and not self._has_available_wanted(name, wanted):
                    # Out of policy, but nothing newer loaded: a broken new version must not
                    # take down the one that works.
                    continue
                self._unload(self._versions[key])
            return self.statuses()

    def _wanted(self, on_disk: dict[str, dict[int, Path]], config: RepositoryConfig) -> dict[tuple[str, int], Path]:
        """The versions the policy selects, plus those the config routes to (whatever the policy)."""
        wanted: dict[tuple[str, int], Path] = {}
        for name, versions in on_disk.items():
            chosen = set(config.policy_for(name, self.default_policy).select(list(versions)))
            chosen |= config.rollout_for(name).referenced_versions() & versions.keys()
            for version in chosen:
                wanted[(name, version)] = versions[version]
        return wanted

    # ---- the config file -----------------------------------------------------------------
    def _read_config(self, on_disk: dict[str, dict[int, Path]]) -> RepositoryConfig | None:
        """The file's config if it can be put in force, else None (rejected, logged). No
        repository.json: the empty config (every model on the server's version policy, no rollout)."""
        try:
            text = self.config_path.read_text()
        except FileNotFoundError:
            if self._config_required:
                self._reject("no such file (--repository-config)")
                return None
            return RepositoryConfig()
        except OSError as exc:
            self._reject(f"cannot read it: {exc.strerror or exc}")
            return None
        try:
            config = RepositoryConfig.parse(text)
            config.check_against(on_disk)
        except ConfigError as exc:
            self._reject(str(exc))
            return None
        return config

    def _unavailable_references(self, config: RepositoryConfig) -> str:
        problems = []
        for name, version in sorted(config.referenced()):
            served = self._versions.get((name, version))
            if served is None or served.state is not VersionState.AVAILABLE:
                state = served.state.name if served else "not loaded"
                detail = f": {served.error}" if served is not None and served.error else ""
                problems.append(f"models.{name}: version {version} is {state}{detail}")
        return "; ".join(problems)

    def _reject(self, problem: str) -> None:
        consequence = ("the last good config stays in force" if self._config_accepted else
                       "no config is in force, so the server stays NOT_SERVING until the file is fixed")
        message = f"{self.config_path} rejected: {problem}; {consequence}"
        if message != self.config_error:  # a poller re-reading the same bad file logs it once
            log.error("%s", message)
        self.config_error = message
        self.metrics.repository_config_ok.set(0)

    def _accept(self, config: RepositoryConfig) -> None:
        if config == self._config and self._config_accepted:
            if self.config_error:
                log.info("%s is in force again (unchanged from the last good config)", self.config_path)
            self.config_error = ""
            self.metrics.repository_config_ok.set(1)
            return
        for line in describe_changes(self._config, config, self.default_policy):
            log.info("repository config %s: %s", self.config_path, line)
        self._config, self._config_accepted, self.config_error = config, True, ""
        self._rebuild_routes()
        self.metrics.rollout_in_force(config.rollouts())
        self.metrics.repository_config_ok.set(1)
        for listener in self._config_listeners:
            listener(config)

    def _keep_removed(self, served: ServedVersion) -> None:
        if served.error != REMOVED_BUT_ROUTED:
            log.warning("model %s v%d %s", served.name, served.version, REMOVED_BUT_ROUTED)
            served.error = REMOVED_BUT_ROUTED

    def _has_available_wanted(self, name: str, wanted: dict[tuple[str, int], Path]) -> bool:
        return any(
            key[0] == name and key in wanted and served.state is VersionState.AVAILABLE
            for key, served in self._versions.items()
        )

    def _load(self, key: tuple[str, int], directory: Path, fp: tuple, replacing: ServedVersion | None) -> None:
        name, version = key
        serving_old = replacing is not None and replacing.state is VersionState.AVAILABLE
        if not serving_old:
            self._set_version(ServedVersion(name, version, directory, VersionState.LOADING, fp))
        started = time.perf_counter()
        try:
            model = OnnxModel(name, version, directory, self.runtime)
            try:
                trust = Trust.from_card(model.card.raw, model.output_names, model.num_classes)
                window = DriftWindow(read_reference(model.card.raw.get("drift_reference")), self.drift_window)
            except (TrustCardError, DriftReferenceError) as exc:
                raise ModelLoadError(f"{CARD_FILE}: {exc}") from None
            sizes = model.warm_up(self.batching.max_batch_size)
        except ModelLoadError as exc:
            self.metrics.model_load_failures.labels(name).inc()
            if serving_old:
                log.error("reload of %s v%d failed, the loaded version keeps serving: %s", name, version, exc)
                replacing.error = f"reload failed, previous file keeps serving: {exc}"
                replacing.fingerprint = fp  # don't retry until the files change again
            else:
                log.error("model %s v%d failed to load: %s", name, version, exc)
                self._set_version(ServedVersion(name, version, directory, VersionState.FAILED, fp, error=str(exc)))
            return
        seconds = time.perf_counter() - started
        batcher = DynamicBatcher(
            ScoredRunner(model, trust, window), self.batching.max_batch_size, self.batching.max_delay_s, self.batching.max_queue_images,
            observer=self.metrics.observer_for(name, version), name=f"{name}-v{version}",
            background_run=ScoredRunner(model, trust, window, background=True),
        )
        served = ServedVersion(name, version, directory, VersionState.AVAILABLE, fp, model=model, batcher=batcher,
                               trust=trust, window=window)
        self.metrics.drift.add(name, version, window)
        self.metrics.queue_capacity.labels(name, str(version)).set(self.batching.max_queue_images)
        self.metrics.model_loads.labels(name).inc()
        self.metrics.model_load_seconds.labels(name).observe(seconds)
        if replacing is not None and replacing.model is not None:
            self.metrics.model_unloaded(name, version, replacing.model.sha256, replacing.model.providers)
        self.metrics.model_loaded(name, version, model.sha256, model.providers, model.on_gpu)
        self._set_version(served)  # the swap: new requests now reach the new session
        log.info(
            "model %s v%d AVAILABLE in %.2fs on %s (sha256 %s, warmed batch sizes %s)",
            name, version, seconds, ", ".join(model.providers), model.sha256[:12], sizes,
        )
        if serving_old:
            self._release(replacing)

    def _set_version(self, served: ServedVersion) -> None:
        key = (served.name, served.version)
        versions = dict(self._versions)
        versions[key] = served
        self._versions = versions
        self._rebuild_routes()

    def _rebuild_routes(self) -> None:
        available: dict[str, dict[int, ServedVersion]] = {}
        for (name, version), served in self._versions.items():
            if served.state is VersionState.AVAILABLE:
                available.setdefault(name, {})[version] = served
        self._routes = {name: ModelRoutes(versions, self._config.rollout_for(name))
                        for name, versions in available.items()}

    def _unload(self, served: ServedVersion) -> None:
        served.state = VersionState.UNLOADING
        versions = dict(self._versions)
        versions.pop((served.name, served.version), None)
        self._versions = versions
        self._rebuild_routes()
        log.info("model %s v%d UNLOADING: removed from the repository", served.name, served.version)
        self._release(served)

    def _release(self, served: ServedVersion) -> None:
        """Drain the queue of a version no longer routed to, then free its session."""
        served.state = VersionState.UNLOADING
        if served.batcher is not None:
            served.batcher.close()
        if served.window is not None:
            self.metrics.drift.remove(served.name, served.version, served.window)
        if served.model is not None:
            if self._versions.get((served.name, served.version)) is None:
                self.metrics.model_unloaded(served.name, served.version, served.model.sha256, served.model.providers)
            served.model.close()  # frees the session; names and card stay for late readers
        served.batcher = None
        release_freed_memory()

    def close(self) -> None:
        """Finish every queued request, then release every session (the last step of shutdown)."""
        with self._scan_lock:
            self._closed = True
            for served in list(self._versions.values()):
                self._release(served)
            self._routes = {}


class RepositoryPoller:
    """Rescans the repository every `interval_s` seconds in a daemon thread."""

    def __init__(self, repository: ModelRepository, interval_s: float):
        self._repository, self._interval = repository, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="repository-poller", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._repository.scan()
            except Exception:  # noqa: BLE001 - the poller must survive anything on disk
                log.exception("repository scan failed")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


