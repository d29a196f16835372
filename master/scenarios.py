"""The master's scenario checks: resolve a job's preset (built-in or from TOML) at submit."""

from __future__ import annotations

from typing import Any

from bus.scenarios import (
    BUILTIN,
    Preset,
    apply_overrides,
    check_input,
    check_output,
    check_preset,
    load_toml,
)
from master.spec import ScenarioCheck, SpecError


def load_presets(toml_path: str | None) -> dict[str, Preset]:
    """Built-in presets plus (overriding them) the operator's TOML file, if given."""
    presets = dict(BUILTIN)
    if toml_path:
        presets.update(load_toml(toml_path))
    return presets


def make_checks(presets: dict[str, Preset]) -> dict[str, ScenarioCheck]:
    """A check per scenario: validates input/output/overrides and stores the resolved preset.

    The stored preset passes the same schema (`check_preset`) the agent applies to a JOB, so
    a preset the master stores is one every agent accepts.
    """

    def check(spec: dict[str, Any]) -> str:
        try:
            resolved = apply_overrides(presets[spec["scenario"]], spec["params"])
            check_input(spec["input"])
            check_output(spec["output"], resolved)
            wire = check_preset(resolved.to_wire()).to_wire()
        except ValueError as e:
            raise SpecError(str(e)) from e
        spec["preset"] = wire
        return resolved.requires

    return {name: check for name in presets}
