"""The input-pipeline benchmark's report (written by `bench/data.py`): a result as markdown, its
start-up and steady-state tables, how start-up grows with the folder, the other processes' load
during the cases and the errors met."""

from __future__ import annotations

import statistics
from typing import Any


def _s(value: float | None, estimated: bool = False) -> str:
    if value is None:
        return "—"
    text = (
        f"{value:.4f}"
        if value < 0.1
        else f"{value:.3f}"
        if value < 1
        else f"{value:.2f}"
        if value < 10
        else f"{value:.1f}"
        if value < 100
        else f"{value:.0f}"
    )
    return f"~{text} (est.)" if estimated else text


def _f(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def _n(value: float | None) -> str:
    return "—" if value is None else f"{value:.0f}"


def _x(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def markdown(report: dict[str, Any]) -> str:
    m, cfg = report["machine"], report["config"]
    v = m["versions"]
    lines = [
        "# Input pipeline: start-up and steady state",
        "",
        f"CPU: {m['cpu']}, {m['usable_cores']} usable cores ({m['cpu_count']} online); "
        f"Python {m['python']}, numpy {v['numpy']}, Pillow {v['pillow']}, grain {v['grain']}, "
        f"torch {v['torch']}, torchvision {v['torchvision']}, timm {v['timm']}.",
        f"before = deit at {cfg['before']}; after = {cfg['after']}. Medians of {cfg['rounds']} "
        "interleaved rounds, each case in a fresh interpreter.",
        "",
        "Folders (bench/imagenet_like.py: 500×375 / 375×500 JPEG q90):",
        "",
    ]
    for key, f in report["folders"].items():
        lines.append(
            f"- {key}: {f['classes']} classes × {f['train_per_class']} train + "
            f"{f['val_per_class']} val = {f['files']} files, {f['mean_kb']:.0f} KB per file"
        )
    startup = report.get("startup")
    if startup:
        lines += [
            "",
            "## Start-up: seconds to the first training batch",
            "",
            f"From just before `import deit.data` (which imports jax) to the first batch of "
            f"{cfg['batch']}; no XLA compile. before: `load_sources` decodes every image, on every "
            "start. after: start = empty `$DEIT_HOME` (lists the folder, writes the index); "
            "resume = the same `$DEIT_HOME` again. scan: a bare `os.scandir` of every class "
            "folder (train and val) in a fresh interpreter.",
            "",
            "| size | files | workers | scan | before start | before resume | after start "
            "| after resume | after import | after start − import |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in startup["summary"]:
            est = row["before mode"] == "estimated"
            imp = row.get("after start import")
            net = row["after start"] - imp if row["after start"] is not None and imp else None
            lines.append(
                f"| {row['size']} | {row['files']} | {row['workers']} | {_s(row['scan'])} "
                f"| {_s(row['before start'], est)} | {_s(row['before resume'], est)} "
                f"| {_s(row['after start'])} | {_s(row['after resume'])} | {_s(imp)} "
                f"| {_s(net)} |"
            )
        notes = [r for r in startup["summary"] if r["before mode"] in ("single", "estimated")]
        for row in notes:
            what = (
                "ran once (resume = start)"
                if row["before mode"] == "single"
                else "estimated from the smaller size's per-file rate"
            )
            lines.append(f"\nbefore at {row['size']}: {what}, over the --before-budget.")
        growth = _growth(startup["summary"])
        if growth:
            lines += ["", growth]
    tp = report.get("throughput")
    if tp:
        pack = tp.get("pack")
        lines += [
            "",
            f"## Steady state: training pipeline at {cfg['img_size']}, batch {cfg['batch']}",
            "",
            f"On {report['throughput_size']}: decode, random-resized crop, flip, RandAugment "
            f"rand-m9-mstd0.5-inc1. Images/s over batches {cfg['warmup']}..."
            f"{cfg['warmup'] + cfg['batches'] - 1} (the first ones skipped so prefetching does "
            "not inflate it); first batch = seconds from the first import. Per worker = img/s ÷ "
            "max(workers, 1) (0 workers: in the main process, which may still use several cores "
            "through threads); cores busy = the whole machine's CPU use during the timed batches "
            "(the pipeline's own on a quiet machine).",
            "",
            "| pipeline | workers | first batch s | img/s | img/s per worker | cores busy "
            "| × timm | × 0 workers |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in tp["summary"]:
            rate, each = _n(row["images_per_s"]), _n(row["images_per_s_per_worker"])
            if row["rate"] != "images_per_s":
                rate += " ‡"
            if row["buffered"]:
                rate += f" † ({_n(row['late_images_per_s'])})"
            lines.append(
                f"| {row['pipeline']} | {row['workers']} | {_s(row['first_batch_s'])} "
                f"| {rate} | {each} | {_f(row['busy_cores'])} | {_x(row['vs_timm'])} "
                f"| {_x(row['vs_0_workers'])} |"
            )
        threads = {r.get("torch_threads") for r in tp["summary"] if r.get("torch_threads")}
        lines += [
            "",
            "ours yields uint8 HWC images (normalisation is done on the device); timm's transform "
            "also makes float CHW tensors, normalises and applies random erasing (re_prob 0.25). "
            f"torch left at its defaults: {', '.join(map(str, sorted(threads))) or '?'} intra-op "
            "thread(s) in the main process (DataLoader workers use 1 each). before (folder) is "
            "the old pipeline with its records listed directly (no start-up decode pass); its "
            "grain reads ahead with 16 threads into a 500-batch buffer even with 0 workers, so "
            "‡ its rate is taken from the iterator's creation to the end of the timed batches.",
        ]
        if any(r["buffered"] for r in tp["summary"]):
            lines.append(
                "† the first half of the timed batches came >15% faster than the second: a "
                "prefetch buffer was still draining; (in brackets) the second half's rate, which "
                "the per-worker rate and the ratios use. Use more --batches or a larger --warmup."
            )
        if pack and "error" not in pack:
            lines.append(
                f"Shards: `deit data pack` took {pack['seconds']:.1f} s, "
                f"{pack['bytes'] / 1e6:.0f} MB."
            )
    lines += ["", _contention(report)]
    errors = _errors(report)
    if errors:
        lines += ["", "Errors:", "", *errors]
    return "\n".join(lines) + "\n"


def _growth(rows: list[dict]) -> str | None:
    sizes = sorted({(r["files"], r["size"]) for r in rows})
    if len(sizes) < 2:
        return None
    (n0, k0), (n1, k1) = sizes[0], sizes[-1]
    lo = next(r for r in rows if r["size"] == k0)
    hi = next(r for r in rows if r["size"] == k1 and r["workers"] == lo["workers"])
    parts = [f"files ×{n1 / n0:.1f}"]
    for kind in ("scan", "before start", "after start", "after resume"):
        if lo.get(kind) and hi.get(kind):
            parts.append(f"{kind} ×{hi[kind] / lo[kind]:.1f}")
    imp0, imp1 = lo.get("after start import"), hi.get("after start import")
    if lo.get("after start") and hi.get("after start") and imp0 and imp1:
        net = (hi["after start"] - imp1) / max(lo["after start"] - imp0, 1e-9)
        parts.append(f"after start less import ×{net:.1f}")
    return f"From {k0} to {k1} ({lo['workers']} workers): " + ", ".join(parts) + "."


def _contention(report: dict) -> str:
    loads = [
        r["others_cores"]
        for part in ("startup", "throughput")
        for r in (report.get(part) or {}).get("raw", [])
        if "others_cores" in r
    ]
    if not loads:
        return "Other processes' CPU use during the cases: not measured (no /proc/stat)."
    busy = sum(v > 0.25 for v in loads)
    text = (
        f"Other processes' CPU use during the cases: mean {statistics.mean(loads):.2f} cores, "
        f"max {max(loads):.2f} (of {report['machine']['usable_cores']})."
    )
    if busy:
        text += (
            f" **{busy} of {len(loads)} cases ran beside more than a quarter core of other work: "
            "rerun on a quiet machine before quoting them.**"
        )
    return text


def _errors(report: dict) -> list[str]:
    seen, out = set(), []
    for part in ("startup", "throughput"):
        for r in (report.get(part) or {}).get("raw", []):
            if "error" in r:
                name = r.get("kind") or r.get("pipeline")
                key = (name, r["error"])
                if key not in seen:
                    seen.add(key)
                    out.append(f"- {name}: {r['error']}")
    pack = (report.get("throughput") or {}).get("pack") or {}
    if "error" in pack:
        out.append(f"- deit data pack: {pack['error']}")
    return out
