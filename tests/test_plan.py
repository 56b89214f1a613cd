"""`python -m bench.plan` and bench/core/plan.py: what a method will cost, from the model's config alone on the meta
device, held to what runs measure. Exact: trainable / total parameters, checkpoint bytes (against a real save),
weights, gradient and optimizer bytes (against a real build and one training step), for every shipped method on
tiny random-init models; the published trainable counts of well-known models (configs built from their published
dimensions); the 7B plan's time and memory; bad input in one line. The activation estimate against real MiniLM and
SmolLM2 runs is the slow calibration test at the end."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from bench.core import measure, methods, pipeline
from bench.core import plan as P
from bench.orchestration.validate import validate
from bench.errors import BenchError
from tests.conftest import METHODS, ROOT, compose


def _setting(cfg, parts) -> P.Setting:
    return P.Setting(batch_size=4, seq_len=12, num_labels=parts.data.num_labels or 2,
                     pad_token_id=parts.tokenizer.pad_token_id)


def _measured(cfg, tmp_path) -> tuple[dict, object]:
    """A real build of the job, its save, and one AdamW step: the figures a run logs."""
    parts = pipeline.build(cfg, torch.device("cpu"))
    model = parts.model
    trainable, total = methods.count_parameters(model)
    out = {"trainable": trainable, "total": total, "weights_bytes": measure.weights_bytes(model),
           "grad_bytes": measure.grad_bytes(model)}
    parts.quant_state = _quant_state_bytes(model)   # as loaded (bitsandbytes moves int8 scales at the first forward)
    rows = [parts.train[i] for i in range(4)]
    batch = parts.collate(rows, torch.device("cpu")) if parts.collate else \
        pipeline.train._pad(parts.tokenizer, rows, torch.device("cpu"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    model.train()
    model(**batch).loss.backward()
    opt.step()
    out["optimizer_bytes"] = measure.optimizer_bytes(opt)
    out["ckpt_bytes"] = methods.save(model, cfg.method, tmp_path / "ckpt")
    return out, parts


def _planned(cfg, parts) -> dict:
    plan = P.estimate(cfg, _setting(cfg, parts))
    return {k: getattr(plan, k) for k in ("trainable", "total", "weights_bytes", "grad_bytes", "optimizer_bytes",
                                          "ckpt_bytes")}


@pytest.fixture
def bert_job(tiny_bert_dir, toy_csv, tmp_path):
    def job(*overrides):
        return compose("model=hf", f"model.name_or_path={tiny_bert_dir}", "task=local", f"task.path={toy_csv}",
                       "device=cpu", "train.max_steps=4", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", *overrides)
    return job


@pytest.mark.parametrize("method", METHODS)
def test_plan_equals_a_real_build_and_save_tiny_bert(method, bert_job, tmp_path):
    cfg = bert_job(f"method={method}")
    validate(cfg)
    measured, parts = _measured(cfg, tmp_path)
    assert _planned(cfg, parts) == measured


@pytest.fixture
def llama_job(tiny_llama_dir, toy_csv, tmp_path):
    def job(*overrides, generation=False):
        task = (["task=trec_instruct", "task.max_train_samples=16", "task.max_eval_samples=8",
                 "task.max_test_samples=8"] if generation else ["task=local", f"task.path={toy_csv}"])
        return compose("model=hf", f"model.name_or_path={tiny_llama_dir}", *task, "device=cpu", "train.max_steps=4",
                       f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", *overrides)
    return job


def _valid(cfg) -> bool:
    try:
        validate(cfg)
        return True
    except BenchError:
        return False


@pytest.mark.parametrize("method", METHODS)
def test_plan_equals_a_real_build_and_save_tiny_llama_classifier(method, llama_job, tmp_path):
    cfg = llama_job(f"method={method}")
    if not _valid(cfg):
        pytest.skip("validation refuses it on this tiny model (a knob that does not fit hidden size 32, or no biases)")
    measured, parts = _measured(cfg, tmp_path)
    assert _planned(cfg, parts) == measured


@pytest.mark.parametrize("method", ["full", "lora", "ia3", "adapter", "prefix", "prompt", "ptuning", "vera",
                                    "ln_tuning", "freeze"])
def test_plan_equals_a_real_build_and_save_tiny_llama_lm(method, llama_job, tmp_path):
    cfg = llama_job(f"method={method}", generation=True)
    validate(cfg)
    measured, parts = _measured(cfg, tmp_path)
    assert _planned(cfg, parts) == measured


def _quant_state_bytes(model) -> int:
    """bitsandbytes' quantization constants of a loaded model, each tensor once."""
    seen, total = set(), 0
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        tensors = [getattr(p, "SCB", None)]
        if state is not None:
            tensors += [state.absmax, state.code, getattr(state, "offset", None)]
            if state.nested:
                tensors += [state.state2.absmax, state.state2.code]
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


@pytest.mark.parametrize("quant", ["nf4", "nf4-single", "int8"])
@pytest.mark.parametrize("family", ["llama", "bert", "llama-lm"])
def test_quantized_weights_and_constants_are_exact(quant, family, llama_job, bert_job, tmp_path):
    """QLoRA: the quantized layers at their storage size (mem/weights_bytes) and bitsandbytes' constants (absmax,
    with and without double quantization; int8 row scales) equal a real quantized load's."""
    over = [f"quant={quant.split('-')[0]}", "method=lora"] + (
        ["quant.bnb_4bit_use_double_quant=false"] if quant == "nf4-single" else [])
    cfg = bert_job(*over) if family == "bert" else llama_job(*over, generation=family == "llama-lm")
    validate(cfg)
    measured, parts = _measured(cfg, tmp_path)
    plan = P.estimate(cfg, _setting(cfg, parts))
    assert _planned(cfg, parts) == measured
    assert plan.quant_state_bytes == parts.quant_state


def _real_step_activation(cfg, parts, batch) -> int:
    """The peak of a real CPU training step's own tensors (gradients excluded), recorded through the dispatcher as
    the plan records its meta-device step: the real counterpart of activation_bytes."""
    model = parts.model
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, foreach=False)
    recorder = P.Allocations("cpu", external=[*model.parameters(), *model.buffers(), *batch.values()])
    model.train()
    with recorder.mode:
        loss = model(**batch).loss
        loss.backward()
        del loss
        end = len(recorder.events)
        opt.step()
    return P.Trace(recorder.events, end, 0, 0, set()).activation_peak_bytes


@pytest.mark.parametrize("family, method", [("bert", "lora"), ("bert", "full"), ("bert", "prompt"),
                                            ("bert", "prefix"), ("bert", "ia3"), ("llama", "lora"),
                                            ("llama", "full"), ("llama", "adapter"), ("llama-lm", "lora"),
                                            ("llama-lm", "prompt")])
def test_activation_bytes_equal_a_real_cpu_steps_live_bytes(family, method, bert_job, llama_job):
    """The meta-device simulation's live activation bytes against the same recorder on real CPU steps (real kernels:
    CPU flash attention, dropout masks): within 3 % or 16 KiB (a real padded batch also holds its attention mask)."""
    cfg = bert_job(f"method={method}") if family == "bert" else llama_job(f"method={method}",
                                                                          generation=family == "llama-lm")
    parts = pipeline.build(cfg, torch.device("cpu"))
    rows = [parts.train[i] for i in range(4)]
    batch = parts.collate(rows, torch.device("cpu")) if parts.collate else \
        pipeline.train._pad(parts.tokenizer, rows, torch.device("cpu"))
    lengths = [len(r["input_ids"]) for r in rows]
    setting = P.Setting(batch_size=4, seq_len=max(lengths), num_labels=parts.data.num_labels or 2,
                        pad_token_id=parts.tokenizer.pad_token_id, padded=len(set(lengths)) > 1)
    planned = P.estimate(cfg, setting).activation_bytes
    real = _real_step_activation(cfg, parts, batch)
    assert planned == pytest.approx(real, rel=0.03, abs=16 * 1024), (planned, real)


# --- published figures: configs built from published dimensions (nothing downloaded) -------------------------

def _config_dir(tmp_path, name, config) -> str:
    d = tmp_path / name
    config.save_pretrained(d)
    return str(d)


def _published(tmp_path, name, config, *overrides, task="trec_instruct"):
    """The plan's counts (no simulated step) for a config built from a model's published dimensions."""
    cfg = compose("model=hf", f"model.name_or_path={_config_dir(tmp_path, name, config)}", f"task={task}",
                  f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", *overrides)
    validate(cfg, tracking=False, data=False)
    return P.estimate(cfg, P.Setting(batch_size=1, seq_len=16, num_labels=2), activations=False)


def _head(hidden: int, labels: int = 2) -> int:
    """RoBERTa's classification head: dense hidden x hidden + out_proj hidden x labels, with biases."""
    return hidden * hidden + hidden + hidden * labels + labels


def test_published_lora_counts_roberta_deberta(tmp_path):
    """microsoft/LoRA examples/NLU/README.md: RoBERTa base LoRA 0.3 M, RoBERTa large 0.8 M, DeBERTa XXL 4.7 M
    trainable parameters (r = 8, 8 and 16 on the query and value projections). The paper counts the LoRA matrices
    only; peft (and so the harness) also trains the new classification head (modules_to_save)."""
    from transformers import DebertaV2Config, RobertaConfig
    base = dict(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1)
    for name, hidden, layers, heads, published in (("roberta-base", 768, 12, 12, 294_912),
                                                    ("roberta-large", 1024, 24, 16, 786_432)):
        config = RobertaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                               intermediate_size=4 * hidden, **base)
        plan = _published(tmp_path, name, config, "method=lora", task="rotten_tomatoes")
        assert plan.trainable - _head(hidden) == published, name   # 0.3 M and 0.8 M as printed, rounded
    deberta = DebertaV2Config(vocab_size=128100, hidden_size=1536, num_hidden_layers=48, num_attention_heads=24,
                              intermediate_size=6144, max_position_embeddings=512, relative_attention=True,
                              position_buckets=256, norm_rel_ebd="layer_norm", share_att_key=True,
                              pos_att_type=["p2c", "c2p"], max_relative_positions=-1, position_biased_input=False,
                              pooler_hidden_size=1536)
    plan = _published(tmp_path, "deberta-v2-xxlarge", deberta, "method=lora", "method.r=16", task="rotten_tomatoes")
    pooler_and_classifier = 1536 * 1536 + 1536 + 1536 * 2 + 2
    assert plan.trainable - pooler_and_classifier == 4_718_592   # 4.7 M


def test_published_lora_counts_gpt2_disagree_and_why(tmp_path):
    """microsoft/LoRA README: GPT-2 M (LoRA) 0.35M, GPT-2 L (LoRA) 0.77M; its examples/NLG/README.md trains
    --lora_dim 4 on the fused c_attn's query and value (loralib MergedLinear). That configuration has 393,216 and
    737,280 parameters (0.39 M, 0.74 M): the published LoRA rows repeat the prefix-tuning rows' budgets above them
    (0.35M, 0.77M). peft's LoRA on the whole c_attn at r=4 (A: 4 x d, B: 3d x 4) happens to have the same count as
    MergedLinear's q, v (A: 8 x d, B: 2d x 4)."""
    from transformers import GPT2Config
    for name, d, layers, heads, computed in (("gpt2-medium", 1024, 24, 16, 393_216),
                                              ("gpt2-large", 1280, 36, 20, 737_280)):
        config = GPT2Config(n_embd=d, n_layer=layers, n_head=heads, vocab_size=50257, n_positions=1024)
        plan = _published(tmp_path, name, config, "method=lora", "method.r=4")
        assert plan.trainable == computed == layers * 2 * 2 * d * 4, name


def test_published_lora_counts_mt0_large_and_llama2_7b(tmp_path):
    """peft's README (print_trainable_parameters of bigscience/mt0-large, LoRA r=8): trainable params: 2359296 ||
    all params: 1231940608. Trainable exact (q and v of encoder self-attention, decoder self- and cross-attention);
    the total here is 256,114,688 (250,112 x 1,024: the LM head) lower: transformers 5's MT5Config forces
    tie_word_embeddings=True, so the LM head is the shared embedding, which the README's transformers 4 counted
    twice as an untied copy.
    Llama-2-7B, r=8 on q_proj and v_proj: trainable 4,194,304 of 6,742,609,920, as peft prints it in countless
    tutorials (some print it under r=16, which has 8,388,608)."""
    from transformers import LlamaConfig, MT5Config
    mt0 = MT5Config(vocab_size=250112, d_model=1024, d_kv=64, d_ff=2816, num_layers=24, num_decoder_layers=24,
                    num_heads=16, feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0)
    plan = _published(tmp_path, "mt0-large", mt0, "method=lora")
    assert (plan.trainable, plan.total + 250_112 * 1_024) == (2_359_296, 1_231_940_608)
    llama = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False)
    plan = _published(tmp_path, "llama-2-7b", llama, "method=lora")
    assert (plan.trainable, plan.total) == (4_194_304, 6_742_609_920)
    assert _published(tmp_path, "llama-2-7b-r16", llama, "method=lora", "method.r=16").trainable == 8_388_608


def test_published_prompt_tuning_t5_xxl_encoder_side(tmp_path):
    """Lester et al. (2021), Figure 2: a 5-token prompt on T5-XXL is 20,480 parameters per task (5 x d_model 4096),
    prepended to the encoder's input. peft's prompt tuning on an encoder-decoder feeds its own prompt to the
    decoder too (num_transformer_submodules=2): 40,960; with method.num_transformer_submodules=1 the paper's
    20,480; 100 tokens on the encoder: 409,600."""
    from transformers import T5Config
    xxl = T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_decoder_layers=24,
                   num_heads=64, feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0)
    both = _published(tmp_path, "t5-xxl", xxl, "method=prompt", "method.num_virtual_tokens=5")
    encoder = _published(tmp_path, "t5-xxl-enc", xxl, "method=prompt", "method.num_virtual_tokens=5",
                         "+method.num_transformer_submodules=1")
    long = _published(tmp_path, "t5-xxl-100", xxl, "method=prompt", "method.num_virtual_tokens=100",
                      "+method.num_transformer_submodules=1")
    assert (both.trainable, encoder.trainable, long.trainable) == (40_960, 20_480, 409_600)


def test_a_7b_plan_is_fast_and_small(tmp_path):
    """A Llama-2-7B-sized config: every figure of the plan, the simulated training step included, in seconds and a
    few hundred MB at most (nothing of the 6.7 B parameters is allocated)."""
    import resource
    import time
    import tracemalloc
    from transformers import LlamaConfig
    llama = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False)
    cfg = compose("model=hf", f"model.name_or_path={_config_dir(tmp_path, 'llama-7b', llama)}", "task=trec_instruct",
                  f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "method=lora")
    setting = P.Setting(batch_size=1, seq_len=256)
    P.estimate(cfg, setting, activations=False)   # imports and the cached meta model out of the measurement
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    started = time.perf_counter()
    plan = P.estimate(cfg, setting)
    seconds = time.perf_counter() - started
    _, python_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss_growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024
    print(f"7B plan: {seconds:.1f} s, Python allocations peak {python_peak / 2**20:.0f} MiB, "
          f"peak RSS growth {rss_growth / 2**20:.0f} MiB, activations {plan.activation_bytes / 2**30:.2f} GiB")
    assert plan.trainable == 4_194_304 and plan.weights_bytes > 25 * 2**30
    assert seconds < 30 and python_peak < 300 * 2**20 and rss_growth < 300 * 2**20


# --- the command line -----------------------------------------------------------------------------------------

def _plan_cli(*args, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.plan", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


@pytest.mark.slow  # a whole command or several runs: kept out of the fast subset
def test_cli_plans_several_methods_with_a_budget_as_json_and_markdown(tiny_bert_dir, toy_csv, tmp_path):
    out = tmp_path / "plan.json"
    common = ["model=hf", f"model.name_or_path={tiny_bert_dir}", "task=local", f"task.path={toy_csv}"]
    r = _plan_cli(*common, "method=full,lora,prompt", "-m", "--budget", "40MiB", "--out", str(out),
                  "--format", "markdown")
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("| ")]
    assert lines[0].startswith("| method | model | quant |") and "fits 40.0 MiB" in lines[0] and len(lines) == 4
    data = json.loads(out.read_text())
    plans = {p["method"]: p for p in data["plans"]}
    assert set(plans) == {"full", "lora", "prompt"} and data["budget_bytes"] == 40 * 2**20
    assert plans["lora"]["trainable"] < plans["full"]["trainable"] == plans["full"]["total"]
    assert all(p["fits_budget"] == (p["train_bytes"] <= 40 * 2**20) for p in plans.values())
    assert plans["lora"]["setting"]["num_labels"] == 3   # the toy data's classes, read from the file
    j = _plan_cli(*common, "method=lora", "--format", "json", "--device", "cuda", "--dtype", "bfloat16")
    assert j.returncode == 0, j.stderr
    bf16 = json.loads(j.stdout)["plans"][0]
    assert bf16["weights_bytes"] < plans["lora"]["weights_bytes"] and bf16["setting"]["device"] == "cuda"


@pytest.mark.parametrize("args, expected", [
    (["model=bert"], r"^error: model: unknown choice 'bert'; valid: hf, minilm, smollm2$"),
    (["model=hf", "model.name_or_path=/nonexistent/folder"],
     r"^error: model.name_or_path: model folder not found: /nonexistent/folder$"),
    (["model=hf", "model.name_or_path={empty}"], r"^error: model.name_or_path: no config.json in .*"),
    (["method=prefix", "model=hf", "model.name_or_path={distilbert}"],
     r"^error: method=prefix: prefix tuning needs a model that accepts past_key_values"),
    (["method=loraa"], r"^error: method: unknown choice 'loraa'; valid: .*"),
    (["--budget", "lots"], r"^error: --budget: 'lots' is not a size; valid: .*"),
    (["--format", "yaml"], r"^error: argument --format: invalid choice: 'yaml'.*"),
], ids=["unknown model", "missing folder", "missing config.json", "unsupported method/model", "unknown method",
        "bad budget", "bad format"])
def test_cli_bad_input_is_one_line_exit_2(args, expected, tmp_path, capsys):
    """The first case through a fresh `python -m bench.plan` (its imports may print nothing either), the others
    through bench.plan.main in this process (the same code after the imports; 3 to 5 s less each)."""
    import re
    from transformers import DistilBertConfig
    from bench import plan
    empty = tmp_path / "empty"
    empty.mkdir()
    distilbert = _config_dir(tmp_path, "distilbert", DistilBertConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=64))
    argv = [a.format(empty=empty, distilbert=distilbert) for a in args]
    if args == ["model=bert"]:
        r = _plan_cli(*argv)
        code, stdout, stderr = r.returncode, r.stdout, r.stderr
    else:
        try:
            code = plan.main(argv)
        except SystemExit as e:   # argparse's own errors
            code = e.code
        stdout, stderr = capsys.readouterr()
    assert code == 2, (stdout, stderr)
    lines = [ln for ln in stderr.splitlines() if ln.strip() and "kernels" not in ln]
    assert len(lines) == 1 and re.search(expected, lines[0]), stderr


# --- the activation estimate against real runs (slow) ----------------------------------------------------------

TOLERANCE = 0.50   # |estimate / measured - 1| of the CPU activation estimate; measured worst +40 % (README *Planning*)
CALIBRATION = {"minilm": (8, 16), "smollm2": (4, 8)}   # model: two batch sizes
CALIBRATED_METHODS = ("lora", "prompt", "ia3", "full")


def _calibration_files(folder) -> dict:
    """Training files of `b` rows whose longest row is cut at train.max_length (128 tokens) and one row is short, so
    every step trains the same padded b x 128 batch; a small validation and test file."""
    import random
    rng = random.Random(0)
    words = "the a of and to in is it that was for on with as movie film story good bad plot actor scene".split()
    files = {}
    for b in sorted({b for bs in CALIBRATION.values() for b in bs}):
        rows = ["text,label"] + [f"{' '.join(rng.choice(words) for _ in range(6 if i == 0 else 400))},"
                                 f"{'pos' if i % 2 else 'neg'}" for i in range(b)]
        files[b] = folder / f"train{b}.csv"
        files[b].write_text("\n".join(rows) + "\n")
    small = folder / "small.csv"
    small.write_text("text,label\n" + "".join(f"{rng.choice(words)} {rng.choice(words)},{'pos' if i % 2 else 'neg'}\n"
                                              for i in range(4)))
    files["small"] = small
    return files


def calibrate(folder, methods, models=CALIBRATION, skip=()) -> dict:
    """Run each model at its two batch sizes under `methods` (`python -m bench -m`: a fresh worker per job, the
    defaults but 3 steps, no forgetting or latency figures); check the plan's exact figures against the run's and
    return {(model, batch, method): (estimate, measured)} of what training adds beyond gradients and optimizer state:
    plan/activation_bytes + plan/overhead_bytes against mem/train_growth_bytes - mem/grad_bytes - mem/optimizer_bytes.
    Also used by tests/perf/plan_calibration.py (every calibrated method; the README's table)."""
    from mlflow.tracking import MlflowClient
    files = _calibration_files(folder)
    store = f"sqlite:///{folder}/mlflow.db"
    for model, sizes in models.items():
        for b in sizes:
            chosen = [m for m in methods if (model, m) not in skip]
            r = subprocess.run(
                [sys.executable, "-m", "bench", f"model={model}", "task=local", f"task.path={files[b]}",
                 f"task.validation_path={files['small']}", f"task.test_path={files['small']}", f"train.batch_size={b}",
                 "train.max_steps=3", "train.eval_every=null", "forgetting=false", "deploy.latency=false",
                 "deploy.merged_test=false", f"tracking.uri={store}", "tracking.experiment=calibration",
                 f"method={','.join(chosen)}", "-m"], capture_output=True, text=True, cwd=folder)
            assert r.returncode == 0, r.stderr[-2000:]
    client = MlflowClient(tracking_uri=store)
    runs = client.search_runs([client.get_experiment_by_name("calibration").experiment_id])
    errors = {}
    for run in runs:
        m, p = run.data.metrics, run.data.params
        for plan, measured in (("plan/trainable", "params/trainable"), ("plan/ckpt_bytes", "ckpt/bytes"),
                               ("plan/weights_bytes", "mem/weights_bytes"), ("plan/grad_bytes", "mem/grad_bytes"),
                               ("plan/optimizer_bytes", "mem/optimizer_bytes")):
            assert m[plan] == m[measured], (run.info.run_name, plan)
        measured = m["mem/train_growth_bytes"] - m["mem/grad_bytes"] - m["mem/optimizer_bytes"]
        estimate = m["plan/activation_bytes"] + m["plan/overhead_bytes"]
        errors[(p["model.name"], int(p["train.batch_size"]), p["method.name"])] = (estimate, measured)
    for key, (est, meas) in sorted(errors.items()):
        print(f"{key[0]:8} b{key[1]:<3} {key[2]:7} estimate {est / 2**20:7.0f} MiB  measured {meas / 2**20:7.0f} MiB  "
              f"error {100 * (est / meas - 1):+4.0f} %")
    assert len(errors) == sum(len(sizes) * len([m for m in methods if (model, m) not in skip])
                              for model, sizes in models.items())
    return errors


@pytest.mark.slow  # 5 real runs (MiniLM: lora and full at batch 8 and 16; SmolLM2: lora at batch 8) on 2 CPU cores
def test_activation_estimate_against_real_cpu_runs(tmp_path):
    """The plan's CPU activation estimate within TOLERANCE of what real runs measure, and its exact figures equal,
    for LoRA and full fine-tuning on MiniLM at two batch sizes and LoRA on SmolLM2 at one (SmolLM2's batch 4 and its
    full runs, the worst case at +27 to +40 %, are left to tests/perf/plan_calibration.py, which runs all 16)."""
    errors = calibrate(tmp_path, ("lora", "full"), models={"minilm": CALIBRATION["minilm"], "smollm2": (8,)},
                       skip={("smollm2", "full")})
    worst = max(abs(est / meas - 1) for est, meas in errors.values())
    assert worst <= TOLERANCE, worst
