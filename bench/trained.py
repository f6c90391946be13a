"""Tiny models with real skills to lose: deterministic training recipes for quality benchmarks and slow tests.

``train_tiny_llava`` trains a LLaVA (CLIP tower, projector, Llama decoder, built from transformers configs)
on the hard shapes task (``qvlm.shapes.HARD_SHAPES``) until it answers held-out questions well but not
perfectly; ``train_tiny_text_llama`` trains a small Llama, with a byte-level BPE tokenizer, on the English
text of Python's bundled documentation (``pydoc_data.topics``). Both stop at a fixed step count, use fixed
seeds, a fixed data order and a fixed number of torch threads, and save like ``qvlm.tiny`` (sharded
safetensors + processor/tokenizer) plus a ``training.json`` describing the run.

``cached_model(kind)`` trains into ``~/.cache/qvlm/trained/<kind>-v<N>/`` once and reuses it afterwards; the
version suffix changes whenever a recipe changes, so a stale checkpoint is never picked up. Recipe variants
(``cached_model("text", layers=12)``) are cached beside it, named by what they change.

    .venv/bin/python bench/trained.py {llava,text} [DIR]

A benchmark fixture, not part of the method: ``bench/quality.py``, ``bench/veo.py`` and one slow test use it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from qvlm.calibration import load_records, make_batches
from qvlm.evaluate import evaluate_records
from qvlm.records import CalibrationRecord
from qvlm.shapes import HARD_IMAGE_SIZE, HARD_SHAPES, make_shapes_scenes
from qvlm.tiny import MIN_SHARDS, build_shapes_image_processor, build_shapes_tokenizer

Batch = dict[str, torch.Tensor]

CACHE = Path.home() / ".cache" / "qvlm" / "trained"
VERSIONS = {"llava": 1, "text": 1}  # bump when a recipe changes
THREADS = 1  # torch threads while training: fixed so the float reductions (and the weights) repeat; 1 because
# on a busy 2-core machine 2 OpenMP threads spin-wait on each other (measured 50x slower per step under load)

# The held-out questions: builtin:shapes-hard with seed 0 after the first HELD_OUT_SKIP records (which a job
# with samples <= 64 uses for calibration). Training records come from other seeds, so they never overlap.
HELD_OUT_SOURCE = "builtin:shapes-hard"
HELD_OUT_SKIP = 64
HELD_OUT_N = 256
PATCH_SIZE = 8
MAX_LENGTH = 64  # held-out questions: one question each
TRAIN_MAX_LENGTH = 128  # training rows: every question about an image in one row
PROBE_EVERY = 200


@dataclass(frozen=True)
class LlavaRecipe:
    vision_layers: int = 4
    text_layers: int = 4
    hidden: int = 128
    intermediate: int = 384
    heads: int = 4
    kv_heads: int = 2
    train_images: int = 16000  # steps x batch_size: every training image is seen once
    train_seed: int = 1_000_003  # far from the seeds calibration and evaluation use
    steps: int = 1000
    batch_size: int = 16
    lr: float = 5e-4  # in trials 1e-3 and 2e-3 stalled at the answer priors
    warmup: int = 100
    weight_decay: float = 0.01


@dataclass(frozen=True)
class TextRecipe:
    layers: int = 4
    hidden: int = 128
    intermediate: int = 384
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 2048
    seq_len: int = 128
    held_out_every: int = 5  # every 5th topic (sorted by name) is held out
    steps: int = 500
    batch_size: int = 16
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.01


LLAVA_RECIPE = LlavaRecipe()
TEXT_RECIPE = TextRecipe()


@contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _lr_at(step: int, recipe) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    progress = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    return recipe.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _train(model: torch.nn.Module, batches: Sequence[Batch], loss_fn, recipe, seed: int,
           probe: Callable[[], float] | None = None) -> tuple[float, list[float], list[float]]:
    """AdamW over ``recipe.steps`` batches drawn in a seeded order.

    Returns (training seconds, mean loss per 100 steps, ``probe()`` every ``PROBE_EVERY`` steps); the
    probe runs in eval mode under no_grad and its time is not counted.
    """
    order_gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.98))
    model.train()
    losses, probes, window, seconds, t = [], [], [], 0.0, time.perf_counter()
    for step in range(recipe.steps):
        if not order:
            order = torch.randperm(len(batches), generator=order_gen).tolist()
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, recipe)
        loss = loss_fn(model, batches[order.pop()])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        window.append(float(loss.detach()))
        if (step + 1) % 100 == 0 or step + 1 == recipe.steps:
            losses.append(sum(window) / len(window))
            window = []
        if probe is not None and (step + 1) % PROBE_EVERY == 0 and step + 1 < recipe.steps:
            seconds += time.perf_counter() - t
            model.eval()
            with torch.no_grad():
                probes.append(probe())
            model.train()
            t = time.perf_counter()
    model.eval()
    return seconds + time.perf_counter() - t, losses, probes


def _save(model: torch.nn.Module, preprocessor: Any, path: Path, info: dict) -> Path:
    """Sharded safetensors + preprocessor, as ``qvlm.tiny._build`` saves; ``training.json`` last."""
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    model.save_pretrained(path, max_shard_size=total // MIN_SHARDS + 1)
    preprocessor.save_pretrained(path)
    (path / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    return path


# --- tiny LLaVA on hard shapes ----------------------------------------------------------------------


def _llava_config(tokenizer: PreTrainedTokenizerFast, r: LlavaRecipe) -> LlavaConfig:
    vision = CLIPVisionConfig(hidden_size=r.hidden, intermediate_size=r.intermediate, projection_dim=r.hidden,
                              num_hidden_layers=r.vision_layers, num_attention_heads=r.heads,
                              image_size=HARD_IMAGE_SIZE, patch_size=PATCH_SIZE)
    text = LlamaConfig(hidden_size=r.hidden, intermediate_size=r.intermediate, num_hidden_layers=r.text_layers,
                       num_attention_heads=r.heads, num_key_value_heads=r.kv_heads, max_position_embeddings=256,
                       tie_word_embeddings=False, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return LlavaConfig(vision_config=vision, text_config=text,
                       image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                       image_seq_length=(HARD_IMAGE_SIZE // PATCH_SIZE) ** 2,
                       vision_feature_layer=-1,  # every CLIP layer feeds the answer, so every one is trained
                       vision_feature_select_strategy="default")


def hard_shapes_processor() -> LlavaProcessor:
    """The processor of the trained LLaVA: hard-shapes vocabulary, HARD_IMAGE_SIZE images."""
    return LlavaProcessor(image_processor=build_shapes_image_processor(HARD_IMAGE_SIZE),
                          tokenizer=build_shapes_tokenizer(HARD_SHAPES), patch_size=PATCH_SIZE,
                          vision_feature_select_strategy="default", image_token="<image>",
                          num_additional_image_tokens=1)


def held_out_records() -> list[CalibrationRecord]:
    """The held-out questions the recipe is judged on (disjoint from training and from calibration)."""
    return load_records(HELD_OUT_SOURCE, HELD_OUT_SKIP + HELD_OUT_N, seed=0)[HELD_OUT_SKIP:]


def _scene_batches(scenes, processor: Any, batch_size: int) -> list[Batch]:
    """One row per image: every question about it followed by its answer, ``<image> q1 a1 q2 a2 ...``.

    ``answer_mask`` is True at the positions whose next token is an answer word. The tokenizer is
    word-level, so word i of the text is the token i places after the last image token.
    """
    records = [CalibrationRecord(" ".join(f"{q} {a}" for q, a in qa), image) for image, qa in scenes]
    batches = make_batches(records, processor, TRAIN_MAX_LENGTH, batch_size, include_answer=False)
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    for b, batch in enumerate(batches):
        mask = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
        for row, (_, qa) in enumerate(scenes[b * batch_size : (b + 1) * batch_size]):
            ids = batch["input_ids"][row]
            word = int((ids == image_id).nonzero().max()) + 1
            for q, a in qa:
                word += len(q.split())
                if ids[word] != processor.tokenizer.convert_tokens_to_ids(a):
                    raise AssertionError(f"answer {a!r} not at token {word} of training row {row}")
                mask[row, word - 1] = True
                word += 1
        batch["answer_mask"] = mask
    return batches


def _answer_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Cross-entropy of the answer tokens only (the positions that predict them)."""
    inputs = {k: v for k, v in batch.items() if k != "answer_mask"}
    logits = model(**inputs).logits
    mask = batch["answer_mask"]
    targets = torch.roll(batch["input_ids"], -1, dims=1)
    return F.cross_entropy(logits[mask].float(), targets[mask])


def held_out_accuracy(model: torch.nn.Module, processor: Any, records: Sequence[CalibrationRecord]) -> float:
    """Share of ``records`` whose answer the model predicts (argmax at every answer token)."""
    return evaluate_records(model, model, processor, records, MAX_LENGTH, 64).fp_accuracy


def train_tiny_llava(path: str | Path, seed: int = 0, recipe: LlavaRecipe = LLAVA_RECIPE) -> Path:
    """Train the tiny LLaVA on hard shapes for ``recipe.steps`` steps and save it at ``path``."""
    path = Path(path)
    processor = hard_shapes_processor()
    with _threads(THREADS):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(_llava_config(processor.tokenizer, recipe))
        t = time.perf_counter()
        scenes = make_shapes_scenes(recipe.train_images, recipe.train_seed + seed, HARD_IMAGE_SIZE, HARD_SHAPES)
        batches = _scene_batches(scenes, processor, recipe.batch_size)
        held_out = held_out_records()
        data_seconds = time.perf_counter() - t
        probe = lambda: held_out_accuracy(model, processor, held_out)  # noqa: E731
        seconds, losses, probes = _train(model, batches, _answer_loss, recipe, seed, probe)
        accuracy = held_out_accuracy(model, processor, held_out)
    info = {"kind": "llava", "version": VERSIONS["llava"], "seed": seed, "recipe": asdict(recipe),
            "task": {"spec": asdict(HARD_SHAPES), "image_size": HARD_IMAGE_SIZE},
            "threads": THREADS, "data_seconds": round(data_seconds, 2), "train_seconds": round(seconds, 2),
            "loss_every_100_steps": [round(x, 4) for x in losses],
            f"held_out_accuracy_every_{PROBE_EVERY}_steps": probes,
            "held_out": {"source": HELD_OUT_SOURCE, "seed": 0, "skip": HELD_OUT_SKIP, "records": len(held_out),
                         "accuracy": accuracy}}
    return _save(model, processor, path, info)


# --- tiny text Llama on Python's documentation --------------------------------------------------------


def pydoc_texts(held_out_every: int = TEXT_RECIPE.held_out_every) -> tuple[list[str], list[str]]:
    """(train, held-out) topic texts of ``pydoc_data.topics``, split by topic in sorted name order."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    train = [topics[n] for i, n in enumerate(names) if i % held_out_every != held_out_every - 1]
    held = [topics[n] for i, n in enumerate(names) if i % held_out_every == held_out_every - 1]
    return train, held


def train_bpe_tokenizer(texts: Sequence[str], vocab: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on ``texts``; ``<s>`` prepended like Llama's tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", backend.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   padding_side="right", model_max_length=1 << 20)  # texts are windowed after


def text_windows(texts: Sequence[str], tokenizer: PreTrainedTokenizerFast, seq_len: int) -> torch.Tensor:
    """Every text tokenized (without ``<s>``), joined with ``</s>``, cut into [n, seq_len] windows."""
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).reshape(n, seq_len)


def window_batches(windows: torch.Tensor, batch_size: int) -> list[Batch]:
    return [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in windows.split(batch_size)]


def _lm_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    logits = model(**batch).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["input_ids"][:, 1:].flatten())


@torch.inference_mode()
def perplexity(model: torch.nn.Module, batches: Sequence[Batch]) -> float:
    """exp(mean next-token NLL) over every window position of ``batches``."""
    nll, count = 0.0, 0
    for batch in batches:
        logits = model(**batch).logits.float()
        nll += float(F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["input_ids"][:, 1:].flatten(), reduction="sum"))
        count += batch["input_ids"][:, 1:].numel()
    return math.exp(nll / count)


def train_tiny_text_llama(path: str | Path, seed: int = 0, recipe: TextRecipe = TEXT_RECIPE) -> Path:
    """Train the tiny text Llama on the train topics for ``recipe.steps`` steps and save it at ``path``."""
    path = Path(path)
    train_texts, held_texts = pydoc_texts(recipe.held_out_every)
    with _threads(THREADS):
        t = time.perf_counter()
        tokenizer = train_bpe_tokenizer(train_texts, recipe.vocab)
        train = text_windows(train_texts, tokenizer, recipe.seq_len)
        batches = window_batches(train, recipe.batch_size)
        data_seconds = time.perf_counter() - t
        config = LlamaConfig(hidden_size=recipe.hidden, intermediate_size=recipe.intermediate,
                             num_hidden_layers=recipe.layers, num_attention_heads=recipe.heads,
                             num_key_value_heads=recipe.kv_heads, max_position_embeddings=max(256, recipe.seq_len),
                             tie_word_embeddings=False, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        seconds, losses, _ = _train(model, batches, _lm_loss, recipe, seed)
        held = window_batches(text_windows(held_texts, tokenizer, recipe.seq_len), recipe.batch_size)
        ppl = perplexity(model, held)
    info = {"kind": "text", "version": VERSIONS["text"], "seed": seed, "recipe": asdict(recipe), "threads": THREADS,
            "data": {"source": "pydoc_data.topics", "train_topics": len(train_texts), "held_out_topics": len(held_texts),
                     "train_tokens": train.numel(), "held_out_tokens": sum(b["input_ids"].numel() for b in held)},
            "data_seconds": round(data_seconds, 2), "train_seconds": round(seconds, 2),
            "loss_every_100_steps": [round(x, 4) for x in losses], "held_out": {"perplexity": ppl}}
    return _save(model, tokenizer, path, info)


TRAINERS = {"llava": train_tiny_llava, "text": train_tiny_text_llama}
RECIPES = {"llava": LLAVA_RECIPE, "text": TEXT_RECIPE}


def cache_dir(kind: str, **changes: Any) -> Path:
    """Where ``cached_model(kind, **changes)`` keeps its model: the recipe's version, then each change."""
    if kind not in TRAINERS:
        raise ValueError(f"unknown trained model {kind!r}; choose one of {sorted(TRAINERS)}")
    recipe = RECIPES[kind]
    unknown = sorted(set(changes) - {f.name for f in fields(recipe)})
    if unknown:
        raise ValueError(f"the {kind} recipe has no field {', '.join(unknown)}; its fields: "
                         f"{', '.join(f.name for f in fields(recipe))}")
    changes = {k: v for k, v in changes.items() if getattr(recipe, k) != v}
    return CACHE / "-".join([f"{kind}-v{VERSIONS[kind]}", *(f"{k}{v}" for k, v in sorted(changes.items()))])


def cached_model(kind: str, **changes: Any) -> Path:
    """The trained ``kind`` ("llava" or "text") under ``~/.cache/qvlm/trained``, training it first if absent;
    ``changes`` replace fields of its recipe (``layers=12``).

    Trains into a temporary folder beside the target and renames it into place, so a concurrent caller
    never sees a half-written model (the loser of a race discards its copy).
    """
    target = cache_dir(kind, **changes)
    if (target / "training.json").exists():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{kind}-", dir=CACHE))
    try:
        TRAINERS[kind](tmp, recipe=replace(RECIPES[kind], **changes))
        tmp.chmod(0o755)  # mkdtemp made it private
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "training.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> None:
    """``python bench/trained.py {llava,text} [DIR]``: train into DIR, or into the cache when DIR is left out."""
    import argparse

    parser = argparse.ArgumentParser(prog="python bench/trained.py", description=main.__doc__)
    parser.add_argument("kind", choices=sorted(TRAINERS))
    parser.add_argument("path", nargs="?")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.path is None:
        path = cached_model(args.kind)
    elif (Path(args.path) / "training.json").exists():
        print(f"{args.path} already holds a trained model; leaving it")
        path = Path(args.path)
    else:
        path = TRAINERS[args.kind](args.path, args.seed)
    print(f"{path}: {(path / 'training.json').read_text()}")


if __name__ == "__main__":
    main()
