"""The ``card`` check: README.md carries the metadata the Hub needs to list and load the checkpoint."""

from __future__ import annotations

from ...files import CARD_NAME
from ..layout import Layout
from ..result import Check, outcome


def check_card(layout: Layout) -> Check:
    threshold = "README.md metadata: transformers, int8 tag, base_model"
    path = layout.folder / CARD_NAME
    if not path.is_file():
        return outcome("card", [f"{CARD_NAME} (the model card) is missing"], figure="missing", threshold=threshold)
    from huggingface_hub import ModelCard

    try:
        data = ModelCard.load(path).data.to_dict()
    except Exception as e:  # an unparseable card is the finding
        return outcome("card", [f"{CARD_NAME} does not parse as a model card ({e})"], figure="unreadable",
                       threshold=threshold)
    problems = []
    if not data:
        problems.append(f"{CARD_NAME} has no metadata block")
    if data and data.get("library_name") != "transformers":
        problems.append(f"{CARD_NAME}: library_name is {data.get('library_name')!r}, not 'transformers'")
    tags = data.get("tags") or []
    if data and "int8" not in tags:
        problems.append(f"{CARD_NAME}: tags {tags} lack 'int8'")
    if data and not data.get("pipeline_tag"):
        problems.append(f"{CARD_NAME} has no pipeline_tag")
    base = None
    if layout.report is not None:
        from ...hub.card import base_model_id

        base = base_model_id(layout.report)
    if base and data.get("base_model") != base:
        problems.append(f"{CARD_NAME}: base_model is {data.get('base_model')!r}, but the checkpoint was converted from {base}")
    if data.get("base_model") and data.get("base_model_relation") != "quantized":
        problems.append(f"{CARD_NAME}: base_model_relation is {data.get('base_model_relation')!r}, not 'quantized'")
    figure = f"base_model {data.get('base_model')}" if data.get("base_model") else "metadata present"
    return outcome("card", problems, figure=figure, threshold=threshold)
