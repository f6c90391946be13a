"""The job file (``job.yaml``): pydantic models, loading with ``--set`` overrides, and error lines of the
form ``FILE:LINE: dotted.path: message``.

Validation here is pure (no file system access beyond reading the job file): whether the model or the
calibration file exists is checked later, against the real inputs. ``qvlm`` (and so torch) is imported
only by :meth:`JobSpec.to_quant_config`.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Optional, Sequence

import yaml
from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError,
                      ValidationInfo, field_validator)

from jobs.errors import JobSpecError

if TYPE_CHECKING:
    from qvlm.config import QuantConfig

Segment = Literal["vision", "projector", "language"]
_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_LOCAL_FORMS = "a local path, file:///absolute/path or s3://bucket/prefix"
_MODEL_FORMS = "a local directory, a Hugging Face hub id (org/name) or s3://bucket/prefix"


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


def _place(uri: str) -> Optional[tuple[str, ...]]:
    """A URI as path segments under its root (``s3://bucket`` or ``/``), for containment checks; None for
    other schemes. Local paths are resolved, so symlinks and '..' cannot hide that two paths meet."""
    if uri.startswith("s3://"):
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        return ("s3://", bucket, *[p for p in key.split("/") if p])
    if "://" in uri and not uri.startswith("file://"):
        return None
    return Path(uri.removeprefix("file://")).expanduser().resolve().parts


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(Strict):
    path: StrictStr
    revision: Optional[StrictStr] = None
    trust_remote_code: StrictBool = False

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        return _check_uri(value, _MODEL_FORMS)


class CalibrationSpec(Strict):
    data: StrictStr = "builtin:shapes"
    samples: Annotated[StrictInt, Field(ge=1)] = 64
    eval_samples: Annotated[StrictInt, Field(ge=0)] = 16
    max_length: Annotated[StrictInt, Field(ge=8)] = 512
    batch_size: Annotated[StrictInt, Field(ge=1)] = 8
    seed: Annotated[StrictInt, Field(ge=0)] = 0

    @field_validator("data")
    @classmethod
    def _data(cls, value: str) -> str:
        if value.startswith("builtin:") and len(value) > len("builtin:"):
            return value
        if "://" not in value and value.endswith(".jsonl"):
            return value
        raise ValueError("must be builtin:<name> (e.g. builtin:shapes) or a path to a local .jsonl file")


class WeightsSpec(Strict):
    bits: Annotated[StrictInt, Field(ge=2, le=8)] = 4
    group_size: StrictInt = 128
    symmetric: StrictBool = True

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, value: int) -> int:
        if value == -1 or (value >= 16 and value & (value - 1) == 0):
            return value
        near = f" (nearest: {1 << (value.bit_length() - 1)} or {1 << value.bit_length()})" if value > 16 else ""
        raise ValueError(f"must be -1 (per channel) or a power of two >= 16, e.g. 64 or 128{near}")


class ActivationsSpec(Strict):
    bits: Literal[4, 6, 8, 16] = 16
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

    enabled: StrictBool = False
    epochs: Annotated[StrictInt, Field(ge=1, le=1000)] = 4
    lr: Annotated[StrictFloat, Field(gt=0, le=1)] = 0.01
    lambda_entropy: Annotated[StrictFloat, Field(ge=0)] = 0.1
    lambda_error: Annotated[StrictFloat, Field(ge=0)] = 1.0
    eta: Annotated[StrictFloat, Field(ge=0)] = 0.1


class QvlmSpec(Strict):
    # Defaults measured by bench/quality.py (BENCHMARKS.md "Numerics and the default search").
    search: Literal["clip", "learned", "best"] = "best"
    max_block_depth: Annotated[StrictInt, Field(ge=1, le=8)] = 3
    h0: Annotated[Literal["auto"] | float, Field(description='"auto" or a float >= 0')] = "auto"
    # Clipping percentiles of static activation ranges (W4A4, W6A6). Weights are clipped per group on the
    # shrink grid below (percentiles of a 128-weight group collapse: 0.995 and 0.99 pick the same element).
    percentiles: tuple[Annotated[StrictFloat, Field(gt=0.5, le=1.0)], ...] = (1.0, 0.995, 0.99, 0.985, 0.98)
    max_shrink: Annotated[StrictFloat, Field(ge=0, lt=1)] = 0.2  # weight clipping: shrink factors 1.0 .. 1 - max_shrink
    shrink_steps: Annotated[StrictInt, Field(ge=1, le=200)] = 20  # in this many steps
    epochs: Annotated[StrictInt, Field(ge=1)] = 4
    iters: Annotated[StrictInt, Field(ge=1)] = 100
    propagation: Literal["fp", "quantized"] = "quantized"
    veo: VeoSpec = VeoSpec()

    @field_validator("h0", mode="before")
    @classmethod
    def _h0(cls, value: Any) -> Any:
        # One clear message instead of pydantic's two (one per member of the union).
        if value == "auto" or (isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0):
            return value
        raise ValueError('must be "auto" or a number >= 0')

    @field_validator("percentiles")
    @classmethod
    def _percentiles(cls, value: tuple) -> tuple:
        return _unique_nonempty(value, "percentile in (0.5, 1.0]")


class GptqSpec(Strict):
    """GPTQ, as the method and as a candidate of search `best`."""

    act_order: StrictBool = True  # columns by decreasing Hessian diagonal, static groups (no g_idx)
    damp: Annotated[StrictFloat, Field(gt=0, le=1)] = 0.01  # x mean(diag(H)); raised x10 up to 3 times on failure


class MixedPrecisionSpec(Strict):
    metric: Literal["none", "sensitivity", "kurtosis"] = "none"
    extra_budget: Annotated[StrictFloat, Field(ge=0, le=1)] = 0.02
    stop: Annotated[StrictInt, Field(ge=1, le=11)] = 2
    top_m: Annotated[StrictInt, Field(ge=0)] = 0


class QuantizationSpec(Strict):
    method: Literal["qvlm", "gptq", "rtn"] = "qvlm"
    weights: WeightsSpec = WeightsSpec()
    activations: ActivationsSpec = ActivationsSpec()
    targets: tuple[Segment, ...] = ("vision", "projector", "language")
    ignore: tuple[StrictStr, ...] = ("lm_head",)
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


class OutputSpec(Strict):
    uri: StrictStr
    overwrite: StrictBool = False
    endpoint_url: Optional[StrictStr] = None

    @field_validator("uri")
    @classmethod
    def _uri(cls, value: str) -> str:
        return _check_uri(value, _LOCAL_FORMS)

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL, e.g. http://127.0.0.1:9000")
        return value


class ResourcesSpec(Strict):
    workers: Annotated[StrictInt, Field(ge=1)] = 2
    gpus_per_worker: Annotated[StrictFloat, Field(ge=0)] = 0.0
    cpus_per_worker: Annotated[StrictFloat, Field(gt=0)] = 1.0
    max_retries: Annotated[StrictInt, Field(ge=0)] = 3
    # How the stage workers' placement group lies across nodes: "pack" fills few nodes (fast transfers
    # between stages), "spread" puts each stage on a different node where it can (memory isolation).
    placement: Literal["pack", "spread"] = "pack"


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
    def _output_outside_model(cls, output: OutputSpec, info: ValidationInfo) -> OutputSpec:
        # A field validator (not a model validator) so it runs even when other fields have errors.
        model = info.data.get("model")
        out, src = _place(output.uri), model and _place(model.path)
        if out and src and out[:len(src)] == src:
            raise FieldProblem(("uri",), f"{output.uri} is inside model.path {model.path}; "
                                         "write the output outside the model folder")
        return output

    def spec_hash(self) -> str:
        """sha256 hex of the canonical JSON of the spec: names the Ray submission and detects a changed job."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def to_quant_config(self) -> QuantConfig:
        """The typed ``qvlm.config.QuantConfig`` of this job (imports torch)."""
        from qvlm.config import MixedPrecisionConfig, QuantConfig, VeoConfig
        from qvlm.quant import ActScheme, WeightScheme, shrink_grid

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

    Relative paths in the file resolve against the file's folder; relative paths given with ``--set``
    resolve against the working directory (where the user typed them).
    """
    path = Path(path)
    data, root = _parse(path, _read(path))
    problems = _duplicate_keys(root, str(path))
    overridden = {}
    for item in overrides:
        dotted, value = _parse_override(item)
        if dotted in _PATH_FIELDS:
            value = resolve_location(value, Path.cwd(), _PATH_FIELDS[dotted])
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
    if not path.exists():
        raise JobSpecError(f"{path}: job file not found (working directory: {Path.cwd()})")
    if path.is_dir():
        raise JobSpecError(f"{path}: is a directory; pass the job's YAML file")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise JobSpecError(f"{path}: cannot read the job file: {exc}") from None


def _parse(path: Path, text: str) -> tuple[dict, yaml.Node]:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise JobSpecError(f"{where}: invalid YAML: {getattr(exc, 'problem', None) or exc}") from None
    if data is None:
        raise JobSpecError(f"{path}: the job file is empty; it needs at least name, model.path and output.uri")
    if not isinstance(data, dict):
        raise JobSpecError(f"{path}:{root.start_mark.line + 1}: the job file must be a mapping of fields "
                           f"(name: ..., model: ..., output: ...), not a {type(data).__name__}")
    return data, root


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
        return dotted, yaml.safe_load(text)
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
        message += f" (got {shown})"
    return message


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
