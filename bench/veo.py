"""What visual-encoder optimisation buys on the trained tiny LLaVA: accuracy, KL, the partition and the search time,
with and without VEO, at W4A4 and W6A6, in one run.

    .venv/bin/python bench/veo.py [--epochs N] [--veo-epochs N]

Runs ``qvlm.driver.quantize`` in this process (the distributed job runs the same code and gives the same bytes,
tests/test_veo.py). The partition uses h0 = auto (the mean of the series), which is blind to a uniform drop of D;
the column "blocks @h0 fixed" re-partitions the VEO series at the h0 the run without VEO used, to show whether
VEO's series would give shorter blocks at an unchanged threshold.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from _common import table as format_table
from qvlm.config import CalibrationSettings, QuantConfig, VeoConfig
from qvlm.batches import calibration_answer_masks, calibration_batches, records_for
from qvlm.driver import quantize
from qvlm.evaluate import evaluate_records
from qvlm.partition import partition
from qvlm.quant import ActScheme, WeightScheme
from trained import HELD_OUT_N, HELD_OUT_SKIP, MAX_LENGTH, cached_model, held_out_records

SCHEMES = {"W4A4": (WeightScheme(4, 128), ActScheme(4, "channel", False)),
           "W6A6": (WeightScheme(6, 128), ActScheme(6, "channel", False))}


def _load(model_dir):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(model_dir).eval(), AutoProcessor.from_pretrained(model_dir)


def _language_stream(result) -> int:
    return next(s for s, stream in enumerate(result.streams) if result.units[stream[0]].segment == "language")


def run(scheme: str, veo: bool, args, model_dir, batches, answers, records, fp_model) -> dict:
    weights, acts = SCHEMES[scheme]
    config = QuantConfig(weights=weights, activations=acts, search="clip", epochs=args.epochs,
                         veo=VeoConfig(enabled=veo, epochs=args.veo_epochs, lr=args.veo_lr,
                                       lambda_entropy=args.lambda_entropy, lambda_error=args.lambda_error))
    model, processor = _load(model_dir)
    t = time.perf_counter()
    _, result = quantize(model, batches, config, answers)
    wall = time.perf_counter() - t
    with torch.no_grad():
        ev = evaluate_records(fp_model, model, processor, records, MAX_LENGTH, 16)
    s = _language_stream(result)
    lang = [b for b in result.blocks if b.stream == s]
    dep = result.dependency[s].dependency
    return {"scheme": scheme, "veo": veo, "acc": ev.q_accuracy, "fp_acc": ev.fp_accuracy, "kl": ev.kl_mean,
            "top1": ev.top1_agreement, "blocks": len(result.blocks), "lang_blocks": len(lang),
            "depth": sum(len(b.units) for b in lang) / len(lang), "d_mean": sum(dep) / max(len(dep), 1), "dep": dep,
            "h0": result.h0[s], "n_lang": len(result.streams[s]), "search": result.seconds["search"],
            "veo_s": result.seconds.get("veo", 0.0), "wall": wall,
            "vision_err": (result.veo.error_before, result.veo.error_after) if result.veo else None,
            "history": result.veo.history if result.veo else ()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2, help="clip-search coordinate passes per block")
    parser.add_argument("--veo-epochs", type=int, default=VeoConfig.epochs)
    parser.add_argument("--veo-lr", type=float, default=VeoConfig.lr)
    parser.add_argument("--lambda-entropy", type=float, default=VeoConfig.lambda_entropy)
    parser.add_argument("--lambda-error", type=float, default=VeoConfig.lambda_error)
    parser.add_argument("--schemes", nargs="+", choices=sorted(SCHEMES), default=list(SCHEMES))
    parser.add_argument("--samples", type=int, default=64, help="at most 64: the held-out questions follow them")
    parser.add_argument("--model-dir", type=Path, help="another LLaVA (with --data builtin:shapes for qvlm.tiny's); "
                                                       "default: the trained tiny LLaVA of bench/trained.py")
    parser.add_argument("--data", default="builtin:shapes-hard")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (2 OpenMP threads spin-wait on each other when the 2 cores are shared)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = args.model_dir or cached_model("llava")
    cal = CalibrationSettings(data=args.data, samples=args.samples, eval_samples=0, max_length=MAX_LENGTH, batch_size=8)
    batches = calibration_batches(model_dir, cal)
    answers = calibration_answer_masks(model_dir, cal)
    records = held_out_records() if args.data == "builtin:shapes-hard" else records_for(
        CalibrationSettings(data=args.data, samples=HELD_OUT_SKIP, eval_samples=HELD_OUT_N))[1]
    fp_model, _ = _load(model_dir)
    print(f"LLaVA at {model_dir}; calibration {args.data}, {args.samples} samples in batches of 8; "
          f"{len(records)} held-out questions; method qvlm, search clip, {args.epochs} epochs; VEO epochs "
          f"{args.veo_epochs}, lr {args.veo_lr}, lambda_entropy {args.lambda_entropy}, lambda_error {args.lambda_error}, "
          f"eta {VeoConfig.eta}; next-token loss on {'the answers' if answers else 'every token'}; weights group 128 symmetric, activations static per channel "
          f"asymmetric; torch threads {args.threads}")
    rows = [run(scheme, veo, args, model_dir, batches, answers, records, fp_model) for scheme in args.schemes for veo in (False, True)]
    header = ("scheme", "VEO", "accuracy", "KL", "top-1", "blocks", "LLM blocks", "mean LLM depth", "mean D(LLM)",
              "blocks @h0 fixed", "vision MSE rtn->tuned", "VEO s", "search s", "quantize s")
    table = []
    for r in rows:
        base = next(b for b in rows if b["scheme"] == r["scheme"] and not b["veo"])
        fixed = len(partition(r["dep"], r["n_lang"], 3, base["h0"]).blocks)
        err = f"{r['vision_err'][0]:.2e}->{r['vision_err'][1]:.2e}" if r["vision_err"] else "-"
        table.append((r["scheme"], "on" if r["veo"] else "off", f"{r['acc']:.3f}", f"{r['kl']:.4f}", f"{r['top1']:.3f}",
                      r["blocks"], r["lang_blocks"], f"{r['depth']:.2f}", f"{r['d_mean']:.4f}", fixed, err,
                      f"{r['veo_s']:.1f}", f"{r['search']:.1f}", f"{r['wall']:.1f}"))
    print(f"full precision accuracy {rows[0]['fp_acc']:.3f}")
    print(format_table(list(header), table))
    print("\nD(k, k+1) over the decoder layers, without -> with VEO:")
    for scheme in args.schemes:
        off, on = (next(r for r in rows if r["scheme"] == scheme and r["veo"] is v) for v in (False, True))
        print(f"  {scheme}: {[round(x, 4) for x in off['dep']]} -> {[round(x, 4) for x in on['dep']]}")
    print("\nVEO loss terms per epoch (means over the calibration batches; error = vision + eta * logits, relative):")
    for r in (r for r in rows if r["veo"]):
        for h in r["history"]:
            print(f"  {r['scheme']} epoch {h['epoch']}: loss {h['loss']:.4f}  next-token {h['next_token']:.4f}  "
                  f"D {h['dependency']:.4f}  error {h['error']:.2e}  w_k {h['jacobian_weights']}")


if __name__ == "__main__":
    main()
