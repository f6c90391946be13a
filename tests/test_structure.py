import torch
from torch import nn
from transformers import AutoModelForCausalLM, BertModel, CLIPVisionModel

from qvlm.capture import call_unit, capture_units, shared_input_groups
from qvlm.structure import find_units, segments_of


def _replay_matches(model, units, batches):
    caps = capture_units(model, units, batches)
    for cap in caps:
        module = model.get_submodule(cap.unit.name)
        for call, out in zip(cap.calls, cap.outputs):
            assert torch.equal(call_unit(module, call), out), cap.unit.name
    return caps


def test_llava_units_and_standalone_forward(llava, llava_batches):
    model, _ = llava
    units = find_units(model)
    cfg = model.config
    n_vis, n_lang = cfg.vision_config.num_hidden_layers, cfg.text_config.num_hidden_layers
    assert [u.segment for u in units] == ["vision"] * n_vis + ["projector"] + ["language"] * n_lang
    assert [u.index for u in units] == list(range(len(units)))
    assert [len(run) for run in segments_of(units)] == [n_vis, 1, n_lang]
    projector = units[n_vis]
    assert isinstance(model.get_submodule(projector.name), nn.Module) and len(projector.linears) >= 1
    caps = _replay_matches(model, units, llava_batches)

    # The captured values are the model's own intermediate values, not just self-consistent hooks.
    batch = llava_batches[0]
    with torch.no_grad():
        vis = model.model.vision_tower(batch["pixel_values"], output_hidden_states=True).hidden_states
        feats = model.model.get_image_features(batch["pixel_values"], return_dict=True).pooler_output
    for i in range(n_vis):
        assert torch.allclose(caps[i].outputs[0], vis[i + 1], atol=1e-6)
    assert torch.allclose(caps[n_vis].outputs[0].reshape(-1, cfg.text_config.hidden_size), torch.cat(list(feats)), atol=1e-6)
    # language tokens count only where the attention mask is on
    assert torch.equal(caps[-1].calls[0].mask, batch["attention_mask"].bool())


def test_llama_units_match_hidden_states(tiny_llama_dir, llama_batches):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    units = find_units(model)
    assert len(units) == model.config.num_hidden_layers
    assert all(u.segment == "language" for u in units)
    caps = _replay_matches(model, units, llama_batches)
    with torch.no_grad():
        hs = model(**llama_batches[0], output_hidden_states=True).hidden_states
    for i in range(len(units) - 1):  # the last entry has the final norm applied
        assert torch.allclose(caps[i].outputs[0], hs[i + 1], atol=1e-6)
    groups = shared_input_groups(model.get_submodule(units[0].name), units[0].linears, caps[0].calls[0])
    assert ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj") in groups
    assert ("mlp.gate_proj", "mlp.up_proj") in groups
    assert sorted(n for g in groups for n in g) == sorted(units[0].linears)


def test_clip_vision_encoder_units(tiny_clip_dir):
    model = CLIPVisionModel.from_pretrained(tiny_clip_dir).eval()
    units = find_units(model)
    assert len(units) == model.config.num_hidden_layers and all(u.segment == "vision" for u in units)
    size = model.config.image_size
    _replay_matches(model, units, [{"pixel_values": torch.randn(2, 3, size, size)}])


def test_bert_encoder_units(tiny_bert_dir):
    model = BertModel.from_pretrained(tiny_bert_dir).eval()
    units = find_units(model)
    assert len(units) == model.config.num_hidden_layers
    assert "pooler" not in " ".join(u.name for u in units)  # heads are not units
    ids = torch.randint(5, model.config.vocab_size, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    _replay_matches(model, units, [{"input_ids": ids, "attention_mask": mask}])


def test_model_without_layer_list_is_refused():
    import pytest

    with pytest.raises(ValueError, match="no repeated layer list"):
        find_units(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)))
