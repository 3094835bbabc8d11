"""Which reference should the station's drift watch compare recent scores with?

Fits PatchCore and PaDiM on a small synthetic brick set, then compares, by a two-sample
Kolmogorov-Smirnov test, (a) the scores of the held-out normal images the thresholds were set on
(the model's `validation_scores_`) and (b) the first half of unseen normal images (a baseline
window) with the second half of unseen normal images, unchanged or brightness-shifted. A good
reference gives a large p-value for unchanged images and a small one for shifted ones.

    PYTHONPATH=src python benchmarks/drift_reference.py [--train 24] [--unseen 80]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.stats import ks_2samp

import anomalens
from anomalens.data.mvtec import training_images
from anomalens.data.synthetic import make_category

SHIFTS = {"unchanged": 0, "+20 grey levels": 20, "+40 grey levels": 40}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=24)
    parser.add_argument("--unseen", type=int, default=80)
    parser.add_argument("--size", type=int, default=96)
    args = parser.parse_args()
    root = make_category(
        Path(tempfile.mkdtemp()),
        seed=3,
        n_train=args.train,
        n_test_good=args.unseen,
        n_test_defect=0,
        image_size=args.size,
    )
    unseen = [np.asarray(Image.open(p)) for p in sorted((root / "test" / "good").glob("*.png"))]
    half = len(unseen) // 2
    print(f"{args.train} training images, {args.size} px; {half} baseline + {half} recent unseen")
    print(
        "| model | recent images | validation median | baseline median | recent median "
        "| p vs validation | p vs baseline |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, params in (("patchcore", {"coreset_ratio": 0.25}), ("padim", {})):
        model = anomalens.create(name, image_size=args.size, validation_fraction=0.5, **params)
        model.fit(training_images(root))
        validation = model.validation_scores_
        baseline = model.decision_function(unseen[:half])
        for label, shift in SHIFTS.items():
            recent_images = [
                np.clip(a.astype(int) + shift, 0, 255).astype(np.uint8) for a in unseen[half:]
            ]
            recent = model.decision_function(recent_images)
            print(
                f"| {name} | {label} | {np.median(validation):.1f} | {np.median(baseline):.1f} "
                f"| {np.median(recent):.1f} | {ks_2samp(recent, validation).pvalue:.2g} "
                f"| {ks_2samp(recent, baseline).pvalue:.2g} |"
            )


if __name__ == "__main__":
    main()
