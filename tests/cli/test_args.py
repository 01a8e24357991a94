"""The flags every command shares (cli.common): one ``--size``, one ``--device`` default; the train,
export-onnx and build-plan subcommands against the scripts they share their flags with; the file
kinds ``info`` reads."""

from __future__ import annotations

import numpy as np
import pytest

from cleandift_rt.cli.common import DEVICE_HELP, best_device
from cleandift_rt.cli.export import build_plan_main, build_plan_parser, export_onnx_parser
from cleandift_rt.cli.main import build_parser, main
from cleandift_rt.cli.train import build_parser as train_script_parser, entry as train_script

# the smallest valid command line of each command with a --size, the flag left out
SIZED = {
    "demo": ["demo", "--out", "d"],
    "match": ["match", "a.jpg", "b.jpg", "--engine", "e.onnx", "--out", "m.png"],
    "extract": ["extract", "photos", "--engine", "e.onnx", "--out", "feats"],
    "probe-depth": ["probe-depth", "--data", "nyu", "--engine", "e.onnx", "--out", "depth"],
    "train-aggregator": ["train-aggregator", "--root", "spair", "--source", "inversion", "--base", "b", "--out", "o"],
    "train-gate": ["train-gate", "--root", "spair", "--base", "b", "--bucket", "b.json", "--out", "o"],
    "content-shift": ["content-shift", "cat.jpg", "--base", "b", "--out", "o"],
    "train": ["train", "--base", "b", "--data", "d", "--out", "o"],
    "export-onnx": ["export-onnx", "--student", "s.safetensors", "--base", "b", "--out", "x.onnx"],
}


def _subparsers():
    return build_parser()._subparsers._group_actions[0].choices


def _options(parser) -> set[str]:
    return {s for action in parser._actions for s in action.option_strings}


@pytest.mark.parametrize("command", sorted(SIZED))
def test_one_size_number_is_a_square(command):
    parser = build_parser()
    one = parser.parse_args(SIZED[command] + ["--size", "256"])
    two = parser.parse_args(SIZED[command] + ["--size", "256", "256"])
    assert one.size == two.size == [256, 256]
    assert parser.parse_args(SIZED[command] + ["--size", "128", "192"]).size == [128, 192]


def test_arguments_after_a_size_keep_their_meaning():
    """--size reads one number or two: images, folders and key=value overrides after it stay themselves."""
    parser = build_parser()
    for size in (["256"], ["256", "256"], ["--size=256"]):
        flag = [] if size[0].startswith("--") else ["--size"]
        args = parser.parse_args(["pca", *flag, *size, "a.jpg", "b.jpg", "--engine", "e.onnx", "--out", "p.png"])
        assert args.size == [256, 256] and args.images == ["a.jpg", "b.jpg"]
    args = parser.parse_args(SIZED["train"] + ["--size", "512", "lr=1e-5", "bf16=true"])
    assert args.size == [512, 512] and args.overrides == ["lr=1e-5", "bf16=true"]
    assert train_script_parser().parse_args(["--base", "b", "--data", "d", "--out", "o", "--size", "64"]).size == [64, 64]
    assert export_onnx_parser().parse_args(["--student", "s", "--base", "b", "--out", "x.onnx", "--size", "64"]).size == [64, 64]


def test_square_only_commands_refuse_two_different_sides(tmp_path, capsys):
    for argv in (["demo", "--out", str(tmp_path / "demo")],
                 ["train", "--base", str(tmp_path / "b"), "--data", str(tmp_path / "d"), "--out", str(tmp_path / "o")]):
        assert main(argv + ["--size", "64", "128"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --size 64 128: ") and "square" in err and "--size 64" in err
    assert not (tmp_path / "demo").exists()  # refused before any work
    assert train_script(["--base", "b", "--data", "d", "--out", str(tmp_path / "o"), "--size", "64", "128"]) == 2
    assert capsys.readouterr().err.startswith("train.py: error: --size 64 128: train runs square inputs")


def test_every_device_flag_defaults_to_the_best_device():
    with_device = []
    for name, parser in _subparsers().items():
        for action in parser._actions:
            if "--device" in action.option_strings:
                with_device.append(name)
                assert action.default is None and action.help == DEVICE_HELP, name
    assert {"train-gate", "content-shift", "train", "match", "train-aggregator"} <= set(with_device)
    import torch

    assert best_device(None) == ("cuda" if torch.cuda.is_available() else "cpu")
    assert best_device("cpu") == "cpu"


@pytest.mark.parametrize("command, script_parser, flags", [
    ("train", train_script_parser, {"--distill-text", "--resume-from", "--head-conditioning", "--size"}),
    ("export-onnx", export_onnx_parser, {"--dynamic-size", "--aggregator", "--external-data", "--size"}),
    ("build-plan", build_plan_parser, {"--timing-cache", "--min-cosine", "--no-verify"}),
])
def test_train_export_and_build_plan_subcommands_take_the_scripts_flags(command, script_parser, flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert f"cleandift-rt {command}" in text and "example" in text
    assert all(flag in text for flag in flags)
    assert _options(_subparsers()[command]) == _options(script_parser())


def test_build_plan_exit_statuses(monkeypatch, tmp_path, capsys):
    """3: TensorRT or the GPU missing; 4: the plan failed verification; 2: a bad argument; the
    subcommand and export/build_engine.py alike, each with its own one-line prefix."""
    from cleandift_rt.export import trt_build
    from cleandift_rt.export.verify import VerificationFailed

    argv = ["--onnx", str(tmp_path / "x.onnx"), "--out", str(tmp_path / "x.plan")]
    for error, status in ((trt_build.BuildUnavailable("TensorRT is not installed"), 3),
                          (VerificationFailed("us6 cosine 0.9 < 0.995"), 4), (ValueError("--workspace 0"), 2)):
        def fail(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(trt_build, "build_engine", fail)
        assert main(["build-plan", *argv]) == status
        assert capsys.readouterr().err.strip() == f"error: {error}"
        assert build_plan_main(argv) == status
        assert capsys.readouterr().err.strip() == f"build_engine: {error}"


def test_export_onnx_subcommand_writes_an_engine(tiny_base_dir, tiny_student_files, tmp_path, capsys):
    from cleandift_rt.formats.artifact import read_onnx_info

    out = tmp_path / "tiny64.onnx"
    assert main(["export-onnx", "--student", str(tiny_student_files["unet"]), "--base", str(tiny_base_dir), "--out",
                 str(out), "--size", "64", "--taps", "us6"]) == 0
    info = read_onnx_info(out)
    assert (info.height, info.width) == (64, 64) and info.tap_names == ("us6",)
    capsys.readouterr()
    assert main(["export-onnx", "--student", str(tiny_student_files["unet"]), "--base", str(tiny_base_dir), "--out",
                 str(tmp_path / "x.onnx"), "--size", "64", "--batch", "4:2:1"]) == 2
    assert capsys.readouterr().err.startswith("error: batch range '4:2:1'") and not (tmp_path / "x.onnx").exists()


def test_info_file_kinds_claim_each_file_once(tmp_path, tiny_student_files, tiny_base_dir):
    from safetensors.numpy import save_file

    from cleandift_rt.cli.info import FILE_KINDS, kind_of
    from cleandift_rt.hyper.aggregator import FORMAT

    aggregator = tmp_path / "aggregator.safetensors"
    save_file({"w": np.zeros(1, np.float32)}, str(aggregator), metadata={"format": FORMAT})
    files = {"engine": [tmp_path / "a.onnx", tmp_path / "a.plan"], "aggregator": [aggregator],
             "student": [tiny_student_files["unet"], tiny_base_dir]}
    for name, paths in files.items():
        for path in paths:
            assert [kind.name for kind in FILE_KINDS if kind.claims(path)] == [name], path
            assert kind_of(path).name == name
    assert {kind.name for kind in FILE_KINDS if kind.picture is not None} == {"aggregator"}
