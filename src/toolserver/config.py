"""Helpers shared by the manager's and the node's configuration: YAML files and error messages."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from toolserver.errors import ConfigError


def read_yaml_mapping(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """The mapping at the top of a YAML file; ConfigError when unreadable, invalid or not a mapping."""
    import yaml  # here: a node started without a config file never needs it

    try:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path} is not valid YAML: {exc}") from exc
    if not isinstance(loaded, dict):
        raise ConfigError(f"{what} {path} must hold a mapping at its top level")
    return loaded


def dotted(loc: tuple[int | str, ...]) -> str:
    """A validation error's location as a dotted key: ``node.max_nodes``."""
    return ".".join(str(p) for p in loc) or "(root)"


def describe_validation_error(
    exc: ValidationError, where: Callable[[tuple[int | str, ...]], str] = dotted
) -> str:
    """One line naming every bad key and what is wrong with it; values are not echoed.

    ``where`` turns an error's location into the key's name as the user wrote it.
    """
    parts = []
    for err in exc.errors():
        if not err["loc"]:  # a check across keys: its message says which
            parts.append(err["msg"].removeprefix("Value error, "))
            continue
        key = where(tuple(err["loc"]))
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown key '{key}'")
        else:
            parts.append(f"'{key}': {err['msg']}")
    return "; ".join(parts)


class EnvOverYamlSettings(BaseSettings):
    """Settings read from the environment first, then from YAML data passed in as arguments."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (env_settings, init_settings)
