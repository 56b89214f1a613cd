"""The README's plan tables (*Planning*): SmolLM2-135M-Instruct as shipped, and a Llama-2-7B-sized config built from
its published dimensions (hidden 4096, 32 layers, 32 heads, FFN 11008, vocabulary 32000; nothing downloaded: the
config is written to a temporary folder), across full, lora, qlora (lora + nf4), adapter, prefix, prompt and ia3,
through `python -m bench.plan`'s own functions. Prints Markdown; the wall-clock of each table on stderr.

    python tests/perf/plan_tables.py
"""
from __future__ import annotations

import sys
import tempfile
import time
from argparse import Namespace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

METHODS = "full,lora,adapter,prefix,prompt,ia3"


def llama_7b(folder: Path) -> Path:
    from transformers import LlamaConfig
    LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                bos_token_id=1, eos_token_id=2, tie_word_embeddings=False).save_pretrained(folder)
    return folder


def table(overrides: list[str], a: Namespace, budget: int) -> str:
    from bench import plan
    from bench.core.plan import estimate
    from bench.orchestration.validate import check_jobs
    plans = []
    # qlora first: a command whose jobs are all quant=none hides bitsandbytes from the process (quant_backend)
    for extra in (["method=lora", "quant=nf4"], [f"method={METHODS}"]):   # full cannot be quantized: two commands
        jobs, errors = check_jobs([*overrides, *extra], True, tracking=False, data=False)
        assert not errors, errors
        plans += [estimate(cfg, plan.setting(cfg, a)) for _, cfg in jobs]
    for p in plans:
        if p.quant == "nf4":
            p.method = "qlora (lora + nf4)"
    plans = plans[1:] + plans[:1]   # full first, qlora after lora's row ... at the end
    return plan.markdown(plans, budget, a)


def main() -> None:
    from bench.plan import parse_bytes
    common = dict(seq_len=None, gen_len=None, gradient_checkpointing=False)
    started = time.perf_counter()
    print("### SmolLM2-135M-Instruct, `task=trec_instruct` (its CPU budget: batch 8 x 128 tokens), CPU float32\n")
    print(table(["model=smollm2", "task=trec_instruct"], Namespace(device="cpu", dtype="float32", **common),
                parse_bytes("4GiB")))
    print(f"SmolLM2: {time.perf_counter() - started:.1f} s", file=sys.stderr)
    with tempfile.TemporaryDirectory() as d:
        folder = llama_7b(Path(d) / "llama-2-7b")
        started = time.perf_counter()
        print("### A Llama-2-7B-sized config, `task=trec_instruct`, batch 4 x 512 tokens, CUDA bfloat16 "
              "(unverified)\n")
        print(table(["model=hf", f"model.name_or_path={folder}", "task=trec_instruct", "train.batch_size=4"],
                    Namespace(device="cuda", dtype="bfloat16", **{**common, "seq_len": 512}), parse_bytes("24GiB")))
        print(f"7B: {time.perf_counter() - started:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
