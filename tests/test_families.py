"""Each supported vision-language family (qvlm.families) goes through ``qvlm-submit`` with images, and the batches
carry every input its model takes."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from transformers import AutoConfig
from typer.testing import CliRunner

from jobs.cli import app
from jobs.spec import load_job
from qvlm.batches import calibration_answer_masks, calibration_batches, load_preprocessor
from qvlm.calibration import collate_rows, load_records, make_batches
from qvlm.config import CalibrationSettings
from qvlm.driver import quantize
from qvlm.families import FAMILIES
from qvlm.tiny_families import FAMILY_MAKERS
from qvlm.loading import model_class
from tests.outputs import assert_same_up_to_summation_order, block_tensors

pytestmark = pytest.mark.timeout(600)
runner = CliRunner()
CAL = CalibrationSettings(samples=2, eval_samples=2, max_length=64, batch_size=2)
QUANT = {"qvlm": {"epochs": 1, "search": "clip", "veo": {"enabled": True, "epochs": 1}}}  # the cheapest search + VEO: this test is about the data path
COSINE = 0.999  # logits of the loaded checkpoint against the in-memory quantized model


@pytest.fixture(scope="session")
def family_dir(tmp_path_factory):
    """family -> its tiny model's folder, built once per session on first use."""
    from qvlm.tiny import build_tiny_llava
    from qvlm.tiny_families import build_tiny_family

    built = {}

    def get(family: str):
        if family not in built:
            path = tmp_path_factory.mktemp(family)
            built[family] = build_tiny_llava(path) if family == "llava" else build_tiny_family(family, path)
        return built[family]

    return get


def _load(path):
    return model_class(AutoConfig.from_pretrained(path)).from_pretrained(path).eval()


@pytest.mark.parametrize("family", sorted(FAMILY_MAKERS))
def test_batched_rows_give_the_logits_of_each_prompt_alone(family_dir, family):
    """Every input the processor makes for the model is batched right: each row of a padded batch gives the
    logits that prompt gives alone (image_sizes, image_grid_thw, token types, aspect ratios, cross-attention mask)."""
    path = family_dir(family)
    _, processor = load_preprocessor(path)
    records = load_records("builtin:shapes", 3, seed=2)
    batch = make_batches(records, processor, max_length=64, batch_size=3)[0]
    assert set(batch) == set(processor.model_input_names) & set(batch) and "pixel_values" in batch
    model = _load(path)
    with torch.no_grad():
        together = model(**batch).logits
        for row, record in enumerate(records):
            alone = model(**make_batches([record], processor, 64, 1)[0]).logits[0]
            torch.testing.assert_close(together[row, : alone.shape[0]], alone, rtol=1e-4, atol=1e-4)


def test_collate_pads_tokens_and_batches_the_rest():
    rows = [{"input_ids": torch.tensor([[1, 5, 5, 7]]), "attention_mask": torch.ones(1, 4, dtype=torch.long),
             "mm_token_type_ids": torch.tensor([[0, 1, 1, 0]]), "pixel_values": torch.ones(2, 3),
             "image_grid_thw": torch.tensor([[1, 2, 2]]), "unused": torch.zeros(1)},
            {"input_ids": torch.tensor([[1, 5, 9]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
             "mm_token_type_ids": torch.tensor([[0, 1, 0]]), "pixel_values": torch.full((1, 3), 2.0),
             "image_grid_thw": torch.tensor([[1, 1, 1]]), "unused": torch.zeros(1)}]
    names = {"input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"}
    batch = collate_rows(rows, pad_id=0, max_length=8, image_id=None, start=0, inputs=names)
    assert set(batch) == names
    assert batch["input_ids"].tolist() == [[1, 5, 5, 7], [1, 5, 9, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch["mm_token_type_ids"].tolist() == [[0, 1, 1, 0], [0, 1, 0, 0]]
    assert batch["pixel_values"].shape == (3, 3) and batch["image_grid_thw"].tolist() == [[1, 2, 2], [1, 1, 1]]
    with pytest.raises(ValueError, match="max_length must be at least 3"):
        collate_rows(rows, pad_id=0, max_length=2, image_id=None, start=0, inputs=names)


def _submit(tmp_path, model_dir, workers: int, quant: dict):
    job = {"name": "family", "model": {"path": str(model_dir)}, "output": {"uri": str(tmp_path / "out")},
           "calibration": {"samples": CAL.samples, "eval_samples": CAL.eval_samples, "max_length": CAL.max_length,
                           "batch_size": CAL.batch_size},
           "quantization": quant, "resources": {"workers": workers}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    result = runner.invoke(app, ["submit", str(tmp_path / "job.yaml")])
    assert result.exit_code == 0, result.output
    assert "evaluation on " in result.output  # the held-out records went through the written checkpoint too
    return tmp_path / "out"


@pytest.mark.parametrize("family", [f.tiny for f in FAMILIES])
def test_family_end_to_end(local_ray, family_dir, tmp_path, family):
    """qvlm-submit with images on two stage workers, VEO on the vision tower and the evaluation on held-out records;
    the checkpoint loads with no missing keys, its blocks hold the tensors the one-process quantize finds (cut into
    the same stages; up to VEO's summation order), and its logits agree with that model."""
    path = family_dir(family)
    out = _submit(tmp_path, path, workers=2, quant=QUANT)
    plan, written = block_tensors(out)
    batches = calibration_batches(path, CAL)
    quant = load_job(tmp_path / "job.yaml").compile().quant  # the job's own settings
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the stage workers run (VEO's float sums depend on the thread count)
    try:
        qmodel, result = quantize(_load(path), batches, quant, calibration_answer_masks(path, CAL), stages=plan["stages"])
    finally:
        torch.set_num_threads(threads)
    expected = result.tensors()
    assert written.keys() == expected.keys()
    assert_same_up_to_summation_order(written, expected)  # VEO trains through many float sums
    cls = model_class(AutoConfig.from_pretrained(path))
    loaded, info = cls.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        for batch in batches:
            got, want = loaded.eval()(**batch).logits.flatten(), qmodel(**batch).logits.flatten()
            assert torch.nn.functional.cosine_similarity(got, want, dim=0) > COSINE
    _assert_the_evaluation_is_the_checkpoints(path, out)
    if family in ("llava_next", "llava_onevision"):  # the image newline is a parameter, not a linear: written as it was
        assert "model.image_newline" not in json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
        torch.testing.assert_close(loaded.model.image_newline, _load(path).model.image_newline, rtol=0, atol=0)


def _assert_the_evaluation_is_the_checkpoints(model_dir, out) -> None:
    """The figures the job measured through its two stages are those of the written checkpoint loaded whole with
    ``from_pretrained`` (workers/eval_task.py) on the same held-out records."""
    from workers.eval_task import evaluate_checkpoint
    from workers.locations import Locations

    staged = json.loads((out / "qvlm_report.json").read_text())["evaluation"]
    whole = evaluate_checkpoint(Locations(str(model_dir), str(out)), CAL)
    assert staged["tokens"] == whole.tokens > 0 and staged["questions"] == whole.questions
    assert staged["kl_mean"] == pytest.approx(whole.kl_mean, rel=1e-3, abs=1e-6)
    for name in ("top1_agreement", "fp_accuracy", "q_accuracy"):
        assert staged[name] == pytest.approx(getattr(whole, name), abs=1.5 / whole.tokens), name


@pytest.mark.parametrize("command", ["plan", "submit"])
def test_unsupported_family_exits_2_naming_the_supported_ones(tmp_path, command):
    """A vision-language family no test proves (BLIP-2 here) is refused before any work, naming those that are."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    model_dir = tmp_path / "blip2"
    config = Blip2Config(vision_config={"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 1,
                                        "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
                         qformer_config={"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 1,
                                         "num_attention_heads": 4, "encoder_hidden_size": 128},
                         text_config={"model_type": "opt", "hidden_size": 128, "ffn_dim": 256, "num_hidden_layers": 1,
                                      "num_attention_heads": 4, "vocab_size": 64, "word_embed_proj_dim": 128})
    Blip2ForConditionalGeneration(config).save_pretrained(model_dir)
    job = {"name": "blip", "model": {"path": str(model_dir)}, "output": {"uri": str(tmp_path / "out")},
           "calibration": {"samples": 2, "eval_samples": 0, "max_length": 64, "batch_size": 2}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    result = runner.invoke(app, [command, str(tmp_path / "job.yaml")])
    assert result.exit_code == 2, result.output
    assert "'blip-2'" in result.output and "does not support" in result.output
    for family in FAMILIES:
        assert f"{family.name} ({family.model_type})" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_readme_table_is_the_registry():
    from pathlib import Path

    from qvlm.families import readme_table

    assert readme_table() in (Path(__file__).parents[1] / "README.md").read_text()


@pytest.mark.parametrize("family", sorted(FAMILY_MAKERS))
def test_a_later_stage_replays_each_layer_exactly(family_dir, family):
    """Cut after the first decoder layer, the second stage's layers get the arguments the model's own forward pass
    gives them (Gemma 3's global layer its own mask and rotary table, Qwen2.5-VL's 3-D positions, Mllama's
    cross-attention layer the vision states): their captured outputs equal those of one uncut forward pass."""
    from qvlm.capture import capture_units
    from qvlm.stage import Stage
    from qvlm.structure import find_units

    path = family_dir(family)
    model = _load(path)
    units = find_units(model)
    cut = next(u.index for u in units if u.segment == "language") + 1
    batch = make_batches(load_records("builtin:shapes", 2, seed=4), load_preprocessor(path)[1], 64, 2)[0]
    first, second = Stage(model, units[:cut], first=True), Stage(model, units[cut:], first=False)
    second.capture(first.capture(batch), hand_over=False)
    whole = capture_units(model, units, [batch])
    for unit in units[cut:]:
        torch.testing.assert_close(second.captures[unit.index].outputs[0], whole[unit.index].outputs[0], rtol=0, atol=0)


def test_a_processor_that_cannot_load_exits_2_naming_it(family_dir, tmp_path):
    """A Qwen2.5-VL folder without its processor files: one line naming the processor class, exit 2."""
    import shutil

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for f in family_dir("qwen2_5_vl").iterdir():
        if f.name == "config.json" or f.name.startswith("model"):
            shutil.copy(f, model_dir / f.name)
    job = {"name": "noproc", "model": {"path": str(model_dir)}, "output": {"uri": str(tmp_path / "out")},
           "calibration": {"samples": 2, "eval_samples": 0, "max_length": 64, "batch_size": 2}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    result = runner.invoke(app, ["submit", "--dry-run", str(tmp_path / "job.yaml")])
    assert result.exit_code == 2, result.output
    assert "Qwen2_5_VLProcessor cannot load" in result.output and "Traceback" not in result.output


def test_a_model_class_named_onevision_does_not_make_its_decoder_vision(family_dir):
    """LLaVA-OneVision's decoder sits inside ``LlavaOnevisionModel``: vision is told by whole words, so its decoder
    layers are language units (a substring match put the whole model in the vision segment)."""
    from qvlm.structure import find_units

    units = find_units(_load(family_dir("llava_onevision")))
    assert [u.segment for u in units] == ["vision"] * 2 + ["projector"] + ["language"] * 2
    assert units[-1].name == "model.language_model.layers.1"
