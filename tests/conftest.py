from __future__ import annotations

import pytest

from tests.broker import Mosquitto, find_mosquitto


@pytest.fixture
def mosquitto(tmp_path):
    """A running mosquitto on a free 127.0.0.1 port (no persistence), killed after the test."""
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed")
    with Mosquitto(tmp_path) as broker:
        yield broker
