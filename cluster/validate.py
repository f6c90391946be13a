"""Everything about a job's inputs that can be checked before any cluster work, checked once: the model folder,
its config and safetensors headers, the output location (the rule of cluster/output.py), the calibration size
against memory, the calibration records and their batches, group sizes against the layers, and VEO's limits.
Each problem is one line naming the field or file (an InputError, exit 2); nothing is written. ``validate``
returns the job's plan, which the driver then runs: ``qvlm plan`` prints it, ``qvlm-submit`` runs it, and a
driver submitted to a cluster validates again there, where the job's inputs are read.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from qvlm.errors import InputError
from cluster.gate import check_gate_applies
from cluster.job import Job
from cluster.places import output_meets
from cluster.memory import check_memory
from cluster.plan import JobPlan, host_memory, inspect_model, record_bytes


def validate(job: Job, local_run: bool = False) -> JobPlan:
    """The job's plan, once every input has been checked without loading weights. ``local_run``: the stage
    workers will run on this host (an embedded local Ray), so what they capture must fit in its memory."""
    _check_model_path(job.where.model_uri)
    _check_output_apart_from_images(job)
    with _storage_problem("output.uri"):
        _check_output(job)
    with _storage_problem("model.path"):
        plan, config_dir = inspect_model(job)
    _check_group_sizes(plan, job.quant)
    _check_calibration_size(plan, job.calibration)
    _check_memory(plan, job, local_run)
    records = _calibration_records(job)
    _check_records_reach_units(plan, records)
    _check_veo(plan, job.quant)
    check_gate_applies(job.gate, records[1])
    _check_batches(config_dir, records, job)
    return plan


def _check_group_sizes(plan, quant) -> None:
    for name, (_, in_features) in plan.linear_shapes.items():
        try:
            quant.weights.groups(in_features)
        except ValueError as exc:
            raise InputError(f"quantization.weights.group_size: {exc} (layer {name})") from None


def _check_calibration_size(plan, cal) -> None:
    """Every calibration record and batch is built on this host, before a single one is: they must fit here."""
    memory = host_memory()
    per_sample = record_bytes(plan, cal.max_length)
    need = (cal.samples + cal.eval_samples) * per_sample
    if need <= memory:
        return
    fit = max(0, memory // per_sample - cal.eval_samples)
    raise InputError(f"calibration.samples: {cal.samples} samples of up to {cal.max_length} tokens (plus "
                     f"{cal.eval_samples} held out) need about {need / 2**30:.1f} GiB for the records and their "
                     f"batches, more than this host's {memory / 2**30:.1f} GiB; at most {fit} samples fit: lower "
                     "calibration.samples (or calibration.max_length)")


def _check_memory(plan, job: Job, local_run: bool) -> None:
    """Each stage's weights, captures and search workspace against a worker's memory: its GPU's when the job
    reserves GPUs and resources.gpu_memory_gb says how much one has, this host's in a local run (its stages
    share it). Where neither is known here, the stages check what they have when they start."""
    gpu = job.resources.gpus_per_worker > 0
    device = int(job.resources.gpu_memory_gb * 2**30) if gpu and job.resources.gpu_memory_gb else None
    check_memory(plan, job.calibration, job.quant, gpu, device, host_memory() if local_run else None)


def _calibration_records(job):
    from qvlm.batches import records_for
    from qvlm.calibration import CalibrationError

    try:
        return records_for(job.calibration)
    except CalibrationError as exc:
        raise InputError(f"calibration.data: {exc}") from exc


def _check_records_reach_units(plan, records) -> None:
    """Units of the vision tower and the projector see only images: text-only records leave them uncaptured."""
    from cluster.plan import image_units

    needing = image_units(plan)
    calibration = records[0]
    if needing and not any(r.image is not None for r in calibration):
        segments = sorted({u.segment for u in needing})
        raise InputError(f"calibration.data: none of the {len(calibration)} calibration records has an image, but "
                         f"quantization.targets quantizes the {' and '.join(segments)} units of this "
                         f"{plan.model_class} ({len(needing)} units), which only images reach; give the records "
                         f"an \"image\", or drop {' and '.join(segments)} from quantization.targets")


def _check_output_apart_from_images(job) -> None:
    """The output must not be, or hold, an image the calibration records use (overwrite could delete it)."""
    from qvlm.calibration import image_files


    for image in image_files(job.calibration.data):
        how = output_meets(job.where.output_uri, str(image))
        if how in ("is", "contains"):
            raise InputError(f"output.uri: {job.where.output_uri} {how} the image {image} that calibration.data "
                             f"uses; write the output where it holds none of the job's inputs")


def _check_veo(plan, quant) -> None:
    if not quant.veo.enabled:
        return
    if not any(u.segment == "vision" for u in plan.units):
        raise InputError(f"quantization.qvlm.veo.enabled: the model ({plan.model_class}) has no vision tower "
                         "among its quantized units; turn veo off")


@contextmanager
def _storage_problem(field: str):
    """Storage errors met while checking a job's inputs are input errors about ``field`` (a missing bucket,
    no credentials, a corrupt checkpoint)."""
    from workers.storage import StorageError as WorkerStorageError

    try:
        yield
    except WorkerStorageError as exc:
        raise InputError(f"{field}: {exc}") from exc


def _check_model_path(uri: str) -> None:
    if uri.startswith("s3://"):
        return
    path = Path(uri)
    if "/" in uri and not uri.startswith(("/", ".")) and not path.exists():
        raise InputError(f"model.path: {uri} is not a local directory or s3:// prefix; "
                         "download hub models first (huggingface-cli download NAME --local-dir DIR)")
    if not path.exists():
        raise InputError(f"model.path: directory {uri} does not exist; fix the path (relative paths resolve "
                         "against the job file's folder)")
    if not path.is_dir():
        raise InputError(f"model.path: {uri} is a file, not a model folder; point it at the folder that holds "
                         "config.json and the safetensors files")


def _check_output(job) -> None:
    """The output is a folder or S3 prefix we can read (a missing bucket or credentials fail here) and write,
    holding no file qvlm did not write, and empty or holding this job unless ``output.overwrite`` (the rule of
    cluster/output.py, which the driver checks again under its lock). Read-only."""
    from cluster.output import OutputRefused, claim_output
    from workers.storage import open_storage

    uri = job.where.output_uri
    if not uri.startswith("s3://"):
        _check_local_output(Path(uri))
    try:
        claim_output(open_storage(uri, job.where.output_endpoint), uri, job.spec_hash, job.overwrite)
    except OutputRefused as exc:
        raise InputError(str(exc)) from None


def _check_local_output(path: Path) -> None:
    """A local output is a folder, or can be made one: its nearest existing folder above is writable."""
    if path.is_symlink() and not path.exists():
        raise InputError(f"output.uri: {path} is a symbolic link to nothing; remove it or choose another output.uri")
    if path.exists() and not path.is_dir():
        raise InputError(f"output.uri: {path} is a file; give a folder (it is created if missing)")
    existing = next(p for p in (path, *path.parents) if p.exists() or p.is_symlink())
    if not existing.is_dir():
        raise InputError(f"output.uri: {existing} is a file, so {path} cannot be created below it; give a folder path")
    if not os.access(existing, os.W_OK | os.X_OK):
        why = "a read-only file system" if os.statvfs(existing).f_flag & os.ST_RDONLY else "this user may not write there"
        raise InputError(f"output.uri: cannot write in {existing} ({why}); choose an output.uri where this user can "
                         "write")


def _check_batches(config_dir: Path, records, job) -> None:
    """Build the calibration and held-out batches as the stages will (image tokens against max_length,
    records with and without images in one batch, a vision encoder given text-only records)."""
    from qvlm.batches import load_preprocessor, make_batches_of

    try:
        kind, preprocessor = load_preprocessor(config_dir)
    except (OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"model.path: cannot load the tokenizer or processor of {job.where.model_uri} ({first}); "
                         "copy the tokenizer and processor files saved with the model into that folder") from None
    for part in records:
        if part:
            make_batches_of(kind, preprocessor, part, job.calibration)
