"""The client of the native API: `Classifier` (blocking) and `AsyncClassifier` (asyncio).

    from serving.client import Classifier

    with Classifier("localhost:50051") as classifier:
        print(classifier.classify("cat.png").label)

`python -m serving.client PATHS... --output FILE` is the bulk CLI over the same API
(serving/client/cli.py); docs/client.md has it all. Names are loaded on first use, so the
health probe (serving.healthcheck), which needs only serving.client.connection, stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Classifier": "serving.client.sync",
    "AsyncClassifier": "serving.client.aio",
    "Classification": "serving.client.results",
    "Prediction": "serving.client.results",
    "Result": "serving.client.results",
    "Explanation": "serving.client.results",
    "FeatureMap": "serving.client.results",
    "RequestError": "serving.client.results",
    "RetryPolicy": "serving.client.retry",
    "Retry": "serving.client.retry",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from serving.client.aio import AsyncClassifier
    from serving.client.results import Classification, Explanation, FeatureMap, Prediction, RequestError, Result
    from serving.client.retry import Retry, RetryPolicy
    from serving.client.sync import Classifier


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
