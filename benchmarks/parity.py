"""Parity harness: anomalens PatchCore and PaDiM against anomalib 2.7's torch models (issue 11).

    PYTHONPATH=src nice -n 5 /work/main/.venv-anomalib/bin/python benchmarks/parity.py \
        --data ../shared/datasets/magnetic_tile --max-train 100 --test-step 2 \
        --json benchmarks/out/parity.json

Needs an environment with anomalib==2.7.0 (benchmarks/RESULTS.md says how it was built). Both
implementations get the same tensors: every image is resized once by anomalens (256x256 squash,
antialiased bilinear); anomalens normalises inside its Backbone, anomalib gets (x - 0.5) / 0.5.
anomalib's models are built with pre_trained=False and given the offline Lite0 weights. The
backbone runs once per image: its maps are checked equal to anomalib's TimmFeatureExtractor on
real images, then fed (cached) to both sides, anomalib's own forward() included.
Stages: features (border vs interior), coreset, nearest distances, reweighting, maps, image
scores; an ablation switching anomalens's differences to anomalib's one at a time; PaDiM.
The synthetic set: held-out normal training images, half with a thin low-contrast crack.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from anomalib.models.components import KCenterGreedy
from anomalib.models.components.sampling import k_center_greedy
from anomalib.models.image.padim.torch_model import PadimModel
from anomalib.models.image.patchcore.torch_model import PatchcoreModel
from scipy.stats import spearmanr
from torch import nn

import anomalens
from anomalens.components.maps import gaussian_blur
from anomalens.components.neighbors import NearestNeighbors, greedy_coreset
from anomalens.data.mvtec import load_sample_mask, test_samples, training_images
from anomalens.data.preprocessing import load_resized
from anomalens.evaluation.metrics import aupro, image_auroc, pixel_auroc
from anomalens.features.backbones import create_backbone, create_classifier
from anomalens.features.patches import aggregate_patches, flatten_patches
from anomalens.models.patchcore import reweighting

NAME, SIZE, SEED, RATIO, K, SIGMA, CHUNK = "tf_efficientnet_lite0", 256, 0, 0.01, 9, 4.0, 16
PC_LAYERS, PADIM_LAYERS = ["blocks.2", "blocks.4"], ["blocks.1", "blocks.2", "blocks.4"]
# The ablation: anomalens's PatchCore, then each difference switched to anomalib's behaviour.
BASE = {
    "zero_pad": False,
    "coreset": "anomalens",
    "holdout": True,
    "upsample": "bilinear",
    "seed": 0,
}
VARIANTS = {
    "anomalens (default)": {},
    "+ border pooling zero-padded (AvgPool2d(3,1,1))": {"zero_pad": True},
    "+ anomalib coreset (sparse JL projection, int size)": {"coreset": "anomalib"},
    "+ bank from all training images (no 10% hold-out)": {"holdout": False},
    "+ map upsampled nearest (anomalib) before the blur": {"upsample": "nearest"},
    "  (anomalens, seed 1: another hold-out and coreset start)": {"seed": 1},
    "  (anomalens, seed 2)": {"seed": 2},
    "all four switched (= anomalib)": {
        "zero_pad": True, "coreset": "anomalib", "holdout": False, "upsample": "nearest"
    },
}  # fmt: skip


class Feeder(nn.Module):
    """Stands in for a feature extractor: returns the cached maps of the current batch, as a dict
    (anomalib's TimmFeatureExtractor) or a list (anomalens's Backbone)."""

    def __init__(self, layers: list[str] | None) -> None:
        super().__init__()
        self.layers, self.maps = layers, []

    def forward(self, _: torch.Tensor):
        return dict(zip(self.layers, self.maps, strict=True)) if self.layers else self.maps


def batches(maps: list[torch.Tensor], feeder: Feeder, step: int = CHUNK):
    """Load `feeder` with each chunk of cached maps; yield a dummy input of the chunk's size."""
    for start in range(0, len(maps[0]), step):
        feeder.maps = [m[start : start + step] for m in maps]
        yield torch.zeros(len(feeder.maps[0]), 3, SIZE, SIZE)


def thin_crack(rng: np.random.Generator) -> np.ndarray:
    """A 1-2.5 px wide polyline of 2-5 segments, 25-50 % of the side long (bool SIZE x SIZE)."""
    count = int(rng.integers(2, 6))
    angles = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, 0.6, count))
    steps = rng.uniform(0.25, 0.5) * SIZE / count * np.stack([np.cos(angles), np.sin(angles)], 1)
    points = np.concatenate([np.zeros((1, 2)), np.cumsum(steps, axis=0)])
    low, high = 12 - points.min(0), SIZE - 12 - points.max(0)
    points += rng.uniform(low, np.maximum(low, high))
    grid = np.stack(np.mgrid[0:SIZE, 0:SIZE][::-1], axis=-1).astype(np.float64)
    half, mask = rng.uniform(0.5, 1.25), np.zeros((SIZE, SIZE), bool)
    for a, b in itertools.pairwise(points):
        t = np.clip((grid - a) @ (b - a) / max((b - a) @ (b - a), 1e-9), 0, 1)
        mask |= np.linalg.norm(grid - a - t[..., None] * (b - a), axis=-1) <= half
    return mask


def synthetic(normal: torch.Tensor, seed: int = SEED):
    """Half of `normal` (uint8) gets a crack of +-0.04-0.08 brightness: pixels, labels, masks."""
    rng, pixels = np.random.default_rng(seed), normal.float() / 255
    labels = np.r_[np.zeros(len(pixels) - len(pixels) // 2), np.ones(len(pixels) // 2)]
    masks = [np.zeros((SIZE, SIZE), bool) for _ in labels]
    for i in np.flatnonzero(labels):
        masks[i] = thin_crack(rng)
        delta = rng.choice([-1, 1]) * rng.uniform(0.04, 0.08)
        pixels[i][:, torch.from_numpy(masks[i])] += delta
    return pixels.clamp_(0, 1), labels, masks


@torch.inference_mode()
def backbone_maps(backbone: nn.Module, pixels: torch.Tensor) -> list[torch.Tensor]:
    unit = pixels.float() / 255 if pixels.dtype == torch.uint8 else pixels
    parts = [backbone(unit[s : s + CHUNK]) for s in range(0, len(unit), CHUNK)]
    return [torch.cat(level) for level in zip(*parts, strict=True)]


def quality(scores, maps, labels, masks, reference=None) -> dict:
    row = {"image_auroc": image_auroc(labels, scores), "pixel_auroc": pixel_auroc(masks, maps)}
    row["aupro"] = aupro(masks, maps)
    if reference is not None:
        row["spearman_vs_anomalib"] = float(spearmanr(scores, reference).statistic)
    return row


def embed(maps: list[torch.Tensor], zero_pad: bool) -> torch.Tensor:
    if zero_pad:  # anomalib: torch.nn.AvgPool2d(3, 1, 1), zero padding counted in the mean
        return aggregate_patches([F.avg_pool2d(m, 3, 1, 1) for m in maps], neighbourhood=1)
    # anomalens before issue 11: the mean over the window's positions inside the image only.
    return aggregate_patches(maps, damp_border=False)


def lib_coreset(bank: torch.Tensor) -> list[int]:
    k_center_greedy.tqdm = lambda steps, **_: steps  # no progress bar
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    return KCenterGreedy(bank, RATIO).select_coreset_idxs()


def score(bank: np.ndarray, maps: list[torch.Tensor], zero_pad: bool, upsample: str):
    """anomalens's scoring (FAISS, exact distances, eq. 7 reweighting) with switchable parts;
    returns reweighted scores, max patch distances, maps and the inputs of the reweighting."""
    index, out = NearestNeighbors(bank), {"score": [], "raw": [], "maps": [], "rw": []}
    for start in range(0, len(maps[0]), CHUNK):
        features = embed([m[start : start + CHUNK] for m in maps], zero_pad)
        count, _, height, width = features.shape
        patches = flatten_patches(features).numpy()
        _, nearest = index.search(patches, 1)
        dist = np.linalg.norm(patches - bank[nearest[:, 0]], axis=1).reshape(count, -1)
        best = dist.argmax(1)
        rows = np.arange(count)
        test = patches.reshape(count, height * width, -1)[rows, best]
        _, support = index.search(bank[nearest[:, 0].reshape(count, -1)[rows, best]], K)
        weights = reweighting(torch.from_numpy(test), torch.from_numpy(bank[support])).numpy()
        out["raw"].append(dist[rows, best])
        out["score"].append(out["raw"][-1] * weights)
        out["rw"].append((test, bank[support]))
        coarse = torch.from_numpy(dist.reshape(count, 1, height, width))
        kwargs = {"align_corners": False} if upsample == "bilinear" else {}
        fine = F.interpolate(coarse, size=(SIZE, SIZE), mode=upsample, **kwargs)
        out["maps"].append(gaussian_blur(fine, SIGMA)[:, 0].numpy())
    return {key: np.concatenate(v) if key != "rw" else v for key, v in out.items()}


def lib_patchcore(train: list[torch.Tensor], tests: dict) -> tuple[PatchcoreModel, dict]:
    model = PatchcoreModel(PC_LAYERS, NAME, pre_trained=False, num_neighbors=K)
    model.feature_extractor = feeder = Feeder(PC_LAYERS)
    model.train()
    for dummy in batches(train, feeder):
        model(dummy)
    full = torch.vstack(model.embedding_store)
    model.embedding_store.clear()
    model.coreset_idx = lib_coreset(full)
    model.memory_bank, model.full_bank = full[model.coreset_idx], full
    model.eval()
    return model, lib_scores(model, tests, feeder)


def lib_scores(model, tests, feeder) -> dict:
    """anomalib's image scores and maps of each named set of cached maps."""
    out = {}
    for name, maps in tests.items():
        results = [model(dummy) for dummy in batches(maps, feeder)]
        out[name] = (
            torch.cat([r.pred_score for r in results]).numpy(),
            torch.cat([r.anomaly_map for r in results])[:, 0].numpy(),
        )
    return out


def lib_padim(train, tests, channels: torch.Tensor | None) -> dict:
    torch.manual_seed(SEED)  # its channel subset: torch.randperm
    model = PadimModel(NAME, PADIM_LAYERS, pre_trained=False, n_features=100)
    if channels is not None:
        model.idx = channels
    model.feature_extractor = feeder = Feeder(PADIM_LAYERS)
    model.train()
    for dummy in batches(train, feeder):
        model(dummy)
    model.fit()
    model.eval()
    return lib_scores(model, tests, feeder)


def border_split(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Max |a - b| by a grid position's distance to the edge (0 = outermost ring, ..., 4+)."""
    diff = (a - b).abs().amax(dim=1)
    rows, cols = torch.meshgrid(*(torch.arange(n) for n in diff.shape[-2:]), indexing="ij")
    edge = torch.minimum(torch.minimum(rows, cols), torch.minimum(rows.flip(0), cols.flip(1)))
    by_ring = {f"ring {d}": float(diff[:, edge == d].max()) for d in range(4)}
    return {
        **by_ring,
        "ring 4+": float(diff[:, edge >= 4].max()),
        "mean_abs": float(a.abs().mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets/magnetic_tile"))
    parser.add_argument("--max-train", type=int, default=100)
    parser.add_argument("--test-step", type=int, default=2, help="every n-th test image")
    parser.add_argument("--synthetic", type=int, default=60, help="held-out normal images")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()
    report: dict = {"anomalens": anomalens.__file__, "torch": torch.__version__, "args": str(args)}

    # ---- data: the same uint8 256x256 tensors for both implementations -------------------
    paths = training_images(args.data)
    train_u8 = load_resized(paths[: args.max_train], SIZE)
    syn_pixels, syn_labels, syn_masks = synthetic(
        load_resized(paths[args.max_train : args.max_train + args.synthetic], SIZE)
    )
    samples = test_samples(args.data)[:: args.test_step]
    sets = {
        "magnetic_tile": (
            load_resized([s.path for s in samples], SIZE),
            np.array([s.label for s in samples]),
            [load_sample_mask(s, (SIZE, SIZE)) for s in samples],
        ),
        "synthetic": (None, syn_labels, syn_masks),
    }
    report["sizes"] = {"train": len(train_u8), **{k: len(v[1]) for k, v in sets.items()}}

    # ---- stage 1: backbone maps and patch features -----------------------------------------
    backbone = create_backbone(NAME, PADIM_LAYERS)
    lib_extractor = PatchcoreModel(PC_LAYERS, NAME, pre_trained=False).feature_extractor
    loaded = lib_extractor.feature_extractor.load_state_dict(
        create_classifier(NAME).state_dict(), strict=False
    )
    assert not loaded.missing_keys, loaded.missing_keys
    probe = sets["magnetic_tile"][0][:CHUNK].float() / 255
    with torch.inference_mode():
        ours, theirs = backbone(probe)[1:], lib_extractor((probe - 0.5) / 0.5)
        pooled = {k: nn.AvgPool2d(3, 1, 1)(v) for k, v in theirs.items()}
        lib_embedding = PatchcoreModel.generate_embedding(
            type("M", (), {"layers": PC_LAYERS})(), pooled
        )
    report["features"] = {
        "backbone_max_abs_diff": [
            float((a - b).abs().max()) for a, b in zip(ours, theirs.values(), strict=True)
        ],
        "patch_features_anomalens_vs_anomalib": border_split(embed(ours, False), lib_embedding),
        "patch_features_zero_pad_vs_anomalib": border_split(embed(ours, True), lib_embedding),
    }
    print(json.dumps(report["features"], indent=1), flush=True)
    train_maps = backbone_maps(backbone, train_u8)
    test_maps = {
        "magnetic_tile": backbone_maps(backbone, sets["magnetic_tile"][0]),
        "synthetic": backbone_maps(backbone, syn_pixels),  # float: not re-quantised
    }
    print(f"features done {time.time() - started:.0f}s", flush=True)

    # ---- anomalib PatchCore end to end (its forward, the cached maps as its extractor) --------
    pc_train, pc_tests = train_maps[1:], {k: v[1:] for k, v in test_maps.items()}
    lib, lib_out = lib_patchcore(pc_train, pc_tests)
    print(f"anomalib patchcore done {time.time() - started:.0f}s", flush=True)

    # ---- anomalens PatchCore: the class (fit on the images), then the switchable pipeline --
    model = anomalens.create("patchcore", seed=SEED).fit(list(train_u8.permute(0, 2, 3, 1).numpy()))
    model.backbone_ = feeder = Feeder(None)
    class_scores = {
        name: np.concatenate([model.predict_batch(d)[0] for d in batches(maps, feeder)])
        for name, maps in pc_tests.items()
    }
    banks: dict = {}

    def bank_of(zero_pad: bool, holdout: bool, coreset: str, seed: int) -> np.ndarray:
        key = (zero_pad, holdout, coreset, seed)
        if key not in banks:  # the hold-out as Detector.fit draws it
            order = np.random.default_rng(seed).permutation(len(train_u8))
            learn = np.sort(order[max(1, round(len(train_u8) * 0.1)) :])
            keep = learn if holdout else np.arange(len(train_u8))
            full = flatten_patches(embed([m[keep] for m in pc_train], zero_pad))
            reference = (True, False, "anomalib", SEED)
            if key == reference:  # the very bank anomalib built: reuse its pick
                report["bank_vs_anomalib_max_abs_diff"] = float((full - lib.full_bank).abs().max())
                idx = lib.coreset_idx
            elif coreset == "anomalib":
                idx = lib_coreset(full)
            else:
                idx = greedy_coreset(full.numpy(), RATIO, 64, seed)
            banks[key] = np.ascontiguousarray(full[idx].numpy())
        return banks[key]

    rows: dict = {}
    for label, change in VARIANTS.items():
        v = {**BASE, **change}
        bank = bank_of(v["zero_pad"], v["holdout"], v["coreset"], v["seed"])
        rows[label] = {}
        for name, maps in pc_tests.items():
            _, labels, masks = sets[name]
            out = score(bank, maps, v["zero_pad"], v["upsample"])
            rows[label][name] = quality(out["score"], out["maps"], labels, masks, lib_out[name][0])
            if label == "anomalens (default)":
                rows[label][name]["max_abs_diff_vs_class"] = float(
                    np.abs(out["score"] - class_scores[name]).max()
                )
                rows.setdefault("  (image score without reweighting)", {})[name] = quality(
                    out["raw"], out["maps"], labels, masks, lib_out[name][0]
                )
                test, support = out["rw"][0]
                distances = torch.cdist(torch.from_numpy(test)[:, None], torch.from_numpy(support))
                lib_weights = 1 - F.softmax(distances[:, 0], 1)[..., 0]
                ens_weights = reweighting(torch.from_numpy(test), torch.from_numpy(support))
                report.setdefault("reweighting_formula_max_abs_diff", {})[name] = float(
                    (lib_weights - ens_weights).abs().max()
                )
            if v == {**BASE, **VARIANTS["all four switched (= anomalib)"]}:
                rows[label][name]["map_max_abs_diff_vs_anomalib"] = float(
                    np.abs(out["maps"] - lib_out[name][1]).max()
                )
                rows[label][name]["score_max_abs_diff_vs_anomalib"] = float(
                    np.abs(out["score"] - lib_out[name][0]).max()
                )
        print(label, json.dumps(rows[label]), f"{time.time() - started:.0f}s", flush=True)
    rows["anomalib 2.7 PatchcoreModel"] = {
        name: quality(*lib_out[name], *sets[name][1:]) for name in pc_tests
    }
    report["patchcore"] = rows

    # ---- coreset and nearest-distance stages on anomalib's own bank --------------------------
    full = lib.full_bank
    ours_idx = greedy_coreset(full.numpy(), RATIO, 64, SEED)
    queries = full[::7].numpy()
    coverage = {}
    for name, idx in (("anomalib", lib.coreset_idx), ("anomalens", ours_idx)):
        dist, _ = NearestNeighbors(full[idx].numpy()).search(queries, 1)
        coverage[name] = {"size": len(idx), "max": float(dist.max()), "mean": float(dist.mean())}
    coverage["overlap"] = len(set(ours_idx.tolist()) & set(lib.coreset_idx)) / len(lib.coreset_idx)
    probe_patches = flatten_patches(embed([m[:CHUNK] for m in pc_tests["magnetic_tile"]], True))
    lib_dist, lib_near = lib.nearest_neighbors(probe_patches, 1)
    index = NearestNeighbors(lib.memory_bank.numpy())
    _, near = index.search(probe_patches.numpy(), 1)
    exact = np.linalg.norm(probe_patches.numpy() - lib.memory_bank.numpy()[near[:, 0]], axis=1)
    report["coreset"] = coverage
    report["nearest"] = {
        "max_abs_diff": float(np.abs(exact - lib_dist.numpy()).max()),
        "same_index": float((near[:, 0] == lib_near.numpy()).mean()),
    }
    noise = torch.rand(2, 1, SIZE, SIZE)
    blurred = lib.anomaly_map_generator.blur(noise) - gaussian_blur(noise, SIGMA)
    report["blur_max_abs_diff"] = float(blurred.abs().max())
    print(json.dumps({k: report[k] for k in ("coreset", "nearest")}), flush=True)

    # ---- PaDiM ---------------------------------------------------------------------------
    padim = anomalens.create("padim", seed=SEED).fit(list(train_u8.permute(0, 2, 3, 1).numpy()))
    assert list(padim.layers) == PADIM_LAYERS, padim.layers
    padim.backbone_ = feeder = Feeder(None)
    lib_own = lib_padim(train_maps, test_maps, None)
    lib_same = lib_padim(train_maps, test_maps, padim.channels_)
    padim_rows: dict = {}
    for name, maps in test_maps.items():
        _, labels, masks = sets[name]
        outs = [padim.predict_batch(d) for d in batches(maps, feeder)]
        scores, amaps = (np.concatenate(part) for part in zip(*outs, strict=True))
        reference = lib_own[name][0]
        padim_rows.setdefault("anomalens PaDiM (default)", {})[name] = quality(
            scores, amaps, labels, masks, reference
        )
        padim_rows.setdefault("anomalib PadimModel, anomalens's channels", {})[name] = quality(
            *lib_same[name], labels, masks, reference
        )
        padim_rows.setdefault("anomalib 2.7 PadimModel", {})[name] = quality(
            *lib_own[name], labels, masks
        )
    report["padim"] = padim_rows
    report["seconds"] = time.time() - started
    print(json.dumps(padim_rows, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
