"""The report's Claims section: what papers and issue trackers claim about PEFT, checked against the runs in the
store, never written by hand: it regenerates with the report. One small function per claim returns an
evidence.Claim: the claim and its source, what is compared by which rule, one Finding per comparison (its numbers
with their noise and n, and a verdict: holds / does not hold / within noise / not measured here), and the command
that measures it. The rules (stats.py holds their definitions):

- latency: two medians of one run differ when |a − b| > max(IQR_a, IQR_b); over a row's runs only when every run
  differs that way, with the same sign (stats.latency_verdict);
- accuracy against full fine-tuning: the paired test of the tables (wording.within), else the seed intervals;
- costs (checkpoint, memory): the tables' measurement noise (stats.costs_apart);
- forgetting: the 95 % seed intervals (stats.intervals_apart), so one seed measures nothing;
- learning curves: bench/report/curves.py's comparison at the smallest k.
"""
from __future__ import annotations

from bench.core import metrics as M
from bench.report import curves as C
from bench.report.data import Data, Group
from bench.report.evidence import (FAILS, HOLDS, NOT_MEASURED, SUFFIXES, WITHIN, Claim, Finding, against_full, bytes_,
                                   cost_evidence, estimate, finite, latency_evidence, ms, places, render,
                                   seed_evidence)
from bench.report.stats import intervals_apart, mean_ci
from bench.report.wording import estimate_pct, mib, pt, test_detail

TABLES = "python -m bench method=full,lora,adapter,prefix seed=0,1,2 -m"
CURVES = ("python -m bench +experiment=data_efficiency method=full,lora,adapter,prefix,ia3 "
          "task.train_per_class=8,32,128,null seed=0,1,2 -m")
# the multi-task parent run's command and figures (tag multitask=parent; children: ordinary runs, mlflow.parentRunId)
MULTITASK_COMMAND = "python -m bench.multitask method=lora task=trec,rotten_tomatoes,finefoods"
MT = {name.split("/", 1)[1]: name for name in M.MULTITASK}   # the registry's multitask/* figures, by short name
TINY = 0.10   # (g) "tiny": at most this fraction of full fine-tuning's checkpoint


def _rows_of(data: Data, method: str):
    return [(g, row) for g, row in places(data) if row.method == method]


def _latency_claim(claim: Claim, data: Data, method: str, a: str, b: str, verdicts: dict[int, str]) -> Claim:
    """One finding per row of `method` and batch size: `a` against `b` by stats.latency_verdict's sign."""
    rows = _rows_of(data, method)
    for group, row in rows:
        for suffix in SUFFIXES:
            found = latency_evidence(row.runs, a, b, suffix)
            if found is not None:
                claim.findings.append(Finding(group.title, row.label, found[1], verdicts[found[0]]))
    if not claim.findings:
        why = {r.tags.get("merge") for _, row in rows for r in row.runs} - {None, "merged"}
        claim.missing = (f"no `{method}` run in the tables timed {a} and {b} (`latency/{a}_ms_*`, `latency/{b}_ms_*`)"
                         + (f"; its runs' `merge` tag: {'; '.join(sorted(why))}" if why else ""))
    return claim


def lora_merged_speed(data: Data) -> Claim:
    claim = Claim("a", "LoRA merges into the base weights: inference as fast as the base model",
                  "Hu et al., *LoRA* (ICLR 2022): \"can merge into original weights, inference speed unchanged\"",
                  "lora's merged copy (`latency/merged_ms_*`) against the base model (`latency/base_ms_*`), timed in "
                  "the same process at batch 1 and N; holds when they do not differ beyond the IQRs",
                  "python -m bench method=lora seed=0,1,2 -m")
    return _latency_claim(claim, data, "lora", "merged", "base", {0: HOLDS, 1: FAILS, -1: FAILS})


def adapter_slower(data: Data) -> Claim:
    claim = Claim("b", "Bottleneck adapters cost extra computation: inference slightly slower",
                  "Houlsby et al. (ICML 2019) adapters, as discussed in Hu et al., *LoRA* (ICLR 2022), §3: "
                  "\"adapters require extra computation, inference slightly slower\"",
                  "`adapter` (Houlsby bottleneck, unmergeable) as trained (`latency/unmerged_ms_*`) against the base "
                  "model (`latency/base_ms_*`); holds when slower beyond the IQRs",
                  "python -m bench method=adapter seed=0,1,2 -m")
    return _latency_claim(claim, data, "adapter", "unmerged", "base", {1: HOLDS, 0: WITHIN, -1: FAILS})


def prefix_slower(data: Data) -> Claim:
    claim = Claim("c", "Prefix tuning processes extra tokens: inference slightly slower",
                  "Li & Liang, prefix tuning (ACL 2021), as discussed in Hu et al., *LoRA* (ICLR 2022), §3: "
                  "\"needs to process extra tokens, inference slightly slower\"",
                  "`prefix` as trained (`latency/unmerged_ms_*`) against the model without its virtual tokens "
                  "(`latency/base_ms_*`); holds when slower beyond the IQRs",
                  "python -m bench method=prefix seed=0,1,2 -m")
    return _latency_claim(claim, data, "prefix", "unmerged", "base", {1: HOLDS, 0: WITHIN, -1: FAILS})


def unmerged_slower(data: Data) -> Claim:
    claim = Claim("d", "Unmerged LoRA is much slower than merged",
                  "PEFT issue #957 (4.2 s unmerged vs 2.8 s merged, ×1.5); vLLM issue #3316 (780 vs 400 ms, ×1.95)",
                  "lora as trained (`latency/unmerged_ms_*`) against its merged copy (`latency/merged_ms_*`); holds "
                  "when slower beyond the IQRs (the % shows how much, against the issues' +50 % and +95 %)",
                  "python -m bench method=lora seed=0,1,2 -m")
    return _latency_claim(claim, data, "lora", "unmerged", "merged", {1: HOLDS, 0: WITHIN, -1: FAILS})


def merge_moves(data: Data) -> Claim:
    claim = Claim("e", "Merging can move the numbers",
                  "PEFT issue #1388: loss 2.1178 → 2.1214 after a bf16 merge",
                  "the merged copy's test score minus the unmerged one's on the whole test split "
                  f"(`{M.MERGE_ACCURACY_DELTA}`, `{M.MERGE_CHRF_DELTA}` for chrF), per row of a mergeable method; "
                  "holds when any run's answers moved (a non-zero delta: the same test examples, no sampling noise)",
                  "python -m bench method=lora,dora,ia3 seed=0,1,2 -m")
    for group, row in places(data):
        for metric, fmt in ((M.MERGE_ACCURACY_DELTA, pt), (M.MERGE_CHRF_DELTA, lambda v: f"{v:+.2f} chrF")):
            values = [v for r in row.runs if (v := finite(r, metric)) is not None]
            if not values:
                continue
            moved = sum(1 for v in values if v != 0.0)
            claim.findings.append(Finding(group.title, row.label, (
                f"`{metric}` {estimate(mean_ci(values), fmt)}; non-zero in {moved} of "
                f"{len(values)} run{'s' if len(values) > 1 else ''}, largest {fmt(max(values, key=abs))}"),
                HOLDS if moved else FAILS))
    if not claim.findings:
        claim.missing = "no run in the tables logged a merge delta (mergeable methods with `deploy.merged_test=true`)"
    return claim


def low_data(data: Data, campaigns: list[C.Campaign]) -> Claim:
    claim = Claim("f", "PEFT beats full fine-tuning in low-data regimes",
                  "Chen et al., *Revisiting Parameter-Efficient Tuning* (EMNLP 2022); Pu et al. (2023) find PEFT "
                  "converges more slowly with little data",
                  "each method's learning curve against full fine-tuning's at the smallest k both have (the curves' "
                  "rule, see *Learning curves*); the whole curve in words beside it",
                  CURVES)
    verdicts = {C.AHEAD: HOLDS, C.BEHIND: FAILS, C.WITHIN: WITHIN, C.UNRESOLVED: NOT_MEASURED}
    for camp in campaigns:
        for line in camp.lines:
            small = [c for c in camp.comparisons(line) if c.k != C.ALL]
            if not small:
                continue
            first = small[0]
            p, q = line.points[first.k], camp.reference.points[first.k]
            claim.findings.append(Finding(camp.title, line.label, (
                f"at {camp.x_label(first.k)} examples (k={first.k}): {estimate_pct(p.accuracy)} vs "
                f"{camp.reference.label}'s {estimate_pct(q.accuracy)}, {first.verdict} "
                f"({first.rule or 'no rule applies'}"
                f"{': ' + first.detail if first.rule == 'paired test' else ''}). {C.sentence(camp, line)}"),
                verdicts[first.verdict]))
    if not claim.findings:
        claim.missing = ("no learning curve with full fine-tuning and another method at the same k "
                         "(runs with `task.train_per_class`)")
    return claim


def _cost_claim(claim: Claim, data: Data, metric_of, fmt, rule) -> Claim:
    for group, row, ref in against_full(data):
        metric = metric_of(group)
        found = cost_evidence(row, ref, metric, fmt)
        if found is not None:
            sign, ratio, text = found
            claim.findings.append(Finding(group.title, row.label, f"`{metric}` {text}", rule(sign, ratio)))
    if not claim.findings:
        claim.missing = "no group with full fine-tuning and another method that both logged the figure"
    return claim


def tiny_checkpoints(data: Data) -> Claim:
    claim = Claim("g", "PEFT checkpoints are tiny", "Hu et al., *LoRA* (ICLR 2022: a checkpoint ~10,000× smaller "
                  "for GPT-3); the Hugging Face PEFT README (\"a few MBs\")",
                  f"`{M.CKPT_BYTES}` against full fine-tuning's in the same group; holds when smaller beyond "
                  f"measurement noise and at most {100 * TINY:.0f} % of it",
                  TABLES)
    return _cost_claim(claim, data, lambda g: M.CKPT_BYTES, bytes_,
                       lambda s, r: (HOLDS if r <= TINY else FAILS) if s < 0 else FAILS if s > 0 else WITHIN)


def less_memory(data: Data) -> Claim:
    claim = Claim("h", "PEFT trains in less memory", "Hu et al., *LoRA* (ICLR 2022: VRAM −2/3 for GPT-3); the "
                  "Hugging Face PEFT README",
                  "each group's method-separating memory figure (train growth on CPU, peak allocated on CUDA; see "
                  "*How to read it*) against full fine-tuning's; holds when smaller beyond measurement noise",
                  TABLES)
    return _cost_claim(claim, data, lambda g: g.memory_metric, mib,
                       lambda s, r: HOLDS if s < 0 else FAILS if s > 0 else WITHIN)


def less_forgetting(data: Data) -> Claim:
    claim = Claim("i", "PEFT forgets less than full fine-tuning", "Hugging Face PEFT README (\"overcomes "
                  "catastrophic forgetting\"); Biderman et al., *LoRA Learns Less and Forgets Less* (TMLR 2024)",
                  f"`{M.FORGET_LOSS_DELTA}` (generative, lower: less forgotten) or `{M.FORGET_EMBEDDING_COSINE}` "
                  "(classifiers, higher: less changed) against full fine-tuning's; holds when the 95 % seed "
                  "intervals do not overlap in PEFT's favour (one seed: no interval, not measured)",
                  TABLES)
    for group, row, ref in against_full(data):
        for metric, better, fmt in ((M.FORGET_LOSS_DELTA, -1, lambda v: f"{v:+.3f}"),
                                    (M.FORGET_EMBEDDING_COSINE, 1, lambda v: f"{v:.4f}")):
            a, b = row.values.get(metric) or [], ref.values.get(metric) or []
            if not a or not b:
                continue
            sign, ea, eb = seed_evidence(a, b)
            verdict = NOT_MEASURED if sign is None else WITHIN if sign == 0 else HOLDS if sign == better else FAILS
            claim.findings.append(Finding(group.title, row.label, f"`{metric}` {estimate(ea, fmt)} vs "
                                          f"{ref.label}'s {estimate(eb, fmt)}", verdict))
    if not claim.findings:
        claim.missing = "no group with full fine-tuning and another method that both measured forgetting"
    return claim


def comparable_accuracy(data: Data) -> Claim:
    claim = Claim("j", "PEFT is as accurate as full fine-tuning", "the Hugging Face PEFT README (\"comparable "
                  "performance to full fine-tuning\"); Hu et al., *LoRA* (ICLR 2022)",
                  "test accuracy against full fine-tuning's in the same group by the tables' paired test (holds "
                  "within noise or ahead, does not hold behind beyond noise); without predictions the 95 % seed "
                  "intervals (test chrF for translation groups)",
                  TABLES)
    for group, row, ref in against_full(data):
        if isinstance(group, Group):
            test = group.paired(row, ref)
            if not isinstance(test, str):
                verdict = HOLDS if test.within_noise or test.diff > 0 else FAILS
                claim.findings.append(Finding(group.title, row.label, f"{estimate_pct(row.accuracy)} vs "
                                              f"{ref.label}'s {estimate_pct(ref.accuracy)}; {test_detail(test)}",
                                              verdict))
                continue
            sign = intervals_apart(row.accuracy, ref.accuracy)
            verdict = NOT_MEASURED if sign is None else FAILS if sign < 0 else HOLDS
            claim.findings.append(Finding(group.title, row.label, f"{estimate_pct(row.accuracy)} vs {ref.label}'s "
                                          f"{estimate_pct(ref.accuracy)}; seed intervals ({test})", verdict))
            continue
        # a chrF / BLEU group: no per-example verdicts, so no paired test
        a, b = ([v for r in x.runs if (v := finite(r, M.TEST_CHRF)) is not None] for x in (row, ref))
        fmt = lambda v: f"chrF {v:.1f}"  # noqa: E731
        if not a or not b:
            continue
        sign, ea, eb = seed_evidence(a, b)
        verdict = NOT_MEASURED if sign is None else FAILS if sign < 0 else HOLDS
        claim.findings.append(Finding(group.title, row.label, f"{estimate(ea, fmt)} vs {ref.label}'s "
                                      f"{estimate(eb, fmt)}; seed intervals (no paired test)", verdict))
    if not claim.findings:
        claim.missing = "no group with full fine-tuning and another method"
    return claim


def multitask(data: Data) -> Claim:
    claim = Claim("k", "Multi-task LoRA: one adapter per task on a shared base, switched with `set_adapter`, "
                  "without cross-talk and with a cheap switch",
                  "Hu et al., *LoRA* (ICLR 2022: switch tasks by swapping the LoRA weights); the Hugging Face PEFT "
                  "docs (`load_adapter`, `set_adapter`)",
                  "multi-task parent runs (tag `multitask=parent`): *no cross-talk* holds when the switched "
                  f"adapters' predictions equal each task's own (`{MT['predictions_equal']}` = 1) and each child's "
                  f"`{MT['test_accuracy_switched']}` equals its `{M.TEST_ACCURACY}`; *cheap switch* when the switch's "
                  f"median plus IQR (`{MT['switch_ms']}`) stays below loading the model (`{MT['load_s']}`); *shared "
                  f"base* when base + adapters (`{MT['base_bytes']}` + `{MT['adapters_bytes']}`) is smaller than one "
                  f"full model per task (`{MT['full_models_bytes']}`)",
                  MULTITASK_COMMAND)
    for parent in data.multitask:
        get = lambda k: finite(parent, MT[k])  # noqa: E731
        tasks = f", {get('tasks'):.0f} tasks" if get("tasks") is not None else ""
        where = f"{parent.name} ({parent.tags.get('model', '?')} · {parent.tags.get('quant', 'none')}{tasks})"
        children = [r for r in data.runs if r.tags.get("mlflow.parentRunId") == parent.run_id
                    and finite(r, MT["test_accuracy_switched"]) is not None and finite(r, M.TEST_ACCURACY) is not None]
        moved = [r for r in children if r.metrics[MT["test_accuracy_switched"]] != r.metrics[M.TEST_ACCURACY]]
        equal = get("predictions_equal")
        if equal is not None:
            mixed = get("mixed_batch_max_abs_diff")
            logit = get("max_abs_logit_diff")
            text = (f"predictions equal: {'yes' if equal == 1 else 'no'}; largest absolute logit difference "
                    f"{'-' if logit is None else f'{logit:.3g}'}"
                    + (f"; mixed batch: largest absolute difference {mixed:.3g}" if mixed is not None else "")
                    + (f"; children with switched accuracy ≠ own: {len(moved)} of {len(children)}"
                       if children else ""))
            claim.findings.append(Finding(where, "no cross-talk", text, HOLDS if equal == 1 and not moved else FAILS))
        switch, iqr, load = get("switch_ms"), get("switch_iqr_ms"), get("load_s")
        if switch is not None and load is not None:
            claim.findings.append(Finding(where, "cheap switch", (
                f"switch {ms(switch)} ms (IQR {ms(iqr or 0.0)}) vs loading {load:.3g} s"),
                HOLDS if switch + (iqr or 0.0) < 1000 * load else FAILS))
        base, adapters, full = get("base_bytes"), get("adapters_bytes"), get("full_models_bytes")
        if None not in (base, adapters, full):
            rss = [get("rss_base_bytes"), get("rss_adapters_bytes")]
            claim.findings.append(Finding(where, "shared base", (
                f"base {bytes_(base)} + adapters {bytes_(adapters)} = {bytes_(base + adapters)} vs full models "
                f"{bytes_(full)} (×{(base + adapters) / full:.2g})"
                + (f"; resident memory: base {mib(rss[0])}, adapters +{mib(rss[1])}" if None not in rss else "")),
                HOLDS if base + adapters < full else FAILS))
    if not claim.findings:
        claim.missing = "no FINISHED multi-task parent run (tag `multitask=parent`) with its figures"
    return claim


def claims(data: Data, campaigns: list[C.Campaign]) -> list[Claim]:
    return [lora_merged_speed(data), adapter_slower(data), prefix_slower(data), unmerged_slower(data),
            merge_moves(data), low_data(data, campaigns), tiny_checkpoints(data), less_memory(data),
            less_forgetting(data), comparable_accuracy(data), multitask(data)]


def section(data: Data, campaigns: list[C.Campaign]) -> list[str]:
    return render(claims(data, campaigns))
