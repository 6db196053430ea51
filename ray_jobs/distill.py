"""distill: self-data distillation (teacher rewrites on Ray Data) and recovery fine-tuning (Ray Train).

    scopeforge run distill --set student=runs/demo-finescope/prune --set data=runs/demo-finescope/curate

1. build examples from the curated rows (plain documents become continuation tasks);
2. mode=distilled: the teacher rewrites every answer in an actor pool, the filter keeps or rejects each rewrite;
3. fine-tune the student on the result with Ray Train (checkpoints in the stage folder: a rerun resumes); in
   mode=kd on the curated answers, against the next-token distributions of the teacher each worker holds;
4. rank 0 saves the recovered model to model/.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import ray.data
import ray.train

from ray_jobs.data import actor_pool
from ray_jobs.metrics import Throughput, TrainingProgress
from ray_jobs.placement import claim
from ray_jobs.train_launch import StageRef, fit_workers
from shared.configs.distill import DistillConfig
from shared.data import read_table, write_parquet
from shared.distill.examples import Example, build_examples, replay_examples
from shared.distill.finetune import encode_for_training
from shared.distill.report import write_report
from shared.distill.rewriter import TeacherRewriter, student_tokenizer
from shared.distill.teacher import distilled_table, judge, tally
from shared.errors import DataError
from shared.lm_data import LMExample
from shared.stage import Stage

DISTILLED = "distilled"


class TeacherActor:
    """A TeacherRewriter on the device Ray assigned to this actor."""

    def __init__(self, cfg: DistillConfig, stage_name: str):
        device = claim(stage_name, "teacher actor", cfg.runtime.gpus_per_actor, cfg.runtime.threads).device
        self.step = TeacherRewriter(cfg.teacher_model, cfg.generation, cfg.seed, cfg.dtype, device, cfg.storage)
        self.step.setup()
        self.throughput = Throughput("distill", stage_name, ("documents", "tokens"))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out, tokens = self.step.rewrite(batch)
        self.throughput.add(documents=len(out["id"]), tokens=tokens)
        return out


def teacher_outputs(cfg: DistillConfig, examples: list[Example], stage: Stage) -> dict[str, tuple[str, bool]]:
    """id -> (teacher text, finished) for every example, from an actor pool over a Ray Dataset."""
    rows = [{"id": e.id, "prompt": e.prompt, "answer": e.answer, "kind": e.kind} for e in examples]
    ds = ray.data.from_items(rows).repartition(max(cfg.runtime.most_actors * 2,
                                                   -(-len(rows) // cfg.generation.batch_size)))
    generated = ds.map_batches(TeacherActor, fn_constructor_kwargs={"cfg": cfg, "stage_name": stage.name},
                               compute=actor_pool(cfg.runtime),
                               batch_size=cfg.generation.batch_size, num_cpus=cfg.runtime.cpus_per_actor,
                               num_gpus=cfg.runtime.gpus_per_actor or None)
    return {str(r["id"]): (str(r["teacher_output"]), bool(r["finished"])) for r in generated.iter_rows()}


# ---------------------------------------------------------------------------------------------------------------------
# Ray Train


@dataclass(frozen=True)
class StudentWork:
    """What every training worker gets: the config, the stage, and the encoded examples (loss on answer tokens)."""

    cfg: DistillConfig
    stage: StageRef
    examples: list[LMExample]


def train_loop(work: StudentWork) -> None:
    """Per worker: load the student, resume from the latest checkpoint of this stage, train, checkpoint, save."""
    import torch

    from ray_jobs.train_launch import report_state, restore_state
    from shared.distill.finetune import (
        Distiller,
        Schedule,
        merged_for_saving,
        prepare_student,
        step_examples,
        train_step,
        trainable_parameters,
    )
    from shared.models import load_causal_lm, save_model
    from shared.storage import Storage

    cfg, examples = work.cfg, work.examples
    t = cfg.training
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = claim(work.stage.name, "training worker", 1.0 if cfg.runtime.use_gpu else 0.0,
                   train=True).device
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_causal_lm(cfg.student, dtype="float32", device=device, storage=cfg.storage)
    model = prepare_student(model, t.method, t.lora).to(device)  # on its device before the optimiser state loads
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=t.lr, weight_decay=t.weight_decay)
    schedule = Schedule(len(examples), t.batch_size, t.epochs, t.decay)
    start, history = 0, []
    fingerprint = {"config": work.stage.config_hash}
    state = restore_state(fingerprint, "distill")
    if state is not None:
        model.load_state_dict(state["model"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        start, history = state["step"], state["history"]
        if rank == 0:
            print(f"resuming from the checkpoint at step {start} of {schedule.total_steps}", flush=True)
    model = ray.train.torch.prepare_model(model, move_to_device=True)
    no_sync = getattr(model, "no_sync", None)
    distiller = None
    if cfg.mode == "kd":  # the frozen teacher beside the student, on the same device
        teacher, _ = load_causal_lm(cfg.teacher_model, dtype=cfg.dtype, device=device, storage=cfg.storage)
        distiller = Distiller(teacher.requires_grad_(False), cfg.kd.temperature, cfg.kd.weight)
    progress = TrainingProgress("distill", work.stage.name) if rank == 0 else None
    started = time.time()
    for step in range(start, schedule.total_steps):
        for group in optimizer.param_groups:
            group["lr"] = t.lr * schedule.lr_factor(step)
        mine = step_examples(examples, step, schedule, rank, world, cfg.seed)
        loss, tokens = train_step(model, optimizer, mine, t.micro_batch, tokenizer.pad_token_id, t.bf16, no_sync,
                                  distiller)
        metrics = {"step": step + 1, "loss": loss, "tokens": tokens, "lr": optimizer.param_groups[0]["lr"],
                   "seconds": round(time.time() - started, 1)}
        history.append(metrics)
        if progress is not None:
            progress.report(loss, (step + 1) / schedule.total_steps)
            print(f"step {step + 1}/{schedule.total_steps}: loss {loss:.4f} ({tokens} answer tokens)", flush=True)
        last = step + 1 == schedule.total_steps
        if (step + 1) % t.checkpoint_every == 0 or last:
            inner = getattr(model, "module", model)
            trainable = {k: v for k, v in inner.state_dict().items() if t.method == "full" or "lora_" in k}
            report_state(metrics, {"model": trainable, "optimizer": optimizer.state_dict(), "step": step + 1,
                                   "history": history}, fingerprint, rank=rank)
        else:
            ray.train.report(metrics)
    if rank == 0:
        stage_store = Storage(work.stage.attempt_uri, cfg.storage)
        save_model(merged_for_saving(model), tokenizer, stage_store, "model")
        stage_store.write_json(history, "training_history.json")


def fine_tune(cfg: DistillConfig, stage: Stage, examples: list[LMExample]) -> list[dict[str, Any]]:
    fit_workers(train_loop, StudentWork(cfg, StageRef.of(stage), examples), stage, cfg.runtime, run_name="train")
    return stage.store.read_json("training_history.json")


# ---------------------------------------------------------------------------------------------------------------------
# Driver


def run(cfg: DistillConfig, stage: Stage) -> dict[str, Any]:
    t0 = time.time()
    tokenizer = student_tokenizer(cfg.student, cfg.teacher_model if cfg.uses_teacher else None, cfg.storage)
    rows = read_table(cfg.data, cfg.storage).to_pylist()
    if not rows:
        raise DataError(f"data {cfg.data}: the curated set is empty")
    try:
        examples, too_short = build_examples(rows, cfg.generation.prompt_fraction, cfg.generation.min_answer_words)
    except DataError as exc:
        raise DataError(f"data {cfg.data}: {exc}") from None
    print(f"{len(examples)} examples ({sum(e.kind == 'continuation' for e in examples)} continuation tasks); "
          f"{too_short} rows too short to use", flush=True)

    # 2. teacher rewrites, filtered
    timings: dict[str, float] = {}
    if cfg.mode == "distilled":
        outputs = teacher_outputs(cfg, examples, stage)
        decisions = [judge(e, *outputs[e.id]) for e in examples]
        teacher_text = [outputs[e.id][0] for e in examples]
        stopped = sum(outputs[e.id][1] for e in examples)
        stops = {"stop_token": stopped, "max_new_tokens": len(examples) - stopped}
        print(f"teacher generations: {stopped} ended on a stop token, {len(examples) - stopped} at max_new_tokens",
              flush=True)
    else:
        decisions, teacher_text, stops = [], [""] * len(examples), {}
    timings["generation_s"] = round(time.time() - t0, 1)
    answers = [d.answer for d in decisions] if decisions else [e.answer for e in examples]
    table = distilled_table(examples, decisions, answers, teacher_text)
    write_parquet(table, stage.store, DISTILLED, "part-000.parquet")
    counts = tally(decisions) if decisions else {}
    if counts:
        print("teacher rewrites: " + ", ".join(f"{k} {v}" for k, v in counts.items()), flush=True)

    # 3. fine-tune on the answers (loss on answer tokens only), with general text replayed beside them
    replay = replay_examples(read_table(cfg.replay, cfg.storage).to_pylist(), {e.id for e in examples},
                             cfg.replay_share, len(examples), cfg.generation.prompt_fraction,
                             cfg.generation.min_answer_words, cfg.seed) if cfg.replay else []
    if replay:
        print(f"replay: {len(replay)} general-text examples from {cfg.replay}", flush=True)
    encoded, encode_stats = encode_for_training(tokenizer, examples + replay, answers + [r.answer for r in replay],
                                                cfg.training.max_length)
    if not encoded:
        raise DataError(f"data {cfg.data}: no example fits training.max_length={cfg.training.max_length}")
    t1 = time.time()
    history = fine_tune(cfg, stage, encoded)
    timings["training_s"] = round(time.time() - t1, 1)
    stage.outputs.update(model="model", dataset=DISTILLED)
    metrics = {
        "mode": cfg.mode, "student": cfg.student, "teacher": cfg.teacher if cfg.uses_teacher else None,
        "examples": len(examples), "rows_too_short": too_short,
        "replay": {"source": cfg.replay, "examples": len(replay)},
        "filter": counts, "generation_stops": stops,
        "teacher_kept_share": (counts["kept"] + counts["kept_trimmed"]) / len(examples) if counts else None,
        "training": {"method": cfg.training.method, "steps": len(history), "final_loss": history[-1]["loss"]
                     if history else None, "first_loss": history[0]["loss"] if history else None,
                     "examples": len(encoded), **encode_stats, "history": history},
        "timings": {**timings, "total_s": round(time.time() - t0, 1)},
    }
    write_report(stage.store, cfg, metrics, table)
    return metrics
