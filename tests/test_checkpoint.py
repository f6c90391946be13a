"""The job's output is a compressed-tensors checkpoint that transformers loads as is."""

import json

import pytest
import torch
from transformers import AutoProcessor, CompressedTensorsConfig, LlavaForConditionalGeneration
from typer.testing import CliRunner

from cluster.driver import run_job
from cluster.job import Job, Resources
from workers.locations import Locations
from jobs.cli import app
from qvlm.config import CalibrationSettings, MixedPrecisionConfig, QuantConfig
from qvlm.batches import calibration_batches
from qvlm.driver import quantize
from qvlm.export import ACTIVATIONS_FILE, apply_activation_ranges
from qvlm.fakequant import FakeQuantLinear
from qvlm.quant import ActScheme, WeightScheme
from qvlm.shapes import make_shapes_records
from tests.conftest import load_llava

pytestmark = [pytest.mark.timeout(600), pytest.mark.smoke]
CAL = CalibrationSettings(samples=8, eval_samples=4, max_length=64, batch_size=4)

CASES = {
    "w4-g128": QuantConfig(method="rtn", weights=WeightScheme(4, 128, True)),
    "w8-channel": QuantConfig(method="rtn", weights=WeightScheme(8, -1, True)),
    "w4-asym": QuantConfig(method="rtn", weights=WeightScheme(4, 64, False)),
    "w8a8": QuantConfig(method="rtn", weights=WeightScheme(8, -1, True), activations=ActScheme(8, "token", True)),
    "w4a4-static": QuantConfig(method="qvlm", epochs=1, iters=10, activations=ActScheme(4, "channel", False)),
}


def _run(local_ray, model_dir, out, quant):
    return run_job(Job("ckpt", "c" * 64, Locations(str(model_dir), str(out)), CAL, quant, Resources(workers=2)))


MIXED = QuantConfig(method="rtn", weights=WeightScheme(4, 64, True),
                    mixed_precision=MixedPrecisionConfig("kurtosis", extra_budget=0.05, stop=3))
SPIKE = "model.layers.12.mlp.down_proj"
IMAGE_ENCODER = ("model.vision_tower.", "model.multi_modal_projector.")  # written dense (qvlm.export)


@pytest.fixture(scope="module")
def spiky_llama_dir(tmp_path_factory):
    """A 24-layer tiny Llama whose layer-12 down_proj has heavy tails (a KurtBoost outlier)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qvlm.tiny import build_shapes_tokenizer

    tokenizer = build_shapes_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=24,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.get_submodule(SPIKE).weight[:4, :16] *= 40
    path = tmp_path_factory.mktemp("spiky-llama")
    model.save_pretrained(path, max_shard_size="2MB")
    tokenizer.save_pretrained(path)
    return path


def _as_served(qmodel):
    """The in-memory model as its checkpoint serves it: the image encoder is written dense (qvlm.export), so its
    weights are the quantized ones but its inputs are not quantized (this matters for W8A8 only)."""
    for name, module in qmodel.named_modules():
        if name.startswith(IMAGE_ENCODER) and isinstance(module, FakeQuantLinear):
            module.act_scheme = ActScheme()
    return qmodel


def _in_memory(model_dir, quant, out=None):
    """The one-process quantize of the same model; with ``out``, cut into the stages that job had (blocks stop at
    stage boundaries, so entropy-guided blocks depend on them)."""
    from transformers import AutoModelForCausalLM

    model = (AutoModelForCausalLM.from_pretrained(model_dir).eval() if "llama" in str(model_dir)
             else load_llava(model_dir)[0])
    batches = calibration_batches(model_dir, CAL)
    stages = json.loads((out / "qvlm_plan.json").read_text())["stages"] if out is not None else None
    qmodel, result = quantize(model, batches, quant, stages=stages)
    return qmodel, result, batches


@pytest.fixture(scope="module")
def outputs(local_ray, tiny_llava_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {name: (_run(local_ray, tiny_llava_dir, root / name, quant), root / name) for name, quant in CASES.items()}


def _check_weight_only(out, qmodel, result, batches, loader):
    loaded = loader.from_pretrained(out).eval()
    with torch.no_grad():
        for batch in batches:
            torch.testing.assert_close(loaded(**batch).logits, qmodel(**batch).logits, rtol=1e-5, atol=1e-5)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    targets = [t for g in config["config_groups"].values() for t in g["targets"]]
    image_encoder = {n for n in result.schemes if n.startswith(IMAGE_ENCODER)}
    assert sorted(targets) == sorted(set(result.schemes) - image_encoder)
    assert "lm_head" in config["ignore"] and image_encoder <= set(config["ignore"])
    return config


@pytest.mark.parametrize("case", ["w4-g128", "w8-channel"])
def test_weight_only_checkpoint_matches_in_memory_model(outputs, tiny_llava_dir, case):
    _, out = outputs[case]
    qmodel, result, batches = _in_memory(tiny_llava_dir, CASES[case])
    _check_weight_only(out, qmodel, result, batches, LlavaForConditionalGeneration)


def test_mixed_precision_checkpoint_of_an_llm(local_ray, spiky_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "mixed"
    _run(local_ray, spiky_llama_dir, out, MIXED)
    qmodel, result, batches = _in_memory(spiky_llama_dir, MIXED)
    assert f"{SPIKE}" in result.precision.boosted
    assert result.precision.total_bits <= result.precision.budget_bits
    config = _check_weight_only(out, qmodel, result, batches, AutoModelForCausalLM)
    assert len(config["config_groups"]) >= 2
    boosted_group = next(g for g in config["config_groups"].values() if SPIKE in g["targets"])
    assert (boosted_group["weights"]["num_bits"], boosted_group["weights"].get("group_size")) != (4, 64)


def _generate(model, inputs):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=4, do_sample=False)


@pytest.mark.parametrize("case", ["w4-g128", "w8a8"])
def test_first_generate_with_an_image_matches_in_memory_model(outputs, tiny_llava_dir, case):
    """transformers' generate() runs the image encoder before the model's first forward, which is when
    compressed-tensors decompresses a loaded checkpoint: the image encoder must not need decompressing."""
    _, out = outputs[case]
    processor = AutoProcessor.from_pretrained(out)
    records = make_shapes_records(6, seed=3)
    records = [r for r in records if r.text == records[0].text][:2]  # same length: no padding
    inputs = processor(text=[f"{processor.image_token} {r.text}" for r in records], images=[r.image for r in records],
                       return_tensors="pt")
    loaded = LlavaForConditionalGeneration.from_pretrained(out).eval()
    decoder_linear = loaded.get_submodule("model.language_model.layers.0.mlp.up_proj")
    compressed = getattr(decoder_linear, "weight", torch.empty(0, dtype=torch.int8))  # packed, or int8
    assert not compressed.is_floating_point()  # not decompressed yet
    tokens = _generate(loaded, inputs)  # the first call on the loaded model
    assert tokens.shape == (2, inputs["input_ids"].shape[1] + 4)
    qmodel, _, _ = _in_memory(tiny_llava_dir, CASES[case])
    assert torch.equal(tokens, _generate(_as_served(qmodel), inputs))


def test_image_encoder_is_written_dense(outputs, tiny_llava_dir):
    from safetensors.torch import load_file

    _, out = outputs["w4-g128"]
    _, result, _ = _in_memory(tiny_llava_dir, CASES["w4-g128"])
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    dense = [r for r in result.linear_results() if r.name.startswith(IMAGE_ENCODER)]
    assert len(dense) == 2 * 6 + 2  # two CLIP layers of six linears, the projector's two
    for r in dense:
        key = r.name.removeprefix("model.") + ".weight"  # the file keeps the source layout (vision_tower.encoder...)
        assert torch.equal(load_file(out / index[key])[key], r.weight.dequantize()), r.name
        assert f"{key[:-len('.weight')]}.weight_packed" not in index


def test_asymmetric_checkpoint_decompresses_exactly(outputs, tiny_llava_dir):
    """transformers 5.23 + compressed-tensors 0.20 mis-shape packed zero points when loading asymmetric
    pack-quantized models (llm-compressor#1618); the tensors themselves must still be what the library's own
    decompressor turns back into our weights, which is what vLLM reads."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file

    _, out = outputs["w4-asym"]
    _, result, _ = _in_memory(tiny_llava_dir, CASES["w4-asym"])
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    group = QuantizationScheme.model_validate(config["config_groups"]["group_0"])
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    compressor = BaseCompressor.get_value_from_registry(group.format)
    checked = 0
    for r in result.linear_results():
        if not r.name.startswith("model.language_model."):
            continue
        prefix = r.name.replace("model.language_model.", "language_model.model.")
        tensors = {s: load_file(out / index[f"{prefix}.{s}"])[f"{prefix}.{s}"]
                   for s in ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")}
        dense = compressor.decompress(tensors, group)["weight"]
        assert torch.equal(dense, r.weight.dequantize()), r.name
        checked += 1
    assert checked == 21


def test_w8a8_dynamic_token_checkpoint(outputs, tiny_llava_dir):
    _, out = outputs["w8a8"]
    qmodel, _, batches = _in_memory(tiny_llava_dir, CASES["w8a8"])
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    group = config["config_groups"]["group_0"]
    assert config["format"] == "int-quantized"
    assert group["input_activations"]["strategy"] == "token" and group["input_activations"]["dynamic"] is True
    loaded = LlavaForConditionalGeneration.from_pretrained(out).eval()
    with torch.no_grad():
        a, b = loaded(**batches[0]).logits, _as_served(qmodel)(**batches[0]).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert not (out / ACTIVATIONS_FILE).exists()


def test_static_activation_ranges_go_to_the_sidecar(outputs, tiny_llava_dir):
    outcome, out = outputs["w4a4-static"]
    qmodel, _, batches = _in_memory(tiny_llava_dir, CASES["w4a4-static"], out)
    dense = LlavaForConditionalGeneration.from_pretrained(out, quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    apply_activation_ranges(dense, (out / ACTIVATIONS_FILE).read_bytes())
    with torch.no_grad():
        torch.testing.assert_close(dense(**batches[0]).logits, qmodel(**batches[0]).logits, rtol=1e-5, atol=1e-5)
    report = json.loads((out / "qvlm_report.json").read_text())
    assert report["servable"]["servable"] is False and "research-only" in report["servable"]["note"]
    assert outcome.evaluation.tokens > 0 and 0.0 <= outcome.evaluation.top1_agreement <= 1.0


def test_processor_and_report_files(outputs):
    _, out = outputs["w4-g128"]
    processor = AutoProcessor.from_pretrained(out)
    assert processor.image_token == "<image>"
    html = (out / "report.html").read_text()
    for chart in ("chart-entropy", "chart-blocks", "chart-sensitivity", "chart-bits", "chart-errors", "chart-time"):
        assert f'id="{chart}"' in html
    assert "http://" not in html and "https://" not in html
    manifest = json.loads((out / "qvlm_manifest.json").read_text())
    assert {"config.json", "model.safetensors.index.json", "report.html", "qvlm_report.json"} <= set(manifest["files"])


def test_verify_names_a_corrupted_file(outputs, tmp_path):
    import shutil

    _, src = outputs["w4-g128"]
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    runner = CliRunner()
    ok = runner.invoke(app, ["verify", str(out)])
    assert ok.exit_code == 0, ok.output
    victim = sorted(out.glob("model-*.safetensors"))[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    bad = runner.invoke(app, ["verify", str(out)])
    assert bad.exit_code == 1 and victim.name in bad.output


def test_only_a_multimodal_models_image_encoder_is_written_dense():
    from qvlm.export import image_encoder_linears
    from qvlm.tiny import make_tiny_clip_vision, make_tiny_llama, make_tiny_llava

    llava = image_encoder_linears(make_tiny_llava()[0])
    assert len(llava) == 2 * 6 + 2 and all(n.startswith(IMAGE_ENCODER) for n in llava)
    assert image_encoder_linears(make_tiny_llama()[0]) == set()
    assert image_encoder_linears(make_tiny_clip_vision()[0]) == set()  # a lone vision encoder: nothing runs ahead
