"""The floor of a Python HTTP server for one sentence, which ``bench_serve.py`` measures as the system
``student/floor/<precision>``: uvicorn (uvloop and httptools) and a bare ASGI
callable that parses the JSON body, tokenizes with the model directory's tokenizer, calls the engine
and answers the label and exit layer. No validation, errors, metrics, scheduler or batching: the
concurrency-1 latency of ``costeff serve`` less this one is what its request path costs.

  python benchmarks/serve_floor.py --model runs/demo/student/model --precision int8 --port 8081
"""
from __future__ import annotations

import argparse
import json


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--precision", default="int8", choices=("fp32", "bf16", "int8"))
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

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

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        if scope["path"] == "/predict":
            body = (await receive())["body"]
            ids, _ = tokenizer.encode([json.loads(body)["inputs"]])
            logits, layer, _ = engine.run(pad_rows(ids, None, always_mask=False)[0], threshold=threshold)
            row = logits[0].tolist()
            out = json.dumps({"label": labels[row.index(max(row))], "exit_layer": int(layer[0])}).encode()
        else:  # /ready
            out = b'{"status": "ready"}'
        await send({"type": "http.response.start", "status": 200, "headers": head + [(b"content-length", str(len(out)).encode())]})
        await send({"type": "http.response.body", "body": out})

    engine.run(pad_rows([[tokenizer.pad_token_id]], None, always_mask=False)[0])  # warm
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False, lifespan="off", proxy_headers=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
