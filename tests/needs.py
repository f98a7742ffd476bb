"""Services a test cannot run without. Where this machine cannot have one, the test skips and says why;
under `make test` and CI (KILN_REQUIRE_SERVICES=1, or CI=true) a missing llama-server or PostgreSQL means
the install is broken, so the test fails with the reason instead of letting a green run hide it."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def services_required() -> bool:
    return os.environ.get("CI", "").lower() == "true" or os.environ.get("KILN_REQUIRE_SERVICES") == "1"


def unavailable(what: str, why: object) -> NoReturn:
    if services_required():
        pytest.fail(f"{what} is required here (make test, CI) but unavailable: {why}", pytrace=False)
    pytest.skip(f"{what} is not available: {why}")
