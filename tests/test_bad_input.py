"""Bad input through the real command line: each case exits 2 (1 where only running the model can tell),
prints one ``error:`` line that names the field, file or record and says how to fix it, shows no traceback
unless ``--debug``, shows no secret, leaves the model folder byte-identical and writes nothing anywhere in
the test's folder (for a failure found mid-job: only the state file that explains it, and the ledger that
vouches for it)."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
import subprocess
from pathlib import Path
from typing import Callable

import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from jobs.cli import app
from tests.job_files import set_fields
from workers.storage import LEDGER_PREFIX

runner = CliRunner()

BASE_JOB = {
    "name": "bad-input",
    "calibration": {"samples": 4, "eval_samples": 0, "max_length": 64, "batch_size": 4},
    "quantization": {"method": "rtn"},
    "resources": {"workers": 2},
}


class Case:
    """One job being made bad: a job file under ``tmp``, a copy of the tiny model when a case edits it."""

    def __init__(self, tmp: Path, tiny_model: Path):
        self.tmp, self.tiny_model = tmp, tiny_model
        self.model = tiny_model
        self.out = tmp / "out"
        self.job = tmp / "job.yaml"
        self.data = copy.deepcopy(BASE_JOB)
        self.data["model"] = {"path": str(tiny_model)}
        self.data["output"] = {"uri": str(self.out)}
        self.text: str | None = None  # a whole job file, written as is
        self.cleanups: list[Callable[[], object]] = []  # undo what pytest could not remove (chattr +i)

    def set(self, **changes) -> None:
        """Set job fields by dotted path (``quantization.weights.bits=9``)."""
        set_fields(self.data, **changes)

    def copy_model(self) -> Path:
        """A private copy of the tiny LLaVA for cases that damage it; the job points at it."""
        if self.model == self.tiny_model:
            self.model = self.tmp / "model"
            shutil.copytree(self.tiny_model, self.model)
            self.set(**{"model.path": str(self.model)})
        return self.model

    def edit_config(self, change: Callable[[dict], None]) -> None:
        path = self.copy_model() / "config.json"
        config = json.loads(path.read_text())
        change(config)
        path.write_text(json.dumps(config))

    def calibration(self, lines: list[str]) -> Path:
        path = self.tmp / "cal.jsonl"
        path.write_text("".join(line + "\n" for line in lines))
        self.set(**{"calibration.data": str(path)})
        return path

    def write(self) -> Path:
        self.job.write_text(self.text if self.text is not None else yaml.safe_dump(self.data))
        return self.job

    def names(self) -> dict[str, str]:
        return {"job": str(self.job), "model": str(self.model), "tmp": str(self.tmp)}


PASSWORD = "qvlm-endpoint-password"  # planted in job files; must never be printed


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` with its bytes (None for folders), ``folder`` itself as "."; {} if absent."""
    if not folder.exists():
        return {}
    return {".": None} | {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in folder.rglob("*")}


def error_line(result, code: int) -> str:
    """The one ``error:`` line of a refused command, checked for exit code and the absence of a traceback."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    assert result.output.rstrip().endswith(errors[0]), result.output  # nothing after it (no second message)
    return errors[0]


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``: a model folder must be byte-identical after any refused job."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def shard(model: Path, n: int = 2) -> Path:
    return next(model.glob(f"model-0000{n}-of-*.safetensors"))


def rewrite_shard(model: Path, change: Callable[[bytes], bytes]) -> Path:
    path = shard(model)
    path.write_bytes(change(path.read_bytes()))
    return path


def rewrite_header(change: Callable[[dict], None]) -> Callable[[bytes], bytes]:
    """A safetensors rewrite that edits the JSON header and keeps the data section as it is."""
    def rewrite(blob: bytes) -> bytes:
        length = int.from_bytes(blob[:8], "little")
        header = json.loads(blob[8:8 + length])
        change(header)
        text = json.dumps(header).encode()
        return len(text).to_bytes(8, "little") + text + blob[8 + length:]
    return rewrite


def _alias_bomb(levels: int = 9) -> str:
    """A "billion laughs" job file: a few lines whose aliases expand to 9**levels values."""
    lines = ["name: bomb", "model: {path: m}", "output: {uri: o}", "x0: &x0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"x{i}: &x{i} [" + ", ".join([f"*x{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(lines + [f"quantization: {{ignore: *x{levels - 1}}}"]) + "\n"


# ---- the cases: (setup, expected exit code, texts the error line must contain; {job} {model} {tmp} are filled) --

CASES = []


def case(*needles: str, code: int = 2):
    def register(setup):
        CASES.append(pytest.param(setup, code, needles, id=setup.__name__.replace("_", "-")))
        return setup
    return register


# the job file

@case("{job}:4: invalid YAML: expected ',' or ']'")
def malformed_yaml(c: Case):
    c.text = "name: a\nmodel:\n  path: [x\noutput: {uri: o}\n"


@case("{job}:1: the job file must be a mapping of fields")
def job_file_is_a_list(c: Case):
    c.text = "- name: a\n- model: b\n"


@case("quantisation: unknown field (did you mean quantization?)")
def unknown_top_level_key(c: Case):
    c.data["quantisation"] = {"method": "rtn"}


@case("quantization.weights.bitz: unknown field (did you mean bits?)")
def unknown_nested_key(c: Case):
    c.set(**{"quantization.weights.bitz": 4})


@case("resources.workers: should be a valid integer (got 'two')")
def wrong_type_string_for_int(c: Case):
    c.set(**{"resources.workers": "two"})


@case("calibration.samples: should be a valid integer")
def wrong_type_list_for_int(c: Case):
    c.set(**{"calibration.samples": [4]})


@case("model: should be a mapping of fields, not a str")
def wrong_type_scalar_for_section(c: Case):
    c.data["model"] = str(c.tiny_model)


@case("quantization.weights.bits: should be less than or equal to 8 (got 9)")
def weight_bits_too_high(c: Case):
    c.set(**{"quantization.weights.bits": 9})


@case("quantization.activations.bits: should be 4, 6, 8 or 16 (got 5)")
def impossible_activation_bits(c: Case):
    c.set(**{"quantization.activations.bits": 5})


@case("quantization.weights.group_size: must be -1 (per channel) or a power of two >= 16", "nearest: 64 or 128")
def group_size_not_a_power_of_two(c: Case):
    c.set(**{"quantization.weights.group_size": 100})


@case("quantization.weights.group_size: group_size 512 does not divide the input width 128",
      "use a divisor of the width or -1", "(layer model.vision_tower")
def group_size_does_not_divide_the_layer_width(c: Case):
    c.set(**{"quantization.weights.group_size": 512})


@case("quantization.targets", "quantization.ignore", "leave nothing to quantize", "ignore fewer linears")
def targets_and_ignore_leave_nothing(c: Case):
    c.set(**{"quantization.targets": ["vision"], "quantization.ignore": ["re:.*"]})


@case("name: must be 1-63 lowercase letters, digits or '-'")
def name_with_a_path(c: Case):
    c.data["name"] = "../escape"


@case("output: required field is missing (a mapping with at least uri:")
def missing_output(c: Case):
    del c.data["output"]


@case("output.uri: unsupported URI scheme http://; use a local path, file:///absolute/path or s3://bucket/prefix")
def http_output(c: Case):
    c.set(**{"output.uri": "http://example.com/out"})


@case("output.uri: {model}/quantized is inside model.path {model}; write the output outside the model folder")
def output_inside_the_model_folder(c: Case):
    c.set(**{"output.uri": str(c.copy_model() / "quantized")})
    c.out = c.model / "quantized"


@case("output.uri: s3://models/llava/w4 is inside model.path s3://models/llava; write the output outside")
def s3_output_inside_the_s3_model_prefix(c: Case):
    c.set(**{"model.path": "s3://models/llava", "output.uri": "s3://models/llava/w4"})


@case("output.uri: {tmp}/out is a file; give a folder")
def output_is_a_file(c: Case):
    c.out.write_text("not a folder")


@case("calibration.data: must be builtin:<name> (e.g. builtin:shapes) or a path to a local .jsonl file")
def calibration_not_jsonl(c: Case):
    c.set(**{"calibration.data": "data.csv"})


# the model

@case("model.path: directory {tmp}/no-such-model does not exist; fix the path")
def missing_model_folder(c: Case):
    c.set(**{"model.path": str(c.tmp / "no-such-model")})


@case("model.path: {tmp}/weights.safetensors is a file, not a model folder; point it at the folder")
def model_path_is_a_file(c: Case):
    (c.tmp / "weights.safetensors").write_bytes(b"x")
    c.set(**{"model.path": str(c.tmp / "weights.safetensors")})


@case("model.path: llava-hf/llava-1.5-7b-hf is not a local directory or s3:// prefix; download hub models first")
def hub_id_instead_of_a_folder(c: Case):
    c.set(**{"model.path": "llava-hf/llava-1.5-7b-hf"})


@case("model.path: no model.safetensors or model.safetensors.index.json under {model}",
      "qvlm reads only safetensors")
def model_without_safetensors(c: Case):
    for path in c.copy_model().glob("model*.safetensors*"):
        path.unlink()


@case("corrupt safetensors header in {model}/model-00002-of-", "invalid JSON", "re-download the model")
def corrupt_safetensors_header(c: Case):
    rewrite_shard(c.copy_model(), lambda b: b[:8] + b"#" * 12 + b[20:])


@case("corrupt safetensors header in {model}/model-00002-of-", "header length 1000000000000 does not fit",
      "re-download the model")
def safetensors_header_length_past_the_end(c: Case):
    rewrite_shard(c.copy_model(), lambda b: (10**12).to_bytes(8, "little") + b[8:])


@case("corrupt safetensors header in {model}/model-00002-of-", "beyond the end of the file", "re-download")
def truncated_safetensors_file(c: Case):
    rewrite_shard(c.copy_model(), lambda b: b[: len(b) // 2])


@case("corrupt safetensors file {model}/model-00002-of-", "shorter than the 8-byte length")
def empty_safetensors_file(c: Case):
    rewrite_shard(c.copy_model(), lambda b: b"")


@case("{model}/model.safetensors.index.json lists {model}/model-00003-of-", "which does not exist",
      "re-download the model")
def shard_listed_in_the_index_is_missing(c: Case):
    shard(c.copy_model(), 3).unlink()


@case("corrupt {model}/model.safetensors.index.json: expected JSON with a 'weight_map' object")
def index_is_not_json(c: Case):
    (c.copy_model() / "model.safetensors.index.json").write_text("{not json")


@case("{model}/model.safetensors.index.json: tensor", "maps to '../outside.safetensors', which is not a file name "
      "inside the model folder")
def index_points_outside_the_model_folder(c: Case):
    path = c.copy_model() / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../outside.safetensors"
    path.write_text(json.dumps(index))


@case("{model}/config.json: not found; model.path must be a folder written by save_pretrained")
def missing_config(c: Case):
    (c.copy_model() / "config.json").unlink()


@case("{model}/config.json: invalid JSON", "re-download or re-save")
def config_is_not_json(c: Case):
    (c.copy_model() / "config.json").write_text("{oops")


@case("{model}/config.json: model_type 'fancyvlm' is not a model transformers", "use a supported architecture")
def unknown_model_type(c: Case):
    c.edit_config(lambda cfg: cfg.update(model_type="fancyvlm"))


@case("{model}/config.json: \"architectures\" names ['FancyVLMForThings'], none of which transformers",
      "set architectures to one")
def unknown_architecture_class(c: Case):
    c.edit_config(lambda cfg: cfg.update(architectures=["FancyVLMForThings"]))


@case("{model}/config.json: unsupported architecture: ResNetModel has no repeated layer list with linear layers")
def architecture_without_layer_lists(c: Case):
    from transformers import ResNetConfig, ResNetModel

    c.model = c.tmp / "resnet"
    ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1])).save_pretrained(c.model)
    c.set(**{"model.path": str(c.model)})


@case("{model}/model-00001-of-", "has shape [128, 256] but config.json implies [128, 384]",
      "use the config.json saved with these weights")
def config_does_not_match_the_weights(c: Case):
    c.edit_config(lambda cfg: cfg["text_config"].update(intermediate_size=384))


@case("model.path: cannot load the tokenizer or processor of {model}", "copy the tokenizer and processor files")
def tokenizer_files_missing(c: Case):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (c.copy_model() / name).unlink()


# the calibration data

@case("calibration.data: calibration file {tmp}/missing.jsonl not found; fix: give an existing .jsonl path")
def missing_calibration_file(c: Case):
    c.set(**{"calibration.data": str(c.tmp / "missing.jsonl")})


@case("calibration.data: unknown calibration source 'builtin:nope'; known built-in sources: builtin:shapes")
def unknown_builtin_calibration(c: Case):
    c.set(**{"calibration.data": "builtin:nope"})


@case("calibration file {tmp}/cal.jsonl, line 2: field \"image\": file {tmp}/nope.png not found",
      "fix: give a path relative to")
def record_with_a_missing_image(c: Case):
    c.calibration(['{"text": "a circle"}', '{"image": "nope.png", "text": "a square"}'] * 3)


@case("calibration file {tmp}/cal.jsonl, line 3: field \"text\" is missing or empty; fix: give a non-empty string")
def record_with_empty_text(c: Case):
    c.calibration(['{"text": "a circle"}', '{"text": "a square"}', '{"text": "   "}', '{"text": "x"}'])


@case("calibration file {tmp}/cal.jsonl, line 1: field \"text\" is missing or empty")
def record_without_text(c: Case):
    c.calibration(['{"answer": "yes"}'] * 4)


@case("calibration file {tmp}/cal.jsonl, line 2: invalid JSON", "fix: write one JSON object per line")
def record_not_json(c: Case):
    c.calibration(['{"text": "a"}', '{text: b}', '{"text": "c"}', '{"text": "d"}'])


@case("calibration file {tmp}/cal.jsonl, line 4: unknown field(s) ['caption']", "fix: use only the fields")
def record_with_an_unknown_field(c: Case):
    c.calibration(['{"text": "a"}'] * 3 + ['{"caption": "b", "text": "c"}'])


@case("calibration file {tmp}/cal.jsonl, line 2: not UTF-8 text", "fix: save the file as UTF-8")
def calibration_file_not_utf8(c: Case):
    path = c.calibration(['{"text": "a"}'])
    path.write_bytes(path.read_bytes() + b'{"text": "\xff\xfe"}\n')


@case("calibration file {tmp}/cal.jsonl, line 1: field \"image\": cannot read {tmp}/broken.png",
      "fix: point it at a valid image file")
def record_with_a_corrupt_image(c: Case):
    (c.tmp / "broken.png").write_bytes(b"not a png")
    c.calibration(['{"image": "broken.png", "text": "a"}'] * 4)


@case("calibration file {tmp}/cal.jsonl has 2 records, job asks for samples + eval_samples = 4 + 2 = 6",
      "fix: add records")
def fewer_records_than_samples(c: Case):
    c.calibration(['{"text": "a"}', '{"text": "b"}'])
    c.set(**{"calibration.eval_samples": 2})


@case("calibration record 0: its image expands to 16 image tokens", "max_length=8",
      "fix: max_length must be at least 17")
def max_length_shorter_than_the_image_tokens(c: Case):
    c.set(**{"calibration.max_length": 8})


@case("calibration batch of records 0..3 mixes records with and without images",
      "fix: group image and text-only records apart")
def batch_mixing_records_with_and_without_images(c: Case):
    Image.new("RGB", (32, 32), "red").save(c.tmp / "red.png")
    c.calibration(['{"image": "red.png", "text": "a"}', '{"text": "b"}'] * 2)


# the output

@case("output.uri: {tmp}/out already holds job 'someone-else'", "set output.overwrite: true to replace it")
def output_holds_another_job(c: Case):
    (c.out / "_qvlm").mkdir(parents=True)
    state = {"name": "someone-else", "spec_hash": "0" * 64, "phase": "finished"}
    (c.out / "_qvlm/state.json").write_text(json.dumps(state))
    (c.out / "config.json").write_text("{}")
    manifest = {"job": "someone-else", "spec_hash": "0" * 64, "files": {"config.json": {"sha256": "", "size": 2}}}
    (c.out / "qvlm_manifest.json").write_text(json.dumps(manifest))


@case("output.uri: {tmp}/out holds 1 file qvlm did not write (notes.txt)",
      "qvlm never deletes or overwrites them, even with output.overwrite: true")
def output_holds_other_files(c: Case):
    c.out.mkdir()
    (c.out / "notes.txt").write_text("mine")


@case("output.uri: {tmp}/out holds 4 files qvlm did not write (a.txt, b.txt, c.txt and 1 more)")
def output_holds_other_files_even_with_overwrite(c: Case):
    c.out.mkdir()
    for name in "abcd":
        (c.out / f"{name}.txt").write_text("mine")
    c.set(**{"output.overwrite": True})


@case("output.uri: {tmp}/out/_qvlm is a symbolic link; qvlm never follows links inside {tmp}/out")
def qvlm_folder_is_a_link_out_of_the_output(c: Case):
    (c.tmp / "elsewhere").mkdir()
    (c.tmp / "elsewhere/state.json").write_text("{}")
    c.out.mkdir()
    (c.out / "_qvlm").symlink_to(c.tmp / "elsewhere")
    c.set(**{"output.overwrite": True})


@case("output.uri: cannot write in {tmp}/readonly", "choose an output.uri where this user can write")
def output_in_a_folder_nobody_may_write(c: Case):
    # Tests run as root, whom permission bits do not stop; an immutable folder (chattr +i) stops root too.
    (c.tmp / "readonly").mkdir()
    if subprocess.run(["chattr", "+i", str(c.tmp / "readonly")], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available on this file system")
    c.cleanups.append(lambda: subprocess.run(["chattr", "-i", str(c.tmp / "readonly")], check=True))
    c.out = c.tmp / "readonly/out"
    c.set(**{"output.uri": str(c.out)})


@case("output.uri: {tmp}/afile is a file, so {tmp}/afile/out cannot be created below it")
def output_below_a_file(c: Case):
    (c.tmp / "afile").write_text("a file where a folder is needed")
    c.out = c.tmp / "afile/out"
    c.set(**{"output.uri": str(c.out)})


@case("output.uri: {tmp}/loop is a symbolic link loop")
def output_is_a_symlink_loop(c: Case):
    (c.tmp / "loop").symlink_to(c.tmp / "loop")
    c.set(**{"output.uri": str(c.tmp / "loop")})


@case("output.uri: /proc/self/qvlm-out (which is /proc/", "is on the kernel's /proc file system, not a disk")
def output_under_proc(c: Case):
    c.set(**{"output.uri": "/proc/self/qvlm-out"})


@case("output.endpoint_url: must not hold a user or password (user:password@)", "AWS credential chain",
      "(got 'http://[REDACTED]@127.0.0.1:9')")
def endpoint_with_a_password(c: Case):
    c.set(**{"output.uri": "s3://bucket/out", "output.endpoint_url": f"http://qvlm:{PASSWORD}@127.0.0.1:9"})


# bounds: the job file, numbers, calibration size

@case("{job}: expands to more than 10000 YAML values once its aliases (*name) are expanded")
def yaml_alias_bomb(c: Case):
    c.text = _alias_bomb()


@case("{job}: expands to more than 10000 YAML values", "or an alias refers to itself")
def yaml_alias_that_contains_itself(c: Case):
    c.text = yaml.safe_dump(c.data) + "loop: &loop [*loop]\n"


@case("{job}: the job file is larger than 1024 KiB")
def job_file_too_large(c: Case):
    c.text = yaml.safe_dump(c.data) + "#" * (1 << 20) + "\n"


@case("calibration.seed: must be between 0 and 4294967295", "(got 18446744073709551616)")
def seed_beyond_what_the_generators_take(c: Case):
    c.set(**{"calibration.seed": 2**64})


@case("resources.cpus_per_worker: should be a finite number (got inf)")
def infinite_cpus(c: Case):
    c.set(**{"resources.cpus_per_worker": math.inf})


@case("resources.cpus_per_worker: should be a finite number (got nan)")
def nan_cpus(c: Case):
    c.set(**{"resources.cpus_per_worker": math.nan})


@case("quantization.qvlm.h0: must be \"auto\" or a finite number >= 0 (got inf)")
def infinite_threshold(c: Case):
    c.set(**{"quantization.qvlm.h0": math.inf})


@case("quantization.mixed_precision.extra_budget: should be a finite number (got nan)")
def nan_budget(c: Case):
    c.set(**{"quantization.mixed_precision.extra_budget": math.nan})


@case("calibration.samples: 10000000 samples of up to 64 tokens", "more than this host's",
      "samples fit: lower calibration.samples")
def calibration_larger_than_memory(c: Case):
    # The JSONL file holds 4 records: had records been built first, the error would say so.
    c.calibration(['{"text": "a circle"}'] * 4)
    c.set(**{"calibration.samples": 10_000_000})


# what the model supports

@case("{model}/config.json: unsupported architecture: T5ForConditionalGeneration is an encoder-decoder model",
      "qvlm supports decoder LLMs (e.g. LlamaForCausalLM), LLaVA-style vision-language models")
def encoder_decoder_model(c: Case):
    from transformers import T5Config, T5ForConditionalGeneration

    c.model = c.tmp / "t5"
    T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                        num_heads=4)).save_pretrained(c.model)
    c.set(**{"model.path": str(c.model)})


@case("quantization.ignore: 'mlp.up_prj' matches no module of this LlavaForConditionalGeneration",
      "closest module names: mlp.up_proj", "fix the entry or remove it")
def ignore_name_with_a_typo(c: Case):
    c.set(**{"quantization.ignore": ["lm_head", "mlp.up_prj"]})


@case("quantization.ignore: 're:model.visual.*' matches no module", "fix the pattern")
def ignore_pattern_matching_nothing(c: Case):
    c.set(**{"quantization.ignore": ["re:model.visual.*"]})


@case("model.path: {tmp}/loop is a symbolic link loop")
def model_is_a_symlink_loop(c: Case):
    (c.tmp / "loop").symlink_to(c.tmp / "loop")
    c.set(**{"model.path": str(c.tmp / "loop")})


@case("model.path: /proc/self (which is /proc/", "is on the kernel's /proc file system, not a disk")
def model_under_proc(c: Case):
    c.set(**{"model.path": "/proc/self"})


@case("corrupt safetensors header in {model}/model-00002-of-", "overlap", "re-download the model")
def safetensors_tensors_overlap(c: Case):
    def alias_second_onto_first(header: dict) -> None:
        names = sorted((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"][0])
        first, second = header[names[0]], header[names[1]]
        size = first["data_offsets"][1] - first["data_offsets"][0]
        # the second tensor's bytes start inside the first's, keeping its own length (so only the overlap is wrong)
        length = second["data_offsets"][1] - second["data_offsets"][0]
        second["data_offsets"] = [size // 2, size // 2 + length]
    rewrite_shard(c.copy_model(), rewrite_header(alias_second_onto_first))


@case("calibration.data: none of the 4 calibration records has an image",
      "drop projector and vision from quantization.targets")
def text_only_records_for_a_vision_target(c: Case):
    c.calibration(['{"text": "a circle"}'] * 4)


@pytest.mark.parametrize("setup, code, needles", CASES)
def test_bad_input_gets_one_clear_line_and_writes_nothing(tmp_path, tiny_llava_dir, setup, code, needles):
    c = Case(tmp_path, Path(tiny_llava_dir))
    try:
        setup(c)
        job = c.write()
        before, model = snapshot(tmp_path), digests(Path(tiny_llava_dir))
        result = runner.invoke(app, ["submit", str(job)])
        line = error_line(result, code)
        for needle in needles:
            assert needle.format(**c.names()) in line, line
        assert PASSWORD not in result.output
        assert snapshot(tmp_path) == before  # the output, the model copy and everything beside them
        assert digests(Path(tiny_llava_dir)) == model
    finally:
        for cleanup in c.cleanups:
            cleanup()


def test_there_are_at_least_thirty_cases():
    assert len(CASES) >= 30


def test_debug_shows_the_traceback(tmp_path, tiny_llava_dir):
    c = Case(tmp_path, Path(tiny_llava_dir))
    corrupt_safetensors_header(c)
    result = runner.invoke(app, ["submit", str(c.write()), "--debug"])
    assert result.exit_code == 2
    assert "Traceback (most recent call last)" in result.output and "CheckpointError: corrupt" in result.output
    assert result.output.rstrip().splitlines()[-1].startswith("error: model.path: corrupt safetensors header")
    assert not c.out.exists()


def test_plan_refuses_bad_input_the_same_way(tmp_path, tiny_llava_dir):
    c = Case(tmp_path, Path(tiny_llava_dir))
    record_with_a_missing_image(c)
    line = error_line(runner.invoke(app, ["plan", str(c.write())]), 2)
    assert f"calibration file {tmp_path}/cal.jsonl, line 2" in line
    assert not c.out.exists()


def test_a_file_removed_from_the_model_is_noticed_after_an_earlier_run(tmp_path, tiny_llava_dir):
    # The model's small files are cached per model URI between runs; the cache must not hide a removal.
    c = Case(tmp_path, Path(tiny_llava_dir))
    c.copy_model()
    assert runner.invoke(app, ["plan", str(c.write())]).exit_code == 0
    (c.model / "config.json").unlink()
    line = error_line(runner.invoke(app, ["submit", str(c.job)]), 2)
    assert f"{c.model}/config.json: not found" in line
    assert not c.out.exists()


def test_bad_override_on_the_command_line(tmp_path, tiny_llava_dir):
    c = Case(tmp_path, Path(tiny_llava_dir))
    line = error_line(runner.invoke(app, ["submit", str(c.write()), "--set", "quantization.weights.bits=1"]), 2)
    assert "quantization.weights.bits: should be greater than or equal to 2 (got 1) " in line
    assert "(from --set quantization.weights.bits=1)" in line
    assert not c.out.exists()


def test_plan_bounds_the_calibration_records_it_would_build(tmp_path, tiny_llava_dir):
    # qvlm plan (and a cluster submission) cannot know the workers' memory, but it builds every record and batch
    # on this host, so those must fit here; the message counts only them.
    c = Case(tmp_path, Path(tiny_llava_dir))
    c.set(**{"calibration.samples": 10_000_000})
    line = error_line(runner.invoke(app, ["plan", str(c.write())]), 2)
    assert "calibration.samples: 10000000 samples of up to 64 tokens (plus 0 held out) need about" in line
    assert "for the records and their batches, more than this host's" in line and "samples fit" in line


def test_an_alias_bomb_in_an_override_is_refused(tmp_path, tiny_llava_dir):
    c = Case(tmp_path, Path(tiny_llava_dir))
    bomb = "[" + ", ".join(["&a [x, x, x, x, x, x, x, x, x, x]"] + ["*a"] * 9) + "]"
    bomb = "{" + ", ".join(f"k{i}: &b{i} " + (bomb if i == 0 else "[" + ", ".join([f"*b{i - 1}"] * 10) + "]")
                           for i in range(5)) + "}"
    line = error_line(runner.invoke(app, ["plan", str(c.write()), "--set", f"quantization.ignore={bomb}"]), 2)
    assert line.startswith("error: --set quantization.ignore=") and "expands to more than 10000 YAML values" in line


def test_missing_job_file(tmp_path):
    line = error_line(runner.invoke(app, ["submit", str(tmp_path / "nope.yaml")]), 2)
    assert line.startswith(f"error: {tmp_path}/nope.yaml: job file not found (working directory: ")


# ---- S3 (moto over HTTP on 127.0.0.1) -----------------------------------------------------------------


def _upload(s3, folder: Path, bucket: str, prefix: str) -> None:
    for path in folder.iterdir():
        s3.upload_file(str(path), bucket, f"{prefix}/{path.name}")


def _keys(s3, bucket: str) -> list[str]:
    return sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", []))


@pytest.fixture()
def s3(s3_server):
    import boto3

    return boto3.session.Session().client("s3", endpoint_url=s3_server, region_name="us-east-1")


def test_model_bucket_that_does_not_exist(tmp_path, tiny_llava_dir, s3_server, s3_bucket, s3):
    c = Case(tmp_path, Path(tiny_llava_dir))
    c.set(**{"model.path": "s3://qvlm-no-such-bucket/models/tiny", "output.uri": f"s3://{s3_bucket}/out",
             "output.endpoint_url": s3_server})
    line = error_line(runner.invoke(app, ["submit", str(c.write())]), 2)
    assert "model.path: bucket 'qvlm-no-such-bucket' does not exist (create it or fix" in line
    assert _keys(s3, s3_bucket) == []


def test_output_bucket_that_does_not_exist(tmp_path, tiny_llava_dir, s3_server, s3):
    c = Case(tmp_path, Path(tiny_llava_dir))
    c.set(**{"output.uri": "s3://qvlm-no-such-bucket/out", "output.endpoint_url": s3_server})
    line = error_line(runner.invoke(app, ["submit", str(c.write())]), 2)
    assert "output.uri: bucket 'qvlm-no-such-bucket' does not exist (create it or fix output.uri" in line
    assert "qvlm-no-such-bucket" not in [b["Name"] for b in s3.list_buckets()["Buckets"]]


def test_missing_credentials(tmp_path, tiny_llava_dir, s3_server, s3_bucket, s3, monkeypatch):
    _upload(s3, Path(tiny_llava_dir), s3_bucket, "models/tiny")
    before = _keys(s3, s3_bucket)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    c = Case(tmp_path, Path(tiny_llava_dir))
    c.set(**{"model.path": f"s3://{s3_bucket}/models/tiny", "output.uri": f"s3://{s3_bucket}/out",
             "output.endpoint_url": s3_server})
    line = error_line(runner.invoke(app, ["submit", str(c.write())]), 2)
    assert "output.uri: no AWS credentials found: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY" in line
    assert _keys(s3, s3_bucket) == before


# ---- found only by running the model: exit 1, and the state file is all that is written --------------


@pytest.mark.slow
def test_failure_found_mid_job_leaves_only_the_state_file(tmp_path, tiny_llava_dir, local_ray):
    c = Case(tmp_path, Path(tiny_llava_dir))
    # The processor expands <image> into token 4; a config expecting another id finds no image tokens,
    # which only the model's forward pass notices.
    c.edit_config(lambda cfg: cfg.update(image_token_index=3))
    line = error_line(runner.invoke(app, ["submit", str(c.write())]), 1)
    assert line == "error: Image features and image tokens do not match, tokens: 0, features: 8192"
    assert_only_the_failed_state(c.out)
    state = json.loads((c.out / "_qvlm/state.json").read_text())
    assert state["phase"] == "failed" and "Image features and image tokens do not match" in state["error"]
    status = runner.invoke(app, ["status", str(c.out)])
    assert status.exit_code == 1 and "failed" in status.output


def assert_only_the_failed_state(out: Path) -> None:
    """A job that failed mid-run left its state file, and the driver's ledger that vouches for it, nothing else."""
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert len(files) == 2 and files[0].startswith("_qvlm/state.json") and files[1].startswith(LEDGER_PREFIX), files
    assert json.loads((out / files[1]).read_text())["keys"] == ["_qvlm/state.json"]


@pytest.mark.slow
def test_non_finite_weights_stop_the_job_before_anything_is_exported(tmp_path, tiny_llava_dir, local_ray):
    from safetensors.torch import load_file, save_file

    c = Case(tmp_path, Path(tiny_llava_dir))
    path = shard(c.copy_model(), 2)
    tensors = load_file(path)
    name = next(n for n, t in sorted(tensors.items()) if t.is_floating_point() and t.numel() > 1)
    tensors[name].view(-1)[1] = math.nan
    save_file(tensors, str(path), metadata={"format": "pt"})
    model = digests(c.model)
    line = error_line(runner.invoke(app, ["submit", str(c.write())]), 2)  # found by the stage that loads it
    assert f"non-finite weights in {path}: tensor '{name}' holds 1 NaN and 0 infinite values" in line
    assert_only_the_failed_state(c.out)  # no block shard, no checkpoint file, no manifest
    state = json.loads((c.out / "_qvlm/state.json").read_text())
    assert state["phase"] == "failed" and f"tensor '{name}'" in state["error"]
    assert digests(c.model) == model
