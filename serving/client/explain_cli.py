"""Explain one image with a running server: the heatmap overlay and the feature-map grids.

    python -m serving.client explain cat.png --output cat-explained.png [--method grad_cam]

Writes the overlay to --output and each layer's feature maps beside it
(cat-explained-<layer>.png); prints the predictions and what was explained.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from serving.client.aio import EXPLAIN_METHODS
from serving.client.connection import add_call_arguments
from serving.client.results import Explanation, RequestError
from serving.client.sync import Classifier


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m serving.client explain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image", type=Path, help="PNG, JPEG, BMP or GIF file")
    parser.add_argument("--output", type=Path, default=None,
                        help="the overlay PNG (default: <image>-explained.png beside the image)")
    parser.add_argument("--method", choices=sorted(EXPLAIN_METHODS), default=None,
                        help="default: the model's default (occlusion)")
    parser.add_argument("--class", dest="target_class", type=int, default=None,
                        help="class index to explain (default: the top-1 prediction)")
    parser.add_argument("--layer", dest="layers", action="append", default=[],
                        help="feature maps of this layer (repeatable; default: the model's default layers)")
    parser.add_argument("--patch", type=int, default=0, help="occlusion patch side in pixels (default 8)")
    parser.add_argument("--stride", type=int, default=0, help="occlusion stride in pixels (default: half the patch)")
    add_call_arguments(parser, timeout=30.0)
    return parser.parse_args(argv)


def write_outputs(explanation: Explanation, output: Path) -> list[Path]:
    """The overlay at `output`, each layer's grid beside it."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(explanation.heatmap_png)
    written = [output]
    for feature_map in explanation.feature_maps:
        path = output.with_name(f"{output.stem}-{feature_map.layer}{output.suffix or '.png'}")
        path.write_bytes(feature_map.png)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    output = args.output or args.image.with_name(f"{args.image.stem}-explained.png")
    with Classifier(args.target, model=args.model, version=args.version, label=args.label, top_k=args.top_k,
                    token=args.token, tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key,
                    timeout=args.timeout) as classifier:
        try:
            explanation = classifier.explain(args.image, method=args.method, target_class=args.target_class,
                                             layers=args.layers, patch_size=args.patch, stride=args.stride)
        except OSError as exc:
            print(f"{args.image}: {exc.strerror or exc}", file=sys.stderr)
            return 2
        except RequestError as err:
            print(f"{args.image}: {err}", file=sys.stderr)
            return 1
    ranked = ", ".join(f"{p.label} {p.probability:.3f}" for p in explanation.predictions)
    print(f"{args.image}: {ranked}  [{explanation.model} v{explanation.version}]")
    print(f"explained {explanation.target_label} (class {explanation.target_class}) by "
          f"{explanation.method}, {explanation.forward_passes} forward passes")
    for path in write_outputs(explanation, output):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
