"""The shadow row: what shadowing a share of live traffic costs the callers.

One server, one repository holding two versions of cifar10: `stable` (the older) takes every
request, `candidate` (the newest) is its shadow. The two sides of a pair are the same server with
and without the shadow in repository.json, switched by ReloadModels (nothing is loaded or
unloaded: both versions stay up on both sides), so a pair differs only in the shadow copies.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import grpc

from bench.servers import OurServer
from serving.proto.cifar10.classifier.v1 import classifier_pb2 as pb
from serving.proto.cifar10.classifier.v1 import classifier_pb2_grpc as pb_grpc

MODEL = "cifar10"
SHADOW_PERCENT = 10.0
SHADOW_CONCURRENCY = 16
SHADOW_TARGET = 1.05  # the callers' p50 with the shadow, at most this times the p50 without


@dataclass(frozen=True)
class ShadowRepository:
    path: Path
    stable: int
    candidate: int

    def configure(self, shadow_percent: float) -> None:
        """stable takes all traffic; candidate gets `shadow_percent` of it as a shadow (0: none)."""
        rollout: dict = {"labels": {"stable": self.stable, "candidate": self.candidate}, "traffic": {"stable": 100}}
        if shadow_percent:
            rollout["shadow"] = {"version": "candidate", "percent": shadow_percent}
        (self.path / "repository.json").write_text(json.dumps({"models": {MODEL: rollout}}, indent=2))


def shadow_repository(work: Path, models: Path) -> ShadowRepository:
    """A fresh copy of models/cifar10: the newest version is the candidate, the one before it stable;
    with one version on disk, a copy of it is published as the candidate (the cost is the same
    work, and the agreement is then 1)."""
    path = work / "repository-shadow"
    shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(models / MODEL, path / MODEL)
    versions = sorted(int(p.name) for p in (path / MODEL).iterdir() if p.name.isdigit() and p.is_dir())
    if len(versions) == 1:
        shutil.copytree(path / MODEL / str(versions[0]), path / MODEL / str(versions[0] + 1))
        versions.append(versions[0] + 1)
    repository = ShadowRepository(path, versions[-2], versions[-1])
    repository.configure(0)
    return repository


def reload(server: OurServer) -> None:
    with grpc.insecure_channel(server.target) as channel:
        pb_grpc.ClassifierStub(channel).ReloadModels(pb.ReloadModelsRequest(), timeout=60)


def shadow_images(server: OurServer) -> dict[str, float]:
    """Images compared and dropped (by reason) by the server's shadow so far."""
    counts: dict[str, float] = {}
    for family in server.metric_families():
        if family.name == "classifier_shadow_compared_images":
            counts["compared"] = sum(s.value for s in family.samples if s.name.endswith("_total"))
        elif family.name == "classifier_shadow_dropped_images":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    key = f"dropped_{sample.labels['reason']}"
                    counts[key] = counts.get(key, 0.0) + sample.value
    return counts


def minus(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {key: after[key] - before.get(key, 0.0) for key in after}
