"""Generative tasks (bench/core/generation.py, bench/core/forgetting.py) on tiny random-init LMs built from configs
(conftest: tiny_llama_dir, tiny_t5_dir; nothing downloaded): response-only labels, label_match scoring of forced
outputs, forgetting's "before", left-padded batched generation, seq2seq training and reloading; and one slow run
of the real SmolLM2 on trec_instruct."""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from bench.core import forgetting, generation, methods, models, pipeline
from bench.core import metrics as M
from tests.conftest import compose

CPU = torch.device("cpu")
WORDS = ["location", "human", "number"]     # the answers of the toy instruction data (train's distinct outputs)


@pytest.fixture(scope="session")
def instruct_files(tmp_path_factory):
    """A toy instruction data set as jsonl files: train / validation outputs cycle through WORDS; every test output
    is "location". Inputs of 1 to 4 repeats, so prompts differ in length."""
    d = tmp_path_factory.mktemp("instruct")

    def rows(n, start, words):
        return [{"instruction": "Name the kind of the answer.",
                 "input": " ".join([f"question {start + i}"] * (1 + i % 4)), "output": words[i % len(words)]}
                for i in range(n)]

    files = {}
    for split, data in {"train": rows(12, 0, WORDS), "validation": rows(3, 100, WORDS),
                        "test": rows(6, 200, ["location"])}.items():
        files[split] = d / f"{split}.jsonl"
        files[split].write_text("\n".join(json.dumps(r) for r in data) + "\n")
    return files


def gen_overrides(model_dir, files, tmp_path, *more: str) -> list[str]:
    """A fast in-process generative run: a tiny model folder on the toy instruction files, store in tmp_path."""
    return ["model=hf", f"model.name_or_path={model_dir}", "task=local", "task.kind=generation",
            f"task.path={files['train']}", f"task.validation_path={files['validation']}",
            f"task.test_path={files['test']}", "task.max_new_tokens=4", "train.max_steps=2", "train.eval_every=2",
            "train.log_every=1", "train.batch_size=4", "train.eval_batch_size=8", "train.isolate=false",
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "device=cpu", *more]


@pytest.fixture
def llama_cfg(tiny_llama_dir, instruct_files, tmp_path):
    def make(*more: str):
        return compose(*gen_overrides(tiny_llama_dir, instruct_files, tmp_path, *more))
    return make


# --- 1. response-only loss ------------------------------------------------------------------------------------

@pytest.mark.parametrize("template", generation.TEMPLATES)
def test_tiny_random_llama_prompt_tokens_carry_no_loss(llama_cfg, template):
    """Every label on a prompt position is -100; the response positions hold the response's ids + EOS (and the
    inputs hold the same ids there); validation and test keep the prompt generation starts from."""
    parts = pipeline.build(llama_cfg("method=full", f"task.template={template}"), CPU)
    tok = parts.tokenizer
    assert parts.family == "decoder" and tok.eos_token == tok.pad_token == "<|im_end|>"
    marker = {"alpaca": "### Response:\n", "chat": "<|im_start|>assistant\n", "plain": "\n"}[template]
    for encoded, raw in ((parts.train, parts.data.train), (parts.validation, parts.data.validation),
                         (parts.test, parts.data.test)):
        assert len(encoded) == len(raw) > 0
        for row, ex in zip(encoded, raw):
            text = generation.prompt_text(tok, template, ex["instruction"], ex["input"])
            assert text.endswith(marker) and ex["input"] in text and ex["output"] not in text
            prompt = tok(text, add_special_tokens=template != "chat")["input_ids"]
            response = tok(ex["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            n = len(prompt)
            assert row["input_ids"] == prompt + response
            assert row["labels"] == [-100] * n + response
            assert row["attention_mask"] == [1] * (n + len(response))
            if "prompt_ids" in row:
                assert row["prompt_ids"] == prompt and row["reference"] == ex["output"]


def test_tiny_random_llama_collate_pads_labels_and_the_loss_counts_response_tokens_only(llama_cfg):
    """collate pads on the right (pad id, mask 0, label -100); the model's loss on such a batch is the mean
    cross-entropy over the response tokens computed by hand from the logits, not over every token; response_loss
    gives the same figure."""
    parts = pipeline.build(llama_cfg("method=full"), CPU)
    tok, model = parts.tokenizer, parts.model
    rows = parts.train.to_list()[:4]
    lengths = [len(r["input_ids"]) for r in rows]
    assert len(set(lengths)) > 1, "the batch must mix lengths for padding to happen"
    batch = generation.collate(tok)(rows, CPU)
    width = max(lengths)
    assert batch["input_ids"].shape == batch["labels"].shape == (4, width)
    for i, (r, n) in enumerate(zip(rows, lengths)):
        assert batch["input_ids"][i, :n].tolist() == r["input_ids"]
        assert batch["labels"][i, :n].tolist() == r["labels"]
        assert (batch["input_ids"][i, n:] == tok.pad_token_id).all()
        assert (batch["labels"][i, n:] == -100).all() and (batch["attention_mask"][i, n:] == 0).all()
        assert batch["attention_mask"][i, :n].all()
    assert tok.padding_side == "right"   # collate restores it

    model.eval()
    with torch.no_grad():
        out = model(**batch)
    logits, targets = out.logits[:, :-1].float(), batch["labels"][:, 1:]
    mask = targets != -100
    assert int(mask.sum()) == sum(len(tok(r["output"], add_special_tokens=False)["input_ids"]) + 1
                                  for r in parts.data.train.to_list()[:4])
    by_hand = torch.nn.functional.cross_entropy(logits[mask], targets[mask])
    assert out.loss.item() == pytest.approx(by_hand.item(), rel=1e-6)
    # every real token (prompt included) would give another figure: the mask is what the test checks
    real = batch["attention_mask"][:, 1:].bool()
    everything = torch.nn.functional.cross_entropy(logits[real], batch["input_ids"][:, 1:][real])
    assert abs(everything.item() - by_hand.item()) > 1e-3
    # the loss changes with a response token's label, not with what sits in the padding
    flipped = {**batch, "labels": batch["labels"].clone()}
    first = mask.float().argmax(1) + 1   # each row's first response label
    rows_ = torch.arange(4)
    flipped["labels"][rows_, first] = (flipped["labels"][rows_, first] + 1) % len(tok)
    padded = {**batch, "input_ids": batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 42)}
    with torch.no_grad():
        assert abs(model(**flipped).loss.item() - out.loss.item()) > 1e-4
        assert model(**padded).loss.item() == out.loss.item()
    # response_loss: the same mean over response tokens, whatever the batching
    ds = parts.train.select(range(4))
    for size in (1, 3, 4):
        assert generation.response_loss(model, ds, generation.collate(tok), size, CPU, "decoder") == \
            pytest.approx(by_hand.item(), rel=1e-5)


# --- 2. label_match scoring -----------------------------------------------------------------------------------

def test_normalize_and_score_label_match_on_hand_made_strings():
    assert generation.normalize("Location.\nmore") == "location"
    assert generation.normalize("\n\n  **Human!**  \nnumber") == "human"
    assert generation.normalize("  New   York ") == "new york"
    assert generation.normalize("") == generation.normalize("\n \n") == ""
    assert generation.first_line("\n  a b \nc") == "a b"
    answers = ["location", "human", "number"]
    gens = ["Location.\nmore", "human", "banana", "the location", "", "NUMBER"]
    refs = ["location", "location", "human", "location", "number", "number"]
    scores, frame = generation.score_label_match(gens, refs, answers, "test")
    assert scores == {M.TEST_ACCURACY: pytest.approx(2 / 6), M.TEST_INVALID_RATE: pytest.approx(3 / 6)}
    assert frame["score"].tolist() == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert frame["label"].tolist() == [0, 0, 1, 0, 2, 2]
    assert frame["prediction"].tolist() == [0, 1, -1, -1, -1, 2]
    val, _ = generation.score_label_match(gens[:1], refs[:1], answers, "val")
    assert set(val) == {M.VAL_ACCURACY, M.VAL_INVALID_RATE}


class Force:
    """A forward hook on the causal LM that overwrites its next-token logits during generation so that greedy
    decoding spells `ids`, then EOS, then EOS... Teacher-forced calls (with labels) are left alone. Decoding steps are
    counted in the hook: a call with more than one input position is a new batch's prefill (step 0), each later call
    one step further; with left padding every row of a batch steps together. (Prompt tuning's prefill reaches the LM
    as inputs_embeds.)"""

    def __init__(self, ids: list[int], eos: int):
        self.ids, self.eos, self.step, self.steps_seen = list(ids) + [eos], eos, 0, 0

    def __call__(self, module, args, kwargs, output):
        if kwargs.get("labels") is not None:
            return output
        inputs = kwargs.get("input_ids", args[0] if args else None)
        inputs = kwargs.get("inputs_embeds") if inputs is None else inputs
        self.step = 0 if inputs.shape[1] > 1 else self.step + 1
        self.steps_seen += 1
        token = self.ids[self.step] if self.step < len(self.ids) else self.eos
        forced = torch.full_like(output.logits[:, -1], -1e4)
        forced[:, token] = 1e4
        output.logits[:, -1] = forced
        return output


def _lm(model):
    """The transformers causal LM inside a model, peft-wrapped or not."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@pytest.mark.parametrize("method,forced,accuracy,invalid", [
    ("lora", "location", 1.0, 0.0),     # every reference is "location"
    ("lora", "human", 0.0, 0.0),        # an answer, the wrong one
    ("lora", "banana", 0.0, 1.0),       # none of the answers
    ("prompt", "location", 1.0, 0.0),   # virtual tokens: the generation is still the new tokens only
    ("prefix", "location", 1.0, 0.0)])
def test_tiny_random_llama_forced_to_a_word_scores_by_label_match(llama_cfg, method, forced, accuracy, invalid):
    """The real tiny Llama under a method, through the run's own evaluation (Parts.evaluate: response_loss, batched
    greedy generation with left padding, label_match), its logits forced to spell `forced` then EOS."""
    parts = pipeline.build(llama_cfg(f"method={method}", "train.eval_batch_size=4"), CPU)
    tok = parts.tokenizer
    assert parts.data.label_names == sorted(WORDS) and set(parts.test["reference"]) == {"location"}
    ids = tok(forced, add_special_tokens=False)["input_ids"]
    force = Force(ids, tok.eos_token_id)
    handle = _lm(parts.model).register_forward_hook(force, with_kwargs=True)
    try:
        scores, frame = parts.evaluate(parts.model, parts.test, "test")
    finally:
        handle.remove()
    assert force.steps_seen >= len(ids) + 1
    assert frame["generation"].tolist() == [forced] * len(parts.test)
    assert scores[M.TEST_ACCURACY] == accuracy
    assert scores[M.TEST_INVALID_RATE] == invalid
    assert math.isfinite(scores[M.TEST_LOSS])
    assert frame["index"].tolist() == list(range(len(parts.test)))
    assert (frame["score"] == accuracy).all()


@pytest.mark.slow
def test_tiny_random_llama_on_trec_instruct_forced_to_location_scores_the_class_share(tiny_llama_dir, tmp_path):
    """trec_instruct (TREC-6 posed as an instruction): the answers are its label words, the references the test
    questions' words; a model that always says "location" is right exactly on the LOC questions, never invalid."""
    cfg = compose("model=hf", f"model.name_or_path={tiny_llama_dir}", "task=trec_instruct", "method=lora",
                  "task.max_train_samples=8", "task.max_eval_samples=4", "task.max_test_samples=24",
                  "train.eval_batch_size=24", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "device=cpu")
    parts = pipeline.build(cfg, CPU)
    tok = parts.tokenizer
    assert parts.data.label_names == list(cfg.task.label_words)
    references = parts.test["reference"]
    assert set(references) <= set(cfg.task.label_words) and 0 < references.count("location") < len(references)
    force = Force(tok("location", add_special_tokens=False)["input_ids"], tok.eos_token_id)
    handle = _lm(parts.model).register_forward_hook(force, with_kwargs=True)
    try:
        scores, frame = parts.evaluate(parts.model, parts.test, "test")
    finally:
        handle.remove()
    assert scores[M.TEST_ACCURACY] == references.count("location") / len(references)
    assert scores[M.TEST_INVALID_RATE] == 0.0
    loc = list(cfg.task.label_words).index("location")
    assert (frame["prediction"] == loc).all() and ((frame["label"] == loc) == (frame["score"] == 1.0)).all()


# --- 3. forgetting's "before" ---------------------------------------------------------------------------------

BEFORE_METHODS = ["lora", "prompt", "prefix",   # the fast subset; the whole suite adds the rest
                  *(pytest.param(m, marks=pytest.mark.slow) for m in ("ia3", "ptuning", "adapter", "full", "freeze"))]


@pytest.fixture(scope="module")
def short_sample():
    """The forgetting sample's first batch: the figures below are exact whatever the texts, and the full sample
    costs seconds per pass through a 49k-token LM head on CPU."""
    return forgetting.sample_texts()[:forgetting.BATCH]


@pytest.fixture(scope="module")
def base_lm_loss(tiny_llama_dir, instruct_files, tmp_path_factory, short_sample):
    """The (short) forgetting sample's LM loss under a freshly loaded tiny Llama, nothing added."""
    cfg = compose(*gen_overrides(tiny_llama_dir, instruct_files, tmp_path_factory.mktemp("base")))
    base, tok = models.load(cfg.model, cfg.quant, 0, CPU, "generation")
    return forgetting.lm_loss(base, tok, "decoder", CPU, texts=short_sample)


@pytest.mark.parametrize("method", BEFORE_METHODS)
def test_tiny_random_llama_forgetting_before_is_the_base_models_loss(llama_cfg, base_lm_loss, short_sample,
                                                                       monkeypatch, method):
    """forget/loss_before (build(forgetting=True)) is the base model's loss exactly, for every method: it is taken
    before the method is added, so never through fresh adapters, prompts or prefixes.

    Right after building (nothing trained) LoRA (B = 0), IA3 (scales of 1), full and freeze leave the model's
    function as it was, so the built model's loss is the base's: the labels are shifted alike through peft's wrapper.
    Prompt tuning, p-tuning and prefix tuning do not: the text's tokens attend to freshly initialized virtual tokens
    (prompts) or key/value prefixes, so their built model's loss differs before any step; measured on the built
    model, "before" would be wrong for them (and for the Houlsby adapter, whose up-projection starts random), which
    is why build measures it earlier."""
    monkeypatch.setattr(forgetting, "sample_texts", lambda: short_sample)
    parts = pipeline.build(llama_cfg(f"method={method}"), CPU, forgetting=True)
    assert isinstance(parts.forget_base, float)
    assert parts.forget_base == base_lm_loss
    assert 0 < base_lm_loss < 2 * math.log(len(parts.tokenizer))
    built = forgetting.lm_loss(parts.model, parts.tokenizer, parts.family, CPU)
    assert math.isfinite(built)
    if method in ("lora", "ia3", "full", "freeze"):
        assert built == pytest.approx(base_lm_loss, abs=1e-6)
    else:  # prompt, ptuning, prefix, adapter
        assert abs(built - base_lm_loss) > 1e-6


# --- 4. left padding --------------------------------------------------------------------------------------------

# the fast subset keeps one case of each kind; the rest run in the whole suite (pytest -m "not slow" stays < 5 min)
SLOW = pytest.mark.slow


@pytest.mark.parametrize("method", ["lora", "prompt", pytest.param("prefix", marks=SLOW)])
def test_tiny_random_llama_left_padded_batch_generates_what_one_at_a_time_does(llama_cfg, monkeypatch, method):
    """Greedy generation of prompts of different lengths in one left-padded batch gives, string for string, what
    each prompt alone gives (the tiny random model is deterministic); the batch really was padded, on the left. And
    the check can fail: the same batch padded on the right (continuing after pad tokens) gives other strings.
    Prompt and prefix tuning too: their virtual tokens come before the padding."""
    parts = pipeline.build(llama_cfg(f"method={method}"), CPU)
    tok, model = parts.tokenizer, parts.model
    prompts = list(parts.test["prompt_ids"]) + list(parts.validation["prompt_ids"])
    assert len({len(p) for p in prompts}) >= 3

    def run(batch_size):
        return generation.generate(model, tok, prompts, family="decoder", max_new_tokens=6, batch_size=batch_size,
                                   device=CPU)

    masks = []
    handle = _lm(model).register_forward_pre_hook(
        lambda m, args, kwargs: masks.append(kwargs["attention_mask"].clone()), with_kwargs=True)
    try:
        batched = run(len(prompts))
    finally:
        handle.remove()
    width = max(len(p) for p in prompts)
    virtual, prefill = masks[0][:, :-width], masks[0][:, -width:]   # peft's virtual tokens (prompts, prefixes) first
    assert virtual.shape[1] == (0 if method == "lora" else parts.cfg.method.num_virtual_tokens) and virtual.all()
    assert sorted(prefill.sum(1).tolist()) == sorted(len(p) for p in prompts)
    assert prefill[:, -1].all() and not prefill[:, 0].all()   # padding on the left, every prompt ends together
    single = run(1)
    assert batched == single
    assert all(s.strip() for s in single), "nothing generated: the comparison would be vacuous"
    assert tok.padding_side == "right"   # restored for training

    real = generation.padding_side
    monkeypatch.setattr(generation, "padding_side", lambda t, side: real(t, "right"))
    assert run(len(prompts)) != single


# --- 5. encoder-decoder ---------------------------------------------------------------------------------------

class StubLog:
    def __init__(self):
        self.metrics, self.points = [], []

    def log_metrics(self, metrics, step=0):
        self.metrics.append((step, dict(metrics)))

    def log_points(self, points):
        self.points.extend(points)


@pytest.mark.parametrize("method", ["lora", pytest.param("prompt", marks=SLOW)])
def test_tiny_random_t5_trains_seq2seq_and_reloads(tiny_t5_dir, instruct_files, tmp_path, short_sample, monkeypatch,
                                                   method):
    """The tiny T5 trains a few seq2seq steps under `method` through pipeline.run (forgetting on: the
    encoder-decoder LM loss, on the short sample), and the saved checkpoint, reloaded onto a fresh base, gives the
    test loss, the test generations and the forgetting loss the run reported."""
    monkeypatch.setattr(forgetting, "sample_texts", lambda: short_sample)
    cfg = compose(*gen_overrides(tiny_t5_dir, instruct_files, tmp_path, f"method={method}", "train.max_steps=3",
                                 "train.eval_every=3", "task.max_new_tokens=6"))
    log = StubLog()
    out = pipeline.run(cfg, tmp_path / "run", CPU, log)
    m = out.metrics
    assert m[M.TRAIN_STEPS] == 3 and math.isfinite(m[M.TRAIN_LOSS])
    assert any(M.TRAIN_LOSS in p for _, p in log.points) and any(M.VAL_ACCURACY in p for _, p in log.points)
    predictions = pd.read_parquet(out.predictions)
    assert len(predictions) == 6 and set(predictions["reference"]) == {"location"}

    base, tok = models.load(cfg.model, cfg.quant, 0, CPU, "generation")
    assert models.family(base.config) == "encoder-decoder" and tok.eos_token == "[SEP]"
    before = forgetting.lm_loss(base, tok, "encoder-decoder", CPU)
    assert m[M.FORGET_LOSS_BEFORE] == before
    assert math.isfinite(m[M.FORGET_LOSS_AFTER])
    assert m[M.FORGET_LOSS_DELTA] == pytest.approx(m[M.FORGET_LOSS_AFTER] - before)

    parts = pipeline.build(cfg, CPU)   # the same data, tokenized alike; its model untrained
    untrained, _ = parts.evaluate(parts.model, parts.test, "test")
    reloaded = methods.reload(base, cfg.method, tmp_path / "run" / "ckpt")
    scores, frame = parts.evaluate(reloaded, parts.test, "test")
    assert scores[M.TEST_LOSS] == pytest.approx(m[M.TEST_LOSS], rel=1e-6)
    assert scores[M.TEST_ACCURACY] == m[M.TEST_ACCURACY]
    assert frame["generation"].tolist() == predictions["generation"].tolist()
    assert frame["index"].tolist() == predictions["index"].tolist()
    # training moved the model: the reload is not the untrained model by accident
    assert abs(untrained[M.TEST_LOSS] - scores[M.TEST_LOSS]) > 1e-3
    assert forgetting.lm_loss(reloaded, tok, "encoder-decoder", CPU) == pytest.approx(m[M.FORGET_LOSS_AFTER],
                                                                                      rel=1e-6)
    # encoder-decoder batches pad the encoder's input on the right: batched = one at a time
    prompts = list(parts.test["prompt_ids"]) + list(parts.validation["prompt_ids"])
    assert len({len(p) for p in prompts}) > 1
    batched, single = (generation.generate(reloaded, tok, prompts, family="encoder-decoder", max_new_tokens=6,
                                           batch_size=size, device=CPU) for size in (len(prompts), 1))
    assert batched == single


# --- 6. the real SmolLM2 ----------------------------------------------------------------------------------------

# The default generative job (SmolLM2-135M-Instruct + LoRA on trec_instruct), shortened for the suite: 30 of its 100
# steps of 8, 100 test questions, 16 validation questions, validation only at the end. Measured (seed 0, CPU, 2 idle
# cores, 2026-11-24): test/accuracy 0.56 at 30 steps on 100 questions, in 115 s (earlier: 0.53 at 40 steps and 0.68
# at 60 on 150; the full job's 100 steps and 500 questions: 0.78). The bound is well above the majority class (0.276)
# and keeps headroom for other CPUs' numerics.
SMOLLM2_TREC_MIN_ACCURACY = 0.4   # measured 0.56 (seed 0, 30 steps, test 100, 2 CPU cores); majority class 0.276


@pytest.mark.slow  # real SmolLM2-135M: about 2 minutes on 2 idle CPU cores
def test_smollm2_lora_trec_instruct_beats_the_majority_class(tmp_path):
    cfg = compose("model=smollm2", "task=trec_instruct", "method=lora", "device=cpu", "train.isolate=false",
                  "train.max_steps=30", "task.max_test_samples=100", "task.max_eval_samples=16",
                  "train.eval_every=null", "forgetting=false", "deploy.latency=false", "deploy.merged_test=false",
                  f"tracking.uri=sqlite:///{tmp_path}/mlflow.db")
    out = pipeline.run(cfg, tmp_path / "run", CPU, StubLog())
    m = out.metrics
    print({k: m[k] for k in (M.TEST_ACCURACY, M.TEST_INVALID_RATE, M.TEST_LOSS, M.TIME_TOTAL)})
    assert m[M.TEST_ACCURACY] >= SMOLLM2_TREC_MIN_ACCURACY


# --- 7. data formats, every method, quantized LMs ------------------------------------------------------------------

def test_tiny_random_llama_reads_prompt_completion_pairs_with_the_plain_template(tiny_llama_dir, tmp_path):
    """Prompt/completion pairs (task.instruction_column=prompt, no input column, output_column=completion): the
    prompt text is the model's whole context (plain template), the completion + EOS its only labelled tokens."""
    rows = [{"prompt": f"2 + {i} =", "completion": str(2 + i)} for i in range(8)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = compose("model=hf", f"model.name_or_path={tiny_llama_dir}", "task=local", "task.kind=generation",
                  f"task.path={path}", "task.test_size=2", "task.validation_size=2", "task.instruction_column=prompt",
                  "task.input_column=null", "task.output_column=completion", "task.template=plain",
                  "task.scorer=chrf_bleu", "device=cpu")
    parts = pipeline.build(cfg, CPU)
    tok = parts.tokenizer
    for ds, source in ((parts.test, parts.data.test), (parts.validation, parts.data.validation)):
        for row, example in zip(ds, source):
            assert example["input"] == "" and example["instruction"].endswith("=")
            assert tok.decode(row["prompt_ids"]) == example["instruction"] + "\n"   # plain: the prompt, a newline
            response = [t for t in row["labels"] if t != -100]
            assert tok.decode(response) == example["output"] + tok.eos_token
            assert row["reference"] == example["output"]
    assert parts.select == M.VAL_CHRF


GENERATIVE_METHODS = ["lora", "dora", "ia3", "prompt", "prefix", "ptuning", "adapter", "adapter_pfeiffer",
                      "adapter_parallel", "full", "freeze"]


@pytest.mark.slow
@pytest.mark.parametrize("method", GENERATIVE_METHODS)
def test_tiny_random_llama_trains_under_every_generative_method(llama_cfg, tmp_path, method):
    """Each method the issue lists for generative models trains a causal LM: its trainable weights move, the LM
    head is not retrained by peft methods, the run scores its generations and saves what trained."""
    cfg = llama_cfg(f"method={method}", "forgetting=false")
    parts = pipeline.build(cfg, CPU)
    before = {n: p.detach().clone() for n, p in parts.model.named_parameters() if p.requires_grad}
    assert before
    if cfg.method.kind == "peft":
        assert not any("lm_head" in n for n in before)   # an LM has no new head to save
    out = pipeline.run(cfg, tmp_path / "run", CPU, StubLog())
    assert out.metrics[M.TRAIN_STEPS] == 2 and math.isfinite(out.metrics[M.TEST_LOSS])
    assert 0.0 <= out.metrics[M.TEST_ACCURACY] <= 1.0 and out.metrics[M.CKPT_BYTES] > 0
    # the same build (same seed) trained by run: compare a fresh build's weights with the saved checkpoint's
    reloaded = methods.reload(models.load(cfg.model, cfg.quant, 0, CPU, "generation")[0], cfg.method,
                              tmp_path / "run" / "ckpt")
    after = dict(reloaded.named_parameters())
    moved = [n for n in before if n in after and not torch.equal(before[n], after[n].detach())]
    assert moved, f"method={method}: no trainable weight changed"


@pytest.mark.slow
@pytest.mark.parametrize("quant,avx512bf16", [("nf4", False), ("nf4", True), ("int8", False)],
                         ids=["nf4", "nf4-avx512bf16-forced-on", "int8"])
def test_tiny_random_llama_quantized_lora_trains_and_generates(llama_cfg, tmp_path, monkeypatch, quant, avx512bf16):
    """QLoRA (nf4) and 8-bit LoRA on a causal LM: the decoder's linear layers are quantized, the LM head is not
    (transformers' default for LMs), and training, periodic generation and the test generation all run; with
    bitsandbytes' AVX512-BF16 CPU path forced on as well as off (it changes the NF4 code path)."""
    pytest.importorskip("bitsandbytes")
    from tests.test_quant import force_avx512bf16
    force_avx512bf16(monkeypatch, avx512bf16)
    cfg = llama_cfg("method=lora", f"quant={quant}", "forgetting=false")
    parts = pipeline.build(cfg, CPU)
    kinds = {type(m).__name__ for n, m in parts.model.named_modules() if n.endswith("q_proj.base_layer")}
    assert kinds == {"Linear4bit" if quant == "nf4" else "Linear8bitLt"}
    assert type(parts.model.get_base_model().lm_head).__name__ == "Linear"
    out = pipeline.run(cfg, tmp_path / "run", CPU, StubLog())
    assert out.metrics[M.TRAIN_STEPS] == 2 and math.isfinite(out.metrics[M.TEST_LOSS])
    assert len(pd.read_parquet(out.predictions)) == 6
