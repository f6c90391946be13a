"""Nothing the user owns is ever deleted or written outside the output (issue 15, part A), through the real
command line and the real driver:

- an output that is, holds or lies inside the model folder, or holds the calibration file or one of its
  images, is refused (exit 2) before anything is touched, whatever ``output.overwrite`` says;
- overwrite deletes only files a qvlm ledger, manifest or record lists; an output holding any other file is
  refused, naming it, even with overwrite; a job that died before its manifest is still recognised;
- a symbolic link inside the output (``_qvlm -> elsewhere``) is refused, and nothing is written through it.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from PIL import Image
from pydantic import ValidationError
from typer.testing import CliRunner

from cluster.output import foreign_keys
from jobs.cli import app
from qvlm.errors import exit_code
from jobs.spec import JobSpec
from tests.job_files import set_fields
from tests.test_bad_input import BASE_JOB, digests, error_line, snapshot
from workers.storage import LEDGER_PREFIX, LocalStorage, UnsafePath, open_output

runner = CliRunner()
SPEC_A, SPEC_B = "a" * 64, "b" * 64


def _job(tmp: Path, model: Path | str, out: Path | str, **changes) -> Path:
    job = json.loads(json.dumps(BASE_JOB))
    job["model"], job["output"] = {"path": str(model)}, {"uri": str(out), "overwrite": True}
    set_fields(job, **changes)
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def _refused(tmp: Path, job: Path, *needles: str, model: Path) -> None:
    """The job exits 2 with one line holding ``needles``, and nothing in ``tmp`` or the model changed."""
    before, model_before = snapshot(tmp), digests(model)
    result = runner.invoke(app, ["submit", str(job)])
    line = error_line(result, 2)
    for needle in needles:
        assert needle in line, line
    assert snapshot(tmp) == before and digests(model) == model_before


@pytest.fixture()
def model(tmp_path, tiny_llava_dir) -> Path:
    """A private copy of the tiny LLaVA: these tests point outputs at it."""
    import shutil

    return Path(shutil.copytree(tiny_llava_dir, tmp_path / "model"))


# ---- the output never overlaps the inputs --------------------------------------------------------------


def test_output_that_is_the_model_folder_is_refused_even_with_overwrite(tmp_path, model):
    job = _job(tmp_path, model, model)
    _refused(tmp_path, job, f"output.uri: {model} is model.path {model}; write the output outside the model folder",
             model=model)


def test_output_inside_the_model_folder_is_refused_even_with_overwrite(tmp_path, model):
    job = _job(tmp_path, model, model / "w4")
    _refused(tmp_path, job, f"output.uri: {model}/w4 is inside model.path {model}", model=model)


def test_output_holding_the_model_folder_is_refused_even_with_overwrite(tmp_path, model):
    job = _job(tmp_path, model, tmp_path)
    _refused(tmp_path, job, f"output.uri: {tmp_path} contains model.path {model}", model=model)


@pytest.mark.parametrize("how", ["link", "dotdot"])
def test_paths_are_compared_after_resolving_links_and_dots(tmp_path, model, how):
    if how == "link":
        (tmp_path / "alias").symlink_to(model)
        out = shown = tmp_path / "alias"
    else:  # the job file's paths are normalised when read, so the message shows the folder itself
        (tmp_path / "elsewhere").mkdir()
        out, shown = f"{tmp_path}/elsewhere/../model", model
    job = _job(tmp_path, model, out)
    _refused(tmp_path, job, f"output.uri: {shown} is model.path {model}", model=model)


def test_s3_output_holding_the_model_prefix_is_refused(tmp_path, model):
    job = _job(tmp_path, "s3://models/llava", "s3://models", **{"output.endpoint_url": "http://127.0.0.1:9"})
    _refused(tmp_path, job, "output.uri: s3://models contains model.path s3://models/llava", model=model)


def test_the_jobs_api_entry_validates_the_same_way(tmp_path):
    # jobs/entry.py rebuilds the spec on the cluster with JobSpec.model_validate: the same rule applies there.
    with pytest.raises(ValidationError, match="is model.path"):
        JobSpec.model_validate({"name": "x", "model": {"path": str(tmp_path)},
                                "output": {"uri": str(tmp_path), "overwrite": True}})


def test_output_holding_the_calibration_file_is_refused(tmp_path, model):
    out = tmp_path / "out"
    out.mkdir()
    (out / "cal.jsonl").write_text('{"text": "a circle"}\n' * 4)
    job = _job(tmp_path, model, out, **{"calibration.data": str(out / "cal.jsonl")})
    _refused(tmp_path, job, f"output.uri: {out} contains calibration.data {out}/cal.jsonl", model=model)


def test_output_that_is_the_calibration_file_is_refused(tmp_path, model):
    (tmp_path / "cal.jsonl").write_text('{"text": "a circle"}\n' * 4)
    job = _job(tmp_path, model, tmp_path / "cal.jsonl", **{"calibration.data": str(tmp_path / "cal.jsonl")})
    _refused(tmp_path, job, f"output.uri: {tmp_path}/cal.jsonl is calibration.data {tmp_path}/cal.jsonl", model=model)


def test_output_holding_an_image_the_records_use_is_refused(tmp_path, model):
    out, data = tmp_path / "out", tmp_path / "data"
    out.mkdir()
    data.mkdir()
    Image.new("RGB", (32, 32), "red").save(out / "red.png")
    (data / "cal.jsonl").write_text('{"image": "../out/red.png", "text": "a"}\n' * 4)
    job = _job(tmp_path, model, out, **{"calibration.data": str(data / "cal.jsonl")})
    _refused(tmp_path, job, f"output.uri: {out} contains the image {data}/../out/red.png that calibration.data uses",
             model=model)


def test_a_model_folder_made_of_links_still_works(tmp_path, tiny_llava_dir):
    # A Hugging Face cache snapshot is a folder of links into the cache's blobs: qvlm follows links in the model
    # (it only reads there), never in the output.
    blobs, snapshot_dir = tmp_path / "blobs", tmp_path / "snapshot"
    blobs.mkdir()
    snapshot_dir.mkdir()
    for path in Path(tiny_llava_dir).iterdir():
        (blobs / path.name).write_bytes(path.read_bytes())
        (snapshot_dir / path.name).symlink_to(blobs / path.name)
    result = runner.invoke(app, ["plan", str(_job(tmp_path, snapshot_dir, tmp_path / "out"))])
    assert result.exit_code == 0, result.output
    assert "model: LlavaForConditionalGeneration" in result.output and not (tmp_path / "out").exists()


# ---- overwrite deletes only what qvlm wrote ------------------------------------------------------------


def _settings(model: Path, out: Path, spec_hash: str, overwrite: bool):
    from cluster.job import Job
    from workers.locations import Locations
    from qvlm.config import CalibrationSettings
    from qvlm.config import QuantConfig

    return Job("second", spec_hash, Locations(str(model), str(out)), CalibrationSettings(samples=4, eval_samples=0),
               QuantConfig(), overwrite=overwrite)


def _crashed_run(out: Path) -> list[str]:
    """What a run of job A that died before its manifest leaves, written through real ledgered writers."""
    driver, block, export = open_output(str(out)), open_output(str(out)), open_output(str(out))
    state = {"name": "job-a", "spec_hash": SPEC_A, "phase": "committing"}
    driver.put_bytes("_qvlm/state.json", json.dumps(state).encode())
    block.put_bytes("_qvlm/blocks/block-00000.safetensors", b"shard")
    block.put_bytes("_qvlm/blocks/block-00000.json", json.dumps({"shard_key": "_qvlm/blocks/block-00000.safetensors"}).encode())
    export.put_bytes("model-00001-of-00002.safetensors", b"packed")
    export.put_bytes("tokenizer.json", b"{}")
    return sorted(LocalStorage(out).list(""))


def test_an_unfinished_run_is_recognised_by_its_ledgers_alone(tmp_path):
    out = tmp_path / "out"
    keys = _crashed_run(out)
    assert foreign_keys(LocalStorage(out), keys) == []
    (out / "notes.txt").write_text("mine")
    assert foreign_keys(LocalStorage(out), keys + ["notes.txt"]) == ["notes.txt"]


def test_overwrite_refuses_an_output_holding_a_file_qvlm_did_not_write(tmp_path, model):
    from cluster.driver import _claim_output
    from cluster.output import OutputRefused

    out = tmp_path / "out"
    _crashed_run(out)
    (out / "notes.txt").write_text("mine")
    (out / "_qvlm/blocks/notes.txt").write_text("mine too")
    expected = (f"output.uri: {out} holds 2 files qvlm did not write (_qvlm/blocks/notes.txt, notes.txt); qvlm never "
                "deletes or overwrites them, even with output.overwrite: true")
    _refused(tmp_path, _job(tmp_path, model, out), expected, model=model)
    before = snapshot(out)
    with pytest.raises(OutputRefused) as refused:  # the driver applies the same rule, with the same words
        _claim_output(open_output(str(out)), _settings(model, out, SPEC_B, overwrite=True))
    assert refused.value.exit_code == 2 and str(refused.value).startswith(expected)
    assert snapshot(out) == before


def test_overwrite_deletes_exactly_what_the_earlier_run_wrote(tmp_path, model):
    from cluster.driver import _claim_output

    out = tmp_path / "out"
    _crashed_run(out)
    assert _claim_output(open_output(str(out)), _settings(model, out, SPEC_B, overwrite=True)) is None
    assert LocalStorage(out).list("") == []


def test_overwrite_of_an_output_from_before_the_ledgers_uses_its_manifest_and_records(tmp_path, model):
    from cluster.driver import _claim_output

    out = LocalStorage(tmp_path / "out")
    out.put_bytes("_qvlm/state.json", json.dumps({"name": "job-a", "spec_hash": SPEC_A, "phase": "finished"}).encode())
    out.put_bytes("_qvlm/blocks/block-00000.json", json.dumps({"shard_key": "_qvlm/blocks/block-00000.safetensors"}).encode())
    out.put_bytes("_qvlm/blocks/block-00000.safetensors", b"shard")
    out.put_bytes("config.json", b"{}")
    out.put_bytes("qvlm_manifest.json", json.dumps({"files": {"config.json": {}}}).encode())
    out.put_bytes("extra.bin", b"the user's")
    with pytest.raises(Exception, match=r"holds 1 file qvlm did not write \(extra.bin\)"):
        _claim_output(open_output(out.uri), _settings(model, out.root, SPEC_B, overwrite=True))
    out.delete("extra.bin")
    _claim_output(open_output(out.uri), _settings(model, out.root, SPEC_B, overwrite=True))
    assert out.list("") == []


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_real_job_ledgers_every_file_it_writes(tmp_path, model, local_ray):
    """Run a job through the CLI, then take its manifest away (as if it died before the commit): its ledgers
    alone still vouch for every file, so overwrite can replace it; a file of the user's stops that."""
    from cluster.driver import _claim_output

    out = tmp_path / "out"
    job = _job(tmp_path, model, out)
    before = digests(model)
    result = runner.invoke(app, ["submit", str(job)])
    assert result.exit_code == 0, result.output
    assert digests(model) == before
    (out / "qvlm_manifest.json").unlink()
    store = LocalStorage(out)
    keys = store.list("")
    assert any(k.startswith(LEDGER_PREFIX) for k in keys) and "model.safetensors.index.json" in keys
    assert foreign_keys(store, keys) == []
    (out / "notes.txt").write_text("mine")
    _refused(tmp_path, _job(tmp_path, model, out, **{"name": "another-job"}),
             f"output.uri: {out} holds 1 file qvlm did not write (notes.txt)", model=model)
    (out / "notes.txt").unlink()
    _claim_output(open_output(str(out)), replace(_settings(model, out, SPEC_B, overwrite=True), name="another"))
    assert store.list("") == [] and digests(model) == before


# ---- no link inside the output is followed -------------------------------------------------------------


@pytest.fixture()
def linked(tmp_path):
    """out/_qvlm is a link to a folder elsewhere that holds a state file (of this very job, so that following
    the link would look like a resume)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "state.json").write_text(json.dumps({"name": "bad-input", "spec_hash": SPEC_A, "phase": "failed"}))
    out = tmp_path / "out"
    out.mkdir()
    (out / "_qvlm").symlink_to(elsewhere)
    return out, elsewhere


def test_a_linked_qvlm_folder_is_refused_by_the_cli(tmp_path, model, linked):
    out, _ = linked
    _refused(tmp_path, _job(tmp_path, model, out),
             f"output.uri: {out}/_qvlm is a symbolic link; qvlm never follows links inside {out}", model=model)


@pytest.mark.parametrize("link", ["_qvlm", "_qvlm/blocks"])
def test_the_driver_writes_nothing_through_a_link(tmp_path, model, linked, link):
    from cluster.driver import run_job

    out, elsewhere = linked
    if link != "_qvlm":
        (out / "_qvlm").unlink()
        (out / "_qvlm").mkdir()
        (out / link).symlink_to(elsewhere)
    before = snapshot(tmp_path)
    with pytest.raises(UnsafePath, match=f"{out}/{link} is a symbolic link") as refused:
        run_job(_settings(model, out, SPEC_A, overwrite=True))
    assert exit_code(refused.value) == 2
    assert snapshot(tmp_path) == before  # nothing in elsewhere, nothing left in the output either
