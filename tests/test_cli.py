"""The command line: bad input exits 2 before any cluster work; the bundled job runs end to end."""

import hashlib
import json
import re
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from jobs.cli import app
from tests.job_files import write_job

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


def _job(tmp_path, model_dir, **changes) -> Path:
    return write_job(tmp_path / "job.yaml", "cli-test", str(model_dir), str(tmp_path / "out"), **changes)


@pytest.mark.smoke
@pytest.mark.parametrize("change,expected", [
    ({"quantization.weights.bitz": 4}, "quantization.weights.bitz: unknown field (did you mean bits?)"),
    ({"quantization.weights.bits": 9}, "quantization.weights.bits"),
    ({"output.uri": "http://example.com/out"}, "output.uri"),
    ({"model.path": "/nonexistent/model"}, "model.path: directory /nonexistent/model does not exist"),
    ({"calibration.data": "missing.jsonl"}, "missing.jsonl"),
    ({"quantization.weights.group_size": 256}, "quantization.weights.group_size"),
])
def test_invalid_input_exits_2_and_writes_nothing(tmp_path, tiny_llava_dir, change, expected):
    job = _job(tmp_path, tiny_llava_dir, **change)
    result = runner.invoke(app, ["submit", str(job)])
    assert result.exit_code == 2, result.output
    assert expected in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.smoke
def test_plan_prints_stages_without_running(tmp_path, tiny_llava_dir):
    result = runner.invoke(app, ["plan", str(_job(tmp_path, tiny_llava_dir))])
    assert result.exit_code == 0, result.output
    assert "stage 0:" in result.output and "stage 1:" in result.output
    assert "LlavaForConditionalGeneration" in result.output
    assert "bytes to read:" in result.output and "memory per stage worker" in result.output
    assert "  stage 1: " in result.output and "search workspace" in result.output


def test_plan_says_whether_the_checkpoint_will_serve(tmp_path, tiny_llava_dir):
    """W4 is a format vLLM has kernels for, but no qvlm checkpoint has been seen in vLLM yet: the plan warns; W3
    has no kernel at all: research-only."""
    w4 = runner.invoke(app, ["plan", str(_job(tmp_path, tiny_llava_dir))])
    assert w4.exit_code == 0 and "serving: weight-only, W4 pack-quantized: servable" in w4.output, w4.output
    assert "no qvlm checkpoint has been seen to load in vLLM yet" in w4.output
    w3 = runner.invoke(app, ["plan", str(_job(tmp_path, tiny_llava_dir)), "--set", "quantization.weights.bits=3"])
    assert w3.exit_code == 0 and "serving: weight-only with W3 pack-quantized layers: no vLLM" in w3.output, w3.output


def test_a_stage_that_does_not_fit_its_gpu_is_refused_saying_what_would(tmp_path, tiny_llava_dir):
    """qvlm plan (and submit) refuse a job whose stage needs more than resources.gpu_memory_gb, before any work,
    naming how many samples would fit; the figure comes from the same memory model the plan prints. (Captures can
    move to host memory; the weights and the search workspace must fit the GPU.)"""
    from cluster.memory import CalibrationSize, HEADROOM, stage_memory
    from cluster.plan import inspect_model
    from jobs.spec import load_job

    path = _job(tmp_path, tiny_llava_dir)
    job = load_job(path).compile()
    plan = inspect_model(job)[0]
    cal = job.calibration
    def need(samples):  # on the GPU: weights and search workspace
        size = CalibrationSize(samples, cal.batch_size, cal.max_length, plan.image_tokens)
        memory = [stage_memory(plan, s, size, job.quant) for s in range(len(plan.stages))]
        return max(m.weights + m.workspace for m in memory)

    gib = (need(cal.samples // 2) + need(cal.samples)) / 2 / HEADROOM / 2**30  # room for half the samples, not all
    args = ["plan", str(path), "--set", "resources.gpus_per_worker=1", "--set", f"resources.gpu_memory_gb={gib}"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "does not fit its worker" in result.output and "of GPU memory" in result.output
    assert f"calibration.samples: {cal.samples // 2} would fit" in result.output and "Traceback" not in result.output
    assert runner.invoke(app, args[:-1] + [f"resources.gpu_memory_gb={gib * 4}"]).exit_code == 0
    assert not (tmp_path / "out").exists()


def test_a_stage_with_the_tower_and_language_layers_keeps_only_the_towers_captures_in_host_memory(tmp_path,
                                                                                                    tiny_llava_dir):
    """The first stage of the bundled plan holds the vision tower, the projector and a language layer. When its
    captures fit its GPU only without the tower's, the tower's go to host memory and the rest stay ("split");
    with less GPU memory all go; a stage of language layers alone is never split."""
    from dataclasses import replace

    from cluster.memory import HEADROOM, calibration_size, fit, stage_memory
    from cluster.plan import inspect_model
    from jobs.spec import load_job

    job = load_job(_job(tmp_path, tiny_llava_dir)).compile()
    plan = inspect_model(job)[0]
    size = calibration_size(plan, job.calibration)
    first, last = stage_memory(plan, 0, size, job.quant), stage_memory(plan, len(plan.stages) - 1, size, job.quant)
    assert {plan.units[i].segment for i in plan.stages[0]} == {"vision", "projector", "language"}
    assert 0 < first.tower < first.captures and last.tower == 0
    split = replace(first, captures=first.captures - first.tower)
    assert fit(first, int(first.total / HEADROOM) + 1, None, True).keep_captures == "device"
    between = fit(first, int((split.total + first.total) / 2 / HEADROOM), None, True)
    assert (between.keep_captures, between.need_device, between.need_host) == ("split", split.total, first.tower)
    assert fit(first, int(split.total / HEADROOM) - 1, None, True).keep_captures == "host"
    assert fit(first, None, int(split.total / HEADROOM) + 1, False).keep_captures is None  # no GPU: all on the host
    assert fit(last, int(last.total / HEADROOM) - 1, None, True).keep_captures == "host"


def test_a_search_that_fits_only_with_shallower_blocks_is_refused_naming_the_depth(tmp_path, tiny_llava_dir):
    """Learned rounding's state grows with the weights of a block; when blocks of one unit fit and blocks of three
    do not, the refusal names the depth that would fit, and that depth is accepted."""
    from dataclasses import replace

    from cluster.memory import CalibrationSize, HEADROOM, stage_memory
    from cluster.plan import inspect_model
    from jobs.spec import load_job

    path = _job(tmp_path, tiny_llava_dir, **{"quantization.qvlm.max_block_depth": 3, "resources.workers": 1})
    job = load_job(path).compile()
    plan = inspect_model(job)[0]
    cal = job.calibration
    size = CalibrationSize(cal.samples, cal.batch_size, cal.max_length, plan.image_tokens)
    def need(depth):
        quant = replace(job.quant, max_block_depth=depth)
        return max(m.weights + m.workspace for m in (stage_memory(plan, s, size, quant) for s in range(len(plan.stages))))

    assert need(1) < need(2) < need(3)
    gib = (need(1) + need(2)) / 2 / HEADROOM / 2**30
    args = ["plan", str(path), "--set", "resources.gpus_per_worker=1", "--set", f"resources.gpu_memory_gb={gib}"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "quantization.qvlm.max_block_depth: 1 would fit" in result.output, result.output
    assert runner.invoke(app, args + ["--set", "quantization.qvlm.max_block_depth=1"]).exit_code == 0


def test_a_search_that_fits_only_with_shallower_blocks_and_smaller_batches_is_refused_naming_both(tmp_path, tiny_llava_dir):
    """When neither a shallower block nor a smaller calibration batch fits alone (nor fewer samples or more
    workers), the refusal names the two together, and the job with both is accepted."""
    from cluster.memory import CalibrationSize, HEADROOM, stage_memory
    from cluster.plan import inspect_model
    from jobs.spec import load_job

    path = _job(tmp_path, tiny_llava_dir, **{"quantization.qvlm.max_block_depth": 3, "resources.workers": 1,
                                             "calibration.samples": 8, "calibration.batch_size": 8})
    job = load_job(path).compile()
    plan = inspect_model(job)[0]
    cal = job.calibration
    def need(depth, batch, p=plan):
        size = CalibrationSize(cal.samples, batch, cal.max_length, p.image_tokens)
        quant = replace(job.quant, max_block_depth=depth)
        return max(m.weights + m.workspace for m in (stage_memory(p, s, size, quant) for s in range(len(p.stages))))

    room = (need(1, 4) + need(1, 5)) / 2
    most_workers = plan.with_workers(len(plan.streams[-1]))
    assert min(need(1, 8), need(2, 1), need(3, 1), need(3, 8, most_workers)) > room  # no one change is enough
    args = ["plan", str(path), "--set", "resources.gpus_per_worker=1",
            "--set", f"resources.gpu_memory_gb={room / HEADROOM / 2**30}"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    fix = "quantization.qvlm.max_block_depth: 1 with calibration.batch_size: 4 would fit"
    assert fix in result.output, result.output
    both = ["--set", "quantization.qvlm.max_block_depth=1", "--set", "calibration.batch_size=4"]
    assert runner.invoke(app, args + both).exit_code == 0


def test_best_holds_its_larger_phase_not_the_sum_of_its_candidates(tmp_path, tiny_llava_dir):
    """`best` runs GPTQ and then learned rounding on the same block: the plan counts the larger of the two
    searches plus what best keeps between them (two int8 candidates and int16 shifts: 4 bytes a weight), not
    both searches at once."""
    from cluster.memory import SearchCost, block_workspace_bytes, calibration_size
    from cluster.plan import inspect_model
    from jobs.spec import load_job

    job = load_job(_job(tmp_path, tiny_llava_dir)).compile()
    plan = inspect_model(job)[0]
    size = calibration_size(plan, job.calibration)
    language = [u for u in plan.units if u.segment == "language"]
    for units in (language[:1], language[:3]):
        gptq, learned, best = (block_workspace_bytes(plan, units, size, SearchCost(len(units), kind, hessians))
                               for kind, hessians in [("plain", True), ("learned", False), ("best", True)])
        weights = sum(plan.unit_bytes[u.index] for u in units) // plan.weight_element_bytes
        assert max(gptq, learned) < best <= max(gptq, learned) + 4 * weights, (len(units), gptq, learned, best)


def test_a_chained_search_counts_the_output_it_carries_from_block_to_block(tmp_path, tiny_llava_dir):
    """With propagation quantized or stage a stage holds, beside its captures, the quantized output of the block
    before (the next block's input): one hidden state per sample at its widest unit input; none with fp."""
    from dataclasses import replace

    from cluster.memory import calibration_size, stage_memory
    from cluster.plan import inspect_model
    from jobs.spec import load_job

    job = load_job(_job(tmp_path, tiny_llava_dir)).compile()
    plan = inspect_model(job)[0]
    size = calibration_size(plan, job.calibration)
    last = len(plan.stages) - 1  # language units only: text tokens at the decoder's width
    hidden = plan.linear_shapes[plan.units[plan.stages[last][0]].linear_name(plan.units[plan.stages[last][0]].linears[0])][1]
    one_state = size.samples * size.tokens * hidden * plan.weight_element_bytes
    fp = stage_memory(plan, last, size, replace(job.quant, propagation="fp"))
    for chained in ("quantized", "stage"):
        memory = stage_memory(plan, last, size, replace(job.quant, propagation=chained))
        assert memory.captures - fp.captures == one_state
        assert (memory.weights, memory.workspace) == (fp.weights, fp.workspace)


def test_the_evaluation_after_the_searches_counts_in_a_stage_memory(tmp_path, tiny_llava_dir):
    """The held-out evaluation holds quantized copies of the stage's linears and, in the first stage, one batch's
    logits over the vocabulary: a stage whose searches fit but whose evaluation does not is refused, saying so."""
    from dataclasses import replace

    from cluster.memory import HEADROOM, calibration_size, check_memory, stage_memory
    from cluster.plan import inspect_model
    from jobs.spec import load_job
    from qvlm.errors import InputError

    job = load_job(_job(tmp_path, tiny_llava_dir)).compile()
    plan = inspect_model(job)[0]
    size = calibration_size(plan, job.calibration)
    small, large = stage_memory(plan, 0, size, job.quant), stage_memory(replace(plan, vocab_size=10**6), 0, size, job.quant)
    assert large.evaluation - small.evaluation == 3 * 4 * size.batch_size * size.tokens * (10**6 - plan.vocab_size)
    assert stage_memory(plan, 1, size, job.quant).evaluation == stage_memory(replace(plan, vocab_size=10**6), 1, size, job.quant).evaluation
    host = (int(large.total / HEADROOM) + 2) * len(plan.stages)  # just room for stage 0, every stage on one host
    check_memory(replace(plan, vocab_size=10**6), job.calibration, job.quant, False, None, host)
    assert large.evaluation > large.captures + large.workspace  # the evaluation is what sizes this stage
    with pytest.raises(InputError, match=r"^stage 0 of 2 does not fit its worker: .* GiB for the evaluation"):
        check_memory(replace(plan, vocab_size=10**6), job.calibration, job.quant, False, None, host // 2)
    check_memory(plan, job.calibration, job.quant, False, None, host // 2)  # the small vocabulary fits


def test_the_evaluation_counts_the_integers_of_the_stages_linears_at_their_width(tmp_path, tiny_llava_dir):
    """The evaluation holds each linear's integers (two a byte at 4 bits, one at 8, and one wherever mixed precision
    may raise a linear) beside the stage's weights, not a dense copy of them."""
    from dataclasses import replace

    from cluster.memory import calibration_size, stage_memory
    from cluster.plan import inspect_model
    from jobs.spec import load_job
    from qvlm.config import MixedPrecisionConfig
    from qvlm.quant import WeightScheme

    job = load_job(_job(tmp_path, tiny_llava_dir)).compile()
    plan = inspect_model(job)[0]
    size = calibration_size(plan, job.calibration)
    w4, w8 = replace(job.quant, weights=WeightScheme(4, 32)), replace(job.quant, weights=WeightScheme(8, 32))
    boosted = replace(w4, mixed_precision=MixedPrecisionConfig(metric="kurtosis"))
    for stage in range(len(plan.stages)):
        shapes = [plan.linear_shapes[plan.units[i].linear_name(n)]
                  for i in plan.stages[stage] for n in plan.units[i].linears]
        half = sum(out * inp // 2 for out, inp in shapes)
        at = lambda quant: stage_memory(plan, stage, size, quant).evaluation
        assert at(w8) - at(w4) == half and at(boosted) == at(w8)  # a dense copy would be the same at any width


def test_veo_counts_in_each_stage_memory_and_needs_no_worker_for_the_whole_model(tmp_path, tiny_llava_dir):
    """VEO runs through the stages (each keeps one batch's graph; the first also the tower's quantizers and the
    logits): the plan counts it per stage and a GPU too small for the whole model in one worker takes the job on
    two; a stage whose VEO step does not fit is refused, saying so."""
    from dataclasses import replace

    from cluster.memory import HEADROOM, calibration_size, check_memory, stage_memory
    from cluster.plan import inspect_model
    from jobs.spec import load_job
    from qvlm.errors import InputError

    job = load_job(_job(tmp_path, tiny_llava_dir, **{"quantization.qvlm.veo.enabled": True})).compile()
    plan, cal, quant = inspect_model(job)[0], job.calibration, job.quant
    size = calibration_size(plan, cal)
    off = replace(quant, veo=replace(quant.veo, enabled=False))
    assert len(plan.stages) == 2
    for s in range(2):
        assert stage_memory(plan, s, size, quant).veo > 0 and stage_memory(plan, s, size, off).veo == 0

    def on_gpu(memory):  # the captures may go to host memory
        return memory.weights + max(memory.workspace, memory.veo, memory.evaluation)

    device = int(max(on_gpu(stage_memory(plan, s, size, quant)) for s in range(2)) / HEADROOM) + 1
    assert on_gpu(stage_memory(plan.with_workers(1), 0, size, quant)) > HEADROOM * device
    check_memory(plan, cal, quant, True, device, None)
    with pytest.raises(InputError, match=r"^stage 0 of 1 does not fit its worker"):
        check_memory(plan.with_workers(1), cal, quant, True, device, None)
    # The first stage keeps every calibration batch's full-precision logits in host memory, whatever the device.
    logits = size.samples * size.tokens * plan.vocab_size * plan.weight_element_bytes
    assert [stage_memory(plan, s, size, quant).host for s in range(2)] == [logits, 0]
    with pytest.raises(InputError, match=r"^stage 0 of 2 does not fit its worker: .* GiB of its reference logits"):
        check_memory(plan, cal, quant, True, device, int(logits * 0.9))
    wide = replace(quant, veo=replace(quant.veo, max_rows=10**6))  # many rows per layer in the dependency term
    assert stage_memory(plan, 1, size, wide).veo > stage_memory(plan, 1, size, wide).workspace
    with pytest.raises(InputError, match=r"^stage [01] of 2 does not fit its worker: .* GiB for VEO before the searches"):
        check_memory(plan, cal, wide, True, device, None)


def test_status_of_an_output_with_no_job_is_an_input_error(tmp_path):
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["status", str(tmp_path / "empty")])
    assert result.exit_code == 2 and "holds no qvlm job state" in result.output


def _submit(job: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "qvlm-submit"
    return subprocess.run([str(exe), str(job)], capture_output=True, text=True, timeout=600, cwd=ROOT)


@pytest.mark.slow
def test_bundled_example_runs_with_qvlm_submit(tmp_path):
    model = tmp_path / "models/tiny-llava"
    subprocess.run([sys.executable, "-m", "qvlm.tiny", "llava", str(model)], check=True, capture_output=True)
    example = (ROOT / "examples/tiny-llava.yaml").read_text()
    (tmp_path / "job.yaml").write_text(example.replace("../models/tiny-llava", str(model)).replace("../out", str(tmp_path / "out")))
    proc = _submit(tmp_path / "job.yaml")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "finished: blocks" in proc.stdout
    manifest = json.loads((tmp_path / "out/tiny-llava-w4/qvlm_manifest.json").read_text())
    assert len(manifest["files"]) >= 2
    status = runner.invoke(app, ["status", str(tmp_path / "out/tiny-llava-w4")])
    assert status.exit_code == 0 and "finished" in status.output
    again = _submit(tmp_path / "job.yaml")  # re-submitting a finished job does nothing and succeeds
    assert again.returncode == 0 and "already finished" in again.stdout


@pytest.mark.slow
def test_model_and_output_in_s3(tmp_path, tiny_llava_dir, s3_server, s3_bucket):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server)
    for f in Path(tiny_llava_dir).iterdir():
        s3.upload_file(str(f), s3_bucket, f"models/tiny/{f.name}")
    job = _job(tmp_path, f"s3://{s3_bucket}/models/tiny", **{"output.uri": f"s3://{s3_bucket}/out/job",
                                                              "output.endpoint_url": s3_server})
    proc = _submit(job)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="out/job/")["Contents"]]
    assert "out/job/qvlm_manifest.json" in keys
    manifest = json.loads(s3.get_object(Bucket=s3_bucket, Key="out/job/qvlm_manifest.json")["Body"].read())
    for key, entry in manifest["files"].items():
        body = s3.get_object(Bucket=s3_bucket, Key=f"out/job/{key}")["Body"].read()
        assert hashlib.sha256(body).hexdigest() == entry["sha256"]


# --- what the commands tell (no Ray) ------------------------------------------------------------------

def _quiet(*args, **kwargs) -> None:
    pass


def _state_at(out, **changes):
    from cluster.state import JobState, StateFile

    return StateFile(out, JobState("told", "7" * 64), echo=_quiet).update(**changes)


def test_status_says_stopped_when_no_live_run_holds_the_output(tmp_path):
    """A phase that is not final is only believed while a live run holds the lock: with no lock, or the lock of a
    process that is gone, the job is stopped (exit 1), with the heartbeat's age; a live holder is running."""
    from cluster.lock import LOCK_KEY, OutputLock
    from workers.storage import LocalStorage

    out = LocalStorage(tmp_path / "out")
    _state_at(out, phase="searching", blocks_total=5, blocks_done=2)
    gone = runner.invoke(app, ["status", str(out.root)])
    assert gone.exit_code == 1 and "[told] stopped during searching: blocks 2/5 - no run holds the output's lock" in gone.output
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    beat = time.time() - 42
    out.put_bytes(LOCK_KEY, json.dumps({"job": "told", "spec_hash": "7" * 64, "run_id": "r" * 32, "pid": int(dead.stdout),
                                        "host": socket.gethostname(), "created_at": beat, "heartbeat_at": beat}).encode())
    killed = runner.invoke(app, ["status", str(out.root)])
    assert killed.exit_code == 1, killed.output
    assert "stopped during searching" in killed.output and "its process is gone (last heartbeat 4" in killed.output
    out.delete(LOCK_KEY)
    live = OutputLock(out, "told", "7" * 64)
    live.acquire()
    try:
        running = runner.invoke(app, ["status", str(out.root)])
    finally:
        live.release()
    assert running.exit_code == 0 and re.search(r"\[told\] searching: blocks 2/5 \(heartbeat \d+s ago\)", running.output)
    for phase, code in (("failed", 1), ("stopped", 1), ("finished", 0)):
        _state_at(out, phase=phase, blocks_total=5, blocks_done=5)
        told = runner.invoke(app, ["status", str(out.root)])
        assert told.exit_code == code and f"[told] {phase}: blocks 5/5" in told.output, (phase, told.output)
    assert "Traceback" not in gone.output + killed.output + running.output


def test_status_and_verify_take_the_s3_endpoint(s3_server, s3_bucket):
    from cluster.verify import MANIFEST_KEY
    from workers.storage import S3Storage

    uri = f"s3://{s3_bucket}/out"
    out = S3Storage(uri, s3_server)
    _state_at(out, phase="finished", blocks_total=3, blocks_done=3)
    files = {"model.bin": {"sha256": out.put_bytes("model.bin", b"weights"), "size": 7}}
    out.put_bytes(MANIFEST_KEY, json.dumps({"job": "told", "spec_hash": "7" * 64, "files": files}).encode())
    for args, env in ((["--endpoint-url", s3_server], {}), ([], {"AWS_ENDPOINT_URL_S3": s3_server}),
                      ([], {"AWS_ENDPOINT_URL": s3_server})):
        status = runner.invoke(app, ["status", uri, *args], env=env)
        assert status.exit_code == 0 and "[told] finished: blocks 3/3" in status.output, status.output
        verify = runner.invoke(app, ["verify", uri, *args], env=env)
        assert verify.exit_code == 0 and f"{uri}: every file matches its manifest" in verify.output, verify.output
    out.put_bytes("model.bin", b"weightz")
    broken = runner.invoke(app, ["verify", uri, "--endpoint-url", s3_server])
    assert broken.exit_code == 1 and "model.bin: sha256 mismatch" in broken.output


def test_dry_run_says_nothing_was_submitted(tmp_path, tiny_llava_dir):
    result = runner.invoke(app, ["submit", "--dry-run", str(_job(tmp_path, tiny_llava_dir))])
    assert result.exit_code == 0, result.output
    assert "stage 0:" in result.output and result.output.rstrip().endswith("dry run: nothing was submitted")
    assert not (tmp_path / "out").exists()


def test_set_paths_resolve_against_the_job_files_folder(tmp_path, tiny_llava_dir, monkeypatch):
    """--set model.path=... means what the same line in the job file would: relative to the file's folder."""
    import shutil

    shutil.copytree(tiny_llava_dir, tmp_path / "project/models/tiny")
    (tmp_path / "project/jobs").mkdir()
    job = write_job(tmp_path / "project/jobs/job.yaml", "cli-set", "/nonexistent", "../out")
    monkeypatch.chdir(tmp_path)  # elsewhere: from here ../models/tiny does not exist
    result = runner.invoke(app, ["submit", "--dry-run", str(job), "--set", "model.path=../models/tiny",
                                 "--set", "output.uri=../out-set"])
    assert result.exit_code == 0, result.output  # resolved against the working directory, model.path would not exist
    from jobs.spec import load_job

    spec = load_job(job, ["model.path=../models/tiny", "output.uri=../out-set"])
    assert spec.model.path == str(tmp_path / "project/models/tiny")
    assert spec.output.uri == str(tmp_path / "project/out-set")


def test_progress_lines_count_each_phase_in_its_own_unit_with_an_eta():
    from cluster.state import JobState

    base = JobState("told", "7" * 64)
    assert base.line() == "[told] planning"
    capture = replace(base, phase="capturing", steps_done=1, steps_total=4, steps_seconds=2.0)
    assert capture.line() == "[told] capturing: batches 1/4, ETA 6s"
    tuning = replace(base, phase="tuning", steps_done=3, steps_total=8, steps_seconds=6.0)
    assert tuning.line() == "[told] tuning: steps 3/8, ETA 10s"
    search = replace(base, phase="searching", blocks_total=10, blocks_done=6, blocks_resumed=4, seconds={"search_elapsed": 8.0})
    assert search.line() == "[told] searching: blocks 6/10, ETA 16s"  # resumed blocks are not timed
    export = replace(base, phase="committing", blocks_total=10, blocks_done=10, steps_done=3, steps_total=7, steps_seconds=1.5)
    assert export.line() == "[told] committing: files 3/7, ETA 2s"
    assert replace(export, phase="finished").line() == "[told] finished: blocks 10/10"
