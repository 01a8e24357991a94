"""ONNX export of the tiny student: graph contract, metadata, external data, parity with PyTorch."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from cleandift_rt.formats.artifact import (
    EMBEDS_INPUT,
    IMAGE_INPUT,
    ArtifactInfo,
    describe,
    parse_batch,
    read_onnx_info,
    size_fields,
)
from cleandift_rt.cli.info import format_info
from cleandift_rt.runtime.engine import Engine
from cleandift_rt.features.extractor import ReferenceExtractor
from cleandift_rt.export.onnx_export import check_onnx, export_onnx
from cleandift_rt.taps import TAPS
from export_fixtures import SIZE, SUBSET, MixedTaps
from export_fixtures import cosine as _cosine

ROOT = Path(__file__).resolve().parents[2]


def test_graphs_pass_checker_and_shape_inference(tiny_onnx):
    for path in tiny_onnx.values():
        check_onnx(path)


def test_graph_inputs_outputs_and_pruning(tiny_onnx):
    full = onnx.load(str(tiny_onnx["full"]), load_external_data=False)
    assert [o.name for o in full.graph.output] == list(TAPS)
    assert [i.name for i in full.graph.input] == [IMAGE_INPUT, EMBEDS_INPUT]
    assert EMBEDS_INPUT in {t.name for t in full.graph.initializer}  # the baked default
    names = " ".join(n.name for n in full.graph.node)
    assert "/unet/up_blocks.2/" in names and "/encoder/down_blocks.0/" in names
    for dead in ("/unet/conv_out", "/unet/conv_norm_out", "up_blocks.3/attentions.1", "/decoder/", "post_quant_conv"):
        assert dead not in names, f"{dead} should have been pruned"
    sub = onnx.load(str(tiny_onnx["subset"]), load_external_data=False)
    sub_names = " ".join(n.name for n in sub.graph.node)
    assert [o.name for o in sub.graph.output] == list(SUBSET)
    assert "/unet/up_blocks.1/" in sub_names and "/unet/up_blocks.2/" not in sub_names  # ends at us6
    used = {i for n in sub.graph.node for i in n.input}
    assert all(t.name in used for t in sub.graph.initializer), "unused weights left in the graph"


def test_external_data_is_one_file_beside_the_model(tiny_onnx):
    path = tiny_onnx["subset"]
    model = onnx.load(str(path), load_external_data=False)
    locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {path.name + ".data"}
    assert (path.parent / (path.name + ".data")).is_file()
    assert not (tiny_onnx["full"].parent / (tiny_onnx["full"].name + ".data")).exists()  # small: inline


def test_metadata_round_trip(tiny_onnx, tiny_base, tiny_student_files):
    info = read_onnx_info(tiny_onnx["full"])
    assert info.tap_names == TAPS
    assert [t["channels"] for t in info.taps] == [64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 32]
    assert [t["stride"] for t in info.taps] == [64, 64, 64, 32, 32, 32, 16, 16, 16, 8, 8]
    assert (info.height, info.width, info.size_range) == (SIZE, SIZE, None)
    assert info.batch == {"min": 1, "opt": 2, "max": 4}
    assert info.timestep == 261.0 and info.prompt == "" and info.resize == "stretch"
    assert info.student == Path(tiny_student_files["unet"]).name and info.variant == "tiny"
    assert info.input["range"] == [-1.0, 1.0] and info.input["dtype"] == "float32"
    d = describe(tiny_onnx["subset"])
    assert d["kind"] == "onnx" and d["size_range"] == [64, 192] and [t["name"] for t in d["taps"]] == list(SUBSET)
    assert d["external_data"] == [tiny_onnx["subset"].name + ".data"]
    props = {p.key: p.value for p in onnx.load(str(tiny_onnx["full"]), load_external_data=False).metadata_props}
    assert json.loads(props["cleandift_rt.timestep"]) == 261.0
    assert json.loads(props["cleandift_rt.package_version"])
    # the student file's text conditioning travels into the export, and info shows it
    assert info.text_conditioning == "distill" and json.loads(props["cleandift_rt.text_conditioning"]) == "distill"
    assert "text conditioning: distill" in format_info(describe(tiny_onnx["full"]))


def test_student_files_say_how_they_were_trained(tiny_student_files, tmp_path):
    from cleandift_rt.checkpoint import read_safetensors, read_safetensors_metadata, write_safetensors

    unet, full = describe(tiny_student_files["unet"]), describe(tiny_student_files["full"])
    assert unet["text_conditioning"] == "distill" and "head_conditioning" not in unet  # no heads in '_unet'
    assert full["text_conditioning"] is None and full["head_conditioning"] == "adarms"
    assert "text conditioning: not recorded" in format_info(full) and "projection heads: adarms" in format_info(full)
    meta = read_safetensors_metadata(tiny_student_files["unet"])
    write_safetensors(tmp_path / "bad.safetensors", read_safetensors(tiny_student_files["unet"]),
                      {**meta, "text_conditioning": "sometimes"})
    with pytest.raises(ValueError, match="text_conditioning metadata 'sometimes' is not one of captions, none, distill"):
        describe(tmp_path / "bad.safetensors")
    from cleandift_rt.models import load_student

    with pytest.raises(ValueError, match="text_conditioning metadata 'sometimes'"):
        load_student(tmp_path / "bad.safetensors")
    assert load_student(tiny_student_files["unet"]).text_conditioning == "distill"


def test_onnxruntime_matches_pytorch_reference(tiny_onnx, reference, batch):
    engine = Engine(tiny_onnx["full"], device="cpu", precision="fp32")
    assert engine.info["providers"] == ["CPUExecutionProvider"]
    ours = engine.extract(batch)
    ref = reference.extract(batch)
    report = []
    for tap in TAPS:
        want = ref[tap].numpy()
        assert ours[tap].shape == want.shape
        cos = _cosine(ours[tap], want).min()
        rel = float(np.abs(ours[tap] - want).max() / np.abs(want).max())
        report.append(f"{tap}: cos {cos:.7f} max rel {rel:.1e}")
        assert cos >= 0.99999, report[-1]
        assert rel < 1e-3, report[-1]
    print("ONNX Runtime vs PyTorch:", "; ".join(report))


def test_subset_export_equals_full_export(tiny_onnx, batch):
    full = Engine(tiny_onnx["full"], precision="fp32").extract(batch, taps=SUBSET)
    sub = Engine(tiny_onnx["subset"], size=(SIZE, SIZE), precision="fp32").extract(batch)
    for tap in SUBSET:
        np.testing.assert_allclose(sub[tap], full[tap], rtol=1e-4, atol=1e-5)


def test_dynamic_size_export(tiny_onnx, tiny_base, tiny_student, photos):
    engine = Engine(tiny_onnx["subset"], size=(192, 64), precision="fp32")
    feats = engine.extract([photos["cat"]])
    assert feats["us3"].shape == (1, 64, 6, 2) and feats["us6"].shape == (1, 64, 12, 4)
    ref = ReferenceExtractor(tiny_student, tiny_base, size=(192, 64)).extract([photos["cat"]], taps=SUBSET)
    for tap in SUBSET:
        assert _cosine(feats[tap], ref[tap].numpy()).min() >= 0.99999
    with pytest.raises(ValueError, match="outside this engine's dynamic range"):
        Engine(tiny_onnx["subset"], size=(256, 256))


def test_prompt_embeds_input_overrides_the_baked_prompt(tiny_onnx, tiny_base, reference, batch):
    engine = Engine(tiny_onnx["full"], precision="fp32")
    baked = onnx.numpy_helper.to_array(next(t for t in onnx.load(str(tiny_onnx["full"])).graph.initializer
                                            if t.name == EMBEDS_INPUT))
    np.testing.assert_allclose(baked, tiny_base.encode_prompt("").numpy(), atol=1e-6)
    embeds = tiny_base.encode_prompt("a photo of a cat")[0]
    ours = engine.extract(batch, taps="us6", prompt_embeds=embeds)
    ref = reference.extract(batch, taps="us6", prompt_embeds=embeds)
    assert _cosine(ours["us6"], ref["us6"].numpy()).min() >= 0.99999
    default = engine.extract(batch, taps="us6")
    assert np.abs(default["us6"] - ours["us6"]).max() > 1e-4  # the embedding really is used


def _as_a_file_from_before_the_derived_list(path: Path, out: Path) -> Path:
    """``path`` with its derived output 'mixed' rewritten the way files recorded their one derived output
    before the ``derived`` list: a graph output 'hyper' described only by ``extra["hyper"]``."""
    model = onnx.load(str(path))
    for node in model.graph.node:
        node.output[:] = ["hyper" if name == "mixed" else name for name in node.output]
    for output in model.graph.output:
        output.name = "hyper" if output.name == "mixed" else output.name
    props = {p.key: p.value for p in model.metadata_props if p.key != "cleandift_rt.derived"}
    props["cleandift_rt.extra"] = json.dumps({"hyper": {"channels": 8, "stride": 16, "source": "cleandift",
                                                        "layers": ["us3", "us6"], "timesteps": [0.0],
                                                        "aggregator": "aggregator.safetensors"}})
    del model.metadata_props[:]
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(out))
    return out


def test_a_derived_output_is_traced_into_the_graph_and_recorded(tiny_base_dir, tiny_student_files, batch, tmp_path):
    """Any ``formats.derived`` output, not only the hyperfeatures aggregator: in the graph after the taps,
    listed in the metadata, the same values as the PyTorch Engine computes; and files written before the
    ``derived`` list (their one derived output, 'hyper', in ``extra["hyper"]``) still load."""
    mixed, out = MixedTaps(), tmp_path / "mixed.onnx"
    export_onnx(tiny_student_files["unet"], tiny_base_dir, out, dynamic_size=(64, 192), taps=["us6"], derived=[mixed],
                log=lambda *_: None)
    info = read_onnx_info(out)
    assert info.derived == [{"name": "mixed", "channels": 8, "stride": 16, "reads": ["us3", "us6"]}]
    assert info.extra["mixed"] == mixed.describe() and info.output_names == ("us6", "mixed")
    assert info.output_shape("mixed", 192, 64) == (8, 12, 4)
    graph_output = next(o for o in onnx.load(str(out), load_external_data=False).graph.output if o.name == "mixed")
    dims = graph_output.type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 8, "mixed_h", "mixed_w"]
    ours = Engine(out, size=(SIZE, SIZE), precision="fp32").extract(batch)
    assert list(ours) == ["us6", "mixed"] and ours["mixed"].shape == (len(batch), 8, SIZE // 16, SIZE // 16)
    pytorch = Engine(tiny_student_files["unet"], base=tiny_base_dir, size=SIZE, taps=["us6"], derived=[mixed])
    want = pytorch.extract(batch)
    for name in ("us6", "mixed"):
        assert _cosine(ours[name], want[name]).min() >= 0.99999
    with pytest.raises(ValueError, match="already computes 'mixed'.*without derived="):
        Engine(out, derived=[mixed])
    old = Engine(_as_a_file_from_before_the_derived_list(out, tmp_path / "old.onnx"), size=(SIZE, SIZE),
                 precision="fp32")
    assert old.taps == ("us6", "hyper") and old.info["derived"][0]["reads"] == ["us3", "us6"]
    assert describe(old.path)["derived"] == [{"name": "hyper", "channels": 8, "stride": 16, "reads": ["us3", "us6"]}]
    np.testing.assert_allclose(old.extract(batch, taps=["hyper"])["hyper"], ours["mixed"], rtol=1e-5, atol=1e-6)


GOOD_RECORD = {"name": "mixed", "channels": 8, "stride": 16, "reads": ["us3", "us6"]}


@pytest.mark.parametrize("entry, match", [
    ({"name": "us6"}, "taken by a tap"),
    ({"name": "images"}, "taken by a graph input"),
    ({"name": "Mixed!"}, "lower-case letters"),
    ({"stride": 7}, r"stride = 7 must divide 64"),
    ({"channels": 0}, r"channels = 0 must be an integer"),
    ({"reads": ["us11"]}, "must list taps"),
])
def test_derived_records_are_checked_before_a_runtime_sizes_buffers(tiny_onnx, entry, match):
    d = read_onnx_info(tiny_onnx["full"]).to_dict()
    assert ArtifactInfo.from_dict({**d, "derived": [GOOD_RECORD]}, "m.onnx").output_names[-1] == "mixed"
    with pytest.raises(ValueError, match=match):
        ArtifactInfo.from_dict({**d, "derived": [{**GOOD_RECORD, **entry}]}, "m.onnx")


def test_derived_names_are_unique_and_agree_with_the_old_hyper_record(tiny_onnx):
    d, good = read_onnx_info(tiny_onnx["full"]).to_dict(), GOOD_RECORD
    with pytest.raises(ValueError, match="repeat"):
        ArtifactInfo.from_dict({**d, "derived": [good, good]}, "m.onnx")
    with pytest.raises(ValueError, match="disagree"):  # the old record of 'hyper' beside the list
        ArtifactInfo.from_dict({**d, "derived": [{**good, "name": "hyper"}],
                                "extra": {"hyper": {"channels": 16, "stride": 16}}}, "m.onnx")


def test_export_rejects_bad_arguments(tiny_base_dir, tiny_student_files, tmp_path):
    student = tiny_student_files["unet"]
    with pytest.raises(ValueError, match="multiples of 64"):
        export_onnx(student, tiny_base_dir, tmp_path / "x.onnx", size=(100, 128))
    with pytest.raises(ValueError, match="unknown tap"):
        export_onnx(student, tiny_base_dir, tmp_path / "x.onnx", size=(128, 128), taps=["us11"])
    with pytest.raises(ValueError, match="MIN:OPT:MAX"):
        export_onnx(student, tiny_base_dir, tmp_path / "x.onnx", size=(128, 128), batch="8:4:1")
    with pytest.raises(ValueError, match=r"must end in \.onnx"):
        export_onnx(student, tiny_base_dir, tmp_path / "x.plan", size=(128, 128))
    with pytest.raises(ValueError, match="exactly one"):
        size_fields((128, 128), (64, 128), 128)
    with pytest.raises(ValueError, match="below 64"):
        parse_batch("1:4:64")
    assert parse_batch("2") == {"min": 2, "opt": 2, "max": 2}
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_cli_reports_errors_in_one_line(tiny_base_dir, tiny_student_files, tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "export"))
    try:
        import export_onnx as cli
    finally:
        sys.path.pop(0)
    rc = cli.main(["--student", str(tmp_path / "missing.safetensors"), "--base", str(tiny_base_dir),
                   "--out", str(tmp_path / "x.onnx"), "--size", "128", "128"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("export_onnx: ") and "missing.safetensors" in err
    # argument mistakes are reported before any model is loaded (the student here does not exist)
    rc = cli.main(["--student", str(tmp_path / "missing.safetensors"), "--base", str(tiny_base_dir),
                   "--out", str(tmp_path / "x.onnx"), "--size", "128", "128", "--batch", "4:2:1"])
    err = capsys.readouterr().err
    assert rc == 2 and "MIN:OPT:MAX" in err and "missing.safetensors" not in err
    # an output folder that cannot be created: one line, no traceback
    (tmp_path / "a_file").write_text("")
    rc = cli.main(["--student", str(tiny_student_files["unet"]), "--base", str(tiny_base_dir),
                   "--out", str(tmp_path / "a_file" / "x.onnx"), "--size", "128", "128"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and "a_file" in err.strip().splitlines()[-1]


def test_weights_go_external_above_the_protobuf_limit_and_saves_are_atomic(tiny_onnx, tmp_path, monkeypatch):
    """The automatic > 2 GB switch (limit lowered so the tiny model crosses it), one .data file,
    and re-saving inline removes the stale weights file; no temporary files are left behind."""
    from cleandift_rt.export import onnx_files

    model = onnx.load(str(tiny_onnx["full"]))
    out = tmp_path / "m.onnx"
    monkeypatch.setattr(onnx_files, "PROTOBUF_LIMIT", 1024)
    onnx_files.save_onnx(model, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    check_onnx(out)
    monkeypatch.setattr(onnx_files, "PROTOBUF_LIMIT", 2**31 - 1)
    onnx_files.save_onnx(onnx.load(str(tiny_onnx["full"])), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    check_onnx(out)
