"""The app's own run settings, read where Ansible runs (the controller).

    {{ (lab_app_dir ~ '/pyproject.toml') | lab_app_run_config }}

`[tool.flwr.app.config]` of app/pyproject.toml: the defaults every run starts from, and therefore the one
source of every setting the inventory's lab_run_config does not set (the data preparation reads the
dataset settings from here too, so data and runs never disagree).
"""

from __future__ import annotations

import tomllib
from pathlib import Path

try:  # run by Ansible; the unit tests import this file without it
    from ansible.errors import AnsibleFilterError
except ImportError:  # pragma: no cover
    AnsibleFilterError = ValueError


def lab_app_run_config(path: str) -> dict:
    """[tool.flwr.app.config] of the pyproject.toml at `path`."""
    try:
        with Path(path).open("rb") as fh:
            return dict(tomllib.load(fh)["tool"]["flwr"]["app"]["config"])
    except (OSError, KeyError, tomllib.TOMLDecodeError) as err:
        raise AnsibleFilterError(f"cannot read the app's run config [tool.flwr.app.config] from {path}: {err}") from err


class FilterModule:
    def filters(self):
        return {"lab_app_run_config": lab_app_run_config}
