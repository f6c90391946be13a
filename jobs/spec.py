"""The job file (``job.yaml``): pydantic models, loading with ``--set`` overrides, and error lines of the
form ``FILE:LINE: dotted.path: message``.

Validation here is pure apart from resolving paths (symlinks included) to see whether the output meets the
model or the calibration data: whether the model or the calibration file exists is checked later, against
the real inputs. Every default comes from the typed job it compiles to (``qvlm.config`` for the method and the
calibration, ``cluster.job.Resources`` for the resources): :meth:`JobSpec.compile` gives that job. The job
file is read with bounds (size, and YAML nodes after alias expansion), so no job file can hang the loader.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Sequence

import yaml
from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError,
                      ValidationInfo, field_validator)

from cluster.job import Gate, Job, Resources, spec_hash_of
from cluster.places import meets as _meets, place as _place
from qvlm.config import CalibrationSettings, MixedPrecisionConfig, QuantConfig, VeoConfig
from qvlm.errors import InputError
from qvlm.quant import SHRINK_MAX, SHRINK_STEPS, ActScheme, WeightScheme, shrink_grid
from workers.locations import Locations

_CAL, _QUANT, _RES = CalibrationSettings(), QuantConfig(), Resources()  # the one source of every default

Segment = Literal["vision", "projector", "language"]
_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_LOCAL_FORMS = "a local path, file:///absolute/path or s3://bucket/prefix"
_MODEL_FORMS = "a local directory, a Hugging Face hub id (org/name) or s3://bucket/prefix"
MAX_JOB_BYTES = 1 << 20  # a job file is a few hundred bytes
MAX_YAML_NODES = 10_000  # after alias expansion; a job file has a few hundred
MAX_SEED = 2**32 - 1  # every seed qvlm passes on (random, numpy, torch) accepts 0 .. 2**32 - 1
_PSEUDO_FILESYSTEMS = ("/proc", "/sys", "/dev")


class JobSpecError(InputError):
    """The job file or a ``--set`` override is invalid (lines read ``FILE:LINE: dotted.path: message``)."""


class FieldProblem(ValueError):
    """A cross-field error raised on a parent field; ``at`` is the sub-path it is really about."""

    def __init__(self, at: tuple[str, ...], message: str):
        super().__init__(f"{'.'.join(at)}: {message}")
        self.at, self.message = at, message


def _check_uri(value: str, forms: str, schemes: tuple[str, ...] = ("s3", "file")) -> str:
    if not value.strip():
        raise ValueError(f"must not be empty; use {forms}")
    scheme, sep, rest = value.partition("://")
    if not sep:
        return value
    if scheme not in schemes:
        raise ValueError(f"unsupported URI scheme {scheme}://; use {forms}")
    if scheme == "s3" and not rest.split("/", 1)[0]:
        raise ValueError("s3 URI has no bucket; write s3://BUCKET/prefix")
    if scheme == "file" and not rest.startswith("/"):
        raise ValueError("a file URL must be absolute: file:///absolute/path")
    return value


def _unique_nonempty(values: tuple, what: str) -> tuple:
    if not values:
        raise ValueError(f"must not be empty; list at least one {what}")
    dups = [v for i, v in enumerate(values) if v in values[:i]]
    if dups:
        raise ValueError(f"duplicate entries {', '.join(map(repr, dict.fromkeys(dups)))}; list each once")
    return values


def _check_local_place(value: str, what: str) -> str:
    """A local path must resolve (no symlink loop) and lie on a real disk, not on /proc, /sys or /dev."""
    place = _place(value)
    if place and place[0] == "/":
        resolved = "/" + "/".join(place[1:])
        pseudo = next((p for p in _PSEUDO_FILESYSTEMS if resolved == p or resolved.startswith(p + "/")), None)
        if pseudo:
            shown = value if resolved == value else f"{value} (which is {resolved})"
            raise ValueError(f"{shown} is on the kernel's {pseudo} file system, not a disk; point it at {what}")
    return value


class Strict(BaseModel):
    # every float field of the job file is a finite number (.inf and .nan are refused, naming the field)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ModelSpec(Strict):
    path: StrictStr
    revision: Optional[StrictStr] = None  # refused: see _revision
    trust_remote_code: StrictBool = False
    endpoint_url: Optional[StrictStr] = None  # the model's S3 endpoint (default: output.endpoint_url)

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        return _check_local_place(_check_uri(value, _MODEL_FORMS), "the model's folder")

    @field_validator("revision")
    @classmethod
    def _revision(cls, value: Optional[str]) -> Optional[str]:
        if value is not None:
            raise ValueError("qvlm reads a model from a local folder or an S3 prefix, which have no revisions; "
                             "download the revision you want first (huggingface-cli download NAME --revision REV "
                             "--local-dir DIR) and remove model.revision")
        return value

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: Optional[str]) -> Optional[str]:
        return _check_endpoint(value)


class CalibrationSpec(Strict):
    data: StrictStr = _CAL.data
    samples: Annotated[StrictInt, Field(ge=1)] = _CAL.samples
    eval_samples: Annotated[StrictInt, Field(ge=0)] = _CAL.eval_samples
    max_length: Annotated[StrictInt, Field(ge=8)] = _CAL.max_length
    batch_size: Annotated[StrictInt, Field(ge=1)] = _CAL.batch_size
    seed: Annotated[StrictInt, Field(ge=0, le=MAX_SEED)] = _CAL.seed

    @field_validator("data")
    @classmethod
    def _data(cls, value: str) -> str:
        if value.startswith("builtin:") and len(value) > len("builtin:"):
            return value
        if "://" not in value and value.endswith(".jsonl"):
            return value
        raise ValueError("must be builtin:<name> (e.g. builtin:shapes) or a path to a local .jsonl file")

    @field_validator("seed", mode="before")
    @classmethod
    def _seed(cls, value: Any) -> Any:
        # before the bounds, for a message that says why (other types are left to the field's own check)
        if isinstance(value, int) and not isinstance(value, bool) and not 0 <= value <= MAX_SEED:
            raise ValueError(f"must be between 0 and {MAX_SEED} (2**32 - 1), the seeds random, numpy and torch all "
                             "accept")
        return value


class WeightsSpec(Strict):
    bits: Annotated[StrictInt, Field(ge=2, le=8)] = _QUANT.weights.bits
    group_size: StrictInt = _QUANT.weights.group_size
    symmetric: StrictBool = _QUANT.weights.symmetric

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, value: int) -> int:
        if value == -1 or (value >= 16 and value & (value - 1) == 0):
            return value
        near = f" (nearest: {1 << (value.bit_length() - 1)} or {1 << value.bit_length()})" if value > 16 else ""
        raise ValueError(f"must be -1 (per channel) or a power of two >= 16, e.g. 64 or 128{near}")


class ActivationsSpec(Strict):
    bits: Literal[4, 6, 8, 16] = _QUANT.activations.bits
    granularity: Optional[Literal["token", "channel", "tensor"]] = None
    symmetric: Optional[StrictBool] = None

    def resolved(self) -> tuple[int, str, bool]:
        """(bits, granularity, symmetric) with the autos filled: token for >= 8 bits, channel below;
        symmetric for token, asymmetric otherwise."""
        granularity = self.granularity or ("token" if self.bits >= 8 else "channel")
        symmetric = self.symmetric if self.symmetric is not None else granularity == "token"
        return self.bits, granularity, symmetric


class VeoSpec(Strict):
    """Visual-encoder optimisation: tune the vision tower's quantizers before the partition (qvlm/veo.py)."""

    enabled: StrictBool = _QUANT.veo.enabled
    epochs: Annotated[StrictInt, Field(ge=1, le=1000)] = _QUANT.veo.epochs
    lr: Annotated[StrictFloat, Field(gt=0, le=1)] = _QUANT.veo.lr
    lambda_entropy: Annotated[StrictFloat, Field(ge=0)] = _QUANT.veo.lambda_entropy
    lambda_error: Annotated[StrictFloat, Field(ge=0)] = _QUANT.veo.lambda_error
    eta: Annotated[StrictFloat, Field(ge=0)] = _QUANT.veo.eta


class QvlmSpec(Strict):
    search: Literal["clip", "learned", "best"] = _QUANT.search
    max_block_depth: Annotated[StrictInt, Field(ge=1, le=8)] = _QUANT.max_block_depth
    h0: Annotated[Literal["auto"] | float, Field(description='"auto" or a float >= 0')] = (
        "auto" if _QUANT.h0 is None else _QUANT.h0)
    # Clipping percentiles of static activation ranges (W4A4, W6A6). Weights are clipped per group on the
    # shrink grid below (percentiles of a 128-weight group collapse: 0.995 and 0.99 pick the same element).
    percentiles: tuple[Annotated[StrictFloat, Field(gt=0.5, le=1.0)], ...] = _QUANT.percentiles
    max_shrink: Annotated[StrictFloat, Field(ge=0, lt=1)] = SHRINK_MAX  # factors 1.0 .. 1 - max_shrink
    shrink_steps: Annotated[StrictInt, Field(ge=1, le=200)] = SHRINK_STEPS  # in this many steps
    epochs: Annotated[StrictInt, Field(ge=1)] = _QUANT.epochs
    iters: Annotated[StrictInt, Field(ge=1)] = _QUANT.iters
    propagation: Literal["fp", "stage", "quantized"] = _QUANT.propagation
    veo: VeoSpec = VeoSpec()

    @field_validator("h0", mode="before")
    @classmethod
    def _h0(cls, value: Any) -> Any:
        # One clear message instead of pydantic's two (one per member of the union).
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if value == "auto" or (number and 0 <= value < math.inf):
            return value
        raise ValueError('must be "auto" or a ' + ("finite " if number and not math.isfinite(value) else "") + "number >= 0")

    @field_validator("percentiles")
    @classmethod
    def _percentiles(cls, value: tuple) -> tuple:
        return _unique_nonempty(value, "percentile in (0.5, 1.0]")


class GptqSpec(Strict):
    """GPTQ, as the method and as a candidate of search `best`."""

    act_order: StrictBool = _QUANT.act_order  # columns by decreasing Hessian diagonal, static groups (no g_idx)
    damp: Annotated[StrictFloat, Field(gt=0, le=1)] = _QUANT.damp  # x mean(diag(H)); raised x10 up to 3 times on failure


class MixedPrecisionSpec(Strict):
    metric: Literal["none", "sensitivity", "kurtosis"] = _QUANT.mixed_precision.metric
    extra_budget: Annotated[StrictFloat, Field(ge=0, le=1)] = _QUANT.mixed_precision.extra_budget
    stop: Annotated[StrictInt, Field(ge=1, le=11)] = _QUANT.mixed_precision.stop
    top_m: Annotated[StrictInt, Field(ge=0)] = _QUANT.mixed_precision.top_m


class QuantizationSpec(Strict):
    method: Literal["qvlm", "gptq", "rtn"] = _QUANT.method
    weights: WeightsSpec = WeightsSpec()
    activations: ActivationsSpec = ActivationsSpec()
    targets: tuple[Segment, ...] = _QUANT.targets
    ignore: tuple[StrictStr, ...] = _QUANT.ignore
    qvlm: QvlmSpec = QvlmSpec()
    gptq: GptqSpec = GptqSpec()
    mixed_precision: MixedPrecisionSpec = MixedPrecisionSpec()

    @field_validator("targets")
    @classmethod
    def _targets(cls, value: tuple) -> tuple:
        return _unique_nonempty(value, "of vision, projector, language")

    @field_validator("qvlm")
    @classmethod
    def _veo_applies(cls, qvlm: QvlmSpec, info: ValidationInfo) -> QvlmSpec:
        if not qvlm.veo.enabled:
            return qvlm
        if info.data.get("method", "qvlm") != "qvlm":
            raise FieldProblem(("veo", "enabled"), f"VEO is part of method qvlm, not {info.data['method']}; "
                                                   "set quantization.method: qvlm or turn veo off")
        targets = info.data.get("targets") or ()
        if not {"vision", "language"} <= set(targets):
            raise FieldProblem(("veo", "enabled"), "VEO tunes the vision tower for the language model: "
                                                   "quantization.targets must include vision and language")
        return qvlm

    @field_validator("ignore")
    @classmethod
    def _ignore(cls, value: tuple) -> tuple:
        for i, pattern in enumerate(value):
            if not pattern.startswith("re:"):
                continue
            try:
                re.compile(pattern[3:])
            except re.error as exc:
                raise FieldProblem((str(i),), f"invalid regular expression {pattern[3:]!r}: {exc}") from None
        return value


class GateSpec(Strict):
    """The publish gate: the held-out evaluation must meet every threshold set, or the output is held."""

    max_kl: Optional[Annotated[StrictFloat, Field(ge=0)]] = None  # mean KL(FP || quantized), nats
    min_top1: Optional[Annotated[StrictFloat, Field(ge=0, le=1)]] = None  # top-1 agreement, 0..1
    max_accuracy_drop: Optional[Annotated[StrictFloat, Field(ge=0, le=1)]] = None  # FP minus quantized accuracy


class OutputSpec(Strict):
    uri: StrictStr
    overwrite: StrictBool = False
    endpoint_url: Optional[StrictStr] = None
    gate: GateSpec = GateSpec()

    @field_validator("uri")
    @classmethod
    def _uri(cls, value: str) -> str:
        return _check_local_place(_check_uri(value, _LOCAL_FORMS), "a folder on a disk")

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: Optional[str]) -> Optional[str]:
        return _check_endpoint(value)


class ResourcesSpec(Strict):
    workers: Annotated[StrictInt, Field(ge=1)] = _RES.workers
    gpus_per_worker: Annotated[StrictFloat, Field(ge=0)] = _RES.gpus_per_worker
    cpus_per_worker: Annotated[StrictFloat, Field(gt=0)] = _RES.cpus_per_worker
    max_retries: Annotated[StrictInt, Field(ge=0)] = _RES.max_retries
    # How the stage workers' placement group lies across nodes: "pack" fills few nodes (fast transfers
    # between stages), "spread" puts each stage on a different node where it can (memory isolation).
    placement: Literal["pack", "spread"] = _RES.placement
    # One GPU's memory, for `qvlm plan` and submissions where no cluster reports it (a running stage measures it).
    gpu_memory_gb: Optional[Annotated[StrictFloat, Field(gt=0)]] = _RES.gpu_memory_gb


class JobSpec(Strict):
    """One validated job file."""

    name: StrictStr
    model: ModelSpec
    calibration: CalibrationSpec = CalibrationSpec()
    quantization: QuantizationSpec = QuantizationSpec()
    output: OutputSpec
    resources: ResourcesSpec = ResourcesSpec()

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if _NAME.fullmatch(value):
            return value
        hint = re.sub(r"[^a-z0-9]+", "-", value.lower()).strip("-")[:63]
        fix = f" (e.g. {hint!r})" if hint else ""
        raise ValueError(f"must be 1-63 lowercase letters, digits or '-', starting with a letter or digit{fix}")

    @field_validator("output")
    @classmethod
    def _output_apart_from_inputs(cls, output: OutputSpec, info: ValidationInfo) -> OutputSpec:
        """The output neither is, holds, nor lies inside the model folder, and does not hold the calibration
        file: overwrite could otherwise delete the user's inputs. Paths are compared resolved (symlinks, '..').
        A field validator (not a model validator) so it runs even when other fields have errors."""
        model, calibration = info.data.get("model"), info.data.get("calibration")
        out = _place(output.uri)
        src = model and _place(model.path)
        how = out and src and _meets(out, src)
        if how:
            raise FieldProblem(("uri",), f"{output.uri} {how} model.path {model.path}; "
                                         "write the output outside the model folder")
        data = calibration and not calibration.data.startswith("builtin:") and _place(calibration.data)
        how = out and data and _meets(out, data)
        if how in ("is", "contains"):
            raise FieldProblem(("uri",), f"{output.uri} {how} calibration.data {calibration.data}; "
                                         "write the output where it holds none of the job's inputs")
        return output

    @field_validator("output")
    @classmethod
    def _gate_has_an_evaluation(cls, output: OutputSpec, info: ValidationInfo) -> OutputSpec:
        calibration = info.data.get("calibration")
        gated = any(v is not None for v in output.gate.model_dump().values())
        if gated and calibration is not None and calibration.eval_samples == 0:
            raise FieldProblem(("gate",), "the gate checks the held-out evaluation, but calibration.eval_samples is "
                                          "0 (no evaluation runs); hold out records (e.g. calibration.eval_samples: 8) "
                                          "or remove output.gate")
        return output

    def spec_hash(self) -> str:
        """sha256 hex of the canonical JSON of the spec: names the Ray submission and detects a changed job.
        The gate is left out: it decides only whether the output is published, so a re-submit with another gate
        is the same job and publishes what is there."""
        return spec_hash_of(self.model_dump(mode="json"))

    def compile(self) -> Job:
        """The typed, frozen job this file describes: what every layer below the command line reads."""
        cal, out, res = self.calibration, self.output, self.resources
        where = Locations(str(self.model.path), str(out.uri), self.model.endpoint_url or out.endpoint_url,
                          out.endpoint_url)
        return Job(self.name, self.spec_hash(), where, CalibrationSettings(**cal.model_dump()), self.to_quant_config(),
                   Resources(**res.model_dump()), out.overwrite, Gate(**out.gate.model_dump()),
                   json.dumps(self.model_dump(mode="json"), sort_keys=True))

    def to_quant_config(self) -> QuantConfig:
        """The typed ``qvlm.config.QuantConfig`` of this job."""
        q, s, w = self.quantization, self.quantization.qvlm, self.quantization.weights
        return QuantConfig(
            method=q.method, weights=WeightScheme(w.bits, w.group_size, w.symmetric),
            activations=ActScheme(*q.activations.resolved()), targets=q.targets, ignore=q.ignore,
            search=s.search, max_block_depth=s.max_block_depth, h0=None if s.h0 == "auto" else float(s.h0),
            percentiles=s.percentiles, epochs=s.epochs, iters=s.iters, propagation=s.propagation,
            mixed_precision=MixedPrecisionConfig(**q.mixed_precision.model_dump()),
            veo=VeoConfig(**s.veo.model_dump()), seed=self.calibration.seed,
            shrinks=shrink_grid(s.max_shrink, s.shrink_steps), act_order=q.gptq.act_order, damp=q.gptq.damp,
        )


def _check_endpoint(value: Optional[str]) -> Optional[str]:
    if value is not None and not value.startswith(("http://", "https://")):
        raise ValueError("must be an http:// or https:// URL, e.g. http://127.0.0.1:9000")
    if value is not None and "@" in value.split("://", 1)[1].split("/", 1)[0]:
        raise ValueError("must not hold a user or password (user:password@); S3 credentials come from the AWS "
                         "credential chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile or a role)")
    return value


def job_json_schema() -> dict:
    """JSON schema of the job file, for editors (e.g. ``# yaml-language-server: $schema=...``)."""
    return JobSpec.model_json_schema()


# ---- paths -------------------------------------------------------------------------------------------

_PATH_FIELDS = {"model.path": True, "calibration.data": False, "output.uri": False}  # value: hub ids allowed


def resolve_location(value: Any, base: Path, hub_ids: bool = False) -> Any:
    """Where a path-like job value points, so that a job file works from any working directory.

    ``builtin:<name>``, ``s3://...`` and other URLs stay as they are (validation rejects bad schemes);
    ``file:///x`` becomes ``/x``; with ``hub_ids``, a Hugging Face id (exactly one '/', no leading '.',
    '/' or '~', and not an existing path under ``base``) stays; anything else is a local path made
    absolute against ``base`` (``~`` expanded). Non-strings are returned unchanged for validation.
    """
    if not isinstance(value, str) or not value or value.startswith("builtin:"):
        return value
    if value.startswith("file:///"):
        return value.removeprefix("file://")
    if "://" in value:
        return value
    if hub_ids and value.count("/") == 1 and not value.startswith((".", "/", "~")) and not (base / value).exists():
        return value
    return os.path.normpath(base / Path(value).expanduser())


def _resolve_paths(data: dict, base: Path) -> None:
    for dotted, hub_ids in _PATH_FIELDS.items():
        section, key = dotted.split(".")
        if isinstance(data.get(section), dict) and key in data[section]:
            data[section][key] = resolve_location(data[section][key], base, hub_ids)


# ---- loading -----------------------------------------------------------------------------------------


def load_job(path: str | Path, overrides: Sequence[str] = ()) -> JobSpec:
    """Read, override and validate a job file; raise :class:`JobSpecError` listing every problem found.

    Relative paths resolve against the job file's folder, whether they are written in the file or given with
    ``--set`` (so ``--set model.path=...`` means what the same line in the file would).
    """
    path = Path(path)
    data, root = _parse(path, _read(path))
    problems = _duplicate_keys(root, str(path))
    overridden = {}
    for item in overrides:
        dotted, value = _parse_override(item)
        _set_dotted(data, dotted, value, item)
        overridden[dotted] = item
    _resolve_paths(data, path.parent.resolve())
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as exc:
        problems += [_error_line(err, str(path), root, overridden) for err in exc.errors(include_url=False)]
    if problems:
        raise JobSpecError("\n".join(problems))
    return spec


def _read(path: Path) -> str:
    """The job file's text, at most ``MAX_JOB_BYTES`` (read with a bound: a FIFO or /dev/zero never ends)."""
    if not path.exists():
        raise JobSpecError(f"{path}: job file not found (working directory: {Path.cwd()})")
    if path.is_dir():
        raise JobSpecError(f"{path}: is a directory; pass the job's YAML file")
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_JOB_BYTES + 1)
        if len(raw) > MAX_JOB_BYTES:
            raise JobSpecError(f"{path}: the job file is larger than {MAX_JOB_BYTES // 1024} KiB; a job file holds a "
                               "few dozen fields: pass the job's YAML file")
        return raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise JobSpecError(f"{path}: cannot read the job file: {exc}") from None


def _parse(path: Path, text: str) -> tuple[dict, yaml.Node]:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        _check_node_budget(str(path), root)
        data = _construct(root)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise JobSpecError(f"{where}: invalid YAML: {getattr(exc, 'problem', None) or exc}") from None
    except RecursionError:
        raise JobSpecError(f"{path}: the YAML is nested too deeply to be a job file") from None
    if data is None:
        raise JobSpecError(f"{path}: the job file is empty; it needs at least name, model.path and output.uri")
    if not isinstance(data, dict):
        raise JobSpecError(f"{path}:{root.start_mark.line + 1}: the job file must be a mapping of fields "
                           f"(name: ..., model: ..., output: ...), not a {type(data).__name__}")
    return data, root


def _construct(root: Optional[yaml.Node]) -> Any:
    """The Python value of a composed document (what ``yaml.safe_load`` returns), without parsing it again."""
    if root is None:
        return None
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_document(root)
    finally:
        loader.dispose()


def _check_node_budget(where: str, root: Optional[yaml.Node]) -> None:
    """Refuse a document that has more than ``MAX_YAML_NODES`` nodes once its aliases are expanded (a "billion
    laughs" file is a few lines whose expansion never ends) or whose aliases refer to themselves."""
    if root is None:
        return
    total = _expanded_nodes(root, MAX_YAML_NODES)
    if total > MAX_YAML_NODES:
        raise JobSpecError(f"{where}: expands to more than {MAX_YAML_NODES} YAML values once its aliases (*name) are "
                           "expanded, or an alias refers to itself; a job file needs a few dozen: write the values out "
                           "instead of repeating aliases")


def _expanded_nodes(node: yaml.Node, limit: int, counted: Optional[dict] = None, open_: Optional[set] = None) -> int:
    """Nodes under ``node`` with every alias expanded, counted once per distinct node (so the count itself never
    expands anything); past ``limit`` the count stops early, and a node inside itself counts as ``limit + 1``."""
    counted = {} if counted is None else counted
    open_ = set() if open_ is None else open_
    if id(node) in counted:
        return counted[id(node)]
    if id(node) in open_:
        return limit + 1
    open_.add(id(node))
    children = node.value if isinstance(node, yaml.SequenceNode) else (
        [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else [])
    total = 1
    for child in children:
        total += _expanded_nodes(child, limit, counted, open_)
        if total > limit:
            break
    open_.discard(id(node))
    counted[id(node)] = total
    return total


def _duplicate_keys(node: yaml.Node, file: str, prefix: str = "") -> list[str]:
    """PyYAML silently keeps the last of two equal keys; a strict job file reports them."""
    problems: list[str] = []
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key, value in node.value:
            if not isinstance(key, yaml.ScalarNode):
                continue
            dotted = f"{prefix}{key.value}"
            if key.value in seen:
                problems.append(f"{file}:{key.start_mark.line + 1}: {dotted}: duplicate key; keep only one")
            seen.add(key.value)
            problems += _duplicate_keys(value, file, dotted + ".")
    return problems


# ---- overrides ---------------------------------------------------------------------------------------


def _parse_override(item: str) -> tuple[str, Any]:
    dotted, sep, text = item.partition("=")
    dotted = dotted.strip()
    if not sep or not dotted:
        raise JobSpecError(f"--set {item}: expected dotted.path=value, e.g. quantization.weights.bits=8")
    keys = dotted.split(".")
    for i, key in enumerate(keys):
        fields = _model_at(keys[:i])
        if fields is None or key not in fields:
            raise JobSpecError(f"--set {item}: {'.'.join(keys[:i + 1])}: unknown field{_suggest(key, fields)}")
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        _check_node_budget(f"--set {item}", root)
        return dotted, _construct(root)
    except RecursionError:
        raise JobSpecError(f"--set {item}: the value is nested too deeply") from None
    except yaml.YAMLError as exc:
        raise JobSpecError(f"--set {item}: invalid YAML value: {getattr(exc, 'problem', None) or exc}") from None


def _set_dotted(data: dict, dotted: str, value: Any, item: str) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        if data.get(key) is None:
            data[key] = {}
        if not isinstance(data[key], dict):
            raise JobSpecError(f"--set {item}: {key} in the job file is not a mapping")
        data = data[key]
    data[last] = value


def _model_at(keys: Sequence[Any]) -> Optional[dict]:
    """The field names of the spec model at ``keys`` (list indices skipped), or None if not a model."""
    model: Any = JobSpec
    for key in keys:
        if isinstance(key, int):
            continue
        field = model.model_fields.get(key) if model else None
        annotation = field.annotation if field else None
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return dict(model.model_fields) if model else None


def _suggest(key: str, fields: Optional[dict]) -> str:
    if not fields:
        return " (the parent is not a mapping of fields)"
    close = difflib.get_close_matches(str(key), list(fields), n=1)
    return f" (did you mean {close[0]}?)" if close else f" (allowed: {', '.join(fields)})"


# ---- error lines -------------------------------------------------------------------------------------

_MISSING_HINTS = {
    "name": "e.g. name: tiny-llava-w4",
    "model": "a mapping with at least path: " + _MODEL_FORMS,
    "model.path": _MODEL_FORMS,
    "output": "a mapping with at least uri: " + _LOCAL_FORMS,
    "output.uri": _LOCAL_FORMS,
}


def _error_line(err: dict, file: str, root: yaml.Node, overridden: dict[str, str]) -> str:
    loc = tuple(err["loc"])
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, FieldProblem):
        loc += cause.at
    dotted = ".".join(map(str, loc))
    message = _message(err, loc, cause)
    origin = next((item for path, item in overridden.items() if f"{dotted}.".startswith(f"{path}.")), None)
    if origin:
        return f"{file}: {dotted}: {message} (from --set {origin})"
    line = _line_of(root, loc)
    return f"{file}:{line}: {dotted}: {message}" if line else f"{file}: {dotted}: {message}"


def _message(err: dict, loc: tuple, cause: Any) -> str:
    kind, value = err["type"], err.get("input")
    if kind == "extra_forbidden":
        return "unknown field" + _suggest(loc[-1], _model_at(loc[:-1]))
    if kind == "missing":
        hint = _MISSING_HINTS.get(".".join(map(str, loc)))
        return "required field is missing" + (f" ({hint})" if hint else "")
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return f"should be a mapping of fields, not a {type(value).__name__}"
    message = cause.message if isinstance(cause, FieldProblem) else err["msg"]
    message = message.removeprefix("Value error, ").replace("Input should be", "should be")
    if isinstance(value, (str, int, float, bool)) and not isinstance(cause, FieldProblem):
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        message += f" (got {_redacted(shown)})"
    return message


def _redacted(text: str) -> str:
    """``text`` without secrets (a URL's user:password@, keys); imported late: storage pulls in boto3."""
    from workers.storage import redact

    return redact(text)


def _line_of(root: yaml.Node, loc: tuple) -> Optional[int]:
    """1-based line of the deepest key along ``loc`` present in the YAML (None if not even the first)."""
    node, line = root, None
    for key in loc:
        child = None
        if isinstance(node, yaml.MappingNode):
            child = next((pair for pair in reversed(node.value) if pair[0].value == str(key)), None)
        elif isinstance(node, yaml.SequenceNode) and str(key).isdigit() and int(key) < len(node.value):
            child = (node.value[int(key)], node.value[int(key)])
        if child is None:
            break
        line, node = child[0].start_mark.line + 1, child[1]
    return line
