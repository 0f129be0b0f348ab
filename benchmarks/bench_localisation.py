"""Localisation benchmark: do the maps find the psammoma-like bodies? Tables 1-2 with references and CIs.

For each training seed and each variant (without / with dark vessel distractors) it generates the
``blobs`` design of :mod:`xrcam.synth` as Cellvizio-like ``.mkt`` videos (576x578, FOV inscribed
square ``--crop`` px, the paper's is 230), trains a resnet18 from scratch (``xrcam.training``),
explains every annotated test frame with all seven methods at layers 1-4 (``xrcam.explain``) and
scores the maps through the SPEC §5 post-processing (upsample -> min-max -> mean+std -> IoU, on
correctly classified frames only) beside the reference rows of :mod:`xrcam.references` (random,
centre, oracle, intensity) and the sign check (each method's inverted map). Every mIoU carries a
95 % CI by bootstrap over test patients (:func:`xrcam.uncertainty.bootstrap_ci`), pooled over the
seeds (patients of different seeds are different patients). It prints Table 1 (per layer) and Table 2
(layer sets), the method ordering per layer next to the paper's, and the aggregation diagnosis
(why 4+3+2+1 does or does not beat layer 1: the mask threshold rule, the normalisation, the resolution).

Single process, no Ray. Heavy: run it niced, e.g.

    nice -n 10 .venv/bin/python benchmarks/bench_localisation.py --out /tmp/bench-loc
    .venv/bin/python benchmarks/bench_localisation.py --seeds 0 --patients 12 --crop 96 --size 160 160  # quick

Asserts nothing; it prints numbers (and writes the per-frame rows as Parquet into ``--out``).
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from pathlib import Path

import numpy as np

PAPER_TABLE1 = {  # SK-ResNeXt, Table 1 of the paper (layer 1..4)
    "gradcam": (16.38, 18.46, 33.14, 31.82),
    "gradcampp": (8.44, 20.23, 35.01, 32.15),
    "xgradcam": (14.40, 24.77, 36.20, 31.82),
    "hirescam": (15.06, 21.93, 30.56, 31.82),
    "layercam": (22.19, 27.50, 32.0, 31.70),
    "relevancecam": (18.0, 30.37, 33.42, 31.0),
    "xrelevancecam": (28.07, 31.83, 35.11, 32.31),
}
LAYER_SETS = ("4", "4+3", "4+3+2", "4+3+2+1")
LAYERS = ("layer1", "layer2", "layer3", "layer4")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _post():
    """The SPEC §5 post-processing functions (the scoring core that reduce and evaluate use)."""
    from xrcam import scoring

    return scoring


def test_frames(root: Path, data, split_rows, frame_step: int):
    """Grey crops in [0, 1], GT masks and patients of every annotated test frame, as training cropped them."""
    import torch

    from xrcam.archive import discover_archive, load_masks
    from xrcam.io.readers import open_video
    from xrcam.preprocess import PreprocessConfig, Preprocessor

    test = {r["video_id"] for r in split_rows if r["split"] == "test"}
    size = data.frames["test"].images.shape[-1]
    config = PreprocessConfig(frame_step=frame_step, mean=(0.0,) * 3, std=(1.0,) * 3, size=size)
    grey, gt, patients, labels = [], [], [], []
    for entry in discover_archive(root).entries:
        if entry.video_id not in test or entry.mask_path is None:
            continue
        masks = load_masks(entry)
        with open_video(entry.path) as reader:
            pre = Preprocessor.for_video(reader, config)
            kept = set(pre.frame_indices(reader.num_frames)) & set(masks)
            frames = [(i, f) for i, f in reader.read(step=frame_step) if i in kept]
        grey.append(pre(np.stack([f for _, f in frames]))[:, 0])
        gt.append(torch.from_numpy(np.stack([pre.crop_mask(masks[i], frame=i) for i, _ in frames])))
        patients += [entry.patient] * len(frames)
        labels += [data.classes.index(entry.label)] * len(frames)
    return torch.cat(grey), torch.cat(gt), patients, torch.tensor(labels)


def score(model, data, grey, gt, patients, labels, *, batch: int = 16, rules=("mean+std",)) -> list[dict]:
    """Per-frame IoU rows: every method, its inverted map and every reference, at every layer and set."""
    import torch

    import xrcam
    from xrcam.references import RANDOM_DRAWS, REFERENCES, reference_map

    post = _post()
    methods = xrcam.list_methods()
    explainer = xrcam.create_explainer(model, methods=methods, layers=LAYERS)
    mean = torch.tensor(data.frames["test"].mean).view(1, 3, 1, 1)
    std = torch.tensor(data.frames["test"].std).view(1, 3, 1, 1)
    generator = torch.Generator().manual_seed(0)
    rows: list[dict] = []
    sets = ["1", "2", "3", *LAYER_SETS]

    def emit(name, kind, norm_per_layer, correct, sel_patients, draws=1):
        for rule in rules:
            for layer_set in sets:
                ious = []
                for norm in norm_per_layer:
                    agg = post.aggregate(norm, layer_set)
                    ious.append(post.iou(post.make_masks(agg, rule), sel_gt))
                value = torch.stack(ious).nanmean(0) if draws > 1 else ious[0]
                area = (
                    post.make_masks(post.aggregate(norm_per_layer[0], layer_set), rule)
                    .flatten(1)
                    .float()
                    .mean(1)
                )
                for i in range(len(value)):
                    rows.append({"name": name, "kind": kind, "rule": rule, "layer_set": layer_set,
                                 "patient": sel_patients[i], "correct": bool(correct[i]),
                                 "iou": float(value[i]), "mask_fraction": float(area[i]),
                                 "gt_fraction": float(sel_gt[i].float().mean())})  # fmt: skip

    for start in range(0, len(grey), batch):
        g = grey[start : start + batch]
        sel_gt = gt[start : start + batch]
        x = (g[:, None].repeat(1, 3, 1, 1) - mean) / std
        exp = explainer(x)
        correct = (exp.logits.argmax(1) == labels[start : start + batch]).tolist()
        sel_patients = patients[start : start + batch]
        size = tuple(sel_gt.shape[-2:])
        for method in methods:
            raw = exp.maps[method]
            emit(method, "method", [{k: post.normalize(v, size, method=method) for k, v in raw.items()}],
                 correct, sel_patients)  # fmt: skip
            if method == "xrelevancecam":  # aggregation diagnosis: negative relevance clipped before min-max
                emit(f"{method}|relu", "variant",
                     [{k: post.normalize(v, size, relu=True) for k, v in raw.items()}], correct, sel_patients)  # fmt: skip
            emit(f"inverted_{method}", "sign check",
                 [{k: post.normalize(-v, size, relu=False) for k, v in raw.items()}], correct, sel_patients)  # fmt: skip
        grids = {k: tuple(v.shape[-2:]) for k, v in exp.maps[methods[0]].items()}
        for ref in REFERENCES:
            draws = RANDOM_DRAWS if ref == "random" else 1
            norms = [
                {
                    k: post.normalize(
                        reference_map(ref, gt=sel_gt, frames=g, shape=s, generator=generator),
                        size,
                        relu=False,
                    )
                    for k, s in grids.items()
                }  # fmt: skip
                for _ in range(draws)
            ]
            emit(ref, "reference", norms, correct, sel_patients, draws)
    return rows


def summarise(rows, rule: str = "mean+std"):
    """Long table: mIoU %, 95 % CI over patients, frames and patients per (name, layer set)."""
    import pandas as pd

    from xrcam.uncertainty import bootstrap_ci

    df = pd.DataFrame.from_records(rows)
    df = df[(df["rule"] == rule) & df["correct"]]
    out = []
    for (name, kind, layer_set), part in df.groupby(["name", "kind", "layer_set"], sort=False):
        mean, lo, hi = bootstrap_ci(part["iou"].to_numpy(), part["seed_patient"].to_numpy())
        out.append({"name": name, "kind": kind, "layer_set": layer_set, "miou": 100 * mean,
                    "lo": 100 * lo, "hi": 100 * hi, "frames": len(part), "patients": part["seed_patient"].nunique(),
                    "mask_fraction": 100 * part["mask_fraction"].mean()})  # fmt: skip
    return pd.DataFrame(out)


def print_table(summary, sets, title: str, kinds=("method", "reference", "sign check")) -> None:
    print(f"\n{title}")
    header = f"{'map':<24}" + "".join(f"{s:>22}" for s in sets)
    print(header)
    for kind in kinds:
        part = summary[summary["kind"] == kind]
        for name in dict.fromkeys(part["name"]):
            cells = []
            for s in sets:
                r = part[(part["name"] == name) & (part["layer_set"] == s)]
                cells.append(
                    f"{r.miou.iloc[0]:6.1f} [{r.lo.iloc[0]:5.1f},{r.hi.iloc[0]:5.1f}]" if len(r) else "-"
                )
            label = name if kind == "method" else f"({kind}) {name}"
            print(f"{label:<24}" + "".join(f"{c:>22}" for c in cells))
    any_row = summary[summary["layer_set"] == sets[0]].iloc[0]
    print(
        f"frames {any_row.frames}, patients {any_row.patients} (correctly classified annotated test frames)"
    )


def ordering(summary) -> None:
    print("\nMethod ordering per layer (best first), here vs the paper (SK-ResNeXt, Table 1):")
    methods = summary[summary["kind"] == "method"]
    for k, layer in enumerate(("1", "2", "3", "4")):
        part = methods[methods["layer_set"] == layer].sort_values("miou", ascending=False)
        here = " > ".join(f"{n} {v:.1f}" for n, v in zip(part["name"], part["miou"], strict=True))
        paper = sorted(PAPER_TABLE1, key=lambda m: -PAPER_TABLE1[m][k])
        print(f"layer {layer}: here  {here}")
        print(f"         paper {' > '.join(f'{m} {PAPER_TABLE1[m][k]:.1f}' for m in paper)}")


VARIANTS = {  # name -> (vessel distractors, file format)
    "plain": (False, "mkt"),
    "vessels": (True, "mkt"),
    "png": (False, "png"),  # 8-bit frames scaled /255: no per-frame percentile window
}


def run_one(args, seed: int, variant: str, work: Path) -> tuple[list[dict], dict]:

    import xrcam
    from xrcam.synth import SynthConfig, write_archive
    from xrcam.training import TrainConfig, fit, prepare_data

    distractors, fmt = VARIANTS[variant]
    tag = f"seed{seed}-{variant}"
    root, ckpt = work / tag / "archive", work / tag / "ckpt"
    t0, c0 = time.perf_counter(), cpu_seconds()
    synth = SynthConfig(patients=args.patients, videos=1, frames=args.frames, size=tuple(args.size),
                        bit_depth=16 if fmt == "mkt" else 8,
                        seed=seed, design="blobs", crop=args.crop, layout_every=args.layout_every,
                        distractors=distractors, rims=args.rims)  # fmt: skip
    if not (root / "manifest.csv").exists():
        write_archive(root, synth, fmt)
    config = TrainConfig(model="resnet18", epochs=args.epochs, lr=args.lr, seed=seed, image_size=args.image_size,
                         patience=args.epochs)  # fmt: skip
    data = prepare_data(root, config)
    result = fit(data, ckpt, config, device="cpu", progress=False)
    t1, c1 = time.perf_counter(), cpu_seconds()
    model = xrcam.load_model("resnet18", num_classes=len(data.classes), checkpoint=result.checkpoint).eval()
    grey, gt, patients, labels = test_frames(root, data, data.split_rows, config.frame_step)
    rows = score(model, data, grey, gt, patients, labels, rules=args.rules)
    t2, c2 = time.perf_counter(), cpu_seconds()
    for r in rows:
        r.update(seed=seed, variant=variant, seed_patient=f"{seed}:{r['patient']}")
    info = {"tag": tag, "test_accuracy": result.test_accuracy, "train_frames": len(data.frames["train"]),
            "test_frames_scored": len(grey), "crop": int(grey.shape[-1]),
            "gt_fraction": float(gt.float().mean()), "train_wall_s": t1 - t0, "train_cpu_s": c1 - c0,
            "score_wall_s": t2 - t1, "score_cpu_s": c2 - c1}  # fmt: skip
    print(
        f"[{tag}] test accuracy {info['test_accuracy']:.3f}, {info['train_frames']} training frames, "
        f"{info['test_frames_scored']} annotated test frames at {info['crop']} px (GT {100 * info['gt_fraction']:.1f} %"
        f" of the crop); train {info['train_wall_s']:.0f} s wall / {info['train_cpu_s']:.0f} s CPU, "
        f"explain+score {info['score_wall_s']:.0f} s / {info['score_cpu_s']:.0f} s CPU",
        flush=True,
    )
    return rows, info


def diagnose(df) -> None:
    """Why does (or does not) 4+3+2+1 beat layer 1? Threshold rule, mask size and the resolution ceiling."""
    import pandas as pd

    print("\nAggregation diagnosis (xrelevancecam and the oracle; mean over correctly classified frames):")
    part = df[df["correct"] & df["name"].isin(["xrelevancecam", "xrelevancecam|relu", "oracle", "xgradcam"])]
    table = part.groupby(["name", "rule", "layer_set"])[["iou", "mask_fraction", "gt_fraction"]].mean() * 100
    with pd.option_context("display.width", 160, "display.max_rows", 200):
        print(table.round(1).unstack("layer_set").to_string())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument(
        "--variants", default="plain,vessels", help=f"comma-separated, of {', '.join(VARIANTS)}"
    )
    parser.add_argument(
        "--patients", type=int, default=40, help="per class (80/10/10 split: 4 test per class)"
    )
    parser.add_argument("--frames", type=int, default=16, help="per video (one video per patient)")
    parser.add_argument("--size", type=int, nargs=2, default=(576, 578), metavar=("H", "W"))
    parser.add_argument("--crop", type=int, default=230, help="FOV inscribed square (px); the paper's is 230")
    parser.add_argument(
        "--image-size", type=int, default=128, help="crop resized to this for training/scoring"
    )
    parser.add_argument("--layout-every", type=int, default=2)
    parser.add_argument("--rims", action="store_true")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rules", default="mean+std,otsu,fraction", help="mask rules for the diagnosis")
    parser.add_argument("--out", type=Path, default=Path("bench-localisation"))
    args = parser.parse_args()
    args.rules = tuple(args.rules.split(","))

    import pandas as pd
    import torch

    print(f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()}, crop {args.crop} px in "
          f"{args.size[0]}x{args.size[1]} frames, resized to {args.image_size}; {args.patients} patients/class, "
          f"{args.frames} frames each, layouts every {args.layout_every} frames, {args.epochs} epochs")  # fmt: skip
    wall0, cpu0 = time.perf_counter(), cpu_seconds()
    args.out.mkdir(parents=True, exist_ok=True)
    all_rows, infos = [], []
    for variant in args.variants.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            rows, info = run_one(args, seed, variant, args.out)
            all_rows += rows
            infos.append(info)
    df = pd.DataFrame.from_records(all_rows)
    df.to_parquet(args.out / "iou.parquet")
    pd.DataFrame(infos).to_csv(args.out / "runs.csv", index=False)
    for variant in args.variants.split(","):
        part = df[df["variant"] == variant]
        summary = summarise(part.to_dict("records"))
        if summary.empty:
            print(f"\n===== {variant}: no correctly classified annotated test frame to score =====")
            continue
        summary.to_csv(args.out / f"summary_{variant}.csv", index=False)
        accs = ", ".join(f"{i['test_accuracy']:.3f}" for i in infos if i["tag"].endswith(variant))
        what = {"plain": "no distractors, .mkt", "vessels": "dark vessels in both classes, .mkt",
                "png": "no distractors, 8-bit .png"}[variant]  # fmt: skip
        print(f"\n===== {variant}: {what}"
              f" (seeds {args.seeds}; test accuracy {accs}) =====")  # fmt: skip
        print_table(summary, ("1", "2", "3", "4"), "Table 1: mIoU % [95 % CI over patients] per layer")
        print_table(summary, LAYER_SETS, "Table 2: mIoU % [95 % CI over patients] per layer set",
                    kinds=("method", "reference"))  # fmt: skip
        ordering(summary)
        diagnose(part)
    print(f"\ntotal {time.perf_counter() - wall0:.0f} s wall, {cpu_seconds() - cpu0:.0f} s CPU; "
          f"load average {os.getloadavg()}")  # fmt: skip


if __name__ == "__main__":
    main()
