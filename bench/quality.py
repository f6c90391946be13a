"""Quality of every method on trained tiny models: accuracy, KL and top-1 agreement to full precision.

    .venv/bin/python bench/quality.py [--only llava text] [--epochs 4] [--iters 100]
    .venv/bin/python bench/quality.py --only text --text-layers 12 --methods rtn gptq qvlm-learned --propagation fp
    .venv/bin/python bench/quality.py --schemes "W4A16 g128" "W4A16 ch" "W3A16 g128" --methods gptq-ao qvlm-best \
        --mixed none --dtype bfloat16

Models: the tiny LLaVA trained on the hard shapes task and the tiny text Llama trained on Python's
documentation (``bench/trained.py``'s ``cached_model``; trained into ~/.cache/qvlm/trained on first use). Every
configuration runs ``qvlm.driver.quantize`` in this process (the code the distributed job runs stage by
stage; tests/test_job_local.py checks the job's tensors match it bit for bit) on a fresh copy of the FP model,
then compares the fake-quant model with FP on held-out data.

Grid: schemes W8A8, W6A6, W4A4, W4A16 g128, W4A16 per channel, W3A16 g128 x methods rtn, gptq (natural
order, `gptq-ao` with act-order on static groups), qvlm (search clip / learned / best) x mixed precision none /
sensitivity / kurtosis (extra budget 2%) x propagation fp / stage / quantized (``--stages N`` cuts the
units as a job on N workers would; with one stage `stage` is `quantized`). ``--dtype`` casts the models (and so
the quantizer's scales and every forward pass) to float16 or bfloat16; full precision is then that dtype. Rows that are
provably identical are not repeated: a mixed-precision plan that boosts no linear leaves every scheme at
the base, so its rows equal the `none` rows (checked once by running one such config in full), and where
propagation leaves the quantized tensors bit-identical the two rows are printed as one (`fp=q`).
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from dataclasses import dataclass, replace
from typing import Callable

import torch
from transformers import AutoProcessor, AutoTokenizer, LlamaForCausalLM, LlavaForConditionalGeneration

from jobs.spec import ActivationsSpec, WeightsSpec
from qvlm.config import CalibrationSettings, MixedPrecisionConfig, QuantConfig
from qvlm.batches import batches_for, records_for
from qvlm.driver import layout_of, quantize
from qvlm.method import linear_shapes
from qvlm.evaluate import compare_models, evaluate_records
from qvlm.quant import ActScheme, WeightScheme
from trained import (HELD_OUT_N, HELD_OUT_SKIP, MAX_LENGTH, TEXT_RECIPE, cached_model, perplexity,
                             pydoc_texts, text_windows, window_batches)

SCHEME_BITS = {"W8A8": (8, 128, 8), "W6A6": (6, 128, 6), "W4A4": (4, 128, 4), "W4A16 g128": (4, 128, 16),
               "W4A16 ch": (4, -1, 16), "W3A16 g128": (3, 128, 16)}
METHODS = {"rtn": {"method": "rtn"}, "gptq": {"method": "gptq", "act_order": False},
           "gptq-ao": {"method": "gptq", "act_order": True},
           "qvlm-clip": {"method": "qvlm", "search": "clip"}, "qvlm-learned": {"method": "qvlm", "search": "learned"},
           "qvlm-best": {"method": "qvlm", "search": "best"},
           # partition ablation at the same search per block (the same candidates and steps in every block):
           # fixed depth 1 (every unit its own block), and fixed depth 3 (h0 = 0: every pair with any dependency
           # is joined, so blocks of 3 consecutive units)
           "qvlm-best-d1": {"method": "qvlm", "search": "best", "max_block_depth": 1},
           "qvlm-best-d3": {"method": "qvlm", "search": "best", "max_block_depth": 3, "h0": 0.0}}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MIXED = ("none", "sensitivity", "kurtosis")
PROPAGATION = ("fp", "stage", "quantized")
EXTRA_BUDGET = 0.02
CAL_SAMPLES, CAL_BATCH = 64, 8


def schemes() -> dict[str, tuple[WeightScheme, ActScheme]]:
    """Each name's weight and activation scheme as a job file with only ``bits`` set resolves them."""
    out = {}
    for name, (w_bits, group, a_bits) in SCHEME_BITS.items():
        w = WeightsSpec(bits=w_bits, group_size=group)
        bits, granularity, symmetric = ActivationsSpec(bits=a_bits).resolved()
        out[name] = (WeightScheme(w.bits, w.group_size, w.symmetric), ActScheme(bits, granularity, symmetric))
    return out


def describe(w: WeightScheme, a: ActScheme) -> str:
    group = "per channel" if w.group_size == -1 else f"group {w.group_size}"
    weights = f"int{w.bits} {'sym' if w.symmetric else 'asym'} {group}"
    if not a.enabled:
        return f"weights {weights}; activations fp"
    kind = "dynamic per-token" if not a.static else f"static per-{a.granularity} (calibrated ranges)"
    return f"weights {weights}; activations int{a.bits} {'sym' if a.symmetric else 'asym'} {kind}"


@dataclass
class Model:
    """One benchmark subject: its FP model, calibration batches and a quality function of a model."""

    name: str
    fp: torch.nn.Module
    batches: list
    quality: Callable[[torch.nn.Module], dict]  # -> {"score": ..., "kl": ..., "top1": ...}
    score_name: str


def llava_subject(cal_seed: int = 0) -> Model:
    path = cached_model("llava")
    settings = CalibrationSettings(data="builtin:shapes-hard", samples=CAL_SAMPLES, eval_samples=HELD_OUT_N,
                                   max_length=MAX_LENGTH, batch_size=CAL_BATCH, seed=cal_seed)
    assert settings.samples == HELD_OUT_SKIP  # the held-out records are the ones training.json scores
    cal, held = records_for(settings)
    processor = AutoProcessor.from_pretrained(path)
    fp = LlavaForConditionalGeneration.from_pretrained(path).eval()

    def quality(model):
        r = evaluate_records(fp, model, processor, held, MAX_LENGTH, 64)
        return {"score": r.q_accuracy, "kl": r.kl_mean, "top1": r.top1_agreement}

    return Model(f"tiny LLaVA {path}", fp, batches_for(path, cal, settings), quality, "acc")


def text_subject(layers: int = TEXT_RECIPE.layers, cal_seed: int = 0) -> Model:
    path = cached_model("text", layers=layers)
    tokenizer = AutoTokenizer.from_pretrained(path)
    train, held = pydoc_texts()
    windows = text_windows(train, tokenizer, TEXT_RECIPE.seq_len)
    pick = torch.randperm(len(windows), generator=torch.Generator().manual_seed(cal_seed))[:CAL_SAMPLES]
    cal = window_batches(windows[pick.sort().values], CAL_BATCH)
    held_batches = window_batches(text_windows(held, tokenizer, TEXT_RECIPE.seq_len), 16)
    fp = LlamaForCausalLM.from_pretrained(path).eval()

    def quality(model):
        r = compare_models(fp, model, held_batches)
        return {"score": perplexity(model, held_batches), "kl": r.kl_mean, "top1": r.top1_agreement}

    return Model(f"tiny text Llama {path}", fp, cal, quality, "ppl")


def stage_cut(model, config: QuantConfig, stages: int) -> list[tuple[int, ...]] | None:
    """Units per stage as a job on ``stages`` workers cuts them (cluster.plan.split_stages), balanced here by
    the units' weights; None for one stage."""
    if stages <= 1:
        return None
    from cluster.plan import split_stages

    layout = layout_of(model, config)
    costs = [sum(model.get_submodule(u.linear_name(n)).weight.numel() for n in u.linears) for u in layout.units]
    return split_stages(costs, layout.streams, stages)


def run_one(subject: Model, config: QuantConfig, stages: int = 1) -> dict:
    model = copy.deepcopy(subject.fp)
    t = time.perf_counter()
    model, result = quantize(model, subject.batches, config, stages=stage_cut(model, config, stages))
    seconds_q = time.perf_counter() - t
    shapes = linear_shapes(model, result.units)
    bits = sum(result.schemes[n].storage_bits(*shapes[n]) for n in shapes)
    row = {"boosted": len(result.precision.boosted) if result.precision else 0,
           "bits": bits / sum(o * i for o, i in shapes.values()), "blocks": len(result.blocks),
           "tensors": result.tensors(), "quantize_s": seconds_q, **subject.quality(model)}
    row["seconds"] = time.perf_counter() - t
    return row


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def base_config(args, w: WeightScheme, a: ActScheme, method: str) -> QuantConfig:
    return QuantConfig(weights=w, activations=a, epochs=args.epochs, iters=args.iters, **METHODS[method])


def boosted_plans(subject: Model, args, w: WeightScheme, a: ActScheme) -> dict[str, int]:
    """Linears each mixed-precision metric boosts for this scheme (the plan does not depend on the method)."""
    return {mp: run_one(subject, replace(base_config(args, w, a, "rtn"),
                                         mixed_precision=MixedPrecisionConfig(mp, EXTRA_BUDGET)))["boosted"]
            for mp in MIXED if mp != "none"}


def grid(subject: Model, args) -> tuple[list[list], list[str]]:
    """The table's rows and notes on the rows left out as identical."""
    fp_quality = subject.quality(subject.fp)
    rows = [["FP", "-", "-", "-", "-", args.dtype, "-", f"{fp_quality['score']:.4f}", "0", "1.0000", "-", "-"]]
    notes, checked_mp_identity = [], False
    identity_method = next((m for m in args.methods if m != "rtn"), args.methods[0])  # rtn would check little
    for sname, (w, a) in schemes().items():
        if sname not in args.schemes:
            continue
        boosts = boosted_plans(subject, args, w, a) if args.mixed != ["none"] else {}
        idle = [mp for mp, n in boosts.items() if n == 0]
        if idle:
            notes.append(f"{sname}: {' and '.join(idle)} boosted no linear, so those rows equal the `none` rows "
                         f"and are not listed")
        for method in args.methods:
            none_runs: dict[str, dict] = {}
            for mp in args.mixed:
                if mp != "none" and boosts[mp] == 0 and (checked_mp_identity or method != identity_method):
                    continue
                runs = {}
                for prop in args.propagation:
                    cfg = replace(base_config(args, w, a, method), propagation=prop,
                                  mixed_precision=MixedPrecisionConfig(mp, EXTRA_BUDGET))
                    runs[prop] = run_one(subject, cfg, args.stages)
                    print(f"  {subject.score_name} {sname} {method} {mp} {prop}: {runs[prop]['score']:.4f} "
                          f"({runs[prop]['seconds']:.1f}s)", flush=True)
                if mp == "none":
                    none_runs = runs
                elif boosts[mp] == 0:  # the one full check that a no-boost plan reproduces the none rows
                    assert all(same_tensors(runs[p]["tensors"], none_runs[p]["tensors"]) for p in runs), \
                        f"{sname} {method} {mp}: no linear boosted but tensors differ from the none run"
                    checked_mp_identity = True
                    notes.append(f"checked once in full: {sname} {method} {mp} (no boost) gave tensors bit-identical "
                                 f"to {sname} {method} none, for " + ("both propagations" if len(runs) == 2 else f"propagation {next(iter(runs))}"))
                    continue
                rows += format_rows(sname, method, mp, runs)
    return rows, notes


def format_rows(sname: str, method: str, mp: str, runs: dict) -> list[list]:
    def cells(prop, r):
        return [sname, method, mp, prop, r["boosted"], f"{r['bits']:.3f}", r["blocks"], f"{r['score']:.4f}",
                f"{r['kl']:.5f}", f"{r['top1']:.4f}", f"{r['quantize_s']:.1f}", f"{r['seconds']:.1f}"]

    if set(runs) == {"fp", "quantized"} and same_tensors(runs["fp"]["tensors"], runs["quantized"]["tensors"]):
        return [cells("fp=q", runs["fp"])]
    return [cells(p, r) for p, r in runs.items()]


def main() -> None:
    from _common import table  # imports the cluster (ray); bench/peer.py reuses the subjects above without it

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=["llava", "text"], default=["llava", "text"])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS),
                        help="the first besides rtn also runs the one full check that a no-boost plan equals `none`")
    parser.add_argument("--schemes", nargs="+", choices=list(SCHEME_BITS), default=list(SCHEME_BITS))
    parser.add_argument("--propagation", nargs="+", choices=PROPAGATION, default=list(PROPAGATION))
    parser.add_argument("--mixed", nargs="+", choices=MIXED, default=list(MIXED),
                        help="mixed-precision metrics (`none` alone skips the boost plans)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32",
                        help="cast the models to this dtype (computing on CPU); full precision is then that dtype")
    parser.add_argument("--text-layers", type=int, default=TEXT_RECIPE.layers,
                        help="decoder layers of the text model (another depth is trained and cached on first use)")
    parser.add_argument("--epochs", type=int, default=4, help="clip: coordinate passes per block")
    parser.add_argument("--iters", type=int, default=100, help="learned: optimisation steps per block")
    parser.add_argument("--cal-seed", type=int, default=0,
                        help="which calibration records (LLaVA: and held-out records) are drawn; shows what is noise")
    parser.add_argument("--stages", type=int, default=1,
                        help="cut the units into this many stages as a job on as many workers would (blocks stop at "
                             "stage boundaries; `propagation: stage` breaks the chain there)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (2 OpenMP threads spin-wait on each other when the 2 cores are shared)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"qvlm.driver.quantize in this process (the in-process path; the distributed job runs the same steps), "
          f"torch threads {args.threads} on {os.cpu_count()} cores (machine shared: timings are within-run only)")
    print(f"search: clip epochs {args.epochs}, act percentiles {QuantConfig().percentiles}, weight shrinks "
          f"{QuantConfig().shrinks[-1]}..1 ({len(QuantConfig().shrinks)}); learned/best iters {args.iters}; "
          f"qvlm max_block_depth {QuantConfig().max_block_depth}, h0 auto; gptq/rtn one unit per block; "
          f"mixed precision extra budget {EXTRA_BUDGET:.0%} (stop {MixedPrecisionConfig().stop}); lm_head not quantized; "
          f"models in {args.dtype}; stages {args.stages}")
    for name, (w, a) in schemes().items():
        print(f"  {name}: {describe(w, a)}")
    headers = ["scheme", "method", "mixed", "prop", "boosted", "bits/w", "blocks", "SCORE", "KL", "top-1", "q-sec", "sec"]
    subjects = {"llava": lambda: llava_subject(args.cal_seed), "text": lambda: text_subject(args.text_layers, args.cal_seed)}
    for key in args.only:
        t = time.perf_counter()
        subject = subjects[key]()
        subject.fp = subject.fp.to(DTYPES[args.dtype])
        print(f"\n{subject.name}: calibration {CAL_SAMPLES} samples, batch {CAL_BATCH} (loaded in {time.perf_counter() - t:.1f}s)")
        rows, notes = grid(subject, args)
        print(f"\n{subject.name} ({time.perf_counter() - t:.0f}s)")
        print(table([h.replace("SCORE", subject.score_name) for h in headers], rows))
        print("prop fp=q: propagation fp and quantized gave bit-identical quantized tensors (one row for both); "
              "q-sec: quantize time, sec: with the evaluation")
        for note in notes:
            print(note)


if __name__ == "__main__":
    main()
