"""The repository config file, in-process: what it accepts, every mistake named by its place in
the file, and the routing arithmetic (the split's layout, sticky points). The server's use of it
(reload, rejection under a running server, routing through both APIs) is in test_rollouts.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from serving.repository_config import (
    ConfigError, RepositoryConfig, ShadowPolicy, TrafficShare, VersionPolicy, describe_changes, sticky_point,
)

ON_DISK = {"cifar10": {1: Path("1"), 2: Path("2")}, "other": {7: Path("7")}}


def parsed(models: dict) -> RepositoryConfig:
    config = RepositoryConfig.parse(json.dumps({"models": models}))
    config.check_against(ON_DISK)
    return config


def test_a_full_rollout_parses_into_labels_traffic_newest_first_and_shadow():
    config = parsed({"cifar10": {"version_policy": "all", "labels": {"stable": 1, "canary": 2},
                                 "traffic": {"stable": 90, "canary": 10}, "shadow": {"version": "canary", "percent": 5}}})
    rollout = config.rollout_for("cifar10")
    assert rollout.labels == {"stable": 1, "canary": 2}
    assert rollout.traffic == (TrafficShare(2, "canary", 10.0), TrafficShare(1, "stable", 90.0))
    assert rollout.shadow == ShadowPolicy(2, "canary", 5.0)
    assert config.policy_for("cifar10", VersionPolicy.parse("latest:1")) == VersionPolicy("all")
    assert config.referenced() == {("cifar10", 1), ("cifar10", 2)}


def test_traffic_and_shadow_may_name_versions_by_number():
    rollout = parsed({"cifar10": {"traffic": {"1": 75, "2": 25}, "shadow": {"version": 2, "percent": 100}}}
                     ).rollout_for("cifar10")
    assert rollout.traffic == (TrafficShare(2, "", 25.0), TrafficShare(1, "", 75.0))
    assert rollout.shadow == ShadowPolicy(2, "", 100.0)


def test_a_policy_may_name_a_model_that_is_not_published_yet():
    assert parsed({"future": {"version_policy": "latest:2"}}).rollouts() == {}


def test_no_models_is_the_empty_config():
    assert RepositoryConfig.parse("{}") == RepositoryConfig()


@pytest.mark.parametrize("models,words", [
    ({"cifar10": {"labels": {"canary": 3}}},
     "models.cifar10.labels.canary: version 3 is not in the repository (cifar10 has 1, 2)"),
    ({"cifar10": {"labels": {"stable": 1}, "traffic": {"stable": 90, "2": 5}}},
     "models.cifar10.traffic: the percents sum to 95, not 100"),
    ({"cifar11": {"labels": {"stable": 1}}}, "models.cifar11: unknown model (the repository has: cifar10, other)"),
    ({"cifar10": {"traffic": {"canary": 100}}}, "models.cifar10.traffic.canary: unknown label 'canary' (labels: none)"),
    ({"cifar10": {"trafic": {"1": 100}}}, "models.cifar10: unknown key(s) 'trafic'"),
    ({"cifar10": {"labels": {"stable": "1"}}}, "models.cifar10.labels.stable: expected a version number >= 1, got \"1\""),
    ({"cifar10": {"labels": {"stable": 0}}}, "expected a version number >= 1, got 0"),
    ({"cifar10": {"labels": {"2x": 1}}}, "'2x' is not a valid label"),
    ({"cifar10": {"traffic": {"1": 120, "2": -20}}}, "models.cifar10.traffic.1: expected a percent in 0..100, got 120"),
    ({"cifar10": {"labels": {"a": 2}, "traffic": {"a": 50, "2": 50}}},
     "models.cifar10.traffic: version 2 is named twice (a(v2) and 2)"),
    ({"cifar10": {"shadow": {"version": 2}}}, "models.cifar10.shadow: missing percent"),
    ({"cifar10": {"shadow": {"version": "next", "percent": 10}}}, "models.cifar10.shadow.version: unknown label 'next'"),
    ({"cifar10": {"shadow": {"version": 9, "percent": 10}}}, "models.cifar10.shadow.version: version 9 is not in the"),
    ({"cifar10": {"version_policy": "newest"}}, "models.cifar10.version_policy: bad version policy 'newest'"),
    ({"cifar10": []}, "models.cifar10: expected an object, got a list"),
    ({"../x": {}}, "models.../x: not a valid model name"),
])
def test_a_mistake_is_named_by_its_place_in_the_file(models, words):
    with pytest.raises(ConfigError) as error:
        parsed(models)
    assert words in str(error.value)


def test_every_mistake_of_a_file_is_reported_at_once():
    with pytest.raises(ConfigError) as error:
        parsed({"cifar10": {"labels": {"stable": 1}, "traffic": {"stable": 50}, "shadow": {"version": "x", "percent": 1}}})
    assert "sum to 50" in str(error.value) and "unknown label 'x'" in str(error.value)


@pytest.mark.parametrize("text,words", [
    ("{\"models\": {", "not valid JSON"),
    ("[]", "expected a JSON object"),
    ("{\"models\": [], \"extra\": 1}", "models: expected an object"),
    ("{\"model\": {}}", "unknown key(s) 'model'"),
])
def test_a_file_of_the_wrong_shape_says_so(text, words):
    with pytest.raises(ConfigError) as error:
        RepositoryConfig.parse(text)
    assert words in str(error.value)


def test_the_split_gives_each_share_its_percent_of_the_points():
    rollout = parsed({"cifar10": {"labels": {"stable": 1, "canary": 2}, "traffic": {"stable": 90, "canary": 10}}}
                     ).rollout_for("cifar10")
    assert [rollout.choose(p).version for p in (0.0, 9.99, 10.0, 99.99)] == [2, 2, 1, 1]


def test_raising_the_newest_share_keeps_every_request_it_had():
    before = parsed({"cifar10": {"traffic": {"1": 90, "2": 10}}}).rollout_for("cifar10")
    after = parsed({"cifar10": {"traffic": {"1": 50, "2": 50}}}).rollout_for("cifar10")
    points = [sticky_point("cifar10", f"id-{i}") for i in range(2000)]
    had = [p for p in points if before.choose(p).version == 2]
    assert had and all(after.choose(p).version == 2 for p in had)


def test_a_request_id_always_falls_on_the_same_point_and_ids_spread_evenly():
    assert sticky_point("cifar10", "abc") == sticky_point("cifar10", "abc")
    points = [sticky_point("cifar10", f"req-{i}") for i in range(10_000)]
    assert all(0 <= p < 100 for p in points)
    assert abs(sum(p < 10 for p in points) / len(points) - 0.10) < 0.015


def test_changes_are_described_per_model_before_and_after():
    old = parsed({"cifar10": {"labels": {"stable": 1}, "traffic": {"stable": 100}}})
    new = parsed({"cifar10": {"version_policy": "all", "labels": {"stable": 1, "canary": 2},
                              "traffic": {"stable": 90, "canary": 10}}})
    lines = describe_changes(old, new, VersionPolicy.parse("latest:1"))
    assert lines == [
        "cifar10: version policy latest:1 -> all",
        "cifar10: rollout labels stable=v1; traffic stable(v1) 100% -> labels canary=v2, stable=v1; "
        "traffic canary(v2) 10%, stable(v1) 90%",
    ]
    assert describe_changes(new, new, VersionPolicy.parse("latest:1")) == []
