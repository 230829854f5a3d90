r"""The run configs shipped in ``invertnet/app/configs`` (read without importing torch)."""

from __future__ import annotations

from importlib import resources

__all__ = ["embedded_config_text", "embedded_configs"]


def embedded_configs() -> list[str]:
    """Names of the configs shipped with invertnet."""
    folder = resources.files("invertnet.app") / "configs"
    return sorted(entry.name[: -len(".json")] for entry in folder.iterdir() if entry.name.endswith(".json"))


def embedded_config_text(name: str) -> str:
    """The JSON text of the embedded config ``name``."""
    return (resources.files("invertnet.app") / "configs" / f"{name}.json").read_text()
