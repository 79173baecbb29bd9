"""Unit tests of lab_common's lab_app_run_config filter: the app's run defaults, from its pyproject.toml."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "roles" / "lab_common" / "filter_plugins"))

from lab_app import FilterModule, lab_app_run_config  # noqa: E402


def test_reads_the_apps_own_run_config():
    config = lab_app_run_config(str(ROOT / "app" / "pyproject.toml"))
    with (ROOT / "app" / "pyproject.toml").open("rb") as fh:
        assert config == tomllib.load(fh)["tool"]["flwr"]["app"]["config"]
    # the dataset settings the data preparation takes from here
    assert {"dataset", "partitioner", "dirichlet-alpha", "seed"} <= set(config)


def test_a_missing_file_or_section_is_named(tmp_path):
    with pytest.raises(Exception, match="cannot read the app's run config .* from .*nowhere.toml"):
        lab_app_run_config(str(tmp_path / "nowhere.toml"))
    other = tmp_path / "pyproject.toml"
    other.write_text('[project]\nname = "x"\n')
    with pytest.raises(Exception, match=r"\[tool.flwr.app.config\] from .*pyproject.toml: 'tool'"):
        lab_app_run_config(str(other))


def test_the_filter_name():
    assert FilterModule().filters() == {"lab_app_run_config": lab_app_run_config}
