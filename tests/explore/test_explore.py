"""The explorer without a browser: a click's answer against the public matching API on the same
features (tap, pad geometry, projected heads, hyper, fusion), the heat map and PCA pictures against
independent computations, every bad input turned into a message, and the HTTP server's answers."""

from __future__ import annotations

import base64
import io
import json
import threading
import urllib.error
import urllib.request
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import cleandift_rt as cd
from cleandift_rt.assets import photo_path
from cleandift_rt.explore import ExploreError, ExplorerServer, Session
from cleandift_rt.explore.pictures import overlay_size
from cleandift_rt.features.preprocess import prepare_images
from cleandift_rt.kernels.matching import sample_points
from cleandift_rt.viz.pictures import pca_maps

pytestmark = pytest.mark.usefixtures("one_thread")

TAP = "us6"
CLICK = (300.0, 140.0)  # on the cat (451 x 300)


def jpeg(name: str) -> bytes:
    return photo_path(name).read_bytes()


def png_size(url: str) -> tuple[int, int]:
    assert url.startswith("data:image/png;base64,")
    with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as im:
        return im.size


def loaded(engine, names=("cat", "coffee"), **kwargs) -> Session:
    session = Session(engine, **kwargs)
    for name in names:
        session.add_image(f"{name}.jpg", jpeg(name))
    return session


@pytest.fixture(scope="module")
def engine(student_engine):
    return student_engine(128)


@pytest.fixture(scope="module")
def session(engine):
    return loaded(engine)


def image_match(fa, fb, size_a, size_b, point):
    """The public API's answer on the same maps: point queries in image pixels, soft-argmax refined."""
    found, sim = cd.match(fa[None], fb[None], points=torch.tensor([[point]], dtype=torch.float32), coords="image",
                          image_size=((size_a[1], size_a[0]), (size_b[1], size_b[0])), refine=True)
    return found[0, 0].numpy(), float(sim[0, 0])


# -- clicks -----------------------------------------------------------------------------------------


def test_click_equals_the_public_match_on_the_same_features(session, engine):
    answer = session.click({"kind": "tap", "tap": TAP}, 0, *CLICK)
    cat, coffee = session.images[0], session.images[1]
    # the features are the engine's, extracted once at load
    for im in (cat, coffee):
        np.testing.assert_allclose(im.taps[TAP].numpy(), engine.extract([im.image], taps=[TAP])[TAP][0], rtol=1e-6,
                                   atol=1e-7)
    (m,) = answer["matches"]
    xy, sim = image_match(cat.taps[TAP], coffee.taps[TAP], cat.image.size, coffee.image.size, CLICK)
    assert m["image"] == 1 and answer["source"] == {"image": 0, "x": CLICK[0], "y": CLICK[1]}
    np.testing.assert_allclose([m["x"], m["y"]], xy, atol=1e-3)
    assert m["similarity"] == pytest.approx(sim, abs=1e-6)
    assert 0 <= m["x"] <= coffee.image.width and 0 <= m["y"] <= coffee.image.height
    assert png_size(m["heat"]) == overlay_size(*coffee.image.size)
    assert answer["match_ms"] < answer["total_ms"] < 1000


def test_heat_map_is_the_cosine_to_the_clicked_point(session):
    recipe = session.recipe({"kind": "tap", "tap": TAP})
    cat, coffee = session.images[0], session.images[1]
    (m,) = recipe.click(cat, CLICK, [coffee])
    fa, fb = cat.taps[TAP], coffee.taps[TAP]
    cell = torch.tensor([[[(CLICK[0] + 0.5) * fa.shape[-1] / cat.image.width - 0.5,
                           (CLICK[1] + 0.5) * fa.shape[-2] / cat.image.height - 0.5]]])
    query = sample_points(fa[None], cell)[0, 0]
    want = F.cosine_similarity(fb, query[:, None, None], dim=0)
    torch.testing.assert_close(m.heat, want, atol=1e-5, rtol=0)
    assert m.similarity == pytest.approx(float(want.max()), abs=1e-5)  # the best cell is the heat map's peak
    # the heat map's peak lies next to the match: within the soft-argmax window around the argmax cell
    peak = np.unravel_index(int(want.argmax()), want.shape)
    x, y = m.grid.to_grid([m.xy])[0]
    assert abs(x - peak[1]) <= 2 and abs(y - peak[0]) <= 2


def test_every_other_image_answers_and_clicks_reuse_the_features(engine, monkeypatch):
    s = loaded(engine, ("cat", "coffee", "astronaut"))
    calls = []
    monkeypatch.setattr(engine, "extract", lambda *a, **k: calls.append(1))  # a click must not run the engine
    answer = s.click({"kind": "tap", "tap": "us9"}, 2, 100.0, 400.0)
    assert [m["image"] for m in answer["matches"]] == [0, 1] and not calls
    prepared = s.prepare({"kind": "tap", "tap": "us9"})
    assert sorted(prepared["pca"]) == [0, 1, 2] and not calls


def test_pad_policy_maps_through_the_model_input(student_engine, tiny_student_files, tiny_base_dir):
    """With the pad policy the image fills only part of the model input: the click must go image ->
    model pixels -> feature cells and back (checked here through preprocess.Geometry and match)."""
    padded = cd.Engine(tiny_student_files["unet"], base=str(tiny_base_dir), size=(128, 128), resize="pad")
    s = loaded(padded)
    answer = s.click({"kind": "tap", "tap": TAP}, 0, *CLICK)
    cat, coffee = s.images[0], s.images[1]
    g_a, g_b = (prepare_images([im.image], (128, 128), "pad").geometry[0] for im in (cat, coffee))
    model_point = [(CLICK[0] + 0.5) * g_a.scale_x - 0.5, (CLICK[1] + 0.5) * g_a.scale_y - 0.5]
    found, _ = cd.match(cat.taps[TAP][None], coffee.taps[TAP][None], points=torch.tensor([[model_point]]),
                        coords="image", image_size=(128, 128), refine=True)
    want = (found[0, 0].numpy() + 0.5) / [g_b.scale_x, g_b.scale_y] - 0.5
    (m,) = answer["matches"]
    np.testing.assert_allclose([m["x"], m["y"]], want, atol=1e-3)
    assert g_a.content_height < 128  # the cat is wider than tall: padded below


def test_projected_recipe_runs_the_heads_kernel(engine, tiny_student_files):
    heads = cd.ProjectionHeads.from_release(tiny_student_files["full"])
    s = loaded(engine, heads=heads)
    spec = {"kind": "projected", "tap": TAP, "t": 500}
    answer = s.click(spec, 0, *CLICK)
    cat, coffee = s.images[0], s.images[1]
    pa, pb = (cd.project(im.taps[TAP][None], 500, heads, TAP)[0] for im in (cat, coffee))
    with torch.no_grad():
        torch.testing.assert_close(pa, heads(TAP, cat.taps[TAP][None], 500)[0], rtol=1e-4, atol=1e-5)
    xy, sim = image_match(pa, pb, cat.image.size, coffee.image.size, CLICK)
    np.testing.assert_allclose([answer["matches"][0]["x"], answer["matches"][0]["y"]], xy, atol=1e-3)
    assert answer["recipe"] == "tap us6 projected by the heads at t = 500"
    assert s.describe()["heads"] == {"taps": list(cd.TAPS), "t": 261.0}


def test_hyper_recipe_matches_the_aggregator_descriptor(tiny_student_files, tiny_base_dir, engine, tmp_path):
    from cleandift_rt.hyper.sources import EngineTaps, new_aggregator

    torch.manual_seed(0)
    path = new_aggregator("cleandift", EngineTaps(engine, "tiny", layers=["us3", "us6"]), projection_dim=128).save(
        tmp_path / "aggregator.safetensors")
    hyper = cd.Engine(tiny_student_files["unet"], base=str(tiny_base_dir), size=(128, 128), aggregator=path)
    s = loaded(hyper)
    assert s.describe()["outputs"] == ["hyper"]
    answer = s.click({"kind": "tap", "tap": "hyper"}, 0, *CLICK)
    cat, coffee = s.images[0], s.images[1]
    fa, fb = (torch.from_numpy(hyper.extract([im.image], taps=["hyper"])["hyper"][0]) for im in (cat, coffee))
    xy, _ = image_match(fa, fb, cat.image.size, coffee.image.size, CLICK)
    np.testing.assert_allclose([answer["matches"][0]["x"], answer["matches"][0]["y"]], xy, atol=1e-3)


def _tiny_dino(path):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(image_size=518, patch_size=14, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          mlp_ratio=4, layer_norm_eps=1e-6, layerscale_value=1.0, qkv_bias=True)
    Dinov2Model(config).eval().save_pretrained(path)
    return path


@pytest.mark.parametrize("name", ["tale", "tlfr"])
def test_fusion_recipe_equals_the_fusion_transfer(name, student_engine, tmp_path_factory):
    from cleandift_rt.fusion import RECIPES, Fusion

    small = replace(RECIPES[name], dino_size=112, sd_size=128, sd_crop=64)  # 8 x 8 descriptor grids
    dino = cd.Dinov2Features(_tiny_dino(tmp_path_factory.mktemp("dino") / "dinov2"), size=112)
    fusion = Fusion(small, student_engine(64), dino)
    s = loaded(student_engine(64), fusions={name: fusion})
    answer = s.click({"kind": "fusion", "name": name}, 0, *CLICK)
    cat, coffee = s.images[0], s.images[1]
    want = fusion.transfer(cat.image, coffee.image, np.array([CLICK]))
    (m,) = answer["matches"]
    np.testing.assert_allclose([m["x"], m["y"]], want.points[0], atol=1e-3)
    assert m["similarity"] == pytest.approx(float(want.similarity[0]), abs=1e-5)
    # the heat map's GridMap and the recipe's own cell -> pixel convention agree
    recipe = s.recipe({"kind": "fusion", "name": name})
    (got,) = recipe.click(cat, CLICK, [coffee])
    cells = np.array([[2.0, 5.0]])
    place = fusion.placement(*coffee.image.size)
    np.testing.assert_allclose(got.grid.to_image(cells), fusion.to_image(place, torch.from_numpy(cells), 8), atol=1e-9)
    assert sorted(s.prepare({"kind": "fusion", "name": name})["pca"]) == [0, 1]


# -- pictures ---------------------------------------------------------------------------------------


def test_pca_picture_is_the_shared_pca_of_the_maps(session):
    spec = {"kind": "tap", "tap": "us9"}
    pictures = session.prepare(spec)["pca"]
    maps = [im.taps["us9"] for im in session.images.values()]
    want = pca_maps(maps)  # stretch policy: every cell lies on the image, none is cropped
    for (fg, rgb), im in zip(want, session.images.values()):
        with Image.open(io.BytesIO(base64.b64decode(pictures[im.id].split(",", 1)[1]))) as pic:
            got = np.asarray(pic.convert("RGB"))
        assert pic.size == overlay_size(*im.image.size)
        h, w = fg.shape
        for cy, cx in [(0, 0), (h // 2, w // 3), (h - 1, w - 1)]:  # the overlay pixel at each cell's centre
            px = int((cx + 0.5) / w * got.shape[1])
            py = int((cy + 0.5) / h * got.shape[0])
            colour = np.round(rgb[cy, cx] * 255) if fg[cy, cx] else (40, 40, 40)
            np.testing.assert_array_equal(got[py, px], colour)


# -- bad input -> messages --------------------------------------------------------------------------


@pytest.mark.parametrize("data, message", [
    (b"\xff\xd8\xff\xe0 not a jpeg at all", "broken.jpg is not an image the explorer can read"),
    (b"", "broken.jpg is not an image"),
])
def test_unreadable_files_are_refused_with_a_message(engine, data, message):
    with pytest.raises(ExploreError, match=message):
        Session(engine).add_image("broken.jpg", data)


def test_huge_and_tiny_images_are_refused_before_decoding(engine, monkeypatch):
    big = io.BytesIO()
    Image.new("RGB", (500, 400)).save(big, format="PNG")
    monkeypatch.setenv("CLEANDIFT_MAX_IMAGE_PIXELS", "100000")  # the package's image limit is the default
    with pytest.raises(ExploreError, match=r"big.png is 500 x 400 pixels \(0 MP\).*up to 0 MP.*CLEANDIFT_MAX_IMAGE"):
        Session(engine).add_image("big.png", big.getvalue())
    assert Session(engine, max_pixels=200_000).add_image("big.png", big.getvalue())["name"] == "big.png"
    small = io.BytesIO()
    Image.new("RGB", (300, 40)).save(small, format="PNG")
    with pytest.raises(ExploreError, match="at least 64 px"):
        Session(engine).add_image("thin.png", small.getvalue())


def test_bad_clicks_and_recipes_are_refused_with_a_message(session, engine):
    cases = [
        (({"kind": "tap", "tap": TAP}, 0, 451.0, 10.0), "lies outside cat.jpg \\(451 x 300 pixels\\)"),
        (({"kind": "tap", "tap": TAP}, 0, 10.0, -1.0), "lies outside"),
        (({"kind": "tap", "tap": TAP}, 0, float("nan"), 1.0), "not a pair of numbers"),
        (({"kind": "tap", "tap": TAP}, 0, "1", 1.0), "not a pair of numbers"),
        (({"kind": "tap", "tap": TAP}, 7, 1.0, 1.0), "no image 7 is loaded"),
        (({"kind": "tap", "tap": "us99"}, 0, 1.0, 1.0), "the engine has no output 'us99'"),
        (({"kind": "projected", "tap": TAP, "t": 10}, 0, 1.0, 1.0), "no projection heads: start the explorer with --heads"),
        (({"kind": "fusion", "name": "tlfr"}, 0, 1.0, 1.0), "--dino PATH"),
        (({"kind": "warp"}, 0, 1.0, 1.0), "unknown recipe kind 'warp'"),
        ((None, 0, 1.0, 1.0), "names no recipe"),
    ]
    for args, message in cases:
        with pytest.raises(ExploreError, match=message):
            session.click(*args)
    alone = loaded(engine, ("cat",))
    with pytest.raises(ExploreError, match="load a second image"):
        alone.click({"kind": "tap", "tap": TAP}, 0, 1.0, 1.0)
    with pytest.raises(ExploreError, match="the engine has no output"):
        Session(engine, start={"kind": "tap", "tap": "hyper"})


def test_image_limit_library_and_removal(engine, tmp_path):
    (tmp_path / "b.jpg").write_bytes(jpeg("coffee"))
    s = loaded(engine, ("cat",), max_images=2, library=[photo_path("astronaut"), tmp_path / "b.jpg"])
    assert s.pick(1)["name"] == "b.jpg"
    with pytest.raises(ExploreError, match="2 images are loaded"):
        s.pick(0)
    with pytest.raises(ExploreError, match="no image 5 in the folder list"):
        s.pick(5)
    s.prepare({"kind": "tap", "tap": TAP})
    s.remove(0)
    assert [im["name"] for im in s.describe()["images"]] == ["b.jpg"]
    assert s.add_image("again.jpg", jpeg("cat"))["id"] == 2  # ids are never reused
    with pytest.raises(ExploreError, match="no image 0 is loaded"):
        s.remove(0)


# -- the server -------------------------------------------------------------------------------------


@pytest.fixture()
def server(engine):
    srv = ExplorerServer(loaded(engine), "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=10)


def request(srv, path, body=None, headers=None, json_body=True):
    headers = {"X-Explorer": "1", **(headers or {})}
    data = json.dumps(body).encode() if json_body and body is not None else body
    req = urllib.request.Request(srv.url.rstrip("/") + path, data=data, headers=headers,
                                 method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_server_answers_and_bad_requests_get_messages(server, monkeypatch):
    status, page = request(server, "/")
    assert status == 200 and b"cleandift-rt explorer" in page
    status, body = request(server, "/api/state")
    assert status == 200 and [im["name"] for im in json.loads(body)["images"]] == ["cat.jpg", "coffee.jpg"]
    status, body = request(server, "/image/0")
    assert status == 200 and body[:2] == b"\xff\xd8"
    status, body = request(server, "/api/click", {"recipe": {"kind": "tap", "tap": TAP}, "image": 0, "x": 30, "y": 40})
    assert status == 200 and len(json.loads(body)["matches"]) == 1

    upload = {"X-File-Name": "broken%20file.jpg", "Content-Type": "application/octet-stream"}
    status, body = request(server, "/api/upload", b"GIF89a broken", upload, json_body=False)
    assert status == 400 and json.loads(body)["error"].startswith("broken file.jpg is not an image")
    status, body = request(server, "/api/upload", jpeg("astronaut"), {"X-File-Name": "astronaut.jpg"}, json_body=False)
    assert status == 200 and json.loads(body)["added"]["name"] == "astronaut.jpg"
    for path, body_, code, message in [
        ("/api/click", {"recipe": {"kind": "tap", "tap": TAP}, "image": 0, "x": 1e6, "y": 0}, 400, "lies outside"),
        ("/api/prepare", b"{not json", 400, "not JSON"),
        ("/api/remove", {"image": 99}, 400, "no image 99"),
        ("/api/nothing", {}, 404, "no such request"),
    ]:
        status, body = request(server, path, body_, json_body=isinstance(body_, dict))
        assert status == code and message in json.loads(body)["error"]
    assert request(server, "/api/state", headers={"Host": "attacker.example"})[0] == 403  # DNS rebinding
    status, body = request(server, "/api/click", {}, headers={"X-Explorer": "0"})
    assert status == 403 and "explorer page" in json.loads(body)["error"]

    def broken(*args):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(server.session, "click", broken)
    status, body = request(server, "/api/click", {"image": 0, "x": 1, "y": 1})
    error = json.loads(body)["error"]
    assert status == 500 and "internal error (RuntimeError: simulated bug)" in error and "Traceback" not in error
    assert request(server, "/api/state")[0] == 200  # and the server goes on


def test_oversized_upload_is_refused_unread(server, monkeypatch):
    from cleandift_rt.explore import server as server_module

    monkeypatch.setattr(server_module, "MAX_BODY", 1000)
    status, body = request(server, "/api/upload", jpeg("cat"), {"X-File-Name": "cat.jpg"}, json_body=False)
    assert status == 413 and "files up to 0 MB" in json.loads(body)["error"]
    assert request(server, "/api/state")[0] == 200


# -- the command ------------------------------------------------------------------------------------


def test_command_refuses_bad_arguments_with_one_line(tiny_student_files, tiny_base_dir, tmp_path, capsys):
    import socket

    from cleandift_rt.cli.main import main

    engine_args = ["explore", "--engine", str(tiny_student_files["unet"]), "--base", str(tiny_base_dir), "--size", "128"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for extra, message in [
            (["--images", str(tmp_path / "missing.jpg")], "--images {}: no such file or folder".format(tmp_path / "missing.jpg")),
            (["--images", str(empty)], "the folder holds no images"),
            (["--recipe", "tlfr"], "--recipe tlfr fuses DINOv2 features: pass --dino PATH"),
            (["--port", str(port)], f"cannot listen on 127.0.0.1:{port}"),
        ]:
            assert main(engine_args + extra) == 2
            err = capsys.readouterr().err
            assert err.splitlines()[-1].startswith("error: ") and message in err and "Traceback" not in err


# -- the tracking tab -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def frames_dir(tmp_path_factory, photos):
    from cleandift_rt.tracking.synthetic import synthetic_video

    video = synthetic_video(photos["cat"], "translation", frames=6, points=4, size=128)
    folder = tmp_path_factory.mktemp("frames")
    for i, frame in enumerate(video.video):
        Image.fromarray(frame).save(folder / f"{i:03d}.png")
    return folder


def test_tracking_tab_equals_the_tracker_on_the_same_frames(engine, frames_dir):
    from cleandift_rt.cli.explore import _sequence

    sequence = _sequence(frames_dir, engine, threading.RLock())
    assert sequence.describe() == {"name": frames_dir.name, "frames": 6, "fps": 30.0, "width": 128, "height": 128,
                                   "total": 6}
    points = [[40.0, 50.0], [90.5, 70.25]]
    got = sequence.track({"points": points, "recipe": {"kind": "tap", "tap": "us9"}})
    frames = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(frames_dir.iterdir())]
    tracker = cd.Tracker(engine, tap="us9")
    maps = tracker.features(frames)  # one engine call, as the tab's (up to 8 frames a call): the same features
    tracker.set_reference(maps[0], np.array(points))
    want = [tracker.track(m) for m in maps[1:]]
    assert got["frames"] == 6 and got["points"][0] == points and got["visible"][0] == [True, True]
    np.testing.assert_allclose(np.array(got["points"][1:]), np.stack([w.points for w in want]), atol=1e-4)
    assert got["visible"][1:] == [w.visible.tolist() for w in want]
    calls = []
    engine_extract = engine.extract
    engine.extract = lambda *a, **k: calls.append(1) or engine_extract(*a, **k)
    try:  # other points on the same tap: the frames' maps are kept, only the matching runs
        sequence.track({"points": [[10.0, 10.0]], "recipe": {"kind": "tap", "tap": "us9"}})
    finally:
        del engine.extract
    assert not calls
    assert sequence.frame(5)[:2] == b"\xff\xd8"


def test_tracking_tab_refuses_bad_points_with_a_message(engine, frames_dir):
    from cleandift_rt.cli.explore import _sequence

    sequence = _sequence(frames_dir, engine, threading.RLock())
    tap = {"kind": "tap", "tap": "us9"}
    for args, message in [
        ({"points": [], "recipe": tap}, "click 1 to 16 points"),
        ({"points": [[1, 2]] * 17, "recipe": tap}, "click 1 to 16 points"),
        ({"points": [[200, 2]], "recipe": tap}, r"point \(200.0, 2.0\) lies outside the first frame \(128 x 128"),
        ({"points": [["a", 2]], "recipe": tap}, "is not a pair of numbers"),
        ({"points": [[1, 2]], "recipe": {"kind": "projected", "tap": "us6", "t": 10}}, "pick 'raw tap'"),
    ]:
        with pytest.raises(ExploreError, match=message):
            sequence.track(args)
    with pytest.raises(ExploreError, match="no frame 6"):
        sequence.frame(6)
