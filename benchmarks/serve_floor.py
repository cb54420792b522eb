"""The floor of a Python HTTP server for one sentence, which ``bench_serve.py`` measures as the system
``student/floor/<precision>``: uvicorn (httptools, asyncio's loop as ``costeff serve`` runs by default)
and a bare ASGI callable that parses the JSON body, tokenizes with the model directory's tokenizer, calls
the engine and answers the label and exit layer. No validation, errors, metrics, scheduler or batching:
the concurrency-1 latency of ``costeff serve`` less this one is what its request path costs.

``--stage`` stops earlier, for ``bench_serve_latency.py``'s ladder of where a served sentence's time goes:
``socket`` a plain blocking socket answering every request with a fixed response (loopback and the
wake-ups of both ends), ``asgi`` uvicorn and an ASGI callable answering the same, ``tokenize`` + the JSON
body parsed and tokenized, ``engine`` (the default) + the engine: the floor.

  python benchmarks/serve_floor.py --model runs/demo/student/model --precision int8 --port 8081
"""
from __future__ import annotations

import argparse
import json
import socket

STAGES = ("socket", "asgi", "tokenize", "engine")
FIXED = b'{"label": "fixed", "exit_layer": 0}'


def serve_socket(port: int) -> None:
    """One connection at a time, keep-alive, any request answered with FIXED (a 200 with content-length)."""
    response = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(FIXED)) + FIXED
    listener = socket.create_server(("127.0.0.1", port))
    while True:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = b""
        with conn:
            while chunk := conn.recv(65536):
                buf += chunk
                while (end := buf.find(b"\r\n\r\n")) >= 0:
                    length = 0
                    for line in buf[:end].split(b"\r\n")[1:]:
                        name, _, value = line.partition(b":")
                        if name.strip().lower() == b"content-length":
                            length = int(value)
                    if len(buf) < end + 4 + length:
                        break
                    buf = buf[end + 4 + length:]
                    conn.sendall(response)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--precision", default="int8", choices=("fp32", "bf16", "int8"))
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--stage", default="engine", choices=STAGES, help="how much of the work a request gets (see above)")
    args = ap.parse_args(argv)
    if args.stage == "socket":
        serve_socket(args.port)
        return 0

    import torch
    import uvicorn

    from costeff.inference import InferenceEngine
    from costeff.inference.model_dir import DirTokenizer, pad_rows, read_engine_config

    torch.set_num_threads(args.threads)
    config = read_engine_config(args.model)
    engine = InferenceEngine.from_pretrained(args.model, args.precision)
    tokenizer = DirTokenizer(args.model)
    threshold, labels = float(config.inference_threshold or 0.0), config.labels
    head = [(b"content-type", b"application/json")]
    stage = STAGES.index(args.stage)

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        out = FIXED
        if scope["path"] == "/predict" and stage >= STAGES.index("tokenize"):
            body = (await receive())["body"]
            ids, _ = tokenizer.encode([json.loads(body)["inputs"]])
            if stage >= STAGES.index("engine"):
                logits, layer, _ = engine.run(pad_rows(ids, None, always_mask=False)[0], threshold=threshold)
                row = logits[0].tolist()
                out = json.dumps({"label": labels[row.index(max(row))], "exit_layer": int(layer[0])}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": head + [(b"content-length", str(len(out)).encode())]})
        await send({"type": "http.response.body", "body": out})

    engine.run(pad_rows([[tokenizer.pad_token_id]], None, always_mask=False)[0])  # warm
    uvicorn.run(app, host="127.0.0.1", port=args.port, loop="asyncio", http="httptools", log_level="warning", access_log=False,
                lifespan="off", proxy_headers=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
