from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: end-to-end test with real Flower processes (slow)")


@pytest.fixture
def fixtures() -> Path:
    return FIXTURES


@pytest.fixture
def run_config() -> dict:
    """The app's run config as pyproject.toml declares it."""
    import tomllib

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    return tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"]
