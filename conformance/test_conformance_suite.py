"""One pytest test per conformance property (see :mod:`.pytest_plugin`)."""

from __future__ import annotations

import pytest

from kldiv_spec.conformance.catalog import select
from kldiv_spec.conformance.pytest_plugin import run_one


@pytest.mark.parametrize("name", [p.name for p in select()])
def test_property(name: str, request: pytest.FixtureRequest) -> None:
    """Run conformance property ``name``."""
    run_one(request.config, name)
