"""cleandift-rt serve end to end, on loopback: the server runs in its own environment (numpy<2 +
PyTriton, see conftest.py), clients run here. Served features equal the in-process Engine's bit for
bit; 8 client threads x 20 requests are all answered correctly (and batched); malformed requests get
clear errors and the server goes on; an engine failure reaches only its caller; SIGTERM leaves no
process, port, shared-memory file or workspace behind. One server serves the module (started through
serve_driver.py, which is `cleandift-rt serve` with an engine that fails on demand)."""

from __future__ import annotations

import json
import re
import signal
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

import cleandift_rt as cd
from cleandift_rt.taps import resolve_taps

pytest.importorskip("tritonclient.grpc", reason="tritonclient is not installed (pip install '.[dev]')")
import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402
from tritonclient.grpc import service_pb2, service_pb2_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from cleandift_rt.serving import Client, ServerError  # noqa: E402
from servers import port_free, shm_files, workspaces  # noqa: E402

pytestmark = pytest.mark.slow
SIZE = 64  # the subset export (us3, us6; dynamic size) served at 64 x 64
MAX_BATCH = 8
CLIENTS = {"grpc": grpcclient, "http": httpclient}


def pid_of(server) -> int:
    return int(re.search(r"serve: ready \(pid (\d+)\)", server.text()).group(1))


@pytest.fixture(scope="module")
def server(start_server, tiny_onnx):
    """``cleandift-rt serve`` on the subset export, through a driver whose engine fails on all-black images."""
    return start_server("--engine", str(tiny_onnx["subset"]), "--size", str(SIZE), "--max-batch", str(MAX_BATCH),
                        "--queue-delay-us", "2000", driver="serve_driver.py")


@pytest.fixture(scope="module")
def images(photos):
    """Photos of three sizes and noise images of three more (the server resizes each as the Engine does)."""
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((64, 96), (80, 80), (130, 70))]
    return [np.asarray(photos[name]) for name in sorted(photos)] + noise


def url(server, protocol: str) -> str:
    return f"127.0.0.1:{server.ports[protocol]}"


def raw_infer(server, protocol: str, model: str, inputs: dict, outputs=(), parameters=None):
    """One request through tritonclient itself (no checks of ours on the way); returns the result."""
    module = CLIENTS[protocol]
    client = module.InferenceServerClient(url(server, protocol))
    tensors = []
    for name, (array, dtype) in inputs.items():
        tensor = module.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array, **({"binary_data": True} if protocol == "http" else {}))
        tensors.append(tensor)
    requested = [module.InferRequestedOutput(n, **({"binary_data": True} if protocol == "http" else {}))
                 for n in outputs]
    try:
        return client.infer(model, tensors, outputs=requested or None, parameters=parameters)
    finally:
        client.close()


def refused(server, protocol, model, inputs, outputs=(), parameters=None) -> str:
    with pytest.raises(InferenceServerException) as caught:
        raw_infer(server, protocol, model, inputs, outputs, parameters)
    return str(caught.value.message())


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_served_features_equal_the_engine(server, subset_engine, images, protocol):
    client = Client(url(server, protocol), protocol=protocol)
    assert client.ready() and client.taps == subset_engine.taps == ("us3", "us6")
    assert client.max_batch == MAX_BATCH
    got = client.extract(images)  # six sizes: one request per size, answers in input order
    want = subset_engine.extract(images)
    assert set(got) == set(want)
    for tap in want:
        assert got[tap].dtype == np.float32 and got[tap].shape == want[tap].shape
        np.testing.assert_array_equal(got[tap], want[tap])
    batch = np.stack([images[0]] * (MAX_BATCH + 3))  # over the server's batch: split here, joined again
    np.testing.assert_array_equal(client.extract(batch, taps="us6")["us6"],
                                  subset_engine.extract(batch, taps="us6")["us6"])

    index, similarity = client.match(images[:2], images[1:3])  # images: the server extracts its match tap (us6)
    feats = want["us6"]
    want_index, want_similarity = cd.match(feats[:2], feats[1:3])
    np.testing.assert_array_equal(index, want_index)
    np.testing.assert_array_equal(similarity, want_similarity)
    index, similarity = client.match(want["us3"][:2], want["us3"][2:4], mutual=True)  # feature maps as sent
    want_index, want_similarity = cd.match(want["us3"][:2], want["us3"][2:4], mutual=True)
    np.testing.assert_array_equal(index, want_index)
    np.testing.assert_array_equal(similarity, want_similarity)
    index, _ = client.match(images[:1], images[1:2], tap="us3")
    np.testing.assert_array_equal(index, cd.match(want["us3"][:1], want["us3"][1:2])[0])
    client.close()


def inference_counts(server, at_least: int = 0) -> tuple[int, int]:
    """(images inferred, executions) of the cleandift model from Triton's Prometheus metrics, waiting up to
    10 s for the images counted to reach ``at_least`` (a request is counted as it is released)."""
    deadline = time.monotonic() + 10
    while True:
        text = urllib.request.urlopen(f"http://127.0.0.1:{server.ports['metrics']}/metrics", timeout=10).read()
        counts = tuple(int(re.search(rf'^{name}{{model="cleandift",version="1"}} (\d+)', text.decode(), re.M).group(1))
                       for name in ("nv_inference_count", "nv_inference_exec_count"))
        if counts[0] >= at_least or time.monotonic() > deadline:
            return counts
        time.sleep(0.2)


def test_eight_threads_of_twenty_requests(server, subset_engine, images):
    want = [subset_engine.extract([img]) for img in images]
    counted, executed = inference_counts(server)
    failures, results = [], {}
    shared = {p: Client(url(server, p), protocol=p) for p in CLIENTS}  # one Client shared by four threads

    def work(thread: int):
        client = shared["grpc" if thread % 2 else "http"]
        try:
            for i in range(20):
                k = (thread * 20 + i) % len(images)
                taps = (None, "us6", ["us3"])[i % 3]
                results[thread, i] = (k, taps, client.extract([images[k]], taps=taps))
        except Exception as exc:  # reported below with the thread that hit it
            failures.append(f"thread {thread}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not failures and len(results) == 160
    for k, taps, got in results.values():
        assert set(got) == set(want[k] if taps is None else resolve_taps(taps))
        for tap, value in got.items():
            np.testing.assert_array_equal(value, want[k][tap])
    assert inference_counts(server, at_least=counted + 160)[0] - counted == 160


def test_dynamic_batching_joins_concurrent_requests(server, subset_engine, images):
    """16 requests sent at once: while the first runs, the rest queue and leave in batches."""
    image = np.stack([images[3]])
    want = subset_engine.extract(image, taps="us6")["us6"]
    counted, executed = inference_counts(server)
    client = grpcclient.InferenceServerClient(url(server, "grpc"))
    answered, results = threading.Semaphore(0), []

    def callback(result, error):
        results.append((result, error))
        answered.release()

    for _ in range(16):
        tensor = grpcclient.InferInput("images", list(image.shape), "UINT8")
        tensor.set_data_from_numpy(image)
        client.async_infer("cleandift", [tensor], callback, outputs=[grpcclient.InferRequestedOutput("us6")])
    assert all(answered.acquire(timeout=60) for _ in range(16))
    client.close()
    for result, error in results:
        assert error is None
        np.testing.assert_array_equal(result.as_numpy("us6"), want)
    after_counted, after_executed = inference_counts(server, at_least=counted + 16)
    assert after_counted - counted == 16
    assert after_executed - executed < 16, "the dynamic batcher should have joined queued requests"


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_bad_requests_get_clear_errors_and_the_server_goes_on(server, subset_engine, images, protocol):
    image = np.ascontiguousarray(np.stack([images[0][:64, :64]]))
    cases = [  # (model, inputs, requested outputs, parameters, what the error must say)
        ("cleandift", {"images": (image.astype(np.float32), "FP32")}, (), None, "expects 'UINT8'"),
        ("cleandift", {"images": (image[..., 0], "UINT8")}, (), None, "images"),  # rank 3: no channel axis
        ("cleandift", {"images": (image[:, :32, :32], "UINT8")}, (), None, "at least 64 px"),
        ("cleandift", {"images": (image, "UINT8")}, ("us9",), None, "us9"),  # a tap this engine does not have
        ("cleandift", {"images": (np.repeat(image, MAX_BATCH + 1, 0), "UINT8")}, (), None, f"<= {MAX_BATCH}"),
        ("cleandift_match", {"images_a": (image, "UINT8")}, (), None, "'images_b' is missing"),
        ("cleandift_match", {"images_a": (image, "UINT8"), "images_b": (image, "UINT8")}, (), {"tap": "us9"},
         "unknown tap 'us9'"),
        ("cleandift_match", {"images_a": (image, "UINT8"), "features_b": (np.ones((1, 4, 2, 2), np.float32), "FP32")},
         (), None, "not both kinds"),
        ("cleandift_match", {"features_a": (np.full((1, 4, 2, 2), np.nan, np.float32), "FP32"),
                             "features_b": (np.ones((1, 4, 2, 2), np.float32), "FP32")}, (), None, "NaN"),
        ("cleandift_match", {}, (), None, ""),  # nothing at all
    ]
    for model, inputs, outputs, parameters, says in cases:
        message = refused(server, protocol, model, inputs, outputs, parameters)
        assert says in message, (model, list(inputs), message)
    assert corrupt_payload_refused(server, protocol)
    result = raw_infer(server, protocol, "cleandift", {"images": (image, "UINT8")}, ("us6",))  # still serving
    np.testing.assert_array_equal(result.as_numpy("us6"), subset_engine.extract(image, taps="us6")["us6"])
    with pytest.raises(ValueError, match="at least 64 px"):  # the Client raises the server's message
        Client(url(server, protocol), protocol=protocol).extract(np.zeros((1, 32, 32, 3), np.uint8))


def corrupt_payload_refused(server, protocol: str) -> str:
    """A request whose tensor bytes do not match its declared shape, below tritonclient's checks."""
    declared = [1, SIZE, SIZE, 3]
    payload = b"\x00" * 100
    if protocol == "grpc":
        import grpc

        channel = grpc.insecure_channel(url(server, "grpc"))
        request = service_pb2.ModelInferRequest(model_name="cleandift", raw_input_contents=[payload], inputs=[
            service_pb2.ModelInferRequest.InferInputTensor(name="images", datatype="UINT8", shape=declared)])
        with pytest.raises(grpc.RpcError) as caught:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
        channel.close()
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        return caught.value.details()
    header = json.dumps({"inputs": [{"name": "images", "shape": declared, "datatype": "UINT8",
                                     "parameters": {"binary_data_size": SIZE * SIZE * 3}}]}).encode()
    request = urllib.request.Request(f"http://{url(server, 'http')}/v2/models/cleandift/infer", data=header + payload,
                                     headers={"Inference-Header-Content-Length": str(len(header)),
                                              "Content-Type": "application/octet-stream"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=30)
    assert caught.value.code == 400
    return json.loads(caught.value.read())["error"]


def test_engine_failure_reaches_its_caller_only(server, images, subset_engine):
    client = Client(url(server, "grpc"))
    magenta = np.full((SIZE, SIZE, 3), (255, 0, 255), np.uint8)  # serve_driver.py's engine fails on it
    with pytest.raises(ServerError, match="engine failed: device lost"):
        client.extract([magenta])
    with pytest.raises(ServerError, match="engine failed: device lost"):
        client.match([magenta], images[:1])
    np.testing.assert_array_equal(client.extract(images[:2])["us6"], subset_engine.extract(images[:2])["us6"])
    assert server.proc.poll() is None


def test_sigterm_leaves_nothing_behind(server):
    pid, children = pid_of(server), server.descendants()
    assert children, "Triton and its Python-backend stubs run under the server"
    ours = {name for name in shm_files() - server.shm_before if name.startswith(f"pytrtion{pid}-")}
    assert ours, "the server's Python backend keeps its shared memory in /dev/shm"
    server.stop(signal.SIGTERM, timeout=10)  # the server and every process under it gone within 10 s, or it fails
    assert server.proc.returncode == 0 and "serve: stopped" in server.text()
    assert all(port_free(port) for port in server.ports.values())
    left = shm_files() - server.shm_before
    assert not [n for n in left if n.startswith(f"pytrtion{pid}-") or n.startswith("psm_")], left
    assert not workspaces() - server.workspaces_before
