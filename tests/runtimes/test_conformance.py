"""The runtime conformance suite (toolserver.testing.conformance) on every tier this machine runs."""

from __future__ import annotations

import pytest

from toolserver.testing.conformance import RuntimeConformance
from toolserver.testing.tiers import Tier, tier_params


class TestConformance(RuntimeConformance):
    @pytest.fixture(params=tier_params())
    def tier(self, request: pytest.FixtureRequest) -> Tier:
        return request.param
