"""Provenance in the manifest: what produced an output, and its check by ``qvlm verify``.

The manifest's ``provenance`` holds the job file as run, a sha256 of the calibration and held-out records,
qvlm's version and git commit (when known), the versions of torch, transformers, compressed-tensors and ray,
the seeds, the devices the stages ran on, per quantized layer its bits, group size, the method its block kept and the
block's error, and the publish gate's verdict. ``provenance_sha256`` seals it. ``qvlm verify`` checks the seal, that the job
file hashes to the manifest's spec hash, and that every layer's entry is what the plan document (itself a
file the manifest vouches for) says.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from importlib import metadata
from pathlib import Path

from cluster.job import spec_hash_of

PLAN_KEY = "qvlm_plan.json"  # the same key cluster.commit writes
PACKAGES = ("qvlm", "torch", "transformers", "compressed-tensors", "ray")
COMMIT_ENV = "QVLM_GIT_COMMIT"  # set by qvlm-submit for a driver on a cluster, where the code has no .git
_ROOT = Path(__file__).resolve().parent.parent


def source_commit() -> str | None:
    """The git commit of the code this process runs, when known (a commit with uncommitted changes ends in
    "-dirty")."""
    if os.environ.get(COMMIT_ENV):
        return os.environ[COMMIT_ENV]
    if not (_ROOT / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(_ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def versions() -> dict[str, str | None]:
    def installed(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None
    return {name: installed(name) for name in PACKAGES}


def layers_of(plan: dict) -> dict[str, dict]:
    """Per quantized linear of the plan document: bits, group size, its block, the method that block kept and
    the block's error after the search."""
    units = {u["index"]: u for u in plan["units"]}
    layers = {}
    for block in plan["blocks"]:
        for unit in (units[i] for i in block["units"]):
            for relative in unit["linears"]:
                name = f"{unit['name']}.{relative}"
                scheme = plan["schemes"].get(name)
                if scheme is not None:
                    layers[name] = {"bits": scheme["bits"], "group_size": scheme["group_size"], "block": block["index"],
                                    "method": block.get("chosen") or plan["method"], "block_error": block["error_after"]}
    return layers


def devices_of(plan: dict) -> dict:
    """The device of each stage, on which node, and how many distinct devices the job used."""
    placed = [{"stage": k, "node": node, "device": device}
              for k, (node, device) in enumerate(zip(plan["stage_nodes"], plan["stage_devices"]))]
    return {"count": len({(p["node"], p["device"]) for p in placed}), "stages": placed}


def build_provenance(job, plan_doc: dict, calibration_sha256: str) -> dict:
    cal = job.calibration
    return {
        "job_file": json.loads(job.job_file) if job.job_file else None,
        "calibration": {"data": cal.data, "samples": cal.samples, "eval_samples": cal.eval_samples,
                        "records_sha256": calibration_sha256},
        "qvlm": {"version": versions()["qvlm"], "commit": source_commit()},
        "versions": {k: v for k, v in versions().items() if k != "qvlm"},
        "seeds": {"calibration": cal.seed, "method": job.quant.seed},
        "devices": devices_of(plan_doc),
        "layers": layers_of(plan_doc),
    }


def seal(provenance: dict) -> str:
    """sha256 of the provenance's canonical JSON."""
    return hashlib.sha256(json.dumps(provenance, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def check_provenance(manifest: dict, plan_doc: dict | None) -> list[str]:
    """Problems with the manifest's provenance; ``plan_doc`` is the verified qvlm_plan.json (None: unreadable)."""
    prov = manifest.get("provenance")
    if not isinstance(prov, dict):
        return []  # an output written before qvlm recorded provenance; verify says so
    if manifest.get("provenance_sha256") != seal(prov):
        return ["provenance: its sha256 does not match provenance_sha256 (the manifest was edited after the job)"]
    problems = []
    job_file = prov.get("job_file")  # None for a job run from Python (cluster.driver.run_job) with no job file
    if job_file is not None and (not isinstance(job_file, dict) or spec_hash_of(job_file) != manifest.get("spec_hash")):
        problems.append("provenance.job_file: does not hash to the manifest's spec_hash (not the job that ran)")
    if plan_doc is not None and prov.get("layers") != layers_of(plan_doc):
        problems.append(f"provenance.layers: differ from {PLAN_KEY} (bits, group size, method or block error)")
    return problems


def provenance_lines(manifest: dict, layers: bool = False) -> list[str]:
    """The provenance for people: a few lines, and with ``layers`` one line per quantized layer."""
    prov = manifest.get("provenance")
    if not isinstance(prov, dict):
        return ["provenance: none recorded (an output written before qvlm recorded it)"]
    q, cal, dev = prov["qvlm"], prov["calibration"], prov["devices"]
    lines = [
        f"qvlm {q['version']} (commit {q['commit'] or 'unknown'}); "
        + ", ".join(f"{k} {v}" for k, v in prov["versions"].items()),
        f"calibration: {cal['data']}, {cal['samples']} + {cal['eval_samples']} held-out records, "
        f"sha256 {cal['records_sha256']}; seeds: "
        + ", ".join(f"{k} {v}" for k, v in prov["seeds"].items()),
        f"devices: {dev['count']} ({', '.join(sorted({s['device'] for s in dev['stages']}))}) for "
        f"{len(dev['stages'])} stages",
        f"layers: {len(prov['layers'])} quantized; " + _layer_summary(prov["layers"]),
        f"publish gate: {prov.get('gate', 'not recorded')}",
    ]
    if layers:
        lines += [f"  {name}: {e['bits']} bits, group {e['group_size']}, block {e['block']} ({e['method']}, "
                  f"error {e['block_error']:.4g})" for name, e in sorted(prov["layers"].items())]
    return lines


def _layer_summary(layers: dict) -> str:
    counts: dict[str, int] = {}
    for e in layers.values():
        key = f"W{e['bits']} g{e['group_size']} {e['method']}"
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{n} x {key}" for key, n in sorted(counts.items()))
