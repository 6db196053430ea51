"""Figures and reports of the image jobs: contact sheets (one row of samples per source), loss curves, tables.

    fig = contact_sheet({"lfw": [img, ...], "gan": [...]})      # images: HxWxC uint8, or floats in [0, 1]
    png = report.add_figure(fig, "samples")                      # embedded in report.html, and returned as PNG
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from shared.errors import DataError
from shared.imageset import IMAGE_SCHEMA
from shared.report import Report
from shared.storage import Storage


def contact_sheet(groups: dict[str, list[np.ndarray]], title: str | None = None):
    """A matplotlib figure: one row per group (its name on the left), its images left to right, pixels unsmoothed."""
    import matplotlib.pyplot as plt

    cols = max((len(v) for v in groups.values()), default=1) or 1
    rows = max(1, len(groups))
    fig, axes = plt.subplots(rows, cols, figsize=(1.1 * cols + 1.6, 1.15 * rows + (0.4 if title else 0.1)),
                             squeeze=False)
    for r, (name, images) in enumerate(groups.items()):
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if c < len(images):
                image = np.asarray(images[c])
                if image.ndim == 3 and image.shape[-1] == 1:
                    image = image[..., 0]
                ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0,
                          vmax=255 if image.dtype == np.uint8 else 1, interpolation="nearest")
        axes[r][0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def image_grid(groups: dict[str, list[np.ndarray]], title: str | None = None) -> bytes:
    """:func:`contact_sheet` as PNG bytes."""
    import io

    import matplotlib.pyplot as plt

    fig = contact_sheet(groups, title)
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def train_report(cfg: Any, out: dict[str, Any], store: Storage) -> str:
    """report.html of a train-ddpm stage: settings, loss per epoch, samples next to training images."""
    report = Report(f"train-ddpm: {cfg.data}")
    history = out["history"]
    report.text(f"{out['images']} training images at {cfg.image_size} px ({out['color']}), UNet widths {cfg.widths} "
                f"({out['parameters'] / 1e6:.2f} M parameters), {cfg.epochs} epochs, {history[-1]['step']} steps "
                f"of {cfg.batch_size}, {history[-1]['seconds']:.0f} s.")
    fig, ax = report.figure()
    ax.plot([h["epoch"] for h in history], [h["loss"] for h in history])
    ax.set_xlabel("epoch")
    ax.set_ylabel("MSE (noise prediction)")
    ax.set_yscale("log")
    report.add_figure(fig, "Training loss (mean per epoch)")
    if out.get("preview"):
        add_png(report, out["preview"], "Training images and samples of the saved (EMA) model, seeds 0..N-1, "
                                        "not picked")
    return report.save(store, "report.html")


def add_png(report: Report, png: bytes, caption: str) -> None:
    """Embed PNG bytes (a preview the training task made) with a caption."""
    import base64
    import html

    data = base64.b64encode(png).decode()
    report.parts.append(f'<figure><img src="data:image/png;base64,{data}"/><figcaption>{html.escape(caption)}'
                        "</figcaption></figure>")


def train_vae_report(cfg: Any, out: dict[str, Any], store: Storage) -> str:
    """report.html of a train-vae stage: settings, the ELBO terms per epoch, reconstructions and samples."""
    report = Report(f"train-vae: {cfg.data}")
    history = out["history"]
    last = history[-1]
    likelihood = f"sigma {cfg.sigma:g}" if cfg.sigma else f"calibrated sigma (last {last['sigma']:.3f})"
    report.text(f"{out['images']} training images at {cfg.image_size} px ({out['color']}), encoder widths "
                f"{cfg.widths}, latent {cfg.latent_dim} ({out['parameters'] / 1e6:.2f} M parameters), Gaussian "
                f"likelihood with {likelihood}, KL weight {cfg.kl_weight:g} after a {cfg.kl_warmup}-epoch warm-up, "
                f"{cfg.epochs} epochs, {last['step']} steps of {cfg.batch_size}, {last['seconds']:.0f} s. Last "
                f"epoch: loss {last['loss']:.4f} nats per pixel value, KL {last['kl']:.2f} nats per image, "
                f"reconstruction MSE {last['recon_mse']:.5f} (pixels in [0, 1]).")
    fig, axes = report.figure(ncols=2, width=4.5)
    epochs = [h["epoch"] for h in history]
    axes[0].plot(epochs, [h["loss"] for h in history])
    axes[0].set_ylabel("loss (nats per pixel value)")
    axes[1].plot(epochs, [h["kl"] for h in history])
    axes[1].set_ylabel("KL (nats per image)")
    for ax in axes:
        ax.set_xlabel("epoch")
    report.add_figure(fig, "Training objective and KL term (means per epoch)")
    if out.get("preview"):
        add_png(report, out["preview"], "Training images, their reconstructions (decoded posterior means) and "
                                        "samples (decoded z ~ N(0, I), seeds 0..N-1), not picked")
    return report.save(store, "report.html")


# ---------------------------------------------------------------------------------------------------------------------
# The generate job's report, from what was actually written


def read_written(store: Storage, files: list[str], columns: list[str], ids: list[str] | None = None) -> pa.Table:
    """Rows of the shards a writer returned (full URIs; only ``columns``; only ``ids`` when given)."""
    import pyarrow.dataset as pads

    if not files:
        return pa.table({c: pa.array([], IMAGE_SCHEMA.field(c).type) for c in columns})
    fs, _ = store.pyarrow_filesystem()
    from shared.storage import split_uri

    dataset = pads.dataset([split_uri(f)[1] for f in files], filesystem=fs, format="parquet", schema=IMAGE_SCHEMA)
    expression = pads.field("id").isin(ids) if ids is not None else None
    return dataset.to_table(columns=columns, filter=expression)


def generate_report(cfg: Any, store: Storage, wall: dict[str, float], ledger: dict[str, Any],
                    shards: dict[str, list[str]]) -> dict[str, Any]:
    """Count what was written per source (``shards``: the files written for each; ids must be unique), write
    drops.jsonl, contact_sheet.png and report.html; returns the stage metrics."""
    import json
    from collections import Counter

    from shared.imageset import decode_image

    sources = [r.name for r in cfg.reals if r.write] + [g.name for g in cfg.generators]
    specs = {g.name: g for g in cfg.generators}
    rows, sheet, per_source = [], {}, {}
    drops_by = Counter((d["source"], d["reason"]) for d in ledger["drops"])
    total_written, total_wall = 0, 0.0
    for name in sources:
        meta = read_written(store, shards.get(name, []), ["id", "label", "mode"])
        ids = sorted(meta.column("id").to_pylist())
        if len(set(ids)) != len(ids):
            dup = next(i for i, n in Counter(ids).items() if n > 1)
            raise DataError(f"images/{name}: id {dup} was written more than once (a retried task?); rerun the stage")
        dropped = {reason: n for (src, reason), n in drops_by.items() if src == name}
        spec = specs.get(name)
        seconds = wall.get(name, 0.0)
        entry = {
            "label": "real" if spec is None else "fake",
            "mode": "real" if spec is None else spec.mode,
            "written": len(ids),
            "dropped": sum(dropped.values()),
            "drop_reasons": dropped,
            "wall_seconds": round(seconds, 2),
            "images_per_second": round(len(ids) / seconds, 3) if seconds > 0 else None,
            "model_seconds": round(ledger["model_seconds"].get(name, 0.0), 2),
            "actor_cpu_seconds": round(ledger.get("cpu_seconds", {}).get(name, 0.0), 2),
        }
        if ledger.get("setup_seconds", {}).get(name):
            entry["actor_setup_seconds"] = round(max(ledger["setup_seconds"][name]), 2)
        if spec is not None:
            entry.update(model=spec.model, actors=spec.runtime.num_actors, batch_size=spec.batch_size,
                         batch_invariant=spec.batch_invariant)
            for key in ("scheduler", "steps", "strength", "guidance", "sources", "per_source"):
                if hasattr(spec, key):
                    entry[key] = getattr(spec, key)
        per_source[name] = entry
        total_written += len(ids)
        total_wall += seconds
        rows.append({"source": name, **{k: v for k, v in entry.items() if k != "drop_reasons"},
                     "drop reasons": ", ".join(f"{r}: {n}" for r, n in dropped.items()) or "-"})
        first = ids[: cfg.samples_per_source]
        table = read_written(store, shards.get(name, []), ["id", "image"], first)
        by_id = dict(zip(table.column("id").to_pylist(), table.column("image").to_pylist()))
        sheet[name] = [decode_image(by_id[i], f"images/{name}/{i}") for i in first]

    store.write_text("".join(json.dumps(d, default=str) + "\n" for d in ledger["drops"]), "drops.jsonl")
    report = Report(f"generate: {len(sources)} sources, {total_written} images")
    out = cfg.output
    report.text(f"Every image is {out.size}x{out.size} {out.color}, encoded as {out.encoding}"
                f"{f' (quality {out.quality})' if out.encoding == 'jpeg' else ''}, real and fake alike. "
                f"Throughput is images written per second of wall time per source, model loading and Ray start-up "
                f"included; model_seconds is the time spent inside the models (summed over actors), actor_cpu_seconds "
                f"the CPU time of the actors' batches (all threads; a measure of work that a busy machine inflates "
                f"less than wall time), actor_setup_seconds the slowest actor's start-up (imports, model loading). The "
                f"live rate is exported as the Ray metric scopeforge_images_per_second / scopeforge_images_total.")
    report.table("Per source", rows)
    if ledger["drops"]:
        report.table(f"Dropped ({len(ledger['drops'])}; all in drops.jsonl)",
                     [{k: str(v) for k, v in d.items()} for d in ledger["drops"][:50]])
    png = report.add_figure(contact_sheet(sheet), f"The first {cfg.samples_per_source} images of each source by id "
                                                  "(not picked)")
    store.write_bytes(png, "contact_sheet.png")
    report.save(store, "report.html")
    return {
        "images": total_written,
        "real": sum(e["written"] for e in per_source.values() if e["label"] == "real"),
        "fake": sum(e["written"] for e in per_source.values() if e["label"] == "fake"),
        "dropped": len(ledger["drops"]),
        "images_per_second": round(total_written / total_wall, 3) if total_wall else None,
        "output": out.model_dump(),
        "sources": per_source,
    }


def curate_report(cfg: Any, store: Storage, scan: pa.Table, keep: set[str], drops: list[dict[str, Any]],
                  shards: list[str]) -> dict[str, Any]:
    """drops.jsonl, contact_sheet.png and report.html of a curate-images stage (``shards``: the files written);
    returns its metrics."""
    import json
    from collections import Counter

    from shared.imageset import decode_image

    written = read_written(store, shards, ["id"])
    ids = sorted(written.column("id").to_pylist())
    if sorted(keep) != ids:
        raise DataError(f"images/{cfg.name}: {len(ids)} rows written but {len(keep)} kept; rerun the stage")
    reasons = Counter(d["reason"] for d in drops)
    store.write_text("".join(json.dumps(d) + "\n" for d in drops), "drops.jsonl")
    report = Report(f"curate-images: {cfg.name} from {cfg.manifest}")
    c = cfg.subject.classifier
    classifier = f"trained on {len(c.positive)} + {len(c.negative)} example prompts" if c else "-"
    report.text(f"{scan.num_rows} manifest rows, {len(ids)} kept, {len(drops)} dropped. Subject filter: keywords "
                f"{cfg.subject.keywords or '-'}, regex {cfg.subject.regex or '-'}, classifier {classifier}, "
                f"exclude {cfg.subject.exclude or '-'}; "
                f"near duplicates within {cfg.dedup_distance} bits of a 64-bit perceptual hash (first id kept); "
                f"sides in [{cfg.min_side}, {cfg.max_side or 'any'}]. Output {cfg.output.size} px {cfg.output.color}, "
                f"{cfg.output.encoding}.")
    report.table("Rows by outcome", [{"outcome": "kept", "rows": len(ids)}]
                 + [{"outcome": r, "rows": n} for r, n in reasons.most_common()])
    pairs = [d for d in drops if d["reason"] == "near_duplicate"][:20]
    if pairs:
        report.table("Near duplicates (first 20)", [{"dropped": d["id"], "duplicate of": d["duplicate_of"]}
                                                    for d in pairs])
    first = ids[: cfg.samples]
    if first:
        table = read_written(store, shards, ["id", "image"], first)
        by_id = dict(zip(table.column("id").to_pylist(), table.column("image").to_pylist()))
        per_row = 8
        groups = {f"kept {i + 1}-{min(i + per_row, len(first))}": [decode_image(by_id[k]) for k in first[i:i + per_row]]
                  for i in range(0, len(first), per_row)}
        png = report.add_figure(contact_sheet(groups), f"The first {len(first)} kept images by id (not picked)")
        store.write_bytes(png, "contact_sheet.png")
    report.save(store, "report.html")
    return {"rows": scan.num_rows, "kept": len(ids), "dropped": len(drops), "drop_reasons": dict(reasons),
            "output": cfg.output.model_dump()}
