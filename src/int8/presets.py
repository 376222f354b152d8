"""Model presets: data files in ``configs/``, one TOML file per model.

An installed wheel carries them as ``int8/configs``; a source checkout (an
editable install) reads the repository's top-level ``configs/``.
"""

from __future__ import annotations

import difflib
import sys
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from .blocks import DEFAULT_BLOCK_SIZE
from .errors import Int8Error


@dataclass(frozen=True)
class CardInfo:
    """What the model card needs to know about the original model."""

    license: str | None = None
    languages: tuple[str, ...] = ()
    datasets: tuple[str, ...] = ()
    pipeline_tag: str | None = None
    sample_prompt: str | None = None


@dataclass(frozen=True)
class Preset:
    name: str
    repo: str
    revision: str = "main"
    description: str = ""
    parameters: str = ""
    dtype: str = "bf16"  # everything not quantized
    scale_dtype: str = "fp32"  # the weight scales (see `int8 convert --help`)
    block_size: int = DEFAULT_BLOCK_SIZE
    skip: tuple[str, ...] = ()
    card: CardInfo = field(default_factory=CardInfo)


def presets_dir() -> Path:
    packaged = Path(__file__).parent / "configs"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "configs"


def _parse(path: Path) -> Preset:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # Python 3.10
        import tomli as tomllib

    try:
        data = tomllib.loads(path.read_text())
        card = data.pop("card", {})
        if data["name"] != path.stem:
            raise ValueError(f"its name is {data['name']!r}; a preset's file is named after it: {data['name']}.toml")
        return Preset(
            name=data["name"],
            repo=data["repo"],
            revision=data.get("revision", "main"),
            description=data.get("description", ""),
            parameters=data.get("parameters", ""),
            dtype=data.get("dtype", "bf16"),
            scale_dtype=_dtype_name(data.get("scale_dtype", "fp32"), "scale_dtype"),
            block_size=int(data.get("block_size", DEFAULT_BLOCK_SIZE)),
            skip=tuple(data.get("skip", ())),
            card=CardInfo(
                license=card.get("license"),
                languages=tuple(card.get("languages", ())),
                datasets=tuple(card.get("datasets", ())),
                pipeline_tag=card.get("pipeline_tag"),
                sample_prompt=card.get("sample_prompt"),
            ),
        )
    except (tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as e:
        raise Int8Error(f"preset file {path} is invalid: {e}") from None


def _dtype_name(value: object, key: str) -> str:
    from .hf import DTYPE_ALIASES

    if not isinstance(value, str) or value.lower() not in DTYPE_ALIASES:
        raise ValueError(f"{key} = {value!r} is not fp32, fp16 or bf16")
    return value


@cache
def preset_names() -> tuple[str, ...]:
    """Every preset's name, sorted: the names of the files (each file is named after its preset), none parsed."""
    return tuple(sorted(p.stem for p in presets_dir().glob("*.toml")))


@cache
def all_presets() -> dict[str, Preset]:
    return {name: _load(name) for name in preset_names()}


@cache
def _load(name: str) -> Preset:
    return _parse(presets_dir() / f"{name}.toml")


def get_preset(name: str) -> Preset | None:
    """The preset called ``name`` (any case), or None; only its own file is read."""
    name = name.lower()
    return _load(name) if name in preset_names() else None


def suggest(name: str, n: int = 3) -> list[str]:
    """Preset names close to ``name`` (for 'did you mean')."""
    names = list(all_presets())
    close = difflib.get_close_matches(name.lower(), names, n=n, cutoff=0.5)
    return close or [p for p in names if name.lower() in p][:n]
