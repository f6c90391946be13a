"""The vision-language families qvlm supports, each proved by a tiny model of it in the tests.

A row names the family, the transformers ``model_type`` of its config, the tiny model that the end-to-end test
quantizes (``qvlm.tiny_families``; ``qvlm.tiny`` for LLaVA) and what qvlm finds in it. Text-only decoders and
encoders need no row: their layers are found from the module tree alone (``qvlm.structure``).
The README's table is written from these rows (``python -m qvlm.families``).

"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str
    model_type: str
    tiny: str  # the tiny model the end-to-end test quantizes (a key of qvlm.tiny's builders)
    units: str  # what qvlm quantizes, in the family's own words
    kept: str  # what stays unquantized


FAMILIES: tuple[Family, ...] = (
    Family("LLaVA 1.5", "llava", "llava", "CLIP layers, projector, decoder layers", "embeddings, norms, lm_head"),
    Family("LLaVA-NeXT", "llava_next", "llava_next", "CLIP layers, projector, decoder layers",
           "image newline, embeddings, norms, lm_head"),
    Family("LLaVA-OneVision", "llava_onevision", "llava_onevision", "SigLIP layers, projector, decoder layers",
           "image newline, embeddings, norms, lm_head"),
    Family("Qwen2-VL", "qwen2_vl", "qwen2_vl", "vision blocks, patch merger, decoder layers (3-D rotary positions)",
           "patch embedding, embeddings, norms, lm_head"),
    Family("Qwen2.5-VL", "qwen2_5_vl", "qwen2_5_vl", "vision blocks, patch merger, decoder layers (3-D rotary positions)",
           "patch embedding, embeddings, norms, lm_head"),
    Family("Gemma 3", "gemma3", "gemma3", "SigLIP layers, sliding and global decoder layers",
           "multi-modal projector (a bare weight matrix, not a linear layer), embeddings, norms, lm_head"),
    Family("Idefics3", "idefics3", "idefics3", "vision layers, connector, decoder layers",
           "patch embedding, embeddings, norms, lm_head"),
    Family("SmolVLM", "smolvlm", "smolvlm", "vision layers, connector, decoder layers",
           "patch embedding, embeddings, norms, lm_head"),
    Family("Mllama", "mllama", "mllama", "vision layers (local and global), self- and cross-attention decoder layers",
           "multi-modal projector (registered after the decoder), patch embedding, gated positional embeddings, "
           "embeddings, norms, lm_head"),
)

MODEL_TYPES = {f.model_type: f for f in FAMILIES}


def supported_families() -> str:
    """The supported vision-language families, for messages: ``LLaVA 1.5 (llava), LLaVA-NeXT (llava_next), ...``."""
    return ", ".join(f"{f.name} ({f.model_type})" for f in FAMILIES)


def readme_table() -> str:
    """The README's table of supported families (Markdown)."""
    rows = ["| family | model_type | quantized | kept unquantized | proved by |", "|---|---|---|---|---|"]
    rows += [f"| {f.name} | `{f.model_type}` | {f.units} | {f.kept} | `tests/test_families.py::test_family_end_to_end[{f.tiny}]` |"
             for f in FAMILIES]
    return "\n".join(rows)


if __name__ == "__main__":
    print(readme_table())
