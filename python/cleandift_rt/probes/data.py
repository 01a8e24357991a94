"""Dataset loaders for the probes: NYUv2 (the labeled ``.mat`` or a folder tree), PASCAL VOC 2012, ImageFolder.

Every loader returns a :class:`Dataset` of :class:`Sample` records whose image and target are read
only when asked (``read_image()`` / ``read_target()``). A bad file never stops a run: a sample whose
files are missing is left out when the dataset is listed, one whose files cannot be decoded raises
:class:`SampleError` when read, and both are counted by reason in a ``runs.skips.SkipLog``. Images are read in
their stored pixel layout (no EXIF rotation: the depth maps and label maps refer to it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..runs.skips import SkipLog

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
NYU_FILE, NYU_SPLITS = "nyu_depth_v2_labeled.mat", "splits.mat"
NYU_SIZE = (480, 640)  # H, W of every NYUv2 labeled image (the Eigen crop is defined on it)
VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")
VOID = 255


class SampleError(Exception):
    """One sample cannot be used: ``reason`` is what the report counts, ``where`` names the file."""

    def __init__(self, reason: str, where: str):
        super().__init__(f"{reason}: {where}")
        self.reason, self.where = reason, where


@dataclass(frozen=True)
class Sample:
    """One image and its target. ``image_key`` names the image's pixels (it keys the feature cache),
    ``target_key`` its target; both change when the file is replaced."""

    name: str
    image_key: str
    target_key: str
    read_image: Callable[[], object]
    read_target: Callable[[], np.ndarray] | None = None
    label: int = -1  # class index (ImageFolder)


@dataclass
class Dataset:
    kind: str  # "nyu", "depth-folder", "voc", "image-folder"
    root: str
    train: list[Sample]
    test: list[Sample]
    skips: SkipLog = field(default_factory=lambda: SkipLog("image"))
    classes: tuple[str, ...] = ()

    def describe(self) -> dict:
        return {"format": self.kind, "root": self.root, "train_listed": len(self.train), "test_listed": len(self.test),
                **({"classes": len(self.classes)} if self.classes else {})}


def _hash(*parts) -> str:
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).hexdigest()[:20]


def file_stamp(path: Path) -> str:
    """Path, size and modification time: a new key when the file is replaced, without reading it."""
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def read_rgb(path: Path):
    from ..features.preprocess import load_image

    try:
        return load_image(path, exif_orientation=False)
    except (ValueError, OSError):
        raise SampleError("image cannot be decoded", str(path)) from None


# -- depth: NYUv2 labeled set ----------------------------------------------------------------


class _NyuFile:
    """The HDF5 handle of ``nyu_depth_v2_labeled.mat``, opened once, read one image at a time.

    MATLAB stores arrays column-major, so h5py shows them with the axes reversed: ``images`` is
    ``[N, 3, W, H]`` and ``depths`` ``[N, W, H]``; each read is transposed back to ``H x W``.
    """

    def __init__(self, path: Path):
        try:
            import h5py
        except ImportError:
            raise ImportError("reading the NYUv2 labeled set needs h5py: pip install h5py "
                              "(or pip install 'cleandift-rt[probes]')") from None
        try:
            self.file = h5py.File(path, "r")
        except OSError:
            raise ValueError(f"{path} is not an HDF5 (MATLAB v7.3) file: the NYUv2 labeled set is distributed as "
                             "v7.3; download nyu_depth_v2_labeled.mat again") from None
        missing = [k for k in ("images", "depths") if k not in self.file]
        if missing:
            raise ValueError(f"{path} has no dataset(s) {missing}: it is not nyu_depth_v2_labeled.mat")
        self.images, self.depths = self.file["images"], self.file["depths"]
        h, w = NYU_SIZE
        if self.images.ndim != 4 or self.images.shape[1:] != (3, w, h) or self.depths.shape[1:] != (w, h) \
                or self.depths.shape[0] != self.images.shape[0]:
            raise ValueError(f"{path}: images {self.images.shape} / depths {self.depths.shape} are not the NYUv2 "
                             f"labeled layout ([N, 3, {w}, {h}] and [N, {w}, {h}] as h5py shows MATLAB arrays)")
        self.path, self.count = path, int(self.images.shape[0])

    def image(self, i: int) -> np.ndarray:
        return np.ascontiguousarray(np.asarray(self.images[i], dtype=np.uint8).transpose(2, 1, 0))

    def depth(self, i: int) -> np.ndarray:
        d = np.ascontiguousarray(np.asarray(self.depths[i], dtype=np.float32).T)
        if not (np.isfinite(d) & (d > 0)).any():
            raise SampleError("depth map has no valid pixel", f"{self.path.name}[{i}]")
        return np.where(np.isfinite(d), d, 0).astype(np.float32)


def _nyu_split(path: Path, count: int) -> dict[str, np.ndarray]:
    try:
        from scipy.io import loadmat
    except ImportError:
        raise ImportError("reading splits.mat needs scipy: pip install scipy (or pip install 'cleandift-rt[probes]')") from None
    try:
        mat = loadmat(str(path))
    except (ValueError, OSError, NotImplementedError) as exc:
        raise ValueError(f"{path} is not a MATLAB v5 splits file ({exc}); use the standard splits.mat") from None
    out = {}
    for split, key in (("train", "trainNdxs"), ("test", "testNdxs")):
        if key not in mat:
            raise ValueError(f"{path} has no {key}: expected the standard NYUv2 splits.mat (trainNdxs, testNdxs)")
        idx = np.asarray(mat[key]).astype(np.int64).ravel() - 1  # MATLAB indices start at 1
        if idx.size == 0 or idx.min() < 0 or idx.max() >= count:
            raise ValueError(f"{path}: {key} indexes outside the {count} images of the .mat file")
        out[split] = idx
    return out


def load_nyu(path: str | Path) -> Dataset:
    """NYUv2 labeled set: ``path`` is the folder holding ``nyu_depth_v2_labeled.mat`` and ``splits.mat``
    (the standard 795 / 654 split), or the ``.mat`` file itself with ``splits.mat`` beside it."""
    path = Path(path)
    mat = path / NYU_FILE if path.is_dir() else path
    splits = mat.parent / NYU_SPLITS
    for p, what in ((mat, "the labeled set"), (splits, "the train/test split")):
        if not p.is_file():
            raise FileNotFoundError(f"{p} does not exist ({what}); download nyu_depth_v2_labeled.mat and splits.mat "
                                    "into one folder and pass it as --data")
    nyu = _NyuFile(mat)
    stamp = file_stamp(mat)
    parts = {}
    for split, idx in _nyu_split(splits, nyu.count).items():
        parts[split] = [Sample(f"{split}/{i + 1:04d}", _hash(stamp, "image", i), _hash(stamp, "depth", i),
                               (lambda i=int(i): nyu.image(i)), (lambda i=int(i): nyu.depth(i))) for i in idx]
    return Dataset("nyu", str(mat), parts["train"], parts["test"])


# -- depth: folder tree ----------------------------------------------------------------------


def read_depth_file(path: Path) -> np.ndarray:
    """Depth in metres from a 16-bit PNG (millimetres) or a ``.npy`` (metres); 0 = no measurement."""
    if path.suffix.lower() == ".npy":
        try:
            d = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError):
            raise SampleError("depth .npy cannot be read", str(path)) from None
        d = np.squeeze(d)
        if d.ndim != 2 or d.dtype.kind not in "fiu":
            raise SampleError("depth .npy is not a 2-D array of numbers", str(path))
        d = d.astype(np.float32)
    else:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                im.load()
                mode = im.mode
                arr = np.asarray(im)
        except (UnidentifiedImageError, OSError, SyntaxError):
            raise SampleError("depth PNG cannot be decoded", str(path)) from None
        # 16-bit greyscale PNGs open as I;16 (or I, 32-bit, in some Pillow versions): never convert
        # them through an 8-bit or RGB mode, which would quantise the depth.
        if mode not in ("I;16", "I;16B", "I;16L", "I") or (mode == "I" and arr.max(initial=0) > 65535):
            raise SampleError(f"depth PNG is mode {mode}, not 16-bit (write millimetres as a 16-bit PNG or metres "
                              "as .npy)", str(path))
        d = arr.astype(np.float32) / 1000.0
    d = np.where(np.isfinite(d) & (d > 0), d, 0).astype(np.float32)
    if not (d > 0).any():
        raise SampleError("depth map has no valid pixel", str(path))
    return d


def _by_stem(folder: Path, suffixes) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {}
    if folder.is_dir():
        for p in sorted(folder.iterdir()):
            if p.is_file() and p.suffix.lower() in suffixes:
                found.setdefault(p.stem, []).append(p)
    return found


def load_depth_folder(root: str | Path) -> Dataset:
    """``ROOT/{train,test}/rgb/NAME.png|jpg`` with ``ROOT/{train,test}/depth/NAME.png`` (16-bit mm) or ``.npy`` (m)."""
    root = Path(root)
    skips, parts = SkipLog("image"), {}
    for split in ("train", "test"):
        rgb_dir, depth_dir = root / split / "rgb", root / split / "depth"
        if not rgb_dir.is_dir() or not depth_dir.is_dir():
            raise FileNotFoundError(f"{root} needs {split}/rgb/ and {split}/depth/ folders (NAME.png|jpg images, "
                                    "NAME.png 16-bit millimetre or NAME.npy metre depth maps), or NYUv2's "
                                    f"{NYU_FILE} + {NYU_SPLITS}")
        images, depths = _by_stem(rgb_dir, IMAGE_SUFFIXES), _by_stem(depth_dir, (".png", ".npy"))
        samples = []
        for name in sorted(set(images) | set(depths)):
            if name not in depths:
                skips.add("depth file missing", images[name][0])
                continue
            if name not in images:
                skips.add("image file missing", depths[name][0])
                continue
            if len(images[name]) > 1 or len(depths[name]) > 1:
                skips.add("two files with one name", (images[name] + depths[name])[0])
                continue
            img, dep = images[name][0], depths[name][0]
            samples.append(Sample(f"{split}/{name}", _hash(file_stamp(img)), _hash(file_stamp(dep)),
                                  (lambda p=img: read_rgb(p)), (lambda p=dep: read_depth_file(p))))
        parts[split] = samples
    return Dataset("depth-folder", str(root), parts["train"], parts["test"], skips)


def load_depth_data(path: str | Path) -> Dataset:
    """NYUv2 labeled set when ``path`` is (or holds) ``nyu_depth_v2_labeled.mat``, else a folder tree."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--data {path} does not exist")
    if path.suffix == ".mat" or (path.is_dir() and (path / NYU_FILE).exists()):
        return load_nyu(path)
    return load_depth_folder(path)


# -- segmentation: PASCAL VOC 2012 ---------------------------------------------------------------


def read_label_png(path: Path, num_classes: int) -> np.ndarray:
    """A VOC label map as class indices (uint8, 255 = void), read from the palette, never as colours."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            arr = np.array(im)
    except (UnidentifiedImageError, OSError, SyntaxError):
        raise SampleError("label PNG cannot be decoded", str(path)) from None
    if mode not in ("P", "L"):
        raise SampleError(f"label PNG is mode {mode}, not palette indices (VOC's SegmentationClass PNGs are "
                          "palette images)", str(path))
    bad = (arr >= num_classes) & (arr != VOID)
    if bad.any():
        raise SampleError(f"label PNG has values outside 0..{num_classes - 1} and {VOID}", str(path))
    return arr.astype(np.uint8)


def load_voc(root: str | Path, train_split: str = "train", test_split: str = "val",
             num_classes: int = len(VOC_CLASSES)) -> Dataset:
    """PASCAL VOC 2012 segmentation: ``JPEGImages/``, ``SegmentationClass/``, ``ImageSets/Segmentation/*.txt``.
    ``root`` is the ``VOC2012`` folder or a ``VOCdevkit`` holding one."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"--data {root} does not exist")
    if not (root / "ImageSets").is_dir() and (root / "VOC2012" / "ImageSets").is_dir():
        root = root / "VOC2012"
    skips, parts = SkipLog("image"), {}
    for split, name in (("train", train_split), ("test", test_split)):
        listing = root / "ImageSets" / "Segmentation" / f"{name}.txt"
        if not listing.is_file():
            raise FileNotFoundError(f"{listing} does not exist: --data must be the VOC2012 folder (JPEGImages/, "
                                    "SegmentationClass/, ImageSets/Segmentation/train.txt and val.txt)")
        samples = []
        for line in listing.read_text().split():
            img, lab = root / "JPEGImages" / f"{line}.jpg", root / "SegmentationClass" / f"{line}.png"
            if not img.is_file():
                skips.add("image file missing", img)
            elif not lab.is_file():
                skips.add("label file missing", lab)
            else:
                samples.append(Sample(line, _hash(file_stamp(img)), _hash(file_stamp(lab)), (lambda p=img: read_rgb(p)),
                                      (lambda p=lab: read_label_png(p, num_classes))))
        parts[split] = samples
    classes = VOC_CLASSES if num_classes == len(VOC_CLASSES) else tuple(str(i) for i in range(num_classes))
    return Dataset("voc", str(root), parts["train"], parts["test"], skips, classes)


# -- classification: ImageFolder -------------------------------------------------------------


def load_image_folders(train: str | Path, val: str | Path) -> Dataset:
    """``TRAIN/<class>/<image>`` and ``VAL/<class>/<image>``; classes are the training folder's
    sub-folders in sorted order, and validation images of other classes are skipped and counted."""
    train, val = Path(train), Path(val)
    for p, flag in ((train, "--train"), (val, "--val")):
        if not p.is_dir():
            raise FileNotFoundError(f"{flag} {p} is not a folder (expected CLASS/IMAGE sub-folders, ImageFolder layout)")
    classes = tuple(sorted(d.name for d in train.iterdir() if d.is_dir()))
    if not classes:
        raise ValueError(f"{train} has no class sub-folders (ImageFolder layout: {train}/CLASS/IMAGE.jpg)")
    index = {c: i for i, c in enumerate(classes)}
    skips, parts = SkipLog("image"), {}
    for split, folder in (("train", train), ("test", val)):
        samples = []
        for d in sorted(p for p in folder.iterdir() if p.is_dir()):
            files = sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if d.name not in index:
                for f in files:
                    skips.add("class not in the training folder", f)
                continue
            for f in files:
                samples.append(Sample(f"{d.name}/{f.relative_to(d)}", _hash(file_stamp(f)), "",
                                      (lambda p=f: read_rgb(p)), None, index[d.name]))
        parts[split] = samples
    return Dataset("image-folder", f"{train} | {val}", parts["train"], parts["test"], skips, classes)
