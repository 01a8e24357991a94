"""Downstream probes (cleandift_rt.probes): loaders on files in the real layouts, metrics against hand
computations, probes that must learn features which linearly encode the answer (and must not learn
noise), the cache (a rerun computes nothing), exact resume, and the three commands end to end with
the tiny model through an Engine."""

from __future__ import annotations

import csv
import hashlib
import json
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cleandift_rt.probes import (DepthProbe, DepthProtocol, FeatureStore, SegmentationProbe, TrainConfig,
                                 confusion_matrix, depth_metrics, iou_scores, knn_classify, line_plot, load_depth_folder,
                                 load_image_folders, load_nyu, load_probe, load_voc, run_dense, run_knn, vote)
from cleandift_rt.probes.depth import resize_matrix
from cleandift_rt.probes.plot import voc_palette

h5py = pytest.importorskip("h5py", reason="the NYUv2 loader needs h5py (pip install h5py)")
scipy_io = pytest.importorskip("scipy.io", reason="splits.mat needs scipy (pip install scipy)")

BLOCK = 16  # synthetic sources pool 16 x 16 pixel blocks into one feature cell
FAST = TrainConfig(epochs=25, batch_size=1, lr=0.3, val_fraction=0.15, patience=10)


# -- synthetic data with known answers ---------------------------------------------------------


def grid_depth(seed: int, size=(480, 640)):
    """(ground truth, image): a smooth random depth field in [1, 9] m on the 16 x 16 block grid; the
    ground truth is its bilinear upsampling (what a perfect grid prediction gives), the image holds
    each block's depth in millimetres (R = high byte, G = low byte), constant over the block."""
    r = np.random.default_rng(seed)
    y, x = np.mgrid[0:size[0] // BLOCK, 0:size[1] // BLOCK].astype(np.float64)
    waves = sum(np.sin(r.uniform(0, 3.5) * y / len(y) + r.uniform(0, 3.5) * x / len(x[0]) * 1.3 + r.uniform(0, 6.3))
                for _ in range(3))
    grid = np.rint((5 + 4 * waves / 3) * 1000) / 1000
    gt = F.interpolate(torch.from_numpy(grid)[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    mm = np.kron(np.rint(grid * 1000).astype(np.int64), np.ones((BLOCK, BLOCK), dtype=np.int64))
    image = np.stack([mm >> 8, mm & 255, np.zeros_like(mm)], -1).astype(np.uint8)
    return gt.numpy().astype(np.float32), image


def blocks(a: np.ndarray) -> np.ndarray:
    """``[..., H, W] -> [..., H / 16, W / 16]`` block means."""
    *lead, hh, ww = a.shape
    return a.reshape(*lead, hh // BLOCK, BLOCK, ww // BLOCK, BLOCK).mean((-3, -1))


class EncodedDepth:
    """Features that linearly encode the depth: tents over 41 anchors of the block-mean depth (a
    partition of unity, so depth = sum anchor * tent), mixed by a fixed random matrix."""

    name, t, tap = "encoded", None, "us6"

    def __init__(self, channels: int = 49, key: str = "encoded-depth"):
        self.key, self.calls = key, 0
        self.anchors = np.linspace(0, 10, 41)
        self.mix = np.random.default_rng(7).normal(size=(channels, len(self.anchors)))

    def compute(self, image) -> np.ndarray:
        self.calls += 1
        rgb = np.asarray(image).astype(np.float64)
        depth = blocks((rgb[..., 0] * 256 + rgb[..., 1]) / 1000)
        step = self.anchors[1] - self.anchors[0]
        tents = np.clip(1 - np.abs(depth[None] - self.anchors[:, None, None]) / step, 0, 1)
        return np.einsum("ca,ahw->chw", self.mix, tents).astype(np.float32)


class Noise:
    """Features that carry nothing: seeded by the image bytes, so the same image gets the same noise."""

    name, t, tap = "noise", None, "us6"

    def __init__(self, channels: int = 48, key: str = "noise"):
        self.channels, self.key, self.calls = channels, key, 0

    def compute(self, image) -> np.ndarray:
        self.calls += 1
        a = np.asarray(image)
        seed = int(hashlib.sha256(a.tobytes()).hexdigest()[:8], 16)
        shape = (self.channels, a.shape[0] // BLOCK, a.shape[1] // BLOCK)
        return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def write_nyu(root, data, train_idx, test_idx):
    """``nyu_depth_v2_labeled.mat`` as MATLAB v7.3 writes it (HDF5, axes reversed) and a v5 ``splits.mat``."""
    root.mkdir(parents=True, exist_ok=True)
    with h5py.File(root / "nyu_depth_v2_labeled.mat", "w") as f:
        f["images"] = np.stack([image.transpose(2, 1, 0) for _, image in data])  # [N, 3, W, H]
        f["depths"] = np.stack([gt.T for gt, _ in data])  # [N, W, H]
    scipy_io.savemat(root / "splits.mat", {"trainNdxs": np.array(train_idx)[:, None] + 1,
                                           "testNdxs": np.array(test_idx)[:, None] + 1})
    return root


def write_depth_tree(root, n_train=24, n_test=4, size=(96, 128)):
    """ROOT/{train,test}/rgb/NAME.png + depth/NAME.png (16-bit mm; every third one as .npy metres)."""
    for split, n, offset in (("train", n_train, 0), ("test", n_test, 100)):
        (root / split / "rgb").mkdir(parents=True)
        (root / split / "depth").mkdir(parents=True)
        for i in range(n):
            gt, image = grid_depth(offset + i, size)
            Image.fromarray(image).save(root / split / "rgb" / f"{i:03d}.png")
            if i % 3 == 2:
                np.save(root / split / "depth" / f"{i:03d}.npy", gt)
            else:
                Image.fromarray(np.rint(gt * 1000).astype(np.uint16)).save(root / split / "depth" / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def nyu(tmp_path_factory):
    data = [grid_depth(i) for i in range(8)]
    root = write_nyu(tmp_path_factory.mktemp("nyu"), data, [0, 2, 3, 5, 6, 7], [1, 4])
    return root, data


# -- depth -------------------------------------------------------------------------------------


def test_nyu_loader_reads_matlab_axis_order_and_the_standard_split(nyu, tmp_path):
    root, data = nyu
    ds = load_nyu(root)
    assert ds.kind == "nyu" and [s.name for s in ds.test] == ["test/0002", "test/0005"]
    assert len(ds.train) == 6
    sample = ds.test[1]  # MATLAB index 5 -> image 4
    np.testing.assert_array_equal(sample.read_target(), data[4][0])
    np.testing.assert_array_equal(sample.read_image(), data[4][1])
    assert load_nyu(root / "nyu_depth_v2_labeled.mat").train[0].image_key == ds.train[0].image_key
    with pytest.raises(FileNotFoundError, match="splits.mat"):
        load_nyu(tmp_path)
    (tmp_path / "nyu_depth_v2_labeled.mat").write_bytes(b"MATLAB 5.0 MAT-file, not HDF5")
    (tmp_path / "splits.mat").write_bytes((root / "splits.mat").read_bytes())
    with pytest.raises(ValueError, match="HDF5"):
        load_nyu(tmp_path)
    bad = write_nyu(tmp_path / "bad", data[:2], [0], [5])
    with pytest.raises(ValueError, match="outside"):
        load_nyu(bad)


def test_depth_metrics_equal_hand_computation():
    gt = np.array([[1.0, 2.0], [4.0, 0.0]])
    pred = np.array([[1.1, 2.0], [5.0, 3.0]])
    m = depth_metrics(pred, gt, gt > 0)  # pixels (1, 1.1), (2, 2), (4, 5)
    assert m["rmse"] == pytest.approx(np.sqrt((0.01 + 0 + 1) / 3))
    assert m["abs_rel"] == pytest.approx((0.1 + 0 + 0.25) / 3)
    assert m["delta1"] == pytest.approx(2 / 3)  # 1.25 itself is not < 1.25
    assert depth_metrics(pred, gt, np.zeros_like(gt, bool)) is None


def test_eigen_crop_and_depth_cap():
    gt = np.full((480, 640), 5.0)
    gt[100, 100], gt[200, 200] = 10.0, 0.0
    nyu = DepthProtocol(1e-3, 10.0, eigen_crop=True, strict_max=True).valid(gt)
    assert nyu.sum() == 426 * 560 - 2 and not nyu[44, 300] and nyu[45, 300] and not nyu[300, 601]
    folder = DepthProtocol(1e-3, 10.0, eigen_crop=False, strict_max=False).valid(gt)
    assert folder.sum() == 480 * 640 - 1 and folder[100, 100]
    with pytest.raises(ValueError, match="480 x 640"):
        DepthProtocol().valid(np.ones((48, 64)))


def test_separable_upsampling_and_loss_equal_the_full_resolution_definitions():
    torch.manual_seed(0)
    x = torch.rand(3, 5, 7)
    ref = F.interpolate(x[None], size=(23, 41), mode="bilinear", align_corners=False)[0]
    sep = resize_matrix(23, 5) @ x @ resize_matrix(41, 7).T
    assert torch.allclose(sep, ref, atol=1e-6)

    probe = DepthProbe(6, n_bins=16, min_depth=0.5, max_depth=8.0)
    with torch.no_grad():
        probe.linear.weight.normal_(0, 1)
        probe.linear.bias.fill_(0.3)
    feats = torch.randn(2, 6, 4, 5)
    gts = [np.random.default_rng(i).uniform(0.2, 9, size=(32, 40)).astype(np.float32) for i in range(2)]
    # reference: nearest-upsampled bin probabilities and bilinear depth at full resolution
    p = probe.probabilities(feats)
    ce, count, g = 0.0, 0, []
    for b, gt in enumerate(gts):
        keep = torch.from_numpy((gt > 0.5) & (gt <= 8.0))
        bins = torch.from_numpy(np.clip(np.rint((gt - 0.5) * 15 / 7.5), 0, 15).astype(np.int64))
        up_p = F.interpolate(p[b:b + 1], size=gt.shape, mode="nearest")[0]
        ce -= torch.log(up_p.gather(0, bins[None])[0])[keep].sum()
        count += int(keep.sum())
        up_d = F.interpolate(probe(feats)[b:b + 1, None], size=gt.shape, mode="bilinear", align_corners=False)[0, 0]
        g.append(torch.log(up_d[keep] + 1e-3) - torch.log(torch.from_numpy(gt)[keep] + 1e-3))
    g = torch.cat(g)
    expected = ce / count + torch.sqrt(g.var(unbiased=False) + 0.15 * g.mean() ** 2)
    assert probe.loss(feats, gts).item() == pytest.approx(expected.item(), rel=1e-5)


def test_sixteen_bit_depth_pngs_keep_their_precision(tmp_path):
    from cleandift_rt.probes.data import read_depth_file

    mm = np.array([[40000, 1234], [0, 65535]], dtype=np.uint16)
    Image.fromarray(mm).save(tmp_path / "d.png")
    np.testing.assert_allclose(read_depth_file(tmp_path / "d.png"), mm / 1000.0, rtol=1e-7)


def _store(tmp_path, name="cache"):
    return FeatureStore(tmp_path / name, "float32")


def test_depth_probe_learns_features_that_encode_depth_and_not_noise(tmp_path):
    write_depth_tree(tmp_path / "data")
    ds = load_depth_folder(tmp_path / "data")
    protocol = DepthProtocol(1e-3, None, eigen_crop=False, strict_max=False)
    good = run_dense("depth", ds, [EncodedDepth()], _store(tmp_path), tmp_path / "good", config=FAST,
                     protocol=protocol, pictures=2, progress=False)
    bad = run_dense("depth", ds, [Noise()], _store(tmp_path), tmp_path / "bad", config=FAST, protocol=protocol,
                    pictures=0, progress=False)
    assert good["rmse"] < 0.15 and good["delta1"] > 0.99 and good["abs_rel"] < 0.03  # depths span 1 .. 9 m
    assert bad["rmse"] > 8 * good["rmse"] and bad["delta1"] < 0.8
    back = json.loads((tmp_path / "good" / "results.json").read_text())
    assert back["rmse"] == good["rmse"] and back["protocol"]["bins"] == 256
    assert back["protocol"]["max_depth"] == pytest.approx(max(float(d.max()) for d in _train_depths(ds)))
    assert Image.open(tmp_path / "good" / "depth_examples.png").size[1] > 2 * 192
    probe, info = load_probe(tmp_path / "good" / "probes" / "encoded.safetensors")
    assert isinstance(probe, DepthProbe) and info["task"] == "depth"


def _train_depths(ds):
    return [s.read_target() for s in ds.train]



def test_nyu_probe_through_the_labeled_set_protocol(nyu, tmp_path):
    root, _ = nyu
    ds = load_nyu(root)
    protocol = DepthProtocol(1e-3, 10.0, eigen_crop=True, strict_max=True)
    config = TrainConfig(epochs=20, batch_size=1, lr=0.3, val_fraction=0.2, patience=20)
    good = run_dense("depth", ds, [EncodedDepth()], _store(tmp_path), tmp_path / "good", config=config,
                     protocol=protocol, pictures=1, progress=False)
    assert good["rmse"] < 0.25 and good["delta1"] > 0.95  # noise features give 1.76 m (measured)
    assert good["protocol"]["eigen_crop"] and good["data"]["train_used"] == 6 and good["images"] == 2


def test_corrupt_and_missing_depth_files_are_skipped_and_counted(tmp_path):
    root = write_depth_tree(tmp_path / "data", n_train=6, n_test=3)
    (root / "train" / "depth" / "000.png").unlink()  # depth missing
    (root / "test" / "rgb" / "001.png").unlink()  # image missing
    (root / "train" / "rgb" / "003.png").write_bytes(b"not a png")  # image cannot be decoded
    Image.fromarray(np.full((96, 128), 90, np.uint8)).save(root / "train" / "depth" / "004.png")  # 8-bit depth
    (root / "train" / "depth" / "005.npy").write_bytes(b"garbage")  # unreadable .npy (005 is a .npy)
    doc = run_dense("depth", load_depth_folder(root), [EncodedDepth()], _store(tmp_path), tmp_path / "out",
                    config=TrainConfig(epochs=1), protocol=DepthProtocol(1e-3, 9.5, False, False), pictures=0,
                    progress=False)
    skipped = doc["data"]["skipped"]["by_reason"]
    assert skipped == {"depth file missing": 1, "image file missing": 1, "image cannot be decoded": 1,
                       "depth PNG is mode L, not 16-bit (write millimetres as a 16-bit PNG or metres as .npy)": 1,
                       "depth .npy cannot be read": 1}
    assert doc["data"]["train_used"] == 2 and doc["data"]["test_used"] == 2


# -- segmentation ------------------------------------------------------------------------------


def write_voc(root, n_train=16, n_val=4, size=(64, 96), classes=6):
    """A VOC2012 tree: each 16 x 16 block one class (image in its palette colour, a little noise),
    label PNGs in palette mode with a void (255) line on every block's top row."""
    palette = voc_palette()
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    for split, n, offset in (("train", n_train, 0), ("val", n_val, 500)):
        names = []
        for i in range(n):
            r = np.random.default_rng(offset + i)
            grid = r.integers(0, classes, size=(size[0] // BLOCK, size[1] // BLOCK))
            labels = np.kron(grid, np.ones((BLOCK, BLOCK), dtype=np.int64)).astype(np.uint8)
            image = palette[labels].astype(np.int64) + r.integers(-10, 11, size=(*size, 3))
            labels[::BLOCK] = 255
            name = f"2012_{offset + i:06d}"
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / "JPEGImages" / f"{name}.jpg", quality=95)
            lab = Image.fromarray(labels, mode="P")
            lab.putpalette(palette.flatten().tolist())
            lab.save(root / "SegmentationClass" / f"{name}.png")
            names.append(name)
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")
    return root


class EncodedClasses:
    """Features that linearly encode the class: the block's nearest palette colour as a one-hot over
    21 classes, mixed by a fixed random matrix."""

    name, t, tap = "encoded", None, "us6"

    def __init__(self, channels: int = 32, key: str = "encoded-classes"):
        self.key, self.palette = key, voc_palette()[:21].astype(np.float64)
        self.mix = np.random.default_rng(3).normal(size=(channels, 21))

    def compute(self, image) -> np.ndarray:
        colour = blocks(np.asarray(image).astype(np.float64).transpose(2, 0, 1))  # [3, h, w]
        dist = ((colour[None] - self.palette[:, :, None, None]) ** 2).sum(1)  # [21, h, w]
        onehot = (dist == dist.min(0, keepdims=True)).astype(np.float64)
        return np.einsum("ck,khw->chw", self.mix, onehot).astype(np.float32)


def test_miou_and_per_class_iou_equal_hand_computation_with_void():
    gt = np.array([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 3, 0]])  # void pixels predicted anything: ignored
    conf = confusion_matrix(pred, gt, 5)
    assert conf.sum() == 6 and conf[0, 0] == 1 and conf[0, 1] == 1 and conf[2, 0] == 1
    iou, miou = iou_scores(conf)
    # class 0: TP 1, FP 1 (a 2 predicted 0), FN 1 -> 1/3; class 1: TP 2, FP 1 -> 2/3; class 2: 1/2;
    # class 3: predicted only on void -> absent; class 4: absent from both
    np.testing.assert_allclose(iou[:3], [1 / 3, 2 / 3, 1 / 2])
    assert np.isnan(iou[3]) and np.isnan(iou[4])
    assert miou == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)


def test_segmentation_loss_equals_full_resolution_cross_entropy():
    torch.manual_seed(0)
    probe = SegmentationProbe(5, num_classes=4)
    with torch.no_grad():
        probe.linear.weight.normal_()
    feats = torch.randn(2, 5, 3, 4)
    labels = [np.random.default_rng(i).integers(0, 4, size=(20, 27)).astype(np.uint8) for i in range(2)]
    labels[0][:5] = 255
    up = F.interpolate(probe(feats), size=(20, 27), mode="nearest")
    target = torch.from_numpy(np.stack(labels).astype(np.int64))
    expected = F.cross_entropy(up, target, ignore_index=255)
    assert probe.loss(feats, labels).item() == pytest.approx(expected.item(), rel=1e-5)


def test_segmentation_probe_is_perfect_on_encoded_classes_and_poor_on_noise(tmp_path):
    root = write_voc(tmp_path / "VOC2012")
    ds = load_voc(root)
    assert len(ds.train) == 16 and ds.classes[15] == "person"
    assert set(np.unique(ds.train[0].read_target())) <= set(range(6)) | {255}
    config = TrainConfig(epochs=15, batch_size=2, lr=0.1, patience=15)
    good = run_dense("segmentation", ds, [EncodedClasses()], _store(tmp_path), tmp_path / "good", config=config,
                     pictures=2, progress=False)
    bad = run_dense("segmentation", ds, [Noise(32)], _store(tmp_path), tmp_path / "bad", config=config, pictures=0,
                    progress=False)
    assert good["miou"] == 1.0 and good["pixel_accuracy"] == 1.0
    assert bad["miou"] < 0.5
    assert good["per_class_iou"][6:] == [None] * 15  # classes in neither ground truth nor predictions
    assert Image.open(tmp_path / "good" / "segmentation_examples.png").width > 3 * 96


def test_voc_loader_skips_missing_and_non_palette_labels(tmp_path):
    root = write_voc(tmp_path / "VOCdevkit" / "VOC2012", n_train=5, n_val=2)
    names = (root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    (root / "JPEGImages" / f"{names[0]}.jpg").unlink()
    (root / "SegmentationClass" / f"{names[1]}.png").unlink()
    Image.open(root / "SegmentationClass" / f"{names[2]}.png").convert("RGB").save(
        root / "SegmentationClass" / f"{names[2]}.png")
    ds = load_voc(tmp_path / "VOCdevkit")  # a VOCdevkit holding VOC2012 works too
    assert ds.skips.counts == {"image file missing": 1, "label file missing": 1}
    doc = run_dense("segmentation", ds, [EncodedClasses()], _store(tmp_path), tmp_path / "out",
                    config=TrainConfig(epochs=1), pictures=0, progress=False)
    assert doc["data"]["skipped"]["total"] == 3 and doc["data"]["train_used"] == 2
    assert any("not palette" in reason for reason in doc["data"]["skipped"]["by_reason"])
    with pytest.raises(FileNotFoundError, match="VOC2012"):
        load_voc(tmp_path)


# -- kNN ---------------------------------------------------------------------------------------


def test_vote_breaks_ties_toward_the_nearer_neighbour():
    ranked, votes = vote(np.array([[2, 1, 1, 2], [3, 1, 1, 3], [4, 4, 0, 0], [7, 6, 5, 6]]), top=3)
    np.testing.assert_array_equal(ranked, [[2, 1, -1], [3, 1, -1], [4, 0, -1], [6, 7, 5]])
    np.testing.assert_array_equal(votes, [[2, 2, 0], [2, 2, 0], [2, 2, 0], [2, 1, 1]])


def test_knn_equals_brute_force_and_orders_equal_similarities_by_index():
    r = np.random.default_rng(0)
    train = r.normal(size=(40, 8)).astype(np.float32)
    train[5] = train[3] * 2  # same direction: equal cosine, index 3 ranks first
    labels = r.integers(0, 4, size=40)
    queries = np.concatenate([r.normal(size=(6, 8)), train[3:4] * 0.5]).astype(np.float32)
    res = knn_classify(train, labels, queries, k=5)
    a = train / np.linalg.norm(train, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    sim = q.astype(np.float64) @ a.T.astype(np.float64)
    sim[-1, 5] = sim[-1, 3]  # exactly tied in exact arithmetic
    expected = np.argsort(-sim, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(res.neighbours, expected)
    assert res.neighbours[-1, 0] == 3 and res.neighbours[-1, 1] == 5
    np.testing.assert_array_equal(res.ranked, vote(labels[expected], 5)[0])
    with pytest.raises(ValueError, match="at least 50"):
        knn_classify(train, labels, queries, k=50)


def write_image_folders(root, classes=("cat", "dog", "fox"), n_train=10, n_val=3):
    colours = {"cat": (220, 40, 40), "dog": (40, 200, 40), "fox": (40, 40, 220), "owl": (200, 200, 40)}
    for split, n in (("train", n_train), ("val", n_val)):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                r = np.random.default_rng(zlib.crc32(f"{split}/{c}/{i}".encode()))  # hash() of str varies per process
                img = np.array(colours[c]) + r.integers(-30, 31, size=(64, 64, 3))  # engines take >= 64 px
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / split / c / f"{i}.png")
    return root / "train", root / "val"


class MeanColour:
    name, t, tap = "colour", None, "mid"

    def __init__(self, key="colour"):
        self.key, self.calls = key, 0

    def compute(self, image) -> np.ndarray:
        self.calls += 1
        return blocks(np.asarray(image).astype(np.float32).transpose(2, 0, 1)) - 128


def test_knn_is_perfect_on_colour_features_and_near_chance_on_noise(tmp_path):
    train, val = write_image_folders(tmp_path)
    (train / "cat" / "9.png").write_bytes(b"broken")
    (val / "owl").mkdir()
    Image.new("RGB", (64, 64), (200, 200, 40)).save(val / "owl" / "0.png")
    ds = load_image_folders(train, val)
    good = run_knn(ds, [MeanColour()], _store(tmp_path), tmp_path / "good", k=10, progress=False)
    bad = run_knn(ds, [Noise(16)], _store(tmp_path), tmp_path / "bad", k=10, progress=False)
    assert good["top1"] == 1.0 and good["top5"] == 1.0 and good["images"] == 9
    assert bad["top1"] < 0.8 and bad["top5"] == 1.0  # three classes: every vote-getter is in the top 5
    assert good["data"]["skipped"]["by_reason"] == {"class not in the training folder": 1,
                                                    "image cannot be decoded": 1}
    assert json.loads((tmp_path / "good" / "results.json").read_text())["top1"] == 1.0



# -- cache, resume, saved probes, plots ------------------------------------------------------------


def test_a_rerun_reads_every_feature_from_the_cache_and_reuses_the_probe(tmp_path):
    root = write_depth_tree(tmp_path / "data", n_train=6, n_test=2)
    protocol = DepthProtocol(1e-3, None, False, False)
    config = TrainConfig(epochs=3, batch_size=2)
    first, second = EncodedDepth(), EncodedDepth()
    store = FeatureStore(tmp_path / "cache")  # float16 storage, the default
    a = run_dense("depth", load_depth_folder(root), [first], store, tmp_path / "out", config=config,
                  protocol=protocol, pictures=1, progress=False)
    assert first.calls == 8 and a["cache"]["computed"] == {"encoded": 8} and "encoded" in a["training"]
    files = sorted((tmp_path / "cache" / first.key / "map").glob("*.npy"))
    assert len(files) == 8 and np.load(files[0], mmap_mode="r").dtype == np.float16
    b = run_dense("depth", load_depth_folder(root), [second], FeatureStore(tmp_path / "cache"), tmp_path / "out",
                  config=config, protocol=protocol, pictures=1, progress=False)
    assert second.calls == 0 and b["cache"]["computed"] == {} and b["training"] == {}  # nothing computed or trained
    assert b["rmse"] == a["rmse"] and b["delta1"] == a["delta1"]
    files[0].write_bytes(files[0].read_bytes()[:40])  # a file cut short by a crash is computed again
    run_dense("depth", load_depth_folder(root), [second], FeatureStore(tmp_path / "cache"), tmp_path / "out",
              config=config, protocol=protocol, pictures=0, progress=False)
    assert second.calls == 1


def test_interrupted_training_resumes_to_the_same_weights(tmp_path):
    r = np.random.default_rng(0)
    feats = [r.normal(size=(6, 3, 4)).astype(np.float32) for _ in range(10)]
    labels = [np.kron(r.integers(0, 3, size=(3, 4)), np.ones((4, 4), np.int64)).astype(np.uint8) for _ in range(10)]
    config = TrainConfig(epochs=5, batch_size=3, lr=0.05, patience=5)
    whole = SegmentationProbe(6, 3)
    report = whole.fit(feats, labels, config)

    def stop_after_two(epoch):
        if epoch == 1:
            raise KeyboardInterrupt

    part = SegmentationProbe(6, 3)
    with pytest.raises(KeyboardInterrupt):
        part.fit(feats, labels, config, checkpoint=tmp_path / "state.safetensors", on_epoch=stop_after_two)
    resumed = SegmentationProbe(6, 3)
    again = resumed.fit(feats, labels, config, checkpoint=tmp_path / "state.safetensors")
    assert again["resumed_at_epoch"] == 2 and again["history"] == report["history"]
    for key, value in whole.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    other = SegmentationProbe(6, 3).fit(feats, labels, TrainConfig(epochs=5, batch_size=3, lr=0.01),
                                        checkpoint=tmp_path / "state.safetensors")
    assert other["resumed_at_epoch"] == 0  # another run's checkpoint is not resumed


def test_a_saved_probe_evaluates_other_features_and_checks_its_kind(tmp_path):
    root = write_depth_tree(tmp_path / "data", n_train=6, n_test=2)
    protocol = DepthProtocol(1e-3, 9.5, False, False)
    run_dense("depth", load_depth_folder(root), [EncodedDepth()], _store(tmp_path), tmp_path / "train",
              config=TrainConfig(epochs=2), protocol=protocol, pictures=0, progress=False)
    saved = tmp_path / "train" / "probes" / "encoded.safetensors"
    other = EncodedDepth(key="other-model")  # the same features under another model's name
    doc = run_dense("depth", load_depth_folder(root), [other], _store(tmp_path), tmp_path / "transfer",
                    config=TrainConfig(epochs=2), protocol=protocol, probe_file=saved, pictures=0, progress=False)
    probe, _ = load_probe(saved)
    ds = load_depth_folder(root)
    expected = probe.evaluate([other.compute(s.read_image()) for s in ds.test], [s.read_target() for s in ds.test],
                              protocol)
    assert doc["rmse"] == pytest.approx(expected["rmse"], rel=1e-3)  # float16 cache vs float32 features
    assert doc["data"]["train_used"] == 0 and doc["probe_trained_on"]["features"] == "encoded-depth"
    with pytest.raises(ValueError, match="segmentation"):
        run_dense("segmentation", load_voc(write_voc(tmp_path / "voc", 2, 1)), [EncodedClasses()], _store(tmp_path),
                  tmp_path / "x", config=TrainConfig(), probe_file=saved, pictures=0, progress=False)


def test_line_plot_draws_each_series_and_the_reference_line():
    img = line_plot([("dift", [0, 100, 200], [0.6, 0.5, 0.55]), ("projected", [0, 100, 200], [0.48, 0.47, 0.5])],
                    [("cleandift", 0.45)], title="depth", xlabel="t", ylabel="RMSE")
    colours = {c for _, c in img.getcolors(maxcolors=100000)}
    assert img.size == (900, 540) and {(31, 119, 180), (255, 127, 14), (44, 160, 44)} <= colours
    with pytest.raises(ValueError, match="as many"):
        line_plot([("x", [0, 1], [1])])



# -- the commands, end to end with the tiny model through an Engine --------------------------------


@pytest.fixture(scope="module")
def engine_args(tiny_student_files, tiny_base_dir):
    """The PyTorch backend on the tiny student at 64 px (us6: a 4 x 4 grid of 64 channels)."""
    return ["--engine", str(tiny_student_files["unet"]), "--base", str(tiny_base_dir), "--size", "64", "64"]


def _refuse(*args, **kwargs):
    raise AssertionError("a fully cached rerun must not open a model")


def test_probe_depth_command_sweeps_then_reruns_from_the_cache_without_a_model(nyu, engine_args, tiny_student_files,
                                                                                tiny_base, tiny_base_dir, tmp_path,
                                                                                monkeypatch):
    from cleandift_rt.cli.main import main
    from cleandift_rt.features.extractor import DiftExtractor
    from cleandift_rt.kernels.fused_heads import project
    from cleandift_rt.models.heads import ProjectionHeads
    from cleandift_rt.runtime.engine import Engine

    out = tmp_path / "depth"
    args = ["probe-depth", "--data", str(nyu[0]), *engine_args, "--out", str(out), "--baseline", "dift", "--heads",
            str(tiny_student_files["full"]), "--timesteps", "100", "500", "--ensemble", "1", "--epochs", "2",
            "--pictures", "1", "--no-progress"]
    assert main(args) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["method"] == "cleandift" and doc["tap"] == "us6" and doc["rmse"] > 0
    assert 0 <= doc["delta1"] <= 1 and doc["abs_rel"] > 0
    assert {(r["method"], r["t"]) for r in doc["sweep"]} == {("dift", 100), ("dift", 500), ("cleandift-projected", 100),
                                                             ("cleandift-projected", 500)}
    assert all(0 <= r["delta1"] <= 1 and r["rmse"] > 0 for r in doc["sweep"])
    with open(out / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5 and rows[0]["method"] == "cleandift" and rows[0]["t"] == ""
    assert Image.open(out / "sweep.png").size == (900, 540) and (out / "depth_examples.png").is_file()
    assert doc["cache"]["computed"] == {"cleandift": 8, "cleandift-projected": 16, "dift": 16}
    # the cached features are the models' own (float16 storage): Engine, DiftExtractor, project
    sample = load_nyu(nyu[0]).test[0]

    def cached(method):
        key = load_probe(out / "probes" / f"{method}.safetensors")[1]["features"]
        return np.load(out / "cache" / key / "map" / f"{sample.image_key}.npy").astype(np.float32)

    engine = Engine(tiny_student_files["unet"], base=tiny_base_dir, size=(64, 64))
    clean = engine.extract([sample.read_image()], taps=["us6"])["us6"][0]
    np.testing.assert_allclose(cached("cleandift"), clean, rtol=2e-3, atol=2e-3 * np.abs(clean).max())
    noisy = DiftExtractor(tiny_base, t=100, ensemble=1, seed=0, size=(64, 64)).extract([sample.read_image()],
                                                                                      taps=["us6"])["us6"][0].numpy()
    np.testing.assert_allclose(cached("dift-t100"), noisy, rtol=2e-3, atol=2e-3 * np.abs(noisy).max())
    heads = ProjectionHeads.from_release(tiny_student_files["full"])
    seen = project(torch.from_numpy(cached("cleandift"))[None], 500, heads, "us6")[0].numpy()
    np.testing.assert_allclose(cached("cleandift-projected-t500"), seen, rtol=2e-3, atol=2e-3 * np.abs(seen).max())

    monkeypatch.setattr(Engine, "__init__", _refuse)
    monkeypatch.setattr(DiftExtractor, "__init__", _refuse)
    monkeypatch.setattr(ProjectionHeads, "from_release", _refuse)
    assert main(args) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["cache"]["computed"] == {} and again["training"] == {}
    assert again["rmse"] == doc["rmse"] and again["sweep"] == doc["sweep"]

    # the paper's transfer check: the probe trained on noisy features, applied to CleanDIFT's
    transfer = tmp_path / "transfer"
    assert main(["probe-depth", "--data", str(nyu[0]), *engine_args, "--out", str(transfer), "--cache", str(out / "cache"),
                 "--probe", str(out / "probes" / "dift-t100.safetensors"), "--no-progress", "--pictures", "0"]) == 0
    moved = json.loads((transfer / "results.json").read_text())
    assert moved["probe_trained_on"]["method"] == "dift" and moved["probe_trained_on"]["t"] == 100
    assert moved["rmse"] > 0 and moved["data"]["train_used"] == 0


def test_probe_seg_and_knn_commands_end_to_end(engine_args, tmp_path):
    from cleandift_rt.cli.main import main

    voc = write_voc(tmp_path / "VOC2012", n_train=6, n_val=2)
    assert main(["probe-seg", "--data", str(voc), *engine_args, "--out", str(tmp_path / "seg"), "--epochs", "2",
                 "--pictures", "1", "--no-progress"]) == 0
    seg = json.loads((tmp_path / "seg" / "results.json").read_text())
    assert 0 <= seg["miou"] <= 1 and len(seg["per_class_iou"]) == 21 and seg["classes"][0] == "background"
    assert (tmp_path / "seg" / "segmentation_examples.png").is_file()

    train, val = write_image_folders(tmp_path / "folders", n_train=4, n_val=2)
    assert main(["knn-classify", "--train", str(train), "--val", str(val), *engine_args, "--k", "5", "--out",
                 str(tmp_path / "knn"), "--no-progress"]) == 0
    knn = json.loads((tmp_path / "knn" / "results.json").read_text())
    assert knn["tap"] == "mid" and knn["k"] == 5 and 0 <= knn["top1"] <= knn["top5"] <= 1 and knn["images"] == 6


def test_commands_explain_bad_arguments(nyu, engine_args, tmp_path, capsys):
    from cleandift_rt.cli.main import main

    engine_only = engine_args[:2]
    cases = [
        (["probe-depth", "--data", str(nyu[0]), *engine_only, "--out", str(tmp_path), "--baseline", "dift"], "--base"),
        (["probe-depth", "--data", str(nyu[0]), *engine_args, "--out", str(tmp_path), "--timesteps", "100"],
         "--baseline dift"),
        (["probe-depth", "--data", str(tmp_path / "nothing"), *engine_args, "--out", str(tmp_path)], "does not exist"),
        (["probe-seg", "--data", str(tmp_path), *engine_args, "--out", str(tmp_path)], "VOC2012"),
        (["knn-classify", "--train", str(tmp_path), "--val", str(tmp_path), *engine_args, "--out", str(tmp_path)],
         "class sub-folders"),
    ]
    for argv, hint in cases:
        assert main(argv) == 2, argv
        assert hint in capsys.readouterr().err


pytestmark = pytest.mark.usefixtures("one_thread")
