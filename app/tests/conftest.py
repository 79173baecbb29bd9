from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: end-to-end test with real Flower processes (slow)")


@pytest.fixture
def fixtures() -> Path:
    return FIXTURES
