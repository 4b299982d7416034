"""The model card inside the ONNX file: the same keys as model_card.json, minus the sha256."""

from __future__ import annotations

import json
from pathlib import Path


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


def update_card(version_dir: Path, blocks: dict) -> dict:
    """Add (or replace) top-level blocks of an exported version's model_card.json, for figures
    measured after export (trust parameters of an older export, the cost ratio). model.onnx is
    untouched, so its sha256 and the card inside it stand; the card says which blocks came later."""
    path = Path(version_dir) / "model_card.json"
    card = json.loads(path.read_text())
    card.update(blocks)
    later = set(card.get("added_after_export", [])) | set(blocks)
    card["added_after_export"] = sorted(later - {"added_after_export"})
    path.write_text(json.dumps(card, indent=2) + "\n")
    return card
