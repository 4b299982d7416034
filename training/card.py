"""The model card inside the ONNX file: the same keys as model_card.json, minus the sha256."""

from __future__ import annotations

import json


def set_metadata(onnx_model, card: dict) -> None:
    """The card, key by key, in metadata_props (values that aren't strings as JSON).

    Keys other tools added (onnx.infer, onnx.quant.pre_process) are replaced too: the card is
    the whole description. The sha256 stays out, since it is a digest of these very bytes.
    """
    del onnx_model.metadata_props[:]
    for key, value in card.items():
        if key == "sha256":
            continue
        entry = onnx_model.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)


def quantized_explain_section(section) -> dict | str:
    """The fp32 card's `explain` section (training/explain_graph.py) as a quantized copy has it:
    no explain graph beside it, so occlusion only; its layers' `model_tensor` names still lead
    serving to the same feature maps in the quantized graph."""
    if not isinstance(section, dict):
        return "none"
    return {"methods": ["occlusion"], "layers": section.get("layers", [])}
