"""A stage on its device: its weights, captures, searches and results live where the stage says, with the device
chosen by the same code a job's actors use (the CPU here; the GPU too where the machine has one)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qvlm.config import CalibrationSettings, QuantConfig
from qvlm.batches import calibration_batches
from qvlm.driver import layout_of
from qvlm.method import block_jobs, Block
from qvlm.stage import Stage, compute_device

CAL = CalibrationSettings(samples=8, eval_samples=0, max_length=32, batch_size=4)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# (compute device, where captures are kept): on a GPU also in host memory, as a stage does when they do not fit
PLACES = [("cpu", "cpu")] + ([("cuda", "cuda"), ("cuda", "cpu")] if torch.cuda.is_available() else [])
ROOT = Path(__file__).resolve().parent.parent


def test_a_stage_computes_on_its_first_assigned_gpu_else_the_cpu():
    assert compute_device([]) == torch.device("cpu")
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert compute_device(["3"]) == expected  # a Ray actor sees its own GPU as cuda:0


def _tensors(value) -> list[torch.Tensor]:
    from qvlm.capture import UnitCall

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, UnitCall):
        return value.tensors()
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


@pytest.mark.parametrize("device,keep", PLACES)
def test_everything_a_stage_touches_is_on_its_device(tiny_llama_dir, device, keep):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir).eval()
    config = QuantConfig(search="best", iters=5, epochs=1, propagation="quantized")  # clip, gptq and learned
    layout = layout_of(model, config)
    stage = Stage(model, layout.units, first=True, device=compute_device([0] if device == "cuda" else []))
    stage.keep_captures_on("device" if keep == device else "host")
    assert stage.device.type == device and stage.keep_on.type == keep
    for batch in calibration_batches(tiny_llama_dir, CAL):
        stage.capture(batch, hand_over=False)
    assert {p.device for p in model.parameters()} == {stage.device}
    captured = [t for c in stage.captures.values() for t in _tensors(c.calls) + _tensors(c.outputs)]
    assert captured and {t.device for t in captured} == {stage.keep_on}
    stage.statistics(config.weights)
    blocks = [Block(i, 0, (u.index,)) for i, u in enumerate(layout.units)]
    schemes = {u.linear_name(n): config.weights for u in layout.units for n in u.linears}
    jobs = block_jobs(blocks, layout, schemes)
    for k, job in enumerate(jobs):
        stage.search_block(job, config, "carried" if k else "captured", None, needs_out=k + 1 < len(jobs))
    result_tensors = [t for r in stage.results.values() for lin in r.linears for t in (lin.weight.qweight, lin.weight.scale)]
    assert {t.device for t in result_tensors} == {stage.device}
    assert {t.device for t in stage.carried() or []} <= {stage.keep_on}


@pytest.mark.parametrize("device", DEVICES)
def test_a_split_stage_keeps_the_towers_captures_in_host_memory_and_the_rest_where_it_computes(tiny_llava_dir,
                                                                                              device):
    """cluster/memory.py's "split": the vision tower's and the projector's captures in host memory, the language
    layers' on the stage's device (on the CPU both are host memory); each block's result is the one a stage that
    keeps every capture on its device finds."""
    from transformers import LlavaForConditionalGeneration

    config = QuantConfig(search="clip", epochs=1)
    found = {}
    for keep in ("split", "device"):
        model = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir).eval()
        layout = layout_of(model, config)
        stage = Stage(model, layout.units, first=True, device=compute_device([0] if device == "cuda" else []))
        stage.keep_captures_on(keep)
        for batch in calibration_batches(tiny_llava_dir, CAL):
            stage.capture(batch, hand_over=False)
        for u in layout.units:
            kept = _tensors(stage.captures[u.index].calls) + _tensors(stage.captures[u.index].outputs)
            host = keep == "split" and u.segment != "language"
            assert kept and {t.device for t in kept} == {torch.device("cpu") if host else stage.device}, u.name
        schemes = {u.linear_name(n): config.weights for u in layout.units for n in u.linears}
        jobs = block_jobs([Block(i, 0, (u.index,)) for i, u in enumerate(layout.units)], layout, schemes)
        for job in jobs:
            stage.search_block(job, config)
        found[keep] = [(lin.name, lin.weight.qweight.cpu(), r.error_after) for r in stage.results.values()
                       for lin in r.linears]
    assert {u.segment for u in layout.units} == {"vision", "projector", "language"}
    assert len(found["split"]) == len(found["device"])
    for (name, q, error), (name_d, q_d, error_d) in zip(found["split"], found["device"]):
        assert name == name_d and torch.equal(q, q_d) and error == error_d


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.timeout(900)
def test_bundled_example_on_the_gpu_matches_the_cpu_run(tmp_path):
    """The bundled job with each of its two stage workers on half of one GPU, against the same job on the CPU:
    the same blocks, their summed error to 2%, fewer than 10% of the integer codes moved, and the checkpoints'
    logits agree (cosine > 0.999). Codes are not a device-free invariant: bench/float_noise.py moves the weights
    by one float32 ulp and 0.3% of the codes move, up to 2 steps; by 1e-3 (TF32's size, which cuDNN uses for
    the tower's float32 convolution) 8.9%, and one block's error by 37%, with the sum within 0.3%. An H200
    moved 2.8% of the codes."""
    from transformers import LlavaForConditionalGeneration

    from tests.outputs import block_tensors

    bin_dir = Path(sys.executable).parent
    model = tmp_path / "models/tiny-llava"
    subprocess.run([sys.executable, "-m", "qvlm.tiny", "llava", str(model)], check=True, cwd=ROOT)
    outs = {}
    for name, gpus in (("cpu", 0), ("gpu", 0.5)):
        out = tmp_path / name
        subprocess.run([str(bin_dir / "qvlm-submit"), str(ROOT / "examples/tiny-llava.yaml"), "--set", f"model.path={model}",
                        "--set", f"output.uri={out}", "--set", f"resources.gpus_per_worker={gpus}"], check=True, cwd=ROOT)
        outs[name] = out
    plan_cpu, cpu = block_tensors(outs["cpu"])
    plan_gpu, gpu = block_tensors(outs["gpu"])
    assert [b["units"] for b in plan_cpu["blocks"]] == [b["units"] for b in plan_gpu["blocks"]]
    assert set(json.loads((outs["gpu"] / "qvlm_plan.json").read_text())["stage_devices"]) == {"cuda:0"}
    errors = [sum(b["error_after"] for b in plan["blocks"]) for plan in (plan_cpu, plan_gpu)]
    assert errors[1] == pytest.approx(errors[0], rel=0.02)
    ints = [k for k in cpu if k.endswith(".qweight")]
    moved = sum(int((cpu[k] != gpu[k]).sum()) for k in ints) / sum(cpu[k].numel() for k in ints)
    assert moved < 0.10
    batch = calibration_batches(model, CAL)[0]
    logits = [LlavaForConditionalGeneration.from_pretrained(outs[n]).eval()(**batch).logits.flatten() for n in ("cpu", "gpu")]
    assert torch.nn.functional.cosine_similarity(logits[0], logits[1], dim=0) > 0.999


def test_quantizers_read_back_from_storage_go_to_the_device_of_the_linear_they_fill():
    """Block results read back from a shard are on the CPU; a stage on a GPU fills its fake-quant linears with
    them (evaluation, Eq. 3 propagation after a restart, the VEO-tuned tower). The meta device stands in for the
    GPU: found on one, where the job's evaluation stopped at "mat2 is on cpu"."""
    from qvlm.fakequant import FakeQuantLinear
    from qvlm.quant import ActRange, ActScheme, WeightScheme, quantize_weight
    from qvlm.search import LinearResult, apply_linear_results

    linear = torch.nn.Linear(256, 8)
    weight = quantize_weight(linear.weight.detach(), WeightScheme(bits=4, group_size=128))
    act_range = ActRange(torch.full((256,), -1.0), torch.full((256,), 1.0))
    fq = FakeQuantLinear.from_linear(linear.to("meta"))
    apply_linear_results({"fc": fq}, [LinearResult("fc", weight, act_range, None, None)], ActScheme(8, "channel"))
    assert fq.weight.is_meta and fq.act_range.lo.is_meta and fq.act_range.hi.is_meta


class _HeldAtEachSearch(Stage):
    """A stage that notes, as each block's search begins, how many captured hidden states it still holds per batch."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.held: list[tuple[int, int]] = []  # (block index, distinct hidden-state tensors held / batches)
        self.keep_everything = False

    def search_block(self, job, config, source="captured", upstream=None, needs_out=False, done=False, release=False):
        return super().search_block(job, config, source, upstream, needs_out, done, release and not self.keep_everything)

    def block_data(self, job, config, inputs):
        self.held.append((job.index, self._held() // len(self.captures[job.units[0]].calls)))
        return super().block_data(job, config, inputs)

    def _held(self) -> int:
        tensors = [t for c in self.captures.values() for t in [k.hidden for k in c.calls] + c.outputs if t is not None]
        return len({id(t) for t in tensors})


@pytest.mark.parametrize("propagation", ["quantized", "fp"])
def test_a_stage_lets_each_captured_hidden_state_go_once_no_block_ahead_reads_it(tiny_llama_dir, propagation):
    """The search phase sends a stage its blocks in order; a block reads its first unit's captured input (when it
    starts from it) and its last unit's output, so as block j of a stage of n units begins the stage holds the inputs
    of the units not yet searched and its last output: n - j + 1 hidden states a batch, one fewer when the block
    starts from the quantized output of the block before (Eq. 3). The tensors found are the ones found keeping all."""
    found, held = {}, {}
    for keep in (True, False):
        stages, result = _run_watched(tiny_llama_dir, QuantConfig(method="rtn", propagation=propagation), keep)
        found[keep] = [(lin.name, lin.weight.qweight) for s in stages for r in s.results.values() for lin in r.linears]
        held[keep] = [s.held for s in stages]
        assert len(result.blocks) == 4
        if not keep:
            assert [s._held() for s in stages] == [0, 0]
    chained = propagation == "quantized"
    assert held[True] == [[(0, 2)], [(1, 4), (2, 4), (3, 4)]]  # kept: every input and the stage's last output
    assert held[False] == [[(0, 2)], [(1, 4 - chained), (2, 3 - chained), (3, 2 - chained)]]
    assert [name for name, _ in found[True]] == [name for name, _ in found[False]] and len(found[True]) == 4 * 7
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(found[True], found[False]))


def test_a_block_finished_before_the_search_lets_its_captures_go(tiny_llama_dir):
    """A block the search phase skips (the VEO-tuned tower, a block an earlier run finished) is never searched, and
    its captured hidden states go all the same."""
    from qvlm.method import Hooks

    stages, result = _run_watched(tiny_llama_dir, QuantConfig(method="rtn", propagation="fp"), False,
                                  Hooks(finished=lambda blocks: {0}))
    assert result.done == {0} and set(result.summaries) == {1, 2, 3}
    assert [s.held for s in stages] == [[], [(1, 4), (2, 3), (3, 2)]] and [s._held() for s in stages] == [0, 0]


def _run_watched(model_dir, config: QuantConfig, keep: bool, hooks=None):
    """The method on the tiny Llama cut in two stages (layer 0, layers 1-3) that note what they hold."""
    from transformers import LlamaForCausalLM

    from qvlm.driver import LocalPipeline
    from qvlm.method import linear_shapes, run_method

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    cut = [u.index for u in layout_of(model, config).units]
    layout = layout_of(model, config, [cut[:1], cut[1:]])
    units = {u.index: u for u in layout.units}
    stages = [_HeldAtEachSearch(model, [units[i] for i in s], first=k == 0) for k, s in enumerate(layout.stages)]
    for stage in stages:
        stage.keep_everything = keep
    result = run_method(LocalPipeline(stages), layout, linear_shapes(model, layout.units),
                        calibration_batches(model_dir, CAL), config, hooks)
    return stages, result
