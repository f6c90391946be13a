"""qvlm.evaluate: KL, top-1 agreement and answer accuracy on the tiny LLaVA (random weights)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from qvlm.calibration import load_records, make_batches
from qvlm.answers import answer_span, find_answer_spans
from qvlm.evaluate import compare_models, evaluate_records
from qvlm.tiny import make_tiny_llava

MAX_LENGTH = 64


class AnswerOracle(torch.nn.Module):
    """Logits that put all mass on the true next token: a model that always answers right."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids, **_):
        nxt = torch.cat([input_ids[:, 1:], input_ids[:, -1:]], dim=1)
        return SimpleNamespace(logits=torch.nn.functional.one_hot(nxt, self.vocab).float() * 20)


@pytest.fixture(scope="module")
def setup():
    fp, processor = make_tiny_llava(seed=0)
    return fp.eval(), processor, load_records("builtin:shapes", 8, seed=3)


def test_answer_span_prefix_and_eos():
    assert answer_span([1, 5, 6], [1, 5, 6, 9, 9]) == (3, 5)
    assert answer_span([1, 5, 6, 2], [1, 5, 6, 9, 2]) == (3, 4)  # a trailing EOS is not the answer
    assert answer_span([1, 5], [1, 5]) is None


def test_identical_models_agree(setup):
    fp, processor, records = setup
    twin = make_tiny_llava(seed=0)[0].eval()
    result = evaluate_records(fp, twin, processor, records, MAX_LENGTH, batch_size=4)
    assert result.tokens > len(records)
    assert result.kl_mean == pytest.approx(0.0, abs=1e-7)
    assert result.top1_agreement == 1.0
    assert result.questions == len(records)
    assert result.fp_accuracy == result.q_accuracy
    assert 0.0 <= result.fp_accuracy <= 1.0


def test_perturbed_model_diverges(setup):
    fp, processor, records = setup
    q = make_tiny_llava(seed=0)[0].eval()
    with torch.no_grad():
        for p in q.parameters():
            p.add_(0.05 * torch.randn_like(p))
    result = evaluate_records(fp, q, processor, records, MAX_LENGTH, batch_size=4)
    assert result.kl_mean > 1e-4
    assert result.top1_agreement < 1.0


def test_oracle_answers_everything(setup):
    fp, processor, records = setup
    oracle = AnswerOracle(fp.config.text_config.vocab_size)
    result = evaluate_records(fp, oracle, processor, records, MAX_LENGTH, batch_size=3)
    assert result.q_accuracy == 1.0
    assert result.fp_accuracy < 1.0  # random weights: far from perfect
    assert result.questions == len(records)


def test_padding_positions_are_not_counted(setup):
    fp, processor, records = setup
    batches = make_batches(records, processor, MAX_LENGTH, batch_size=4)
    expected = sum(int(b["attention_mask"].sum()) - b["attention_mask"].shape[0] for b in batches)
    assert compare_models(fp, fp, batches).tokens == expected


def test_records_without_answers_or_truncated_are_not_questions(setup):
    fp, processor, records = setup
    records = [records[0], type(records[1])(text=records[1].text, image=records[1].image, answer=None)]
    full = make_batches(records, processor, MAX_LENGTH, 2, include_answer=True)
    prompts = make_batches(records, processor, MAX_LENGTH, 2, include_answer=False)
    assert find_answer_spans(prompts, full, records, MAX_LENGTH)[0][1] is None
    length = int(full[0]["attention_mask"][0].sum())
    cut = make_batches(records, processor, length, 2, include_answer=True)
    cut_prompts = make_batches(records, processor, length, 2, include_answer=False)
    assert find_answer_spans(cut_prompts, cut, records, length) == [[None, None]]
    result = compare_models(fp, fp, full, find_answer_spans(prompts, full, records, MAX_LENGTH))
    assert result.questions == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_evaluation_through_three_stages_equals_the_whole_models(setup, dtype):
    """The held-out batches run through stages (vision + the first decoder layer, then one layer each), each
    switching its own linears between full precision and its blocks' quantizers, with the first stage finishing
    every pass: the figures of the whole full-precision model against the whole quantized one, and the stages'
    model is full precision again afterwards."""
    from qvlm.config import QuantConfig
    from qvlm.driver import LocalPipeline, layout_of, quantize
    from qvlm.evaluate import Comparison, answered_batches, evaluation_phase
    from qvlm.quant import WeightScheme
    from qvlm.stage import Stage
    from qvlm.structure import find_units

    _, processor, records = setup
    fp = make_tiny_llava(seed=0)[0].to(dtype).eval()
    units = find_units(fp)
    language = [u.index for u in units if u.segment == "language"]
    cut = [[u.index for u in units if u.segment != "language"] + language[:1], language[1:2], language[2:]]
    config = QuantConfig(method="rtn", weights=WeightScheme(3, 32))
    batches, spans = answered_batches(records, processor, MAX_LENGTH, batch_size=3)
    quantized, result = quantize(make_tiny_llava(seed=0)[0].to(dtype), batches[:1], config, stages=cut)
    layout = layout_of(fp, config, cut)
    stages = [Stage(fp, [units[i] for i in s], first=(k == 0)) for k, s in enumerate(cut)]
    for k, stage in enumerate(stages):
        mine = [r for b, r in zip(result.blocks, result.block_results) if layout.stage_of(b.units[0]) == k]
        stage.prepare_evaluation(mine, config.activations, Comparison(batches, spans))
    steps = []
    staged = evaluation_phase(LocalPipeline(stages), len(batches), lambda done, total: steps.append((done, total)))
    whole = compare_models(make_tiny_llava(seed=0)[0].to(dtype).eval(), quantized, batches, spans)
    assert staged.tokens == whole.tokens and staged.questions == whole.questions == len(records)
    assert staged.kl_mean == pytest.approx(whole.kl_mean, rel=1e-4) and staged.kl_mean > 1e-3
    assert (staged.top1_agreement, staged.fp_accuracy, staged.q_accuracy) == \
        (whole.top1_agreement, whole.fp_accuracy, whole.q_accuracy)
    assert steps[-1] == (len(batches), len(batches))
    twin = make_tiny_llava(seed=0)[0].to(dtype).eval()
    with torch.no_grad():
        torch.testing.assert_close(fp(**batches[0]).logits, twin(**batches[0]).logits, rtol=0, atol=0)


def test_the_evaluations_quantized_linears_hold_integers_not_a_second_copy_of_the_weights(setup):
    """A stage evaluating its blocks holds their integers beside its own weights, not a dense quantized copy of
    every linear (a second copy of the stage's weights): the quantized linears read the stage's weight tensors,
    which a quantized pass leaves as loaded."""
    from qvlm.config import QuantConfig
    from qvlm.driver import quantize
    from qvlm.evaluate import Comparison, answered_batches
    from qvlm.stage import Stage
    from qvlm.structure import find_units

    _, processor, records = setup
    fp = make_tiny_llava(seed=0)[0].eval()
    batches, spans = answered_batches(records, processor, MAX_LENGTH, batch_size=4)
    _, result = quantize(make_tiny_llava(seed=0)[0], batches[:1], QuantConfig(method="rtn"))
    before = {k: v.clone() for k, v in fp.state_dict().items()}
    stage = Stage(fp, find_units(fp), first=True)
    stage.prepare_evaluation(result.block_results, QuantConfig().activations, Comparison(batches, spans))
    assert stage._quantized
    for name, fq in stage._quantized.items():
        own = fp.get_submodule(name).weight
        assert fq.weight.untyped_storage().data_ptr() == own.untyped_storage().data_ptr(), name
        assert fq.quantized is not None and fq.quantized.packed, name  # W4: two integers a byte
    for quantized in (False, True):
        stage.evaluate_head(0, stage.evaluate_forward(0, quantized), quantized)
    assert all(torch.equal(v, fp.state_dict()[k]) for k, v in before.items())
