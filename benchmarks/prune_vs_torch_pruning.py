"""Structured pruning, scopeforge vs Torch-Pruning at the same parameter fraction; and curated vs generic calibration.

    .venv/bin/python benchmarks/prune_vs_torch_pruning.py                               # tiny-llama, smollm2-135m
    .venv/bin/python benchmarks/prune_vs_torch_pruning.py --models tiny-llama --timeout 120

Prints one JSON object per line:

- ``"run"`` lines, one per (model, tool, what is pruned): wall time of importance + pruning, peak resident memory of
  the process, held-out perplexity before/after, achieved fraction, and whether ``save_pretrained`` output reloads
  with plain ``AutoModelForCausalLM.from_pretrained`` to the same logits. Both tools get the same model, calibration
  examples, layers and kept channel / KV-group counts (scopeforge's solver picks them), and the same first-order
  Taylor criterion. Every run is a separate process with a time limit: Torch-Pruning 1.6 is known to spin for 10+
  minutes when pruning heads under grouped-query attention, which is reported as ``"status": "timed out"``; an
  absent ``torch_pruning`` package is reported as ``"status": "absent"``.
- ``"ratio"`` lines: scopeforge / Torch-Pruning for time and peak memory where both finished.
- ``"calibration"`` lines: domain perplexity after pruning (scopeforge, same fraction) when calibrated on domain
  documents vs on the same number of random documents of a mixed pool.
- ``"importance"`` lines: the same figure for other importance methods (``--methods``; magnitude and random by
  default), all at the same fraction on the same data.

Data (read where it lies, nothing is copied into the repo): the domain is Python standard-library documentation
(docstrings of one set of modules for calibration, of other modules held out); the pool mixes it with news articles,
movie reviews and a novel from gensim's bundled test data and SymPy's docstrings. Domain documents stand in for a
curate stage's output here; with a curate stage at hand, pass ``--curated URI``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared.doc_text import docstring_passages  # noqa: E402

DOMAIN_CALIBRATION = ("json", "os", "re", "collections", "functools", "itertools", "pathlib", "subprocess", "argparse",
                      "logging", "typing", "dataclasses", "socket", "csv", "datetime", "decimal", "email.message",
                      "urllib.parse", "sqlite3", "asyncio")
DOMAIN_HELD_OUT = ("fractions", "random", "statistics", "string", "textwrap", "threading", "queue", "shutil",
                   "tempfile", "zipfile", "tarfile", "heapq", "contextlib", "enum", "pickle", "unittest", "doctest")


# ---------------------------------------------------------------------------------------------------------------------
# Text


def _word_chunks(text: str, words: int) -> list[str]:
    tokens = text.split()
    return [" ".join(tokens[i:i + words]) for i in range(0, len(tokens) - words + 1, words)]


def _pool_chunks(words: int) -> dict[str, list[str]]:
    """Non-domain documents of the pool, by source."""
    import gensim

    data = Path(gensim.__file__).parent / "test" / "test_data"
    news = [c for line in (data / "lee_background.cor").read_text(encoding="utf-8").splitlines()
            for c in _word_chunks(line, words)]
    lines = (data / "pang_lee_polarity.cor").read_text(encoding="latin-1").splitlines()
    reviews = [line.split(" ", 1)[1] for line in lines]  # drop the __label__ prefix
    reviews = _word_chunks(" ".join(reviews), words)
    novel = _word_chunks((data / "crime-and-punishment.txt").read_text(encoding="utf-8"), words)
    import sympy  # noqa: F401  (its submodules carry the math docstrings)

    math = docstring_passages(("sympy.core.expr", "sympy.integrals.integrals", "sympy.solvers.solvers",
                               "sympy.matrices.matrixbase", "sympy.series.series", "sympy.simplify.simplify"), words)
    return {"news": news, "reviews": reviews, "novel": novel, "math": math}


def build_data(folder: Path, n: int, words: int, seed: int) -> dict[str, Any]:
    """Parquet files: domain calibration, generic calibration (random pool documents), held-out domain."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    domain = docstring_passages(DOMAIN_CALIBRATION, words)
    held_out = docstring_passages(DOMAIN_HELD_OUT, words)
    pool = {"domain": domain, **_pool_chunks(words)}
    rng = random.Random(seed)
    everything = [(source, text) for source, texts in pool.items() for text in texts]
    generic = rng.sample(everything, n)
    curated = rng.sample(domain, min(n, len(domain)))
    files = {}
    for name, rows in (("curated", [("domain", t) for t in curated]), ("generic", generic),
                       ("held_out", [("domain", t) for t in held_out])):
        files[name] = str(folder / f"{name}.parquet")
        pq.write_table(pa.table({"id": list(range(len(rows))), "text": [t for _, t in rows],
                                 "source": [s for s, _ in rows]}), files[name])
    mix: dict[str, int] = {}
    for source, _ in generic:
        mix[source] = mix.get(source, 0) + 1
    return {"files": files, "pool_sizes": {k: len(v) for k, v in pool.items()}, "generic_mix": mix,
            "curated": len(curated), "held_out": len(held_out)}


# ---------------------------------------------------------------------------------------------------------------------
# One run, in its own process


def _mark(stage: str, started: float) -> None:
    """A progress marker on stderr: after a time-out the parent reports the last one, i.e. where the run was."""
    print(f"@stage {stage} {time.perf_counter() - started:.1f}s", file=sys.stderr, flush=True)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    from shared.lm_data import batches, collate, load_examples
    from shared.models import load_causal_lm, resolve_model
    from shared.perplexity import batch_nll, evaluate_loss
    from shared.pruning.planning import plan_from_config

    clock = time.perf_counter()
    model, tokenizer = load_causal_lm(spec["model"])
    pad = tokenizer.pad_token_id
    calibration, _ = load_examples(spec["calibration"], tokenizer, max_length=spec["max_length"],
                                   max_examples=spec["examples"], seed=0)
    held_out, _ = load_examples(spec["held_out"], tokenizer, max_length=spec["max_length"],
                                max_examples=spec["eval_examples"], seed=0)
    target = plan_from_config(resolve_model(spec["model"]), spec["model"], layers=spec["layers"],
                              fraction=spec["fraction"], prune_attention=spec["attention"])
    before = sum(p.numel() for p in model.parameters())
    rss_loaded = _rss_mb()
    out: dict[str, Any] = {"parameters_before": before}
    if spec.get("baseline"):
        out["heldout_perplexity"] = evaluate_loss(model, held_out, batch_size=4, pad_id=pad).perplexity
        return out

    scale = 1.0 / sum(e.target_tokens for e in calibration)
    _mark("loaded", clock)
    started = time.perf_counter()
    if spec["tool"] == "scopeforge":
        from shared.pruning.groups import prunable_layers
        from shared.pruning.importance import GRADIENT_METHODS, TaylorAccumulator, gradient_pass, static_scores
        from shared.pruning.surgery import prune_model, select

        layers = prunable_layers(model, target.layers)
        method = spec.get("importance", "param_first")
        if method in GRADIENT_METHODS:
            with gradient_pass(model, checkpointing=True), TaylorAccumulator(model, layers, method) as accumulator:
                for batch in batches(calibration, 4, pad):
                    nll, _ = batch_nll(model, batch)
                    (nll * scale).backward()
                scores = accumulator.scores()
        else:
            scores = static_scores(layers, method, seed=0)
        pruned = prune_model(model, select(scores, target.plan)).eval()
    else:
        pruned = _torch_pruning(model, calibration, pad, scale, target, spec["attention"], clock)
    out["prune_seconds"] = round(time.perf_counter() - started, 2)
    _mark("pruned", clock)
    out["peak_rss_mb"] = round(_rss_mb(), 1)
    out["peak_rss_over_loaded_mb"] = round(_rss_mb() - rss_loaded, 1)
    after = sum(p.numel() for p in pruned.parameters())
    out.update(parameters_after=after, achieved_fraction=round(1 - after / before, 4),
               planned_fraction=round(target.plan.achieved_fraction, 4))
    out["heldout_perplexity_after"] = evaluate_loss(pruned, held_out, batch_size=4, pad_id=pad).perplexity
    out.update(_reload_check(pruned, collate(calibration[:2], pad)))
    return out


def _torch_pruning(model: Any, calibration: list, pad: int, scale: float, target: Any, attention: bool,
                   clock: float) -> Any:
    """Torch-Pruning's MetaPruner with its group Taylor importance, asked for the same kept counts per layer."""
    import torch
    import torch_pruning as tp

    from shared.lm_data import batches
    from shared.perplexity import batch_nll

    keep = {k.index: k for k in target.plan.keep}
    ignored: list[Any] = [model.lm_head]
    ratios: dict[Any, float] = {}
    head_ratios: dict[Any, float] = {}
    num_heads: dict[Any, int] = {}
    for index, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        ignored += [attn.o_proj, mlp.down_proj]
        if index in keep:
            ratios[mlp.gate_proj] = ratios[mlp.up_proj] = 1 - keep[index].channels / mlp.gate_proj.out_features
        else:
            ignored += [mlp.gate_proj, mlp.up_proj]
        if attention and index in keep:
            heads = attn.q_proj.out_features // attn.head_dim
            kv = attn.k_proj.out_features // attn.head_dim
            num_heads.update({attn.q_proj: heads, attn.k_proj: kv, attn.v_proj: kv})
            groups = keep[index].kv_groups
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                head_ratios[proj] = 1 - groups / kv
                ratios[proj] = 0.0
        else:
            ignored += [attn.q_proj, attn.k_proj, attn.v_proj]
    model.zero_grad(set_to_none=True)
    for batch in batches(calibration, 4, pad):  # Torch-Pruning reads .grad: the whole model's gradient is kept
        nll, _ = batch_nll(model, batch)
        (nll * scale).backward()
    _mark("torch-pruning: gradients done", clock)
    example = torch.tensor([list(calibration[0].input_ids[:16])])
    pruner = tp.pruner.MetaPruner(
        model, example_inputs=example, importance=tp.importance.GroupTaylorImportance(group_reduction="sum"),
        pruning_ratio=0.0, pruning_ratio_dict=ratios, ignored_layers=ignored, round_to=8, num_heads=num_heads,
        prune_num_heads=bool(num_heads), prune_head_dims=False, head_pruning_ratio_dict=head_ratios or None,
        output_transform=lambda out: out.logits)
    _mark("torch-pruning: dependency graph built, pruner.step() running", clock)
    pruner.step()
    _mark("torch-pruning: pruner.step() done", clock)
    model.zero_grad(set_to_none=True)
    for layer in model.model.layers:  # what Torch-Pruning's LLM example patches by hand
        attn = layer.self_attn
        heads = attn.q_proj.out_features // attn.head_dim
        kv = attn.k_proj.out_features // attn.head_dim
        attn.num_key_value_groups = heads // kv
    widths = {(layer.self_attn.q_proj.out_features, layer.self_attn.k_proj.out_features,
               layer.mlp.gate_proj.out_features) for layer in model.model.layers}
    if len(widths) == 1:  # a standard config can describe the result only when every layer is alike
        q, k, inter = widths.pop()
        head_dim = model.model.layers[0].self_attn.head_dim
        model.config.num_attention_heads, model.config.num_key_value_heads = q // head_dim, k // head_dim
        model.config.intermediate_size = inter
    return model.eval()


def _reload_check(model: Any, batch: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        model.save_pretrained(tmp)
        expected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        try:
            reloaded = AutoModelForCausalLM.from_pretrained(tmp).eval()
        except Exception as exc:  # the point is to report what happens, whatever it is
            return {"reloads_with_from_pretrained": False, "reload_error": str(exc).strip().splitlines()[0][:200]}
        got = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        difference = float((got - expected).abs().max()) if got.shape == expected.shape else float("inf")
    return {"reloads_with_from_pretrained": difference <= 1e-4, "reload_max_logit_difference": difference,
            "reloaded_class": type(reloaded).__name__}


def run_child(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", json.dumps(spec)]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        marks = [line[len("@stage "):] for line in err.splitlines() if line.startswith("@stage ")]
        return {"status": "timed out", "timeout_s": timeout, "last_progress": marks[-1] if marks else "none"}
    wall = round(time.perf_counter() - started, 1)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"status": "failed", "error": tail[:300], "process_seconds": wall}
    return {"status": "ok", "process_seconds": wall, **json.loads(lines[-1])}


# ---------------------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny-llama", "smollm2-135m"])
    parser.add_argument("--fraction", type=float, default=0.35)
    parser.add_argument("--examples", type=int, default=32, help="calibration examples (same for every run)")
    parser.add_argument("--eval-examples", type=int, default=48)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--words", type=int, default=150, help="words per text chunk")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per run before it counts as timed out")
    parser.add_argument("--tp-heads-timeout", type=float, default=300,
                        help="time limit of Torch-Pruning runs that prune KV groups (known to hang under GQA)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="seed of the generic sample")
    parser.add_argument("--curated", help="calibration URI to use as 'curated' (e.g. a curate stage)")
    parser.add_argument("--methods", nargs="*", default=["magnitude", "random"],
                        help="scopeforge importance methods to compare with param_first (same data and fraction)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory(prefix="prune-bench-") as tmp:
        data = build_data(Path(tmp), args.examples, args.words, args.seed)
        files = dict(data["files"])
        if args.curated:
            files["curated"] = args.curated
        described = {k: v for k, v in data.items() if k != "files"}
        print(json.dumps({"benchmark": "prune_vs_torch_pruning", "data": described,
                          "fraction": args.fraction, "calibration_examples": args.examples,
                          "max_length": args.max_length, "threads": args.threads, "cpu_count": os.cpu_count(),
                          "load_average": os.getloadavg()}), flush=True)
        try:
            import torch_pruning  # noqa: F401

            have_tp = True
        except ImportError:
            have_tp = False
        for model in args.models:
            base = {"model": model, "fraction": args.fraction, "examples": args.examples,
                    "eval_examples": args.eval_examples, "max_length": args.max_length, "threads": args.threads,
                    "calibration": files["curated"], "held_out": files["held_out"]}
            baseline = run_child({**base, "baseline": True, "attention": True, "tool": "none", "layers": None},
                                 args.timeout)
            ppl_before = baseline.get("heldout_perplexity")
            results = {}
            for tool in ("scopeforge", "torch-pruning"):
                for attention in (False, True):
                    # MLP only: every layer alike (standard config, reloadable by both tools if they get it right);
                    # KV groups too: scopeforge's default layer range (first eighth and last two layers kept)
                    spec = {**base, "tool": tool, "attention": attention, "layers": None if attention else "all"}
                    if tool == "torch-pruning" and not have_tp:
                        result = {"status": "absent", "note": "pip install --no-deps torch-pruning==1.6.1"}
                    else:
                        limit = args.tp_heads_timeout if tool == "torch-pruning" and attention else args.timeout
                        result = run_child(spec, limit)
                    results[(tool, attention)] = result
                    print(json.dumps({"run": tool, "model": model, "prunes": "kv_groups+mlp" if attention else "mlp",
                                      "layers": spec["layers"] or "default",
                                      "heldout_perplexity_before": ppl_before, **result}), flush=True)
            for attention in (False, True):
                ours, theirs = results[("scopeforge", attention)], results[("torch-pruning", attention)]
                if ours.get("status") == theirs.get("status") == "ok":
                    print(json.dumps({
                        "ratio": "scopeforge / torch-pruning", "model": model,
                        "prunes": "kv_groups+mlp" if attention else "mlp",
                        "prune_seconds": round(ours["prune_seconds"] / theirs["prune_seconds"], 3),
                        "peak_rss_over_loaded_mb": round(ours["peak_rss_over_loaded_mb"]
                                                         / max(theirs["peak_rss_over_loaded_mb"], 1e-9), 3),
                        "heldout_perplexity_after": round(ours["heldout_perplexity_after"]
                                                          / theirs["heldout_perplexity_after"], 3)}), flush=True)
            generic = run_child({**base, "tool": "scopeforge", "attention": True, "layers": None,
                                 "calibration": files["generic"]}, args.timeout)
            curated = results[("scopeforge", True)]
            line = {"calibration": "curated vs generic", "model": model, "fraction": args.fraction,
                    "heldout_domain_perplexity_before": ppl_before,
                    "curated": curated.get("heldout_perplexity_after", curated.get("status")),
                    "generic": generic.get("heldout_perplexity_after", generic.get("status")),
                    "generic_mix": data["generic_mix"]}
            if isinstance(line["curated"], float) and isinstance(line["generic"], float):
                line["curated_over_generic"] = round(line["curated"] / line["generic"], 3)
            print(json.dumps(line), flush=True)
            methods = {"param_first": curated.get("heldout_perplexity_after", curated.get("status"))}
            for method in args.methods:
                if method == "param_first":
                    continue
                result = run_child({**base, "tool": "scopeforge", "attention": True, "layers": None,
                                    "importance": method}, args.timeout)
                methods[method] = result.get("heldout_perplexity_after", result.get("status"))
            print(json.dumps({"importance": "held-out domain perplexity after pruning", "model": model,
                              "fraction": args.fraction, "before": ppl_before, **methods}), flush=True)


if __name__ == "__main__":
    main()
