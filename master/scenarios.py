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
    output_extension,
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

    A file output's extension must go with the preset's container; one without an extension
    gets the preset's (`clip` -> `clip.webm` for 1080p-vp9).

    The stored preset passes the same schema (`check_preset`) the agent applies to a JOB, so
    a preset the master stores is one every agent accepts.
    """

    def check(spec: dict[str, Any]) -> str:
        try:
            resolved = apply_overrides(presets[spec["scenario"]], spec["params"])
            check_input(spec["input"])
            check_output(spec["output"], resolved)
            output = output_extension(spec["output"], resolved)  # refuses .mp4 for webm
            if output != spec["output"]:  # the preset's extension added: bounds again
                check_output(output, resolved)
                spec["output"] = output
            wire = check_preset(resolved.to_wire()).to_wire()
        except ValueError as e:
            raise SpecError(str(e)) from e
        spec["preset"] = wire
        return resolved.requires

    return {name: check for name in presets}
