"""The part of a model one worker holds: a skeleton on the meta device with real tensors only for its units
(and, for the first stage, the model's glue), read straight from the checkpoint's safetensors files."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Sequence

from qvlm.export import image_encoder_linears
from qvlm.loading import build_skeleton, checkpoint_key_map, glue_names, materialize, owned_names
from workers.safetensors_reader import CheckpointIndex

SMALL_FILE_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")


def fetch_small_files(storage, dest: Path | None = None) -> Path:
    """Copy the model's config, tokenizer and processor files (never the weights) to a local folder.

    By default the folder is one per model URI under the temp directory, reused by later calls, so jobs
    do not leave a new folder behind each time.
    """
    from workers.storage import TMP_MARK

    reused = dest is None
    if reused:
        digest = hashlib.sha256(storage.uri.encode()).hexdigest()[:16]
        dest = Path(tempfile.gettempdir()) / "qvlm-model-files" / digest
    dest.mkdir(parents=True, exist_ok=True)
    keys = [key for key in storage.list("") if "/" not in key and key.endswith(SMALL_FILE_SUFFIXES)]
    for key in keys:
        storage.download(key, dest / key)
    # a file since removed from the model (a config.json, a tokenizer file) must not live on in the reused folder;
    # other processes' downloads in flight are temp files, left alone
    for stale in dest.iterdir() if reused else ():
        if stale.is_file() and stale.name not in keys and not stale.name.startswith(TMP_MARK):
            stale.unlink(missing_ok=True)
    return dest


class ModelShard:
    """A skeleton of the model with real tensors only for the given unit modules (plus glue if asked)."""

    def __init__(self, storage, unit_modules: Sequence[str], glue: bool, all_unit_modules: Sequence[str] = ()):
        from transformers import AutoConfig

        self.storage = storage
        self.local_dir = fetch_small_files(self.storage)
        self.model = build_skeleton(AutoConfig.from_pretrained(self.local_dir))
        index = CheckpointIndex.open(self.storage)
        self.keymap = checkpoint_key_map(self.model, index.names)
        names = owned_names(self.model, unit_modules)
        if glue:
            names += glue_names(self.model, all_unit_modules)
        wanted = {n: self.keymap[n] for n in names if n in self.keymap}
        loaded = index.read(wanted.values())
        materialize(self.model, {n: loaded[k] for n, k in wanted.items()})
        self.tensor_names = sorted(wanted)

    def dense_linears(self) -> set[str]:
        """The linears the checkpoint holds dense (a multimodal model's image encoder: qvlm.export says why)."""
        return image_encoder_linears(self.model)

    def prefix(self, linear: str) -> str:
        """The checkpoint's key prefix of a linear module (its weight's key without ``.weight``)."""
        return self.keymap[f"{linear}.weight"][: -len(".weight")]
