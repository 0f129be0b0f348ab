"""Cost of evaluation: post-processing per frame, the axiom metrics' channel ablations, the sanity check.

Prints measured numbers (best of ``--repeat`` runs); asserts nothing.

  scoring      normalise + aggregate (7 layer sets) + mask + IoU, 7 methods x 4 layers, per frame,
               for each threshold rule (Otsu sorts every map)
  spearman/ssim  per pair of crop-size maps
  axioms       axiom_metrics for all methods at layer1..layer4 per frame (K ablations per layer,
               --chunk at a time) against one explainer call for the same frames
  sanity       cascading_randomization (5 explainer calls) per frame

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_evaluate.py [--model resnet18] [--size 96] [--device cpu]
"""

from __future__ import annotations

import argparse

from timing import best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=96, help="input and crop size (paper: 230)")
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import torch

    import xrcam
    from xrcam.metrics import axiom_metrics, cascading_randomization, spearman, ssim
    from xrcam.scoring import STANDARD_LAYER_SETS, aggregate, iou, make_masks, normalize

    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    model = xrcam.load_model(args.model, num_classes=2).to(device)
    images = torch.randn(args.frames, 3, args.size, args.size, device=device)
    methods = xrcam.list_methods()
    layers = ("layer1", "layer2", "layer3", "layer4")
    exp = xrcam.create_explainer(model, methods=methods, layers=layers)(images)
    gt = torch.rand(args.frames, args.size, args.size, device=device) > 0.8
    sets = ["1", "2", "3", *STANDARD_LAYER_SETS]
    print(
        f"{args.model}, {args.frames} frames of {args.size}x{args.size}, {device}, {torch.get_num_threads()} threads"
    )

    for rule in ("mean+std", "fraction", "otsu"):

        def post(rule=rule):
            for method in methods:
                norm = {
                    layer: normalize(m, args.size, method=method) for layer, m in exp.maps[method].items()
                }
                for layer_set in sets:
                    iou(make_masks(aggregate(norm, layer_set), rule), gt)
            sync()

        t = best(post, args.repeat)
        print(f"scoring     {rule:9s} {1000 * t / args.frames:8.1f} ms/frame (7 methods x {len(sets)} sets)")

    a, b = torch.rand(2, 64, args.size, args.size, device=device).unbind(0)
    for name, fn in (("spearman", spearman), ("ssim", ssim)):
        t = best(lambda fn=fn: (fn(a, b), sync()), args.repeat)
        print(f"{name:20s} {1000 * t / 64:8.2f} ms/pair")

    explainer = xrcam.create_explainer(
        model, methods=methods, layers=layers, clrp="logit", contributions=True
    )
    t_explain = best(lambda: (explainer(images), sync()), args.repeat)
    t_axioms = best(
        lambda: (axiom_metrics(model, images, methods=methods, layers=layers, chunk_size=args.chunk), sync()),
        args.repeat,
    )
    channels = sum(_channels(model, layer) for layer in layers)
    print(
        f"explain (all 7)      {1000 * t_explain / args.frames:8.1f} ms/frame\n"
        f"axioms (all 7)       {1000 * t_axioms / args.frames:8.1f} ms/frame "
        f"({channels} ablations/frame, chunk {args.chunk}; {t_axioms / t_explain:.1f}x one explainer call)"
    )
    t_sanity = best(
        lambda: (cascading_randomization(model, images, methods=methods, layers=layers), sync()), args.repeat
    )
    print(f"sanity (all 7)       {1000 * t_sanity / args.frames:8.1f} ms/frame (4 randomisation steps)")


def _channels(model, layer: str) -> int:
    return int(model.feature_info[int(layer[5:])]["num_chs"])


if __name__ == "__main__":
    main()
