"""The docs and shipped configs stay true to the code."""

from __future__ import annotations

from pathlib import Path

import pytest

from joynode.config import Config, load_config

ROOT = Path(__file__).resolve().parent.parent


def config_keys() -> list[str]:
    keys = []
    for section, field in Config.model_fields.items():
        model = field.annotation
        if section == "path" or model is None:
            continue
        keys += [f"{section}.{key}" for key in getattr(model, "model_fields", {})]
    return keys


@pytest.mark.parametrize("key", config_keys())
def test_readme_documents_every_config_key(key: str) -> None:
    assert f"| `{key}` |" in (ROOT / "README.md").read_text()


@pytest.mark.parametrize(
    "path", [ROOT / "joynode.toml", *sorted((ROOT / "configs").glob("*.toml"))], ids=str
)
def test_shipped_configs_are_valid(path: Path) -> None:
    load_config(path)
