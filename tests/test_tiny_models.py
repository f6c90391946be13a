import json

import pytest
import torch
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    AutoProcessor,
    AutoTokenizer,
    BertModel,
    CLIPImageProcessor,
    CLIPVisionModel,
    LlavaForConditionalGeneration,
)

from qvlm.calibration import make_batches, make_pixel_batches
from qvlm.shapes import make_shapes_records
from qvlm.tiny import (
    build_tiny_bert,
    build_tiny_clip_vision,
    build_tiny_llama,
    build_tiny_llava,
    make_tiny_bert,
    make_tiny_clip_vision,
    make_tiny_llama,
    make_tiny_llava,
)

TEXT = ["what color is the shape ? red", "where is the shape ?"]


def _llava_inputs(processor):
    return make_batches(make_shapes_records(2, seed=0), processor, max_length=64, batch_size=2)[0]


def _text_inputs(tokenizer):
    return dict(tokenizer(TEXT, padding=True, return_tensors="pt"))


def _pixel_inputs(image_processor):
    return make_pixel_batches(make_shapes_records(2, seed=0), image_processor, batch_size=2)[0]


# name -> (builder, in-memory maker, loader class, preprocessor loader, inputs from preprocessor, output field)
CASES = {
    "llava": (build_tiny_llava, make_tiny_llava, LlavaForConditionalGeneration, AutoProcessor, _llava_inputs, "logits"),
    "llama": (build_tiny_llama, make_tiny_llama, AutoModelForCausalLM, AutoTokenizer, _text_inputs, "logits"),
    "clip": (build_tiny_clip_vision, make_tiny_clip_vision, CLIPVisionModel, CLIPImageProcessor, _pixel_inputs,
             "last_hidden_state"),
    "bert": (build_tiny_bert, make_tiny_bert, BertModel, AutoTokenizer, _text_inputs, "last_hidden_state"),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {name: case[0](root / name, seed=0) for name, case in CASES.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_saved_in_shards_with_index(saved, name):
    path = saved[name]
    shards = sorted(p.name for p in path.glob("*.safetensors"))
    assert len(shards) >= 2
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    assert sorted(set(weight_map.values())) == shards
    for shard in shards:  # every tensor sits in the shard the index names
        with safe_open(path / shard, framework="pt") as f:
            assert all(weight_map[key] == shard for key in f.keys())


@pytest.mark.parametrize("name", list(CASES))
def test_reload_gives_identical_outputs(saved, name):
    _, make, model_cls, pre_cls, inputs_of, field = CASES[name]
    model, preprocessor = make(seed=0)
    loaded = model_cls.from_pretrained(saved[name]).eval()
    inputs = inputs_of(pre_cls.from_pretrained(saved[name]))
    assert all(torch.equal(v, inputs_of(preprocessor)[k]) for k, v in inputs.items())
    with torch.no_grad():
        expected, actual = getattr(model(**inputs), field), getattr(loaded(**inputs), field)
    assert torch.isfinite(actual).all() and actual.abs().sum() > 0
    assert torch.equal(expected, actual)


def test_seed_changes_weights():
    a, _ = make_tiny_clip_vision(seed=0)
    b, _ = make_tiny_clip_vision(seed=0)
    c, _ = make_tiny_clip_vision(seed=1)
    key = "encoder.layers.0.mlp.fc1.weight"
    assert torch.equal(a.state_dict()[key], b.state_dict()[key])
    assert not torch.equal(a.state_dict()[key], c.state_dict()[key])


def test_llava_linear_widths_divisible_by_128():
    model, _ = make_tiny_llava()
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    assert len(linears) == 2 * 6 + 2 + 3 * 7
    assert all(m.in_features % 128 == 0 for _, m in linears)
    assert all(m.out_features % 64 == 0 for _, m in linears)  # k/v projections: 2 KV heads x 32


def test_llava_processor_round_trip_and_batches_run(saved):
    processor = AutoProcessor.from_pretrained(saved["llava"])
    model = LlavaForConditionalGeneration.from_pretrained(saved["llava"]).eval()
    assert processor.image_token == "<image>" and processor.image_token_id == model.config.image_token_id
    assert len(processor.tokenizer) == model.config.text_config.vocab_size
    records = make_shapes_records(5, seed=3)
    batches = make_batches(records, processor, max_length=40, batch_size=2)
    assert len(batches) == 3
    with torch.no_grad():
        for batch in batches:
            out = model(**batch)
            assert out.logits.shape == (*batch["input_ids"].shape, len(processor.tokenizer))
            assert torch.isfinite(out.logits).all()
