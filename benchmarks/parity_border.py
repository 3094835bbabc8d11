"""Where the image score's patch sits: anomalens's border pooling vs zero padding (issue 11).

    PYTHONPATH=src nice -n 5 /work/main/.venv-anomalib/bin/python benchmarks/parity_border.py

A companion of parity.py (same data and settings: the first 100 magnetic-tile training images in
the bank, seed 0 hold-out and coreset, every 2nd test image, the synthetic thin cracks). For each
pooling it reports how often the largest patch distance of an image, which is PatchCore's image
score, lies in the three outer rings of the 32x32 grid (34 % of the positions).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import torch

from anomalens.components.neighbors import NearestNeighbors, greedy_coreset
from anomalens.data.mvtec import test_samples, training_images
from anomalens.data.preprocessing import load_resized
from anomalens.features.backbones import create_backbone
from anomalens.features.patches import flatten_patches

spec = importlib.util.spec_from_file_location("parity", Path(__file__).with_name("parity.py"))
P = importlib.util.module_from_spec(spec)
spec.loader.exec_module(P)


def main(root: str = "../shared/datasets/magnetic_tile") -> None:
    torch.set_num_threads(2)
    paths = training_images(root)
    train = load_resized(paths[:100], P.SIZE)
    syn, syn_labels, _ = P.synthetic(load_resized(paths[100:160], P.SIZE))
    samples = test_samples(root)[::2]
    mt = load_resized([s.path for s in samples], P.SIZE)
    backbone = create_backbone(P.NAME, P.PC_LAYERS)
    train_maps = P.backbone_maps(backbone, train)
    tests = {
        "magnetic_tile": (P.backbone_maps(backbone, mt), np.array([s.label for s in samples])),
        "synthetic": (P.backbone_maps(backbone, syn), syn_labels),
    }
    learn = np.sort(np.random.default_rng(P.SEED).permutation(100)[10:])
    report = {}
    for zero_pad in (False, True):
        full = flatten_patches(P.embed([m[learn] for m in train_maps], zero_pad))
        bank = full[greedy_coreset(full.numpy(), P.RATIO, 64, P.SEED)].numpy()
        index = NearestNeighbors(bank)
        for name, (maps, labels) in tests.items():
            features = P.embed(maps, zero_pad)
            count, _, height, width = features.shape
            patches = flatten_patches(features).numpy()
            _, nearest = index.search(patches, 1)
            distances = np.linalg.norm(patches - bank[nearest[:, 0]], axis=1)
            best = distances.reshape(count, -1).argmax(1)
            rows, cols = best // width, best % width
            ring = np.minimum(
                np.minimum(rows, cols), np.minimum(height - 1 - rows, width - 1 - cols)
            )
            key = f"{name} {'zero-padded' if zero_pad else 'anomalens'} pooling"
            report[key] = {
                "normal: max patch in rings 0-2": float((ring[labels == 0] <= 2).mean()),
                "anomalous: max patch in rings 0-2": float((ring[labels == 1] <= 2).mean()),
            }
            print(key, report[key], flush=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
