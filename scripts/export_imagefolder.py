"""Write a built-in data set as an ImageFolder tree of PNG files (lossless), numbered in the
data set's own order, so that `--dataset imagefolder` on the export reads the same samples in
the same order as the original (docs/results.md uses it to check the streaming path against
the resident MNIST path).

    python scripts/export_imagefolder.py --dataset mnist --data-dir data --out mnist-png
"""

import argparse
import sys
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dist_resnet import datasets  # noqa: E402
from dist_resnet.images import displayable  # noqa: E402


def export(name: str, data_dir: str, out: Path) -> None:
    train, test = datasets.open_splits(name, datasets.Options(data_dir))
    for split_name, split in (("train", train), ("test", test)):
        digits = len(str(len(split) - 1))
        for i in range(len(split)):
            image, label = split[i]
            folder = out / split_name / split.spec.class_names[label].replace("/", "-")
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(displayable(image.numpy())).save(folder / f"{i:0{digits}d}.png")
        print(f"{split_name}: {len(split)} images in {out / split_name}", file=sys.stderr)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=[n for n in datasets.DATASETS if n != "imagefolder"], default="mnist")
    parser.add_argument("--data-dir", default="./data")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    export(args.dataset, args.data_dir, args.out)
