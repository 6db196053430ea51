"""inspect-model: load a model reference on a Ray worker, report its architecture, parameter count and a sample answer.

    scopeforge run inspect-model --set model=smollm2-135m --set output_root=runs/inspect
"""

from __future__ import annotations

import time
from typing import Any

import ray

from shared.configs.inspect_model import InspectModelConfig
from shared.stage import Stage


@ray.remote(num_cpus=1)
def _inspect(cfg: InspectModelConfig) -> dict[str, Any]:
    import torch

    from ray_jobs.metrics import Progress, Throughput
    from ray_jobs.placement import claim
    from shared.generation import chat_prompt, generate_text
    from shared.models import describe_architecture, load_causal_lm

    claim(cfg.stage_name, "inspect task", 0.0)
    progress = Progress(cfg.JOB, cfg.stage_name)
    progress.report(0.0)
    started = time.perf_counter()
    model, tokenizer = load_causal_lm(cfg.model, dtype=cfg.dtype, storage=cfg.storage)
    progress.report(0.5)
    report: dict[str, Any] = {"model": cfg.model, **describe_architecture(model)}
    report["load_seconds"] = round(time.perf_counter() - started, 3)
    report["tokenizer"] = {"class": type(tokenizer).__name__, "vocab": len(tokenizer),
                           "chat_template": tokenizer.chat_template is not None}
    if cfg.prompt and cfg.max_new_tokens > 0:
        with torch.inference_mode():
            started = time.perf_counter()
            prompt = chat_prompt(tokenizer, cfg.prompt)
            report["sample"] = {"prompt": cfg.prompt,
                                "answer": generate_text(model, tokenizer, [prompt],
                                                        max_new_tokens=cfg.max_new_tokens)[0],
                                "seconds": round(time.perf_counter() - started, 3)}
            tokens = len(tokenizer(report["sample"]["answer"], add_special_tokens=False)["input_ids"])
            Throughput(cfg.JOB, cfg.stage_name, ("tokens",)).add(tokens=tokens)  # ray_scopeforge_tokens_total
    progress.report(1.0)
    report["modules"] = str(model)
    return report


def run(cfg: InspectModelConfig, stage: Stage) -> dict[str, Any]:
    report = ray.get(_inspect.remote(cfg))
    stage.store.write_text(report.pop("modules") + "\n", "architecture.txt")
    print(f"{report['model']}: {report['architecture']} with {report['parameters']:,} parameters, "
          f"{report['layers']} layers, hidden {report['hidden_size']}, {report['attention_heads']} heads / "
          f"{report['kv_heads']} KV heads, vocab {report['vocab_size']} ({report['load_seconds']} s to load)")
    if "sample" in report:
        print(f"  Q: {report['sample']['prompt']}\n  A: {report['sample']['answer']}")
    return report
