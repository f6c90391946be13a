"""The job file: defaults, overrides, path resolution, and one exact error line per kind of mistake."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.spec import JobSpecError
from qvlm.errors import QvlmError
from jobs.spec import JobSpec, job_json_schema, load_job, resolve_location

MINIMAL = """\
name: tiny-llava-w4
model:
  path: ./models/tiny-llava
output:
  uri: ./out/tiny-llava-w4
"""

FULL = """\
name: full-job
model:
  path: s3://models/llava-13b
  trust_remote_code: true
  endpoint_url: http://127.0.0.1:9001
calibration:
  data: data/cal.jsonl
  samples: 32
  eval_samples: 4
  max_length: 256
  batch_size: 2
  seed: 7
quantization:
  method: gptq
  weights: {bits: 3, group_size: -1, symmetric: false}
  activations: {bits: 8, granularity: null, symmetric: null}
  targets: [language]
  ignore: [lm_head, "re:.*vision.*"]
  qvlm:
    search: learned
    max_block_depth: 5
    h0: 0.25
    percentiles: [1.0, 0.9]
    epochs: 3
    iters: 50
    propagation: quantized
  mixed_precision:
    metric: kurtosis
    extra_budget: 0.1
    stop: 4
    top_m: 2
output:
  uri: s3://bucket/out/full
  overwrite: true
  endpoint_url: http://127.0.0.1:9000
resources:
  workers: 4
  gpus_per_worker: 0.5
  cpus_per_worker: 2
  max_retries: 0
  placement: spread
"""

DEFAULTS = {
    "calibration": {"data": "builtin:shapes", "samples": 64, "eval_samples": 16, "max_length": 512,
                    "batch_size": 8, "seed": 0},
    "quantization": {
        "method": "qvlm",
        "weights": {"bits": 4, "group_size": 128, "symmetric": True},
        "activations": {"bits": 16, "granularity": None, "symmetric": None},
        "targets": ("vision", "projector", "language"),
        "ignore": ("lm_head",),
        "qvlm": {"search": "best", "max_block_depth": 3, "h0": "auto",
                 "percentiles": (1.0, 0.995, 0.99, 0.985, 0.98), "max_shrink": 0.2, "shrink_steps": 20,
                 "epochs": 4, "iters": 100, "propagation": "quantized",
                 "veo": {"enabled": False, "epochs": 4, "lr": 0.001, "lambda_entropy": 0.1, "lambda_error": 10.0,
                         "eta": 0.1}},
        "gptq": {"act_order": True, "damp": 0.01},
        "mixed_precision": {"metric": "none", "extra_budget": 0.02, "stop": 2, "top_m": 0},
    },
    "resources": {"workers": 2, "gpus_per_worker": 0.0, "cpus_per_worker": 1.0, "max_retries": 3, "placement": "pack",
                  "gpu_memory_gb": None},
}


def write(folder: Path, text: str, name: str = "job.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    return path


def error_lines(path: Path, overrides=()) -> list[str]:
    with pytest.raises(JobSpecError) as info:
        load_job(path, overrides)
    assert info.value.exit_code == 2 and isinstance(info.value, QvlmError)
    return str(info.value).splitlines()


def test_minimal_file_gets_documented_defaults(tmp_path):
    spec = load_job(write(tmp_path, MINIMAL))
    dumped = spec.model_dump()
    assert dumped["name"] == "tiny-llava-w4"
    assert dumped["model"] == {"path": str(tmp_path / "models/tiny-llava"), "revision": None,
                               "trust_remote_code": False, "endpoint_url": None}
    assert dumped["output"] == {"uri": str(tmp_path / "out/tiny-llava-w4"), "overwrite": False, "endpoint_url": None,
                                "gate": {"max_kl": None, "min_top1": None, "max_accuracy_drop": None}}
    assert {k: dumped[k] for k in DEFAULTS} == DEFAULTS


def test_minimal_quant_config_resolves_autos(tmp_path):
    config = load_job(write(tmp_path, MINIMAL)).to_quant_config()
    assert (config.method, config.h0, config.seed, config.targets) == ("qvlm", None, 0, ("vision", "projector", "language"))
    assert (config.weights.bits, config.weights.group_size, config.weights.symmetric) == (4, 128, True)
    assert not config.activations.enabled


def test_full_file_loads_and_maps_to_quant_config(tmp_path):
    spec = load_job(write(tmp_path, FULL))
    assert spec.model.path == "s3://models/llava-13b" and spec.model.trust_remote_code is True
    assert spec.calibration.data == str(tmp_path / "data/cal.jsonl")
    assert spec.output.endpoint_url == "http://127.0.0.1:9000" and spec.resources.gpus_per_worker == 0.5
    job = spec.compile()
    assert (job.where.model_endpoint, job.where.output_endpoint) == ("http://127.0.0.1:9001", "http://127.0.0.1:9000")
    assert load_job(write(tmp_path, MINIMAL)).compile().where.model_endpoint is None
    config = spec.to_quant_config()
    assert (config.method, config.search, config.h0, config.seed) == ("gptq", "learned", 0.25, 7)
    assert (config.weights.bits, config.weights.group_size, config.weights.symmetric) == (3, -1, False)
    assert (config.activations.bits, config.activations.granularity, config.activations.symmetric) == (8, "token", True)
    assert config.targets == ("language",) and config.ignore == ("lm_head", "re:.*vision.*")
    assert config.percentiles == (1.0, 0.9) and config.propagation == "quantized"
    assert (config.mixed_precision.metric, config.mixed_precision.top_m, config.mixed_precision.stop) == ("kurtosis", 2, 4)
    assert config.is_ignored("model.vision_tower.layers.0.q_proj")


def test_placement_maps_to_the_job_and_plan_text(tmp_path):
    from cluster.placement import placement_strategy

    default = load_job(write(tmp_path, MINIMAL)).compile()
    assert default.resources.placement == "pack" and placement_strategy(default) == "PACK"
    spread = load_job(tmp_path / "job.yaml", ["resources.placement=spread"]).compile()
    assert spread.resources.placement == "spread" and placement_strategy(spread) == "SPREAD"
    assert load_job(write(tmp_path, FULL)).resources.placement == "spread"
    assert job_json_schema()["$defs"]["ResourcesSpec"]["properties"]["placement"]["enum"] == ["pack", "spread"]


def test_placement_override_error_names_the_override(tmp_path):
    path = write(tmp_path, MINIMAL)
    assert error_lines(path, ["resources.placement=scatter"]) == [
        f"{path}: resources.placement: should be 'pack' or 'spread' (got 'scatter') "
        "(from --set resources.placement=scatter)"]


def test_low_bit_activations_default_to_asymmetric_per_channel(tmp_path):
    spec = load_job(write(tmp_path, MINIMAL), ["quantization.activations.bits=4"])
    scheme = spec.to_quant_config().activations
    assert (scheme.bits, scheme.granularity, scheme.symmetric) == (4, "channel", False)


def test_overrides_apply(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = load_job(write(tmp_path / "jobs", MINIMAL), [
        "quantization.weights.bits=8", "quantization.targets=[language]", "quantization.qvlm.h0=0.5",
        "output.uri=./elsewhere", "model.revision=",
    ])
    assert spec.quantization.weights.bits == 8 and spec.quantization.targets == ("language",)
    assert spec.quantization.qvlm.h0 == 0.5 and spec.model.revision is None
    assert spec.output.uri == str(tmp_path / "jobs/elsewhere")  # --set paths resolve like the file's: its folder


@pytest.mark.parametrize("override, expected", [
    ("quantization.weights.bitz=8", "--set quantization.weights.bitz=8: quantization.weights.bitz: unknown field "
                                    "(did you mean bits?)"),
    ("quantisation.method=rtn", "--set quantisation.method=rtn: quantisation: unknown field (did you mean quantization?)"),
    ("name.first=x", "--set name.first=x: name.first: unknown field (the parent is not a mapping of fields)"),
    ("quantization.weights.bits", "--set quantization.weights.bits: expected dotted.path=value, "
                                  "e.g. quantization.weights.bits=8"),
])
def test_bad_override_paths(tmp_path, override, expected):
    assert error_lines(write(tmp_path, MINIMAL), [override]) == [expected]


def test_invalid_override_value_names_the_override(tmp_path):
    path = write(tmp_path, MINIMAL)
    assert error_lines(path, ["quantization.weights.bits=9"]) == [
        f"{path}: quantization.weights.bits: should be less than or equal to 8 (got 9) "
        "(from --set quantization.weights.bits=9)"]


def test_relative_paths_resolve_against_the_job_folder(tmp_path, monkeypatch):
    folder = tmp_path / "project"
    (folder / "org/local").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    text = MINIMAL.replace("./models/tiny-llava", "org/local") + "calibration:\n  data: ../cal/data.jsonl\n"
    spec = load_job(write(folder, text))
    assert spec.model.path == str(folder / "org/local")  # exists locally, so not a hub id
    assert spec.calibration.data == str(tmp_path / "cal/data.jsonl")
    assert spec.output.uri == str(folder / "out/tiny-llava-w4")
    hub = load_job(folder / "job.yaml", ["model.path=org/remote"])
    assert hub.model.path == "org/remote"  # no such folder: a Hugging Face hub id


def test_resolve_location_keeps_remote_forms(tmp_path):
    assert resolve_location("llava-hf/llava-1.5-7b-hf", tmp_path, hub_ids=True) == "llava-hf/llava-1.5-7b-hf"
    assert resolve_location("llava-hf/llava", tmp_path, hub_ids=False) == str(tmp_path / "llava-hf/llava")
    assert resolve_location("s3://b/p", tmp_path) == "s3://b/p"
    assert resolve_location("builtin:shapes", tmp_path) == "builtin:shapes"
    assert resolve_location("file:///data/out", tmp_path) == "/data/out"
    assert resolve_location("/abs/x", tmp_path) == "/abs/x"
    assert resolve_location("./a/../b", tmp_path) == str(tmp_path / "b")


def test_spec_hash_is_canonical(tmp_path):
    spec = load_job(write(tmp_path, FULL))
    again = JobSpec.model_validate(json.loads(json.dumps(spec.model_dump(mode="json"))))
    assert again == spec and again.spec_hash() == spec.spec_hash()
    assert len(spec.spec_hash()) == 64 and int(spec.spec_hash(), 16) >= 0
    changed = load_job(tmp_path / "job.yaml", ["calibration.seed=8"])
    assert changed.spec_hash() != spec.spec_hash()


def test_json_schema_describes_the_job_file():
    schema = job_json_schema()
    assert set(schema["required"]) == {"name", "model", "output"}
    assert {"name", "model", "calibration", "quantization", "output", "resources"} == set(schema["properties"])
    assert schema["$defs"]["WeightsSpec"]["properties"]["bits"]["maximum"] == 8
    assert schema["$defs"]["ModelSpec"]["additionalProperties"] is False


# Each case: the YAML after MINIMAL's five lines (or a whole file), and the exact error line ({f} = the file).
CASES = {
    "unknown-top": (MINIMAL + "resource:\n  workers: 2\n",
                    "{f}:6: resource: unknown field (did you mean resources?)"),
    "unknown-nested": (MINIMAL + "quantization:\n  weights: {bits: 4, group_sz: 64}\n",
                       "{f}:7: quantization.weights.group_sz: unknown field (did you mean group_size?)"),
    "unknown-no-match": (MINIMAL + "quantization:\n  zzz: 1\n",
                         "{f}:7: quantization.zzz: unknown field (allowed: method, weights, activations, targets, "
                         "ignore, qvlm, gptq, mixed_precision)"),
    "type-int": (MINIMAL + "resources:\n  workers: two\n",
                 "{f}:7: resources.workers: should be a valid integer (got 'two')"),
    "type-bool-as-int": (MINIMAL + "calibration:\n  samples: true\n",
                         "{f}:7: calibration.samples: should be a valid integer (got True)"),
    "type-mapping": ("name: a\nmodel: ./m\noutput:\n  uri: ./o\n",
                     "{f}:2: model: should be a mapping of fields, not a str"),
    "act-bits-1": (MINIMAL + "quantization:\n  activations: {bits: 1}\n",
                   "{f}:7: quantization.activations.bits: should be 4, 6, 8 or 16 (got 1)"),
    "act-bits-9": (MINIMAL + "quantization:\n  activations: {bits: 9}\n",
                   "{f}:7: quantization.activations.bits: should be 4, 6, 8 or 16 (got 9)"),
    "act-bits-5": (MINIMAL + "quantization:\n  activations:\n    bits: 5\n",
                   "{f}:8: quantization.activations.bits: should be 4, 6, 8 or 16 (got 5)"),
    "weight-bits-1": (MINIMAL + "quantization:\n  weights: {bits: 1}\n",
                      "{f}:7: quantization.weights.bits: should be greater than or equal to 2 (got 1)"),
    "group-0": (MINIMAL + "quantization:\n  weights: {group_size: 0}\n",
                "{f}:7: quantization.weights.group_size: must be -1 (per channel) or a power of two >= 16, "
                "e.g. 64 or 128 (got 0)"),
    "group-100": (MINIMAL + "quantization:\n  weights:\n    group_size: 100\n",
                  "{f}:8: quantization.weights.group_size: must be -1 (per channel) or a power of two >= 16, "
                  "e.g. 64 or 128 (nearest: 64 or 128) (got 100)"),
    "name-upper": (MINIMAL.replace("tiny-llava-w4\n", "Tiny-LLaVA\n", 1),
                   "{f}:1: name: must be 1-63 lowercase letters, digits or '-', starting with a letter or digit "
                   "(e.g. 'tiny-llava') (got 'Tiny-LLaVA')"),
    "name-space": (MINIMAL.replace("tiny-llava-w4\n", "my job\n", 1),
                   "{f}:1: name: must be 1-63 lowercase letters, digits or '-', starting with a letter or digit "
                   "(e.g. 'my-job') (got 'my job')"),
    "name-long": (MINIMAL.replace("tiny-llava-w4\n", "a" * 64 + "\n", 1),
                  "{f}:1: name: must be 1-63 lowercase letters, digits or '-', starting with a letter or digit "
                  "(e.g. '" + "a" * 63 + "') (got '" + "a" * 64 + "')"),
    "missing-name": (MINIMAL.replace("name: tiny-llava-w4\n", ""),
                     "{f}: name: required field is missing (e.g. name: tiny-llava-w4)"),
    "missing-model-path": (MINIMAL.replace("  path: ./models/tiny-llava\n", "  trust_remote_code: false\n"),
                           "{f}:2: model.path: required field is missing (a local directory, a Hugging Face hub id "
                           "(org/name) or s3://bucket/prefix)"),
    "revision": (MINIMAL.replace("  path: ./models/tiny-llava\n", "  path: ./models/tiny-llava\n  revision: v1.0\n"),
                 "{f}:4: model.revision: qvlm reads a model from a local folder or an S3 prefix, which have no "
                 "revisions; download the revision you want first (huggingface-cli download NAME --revision REV "
                 "--local-dir DIR) and remove model.revision (got 'v1.0')"),
    "missing-output-uri": (MINIMAL.replace("  uri: ./out/tiny-llava-w4\n", "  overwrite: true\n"),
                           "{f}:4: output.uri: required field is missing (a local path, file:///absolute/path or "
                           "s3://bucket/prefix)"),
    "http-output": (MINIMAL.replace("./out/tiny-llava-w4", "https://example.com/out"),
                    "{f}:5: output.uri: unsupported URI scheme https://; use a local path, file:///absolute/path or "
                    "s3://bucket/prefix (got 'https://example.com/out')"),
    "s3-no-bucket": (MINIMAL.replace("./out/tiny-llava-w4", "s3:///prefix"),
                     "{f}:5: output.uri: s3 URI has no bucket; write s3://BUCKET/prefix (got 's3:///prefix')"),
    "output-in-model": (MINIMAL.replace("./out/tiny-llava-w4", "models/tiny-llava/quantized"),
                        "{f}:5: output.uri: {d}/models/tiny-llava/quantized is inside model.path "
                        "{d}/models/tiny-llava; write the output outside the model folder"),
    "targets-empty": (MINIMAL + "quantization:\n  targets: []\n",
                      "{f}:7: quantization.targets: must not be empty; list at least one of vision, projector, "
                      "language"),
    "targets-unknown": (MINIMAL + "quantization:\n  targets: [vision, text]\n",
                        "{f}:7: quantization.targets.1: should be 'vision', 'projector' or 'language' (got 'text')"),
    "targets-duplicate": (MINIMAL + "quantization:\n  targets: [language, vision, language]\n",
                          "{f}:7: quantization.targets: duplicate entries 'language'; list each once"),
    "percentile-low": (MINIMAL + "quantization:\n  qvlm:\n    percentiles: [1.0, 0.3]\n",
                       "{f}:8: quantization.qvlm.percentiles.1: should be greater than 0.5 (got 0.3)"),
    "percentile-high": (MINIMAL + "quantization:\n  qvlm:\n    percentiles:\n      - 1.0\n      - 1.2\n",
                        "{f}:10: quantization.qvlm.percentiles.1: should be less than or equal to 1 (got 1.2)"),
    "bad-regex": (MINIMAL + "quantization:\n  ignore:\n    - lm_head\n    - 're:(vision'\n",
                  "{f}:9: quantization.ignore.1: invalid regular expression '(vision': missing ), unterminated "
                  "subpattern at position 0"),
    "negative-workers": (MINIMAL + "resources:\n  workers: -1\n",
                         "{f}:7: resources.workers: should be greater than or equal to 1 (got -1)"),
    "placement-unknown": (MINIMAL + "resources:\n  placement: strict_spread\n",
                           "{f}:7: resources.placement: should be 'pack' or 'spread' (got 'strict_spread')"),
    "placement-upper": (MINIMAL + "resources:\n  workers: 2\n  placement: SPREAD\n",
                        "{f}:8: resources.placement: should be 'pack' or 'spread' (got 'SPREAD')"),
    "unknown-method": (MINIMAL + "quantization:\n  method: awq\n",
                       "{f}:7: quantization.method: should be 'qvlm', 'gptq' or 'rtn' (got 'awq')"),
    "h0-negative": (MINIMAL + "quantization:\n  qvlm: {h0: -0.5}\n",
                    "{f}:7: quantization.qvlm.h0: must be \"auto\" or a number >= 0 (got -0.5)"),
    "data-not-jsonl": (MINIMAL + "calibration:\n  data: shapes\n",
                       "{f}:7: calibration.data: must be builtin:<name> (e.g. builtin:shapes) or a path to a local "
                       ".jsonl file (got '{d}/shapes')"),
    "endpoint-not-url": (MINIMAL + "  endpoint_url: 127.0.0.1:9000\n",
                         "{f}:6: output.endpoint_url: must be an http:// or https:// URL, e.g. http://127.0.0.1:9000 "
                         "(got '127.0.0.1:9000')"),
    "duplicate-key": (MINIMAL + "name: again\n", "{f}:6: name: duplicate key; keep only one"),
    "malformed": ("name: a\nmodel:\n  path: [x\noutput: {uri: o}\n",
                  "{f}:4: invalid YAML: expected ',' or ']', but got ':'"),
    "top-list": ("- name: a\n- model: b\n",
                 "{f}:1: the job file must be a mapping of fields (name: ..., model: ..., output: ...), not a list"),
    "empty": ("# nothing\n", "{f}: the job file is empty; it needs at least name, model.path and output.uri"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_invalid_job_file_gives_exact_error_line(tmp_path, case):
    text, expected = CASES[case]
    path = write(tmp_path, text)
    lines = error_lines(path)
    assert expected.format(f=path, d=tmp_path) in lines, "\n".join(lines)


def test_all_field_errors_come_together(tmp_path):
    text = MINIMAL + "quantization:\n  weights: {bits: 9}\n  method: awq\nresources:\n  workers: 0\n"
    lines = error_lines(write(tmp_path, text))
    assert [line.split(": ")[1] for line in lines] == [
        "quantization.method", "quantization.weights.bits", "resources.workers"]


def test_missing_job_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert error_lines(missing)[0].startswith(f"{missing}: job file not found (working directory: ")


def test_directory_instead_of_job_file(tmp_path):
    assert error_lines(tmp_path) == [f"{tmp_path}: is a directory; pass the job's YAML file"]
