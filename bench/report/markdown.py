"""The report's Markdown: per task × model × quant a table, plots and the method-selection answer
(bench/report/selection.py), and for chrf_bleu runs a table of chrF and BLEU (no selection: no per-example
verdicts); then the tuned comparison (bench/report/compare.py), the learning curves (bench/report/curves.py), the
claims (bench/report/claims.py), sweeps and provenance (bench/report/provenance.py). Everything here is a
function of the runs alone (stable order, no generation time). The wording rules: bench/report/wording.py;
the definitions: bench/report/stats.py, told to the reader in HOW_TO_READ.
"""
from __future__ import annotations

from pathlib import Path

from bench.core import metrics as M
from bench.fmt import human_bytes
from bench.report import claims, compare, curves
from bench.report.curves import ALL, Campaign
from bench.report import plan_check
from bench.report.data import ACCURACY, CLASSIFICATION, SCORES, Data, Group, ScoreGroup
from bench.report.provenance import provenance
from bench.report.selection import selection
from bench.report.stats import N_RESAMPLES, RESOLUTION
from bench.report.sweeps import Study
from bench.report.wording import acc, cell, memory_name, mib, pct, pt, ratio, sampling, secs

HOW_TO_READ = (
    f"**How to read it.** The headline is test accuracy (`{ACCURACY}`), in %: every run scores the task's test "
    f"split once, at its end, with the model selected on the validation split (`{M.VAL_PREFIX}*`); nothing is "
    "selected on the test split. Each row shows two sources of noise. *Seeds*: the mean over seeds ± the half-width of "
    "its 95 % confidence interval (Student t, n − 1 degrees of freedom); one seed (n=1) shows no interval; an interval "
    "wider than the accuracy itself means the seeds disagree wildly (an unstable method or setting). "
    "*Test sampling*: the Wilson score 95 % interval of the pooled accuracy (the row's correct answers over all "
    "its answers) with n = the number of distinct test examples. Every seed answers the same test questions, so "
    "pooling seeds adds no independent questions and n is not multiplied by the seeds: this interval is how far "
    "another test set of the same size could move the figure. Two methods are *within noise* of each other "
    "when a paired test on the same test examples (read from each run's `predictions/test.parquet`) is not "
    "significant at 5 %: with one seed each, the exact McNemar test on the examples both runs scored "
    "(p ≥ 0.05); with several seeds, a paired bootstrap over seeds and examples (runs paired by seed; each of "
    f"{N_RESAMPLES:,} resamples draws seeds and examples with replacement, the same ones for both methods, and "
    "takes the difference of mean accuracy) whose 95 % interval of the difference contains 0. Where a run's "
    "predictions are missing the report says *paired test unavailable* and claims nothing. Memory: on CPU the "
    f"figure that separates methods is *train growth* (`{M.MEM_TRAIN_GROWTH}`: peak resident memory during "
    "training minus the resident memory right before the first step, i.e. gradients, optimizer state and "
    f"activations), shown next to *peak train (process)* (`{M.MEM_PEAK_TRAIN}`, the whole process's peak, "
    f"weights and libraries included); on CUDA it is *peak train (allocated)* (`{M.MEM_PEAK_TRAIN}`, peak "
    "allocated). Budgets, the memory Pareto frontier and the selection use the separating figure. A cost's "
    "*run-to-run spread* is its max − min over a row's seeds (one seed: "
    f"{100 * RESOLUTION:.0f} % of the figure, a stated resolution); two rows' costs are *within measurement "
    "noise* when they differ by no more than the larger spread, and then the report claims no \"fits\", "
    "\"fastest\" or \"smallest\" between them. The other columns are means over seeds, defined in the README "
    "(*What every run records in MLflow*). A row is on the Pareto frontier of a cost (memory, checkpoint size, "
    "train time) when no other row has at least its mean test accuracy and at most its mean cost, one of the two "
    "strictly. Against full fine-tuning (`method=full`, the reference row in bold, when present) accuracy "
    "differs in points and costs as ratios (×).")

# the figures only some kinds of run report (data.OPTIONAL): column head and format, and what they mean
OPTIONAL_COLUMNS = {
    M.TEST_INVALID_RATE: ("invalid answers", lambda v: f"{100 * v:.1f} %"),
    M.FORGET_LOSS_DELTA: ("forgetting: Δ LM loss", lambda v: f"{v:+.3f}"),
    M.FORGET_EMBEDDING_COSINE: ("forgetting: embedding cosine", lambda v: f"{v:.4f}"),
}
SCORE_HEADS = {M.TEST_CHRF: "test chrF", M.TEST_BLEU: "test BLEU"}


def _generative_note(data: Data) -> list[str]:
    """What the generative groups and the optional columns mean; nothing when the report has neither."""
    kinds = {g.kind for g in data.groups} | {g.kind for g in data.score_groups}
    shown = {m for g in [*data.groups, *data.score_groups] for m in g.optional()}
    parts = []
    if "label_match" in kinds:
        parts.append(
            "Groups titled `… · label_match` are generative tasks: the model generates its answer (greedy) and "
            f"`{ACCURACY}` is the fraction of test examples whose normalized first generated line is the label "
            "word; intervals, paired tests (on each example's verdict, the `score` column of its "
            f"`{M.PREDICTIONS_ARTIFACT}`) and the selection read as above.")
    if M.TEST_INVALID_RATE in shown:
        parts.append(f"*Invalid answers* (`{M.TEST_INVALID_RATE}`): the fraction of test examples whose first "
                     "line is none of the task's label words (counted wrong).")
    if "chrf_bleu" in kinds:
        parts.append("Groups titled `… · chrf_bleu` (translation) have no accuracy: their tables show sacreBLEU's "
                     f"corpus chrF and BLEU (`{M.TEST_CHRF}`, `{M.TEST_BLEU}`, 0–100) instead, explained there.")
    forgetting = [text for metric, text in (
        (M.FORGET_LOSS_DELTA, f"*Δ LM loss* (`{M.FORGET_LOSS_DELTA}`, generative tasks) is the mean token "
                              "cross-entropy of the sample under the trained model minus under the base model (0: "
                              "nothing forgotten; lower is better)"),
        (M.FORGET_EMBEDDING_COSINE, f"*embedding cosine* (`{M.FORGET_EMBEDDING_COSINE}`, classifiers) is the mean "
                                    "cosine similarity of the backbone's mean-pooled last hidden states on the "
                                    "sample before and after training (1: unchanged)")) if metric in shown]
    if forgetting:
        parts.append("*Forgetting*, on a fixed WikiText-2 sample no task trains on (means over the seeds that "
                     "measured it): " + "; ".join(forgetting) + ".")
    if not parts:
        return []
    head = "Generative tasks and forgetting" if kinds - {CLASSIFICATION} else "Forgetting"
    return [f"**{head}.** " + " ".join(parts), ""]


def _optional_cells(group, row) -> list[str]:
    return ["-" if row.means[m] is None else OPTIONAL_COLUMNS[m][1](row.means[m]) for m in group.optional()]


def _cost_cells(group, row, rm: dict) -> list[str]:
    """trainable %, memory, train time, checkpoint, throughput (against the reference's `rm` as ratios)."""
    m = row.means
    memory = [group.memory_metric] if group.cuda else [M.MEM_TRAIN_GROWTH, M.MEM_PEAK_TRAIN]
    tp, tput = m[M.PARAMS_TRAINABLE_PCT], m[M.THROUGHPUT_TOKENS]
    return ["-" if tp is None else f"{tp:.3g}",
            *(mib(m[k]) + ratio(m[k], rm.get(k)) for k in memory),
            secs(m[M.TIME_TRAIN]) + ratio(m[M.TIME_TRAIN], rm.get(M.TIME_TRAIN)),
            human_bytes(m[M.CKPT_BYTES]) + ratio(m[M.CKPT_BYTES], rm.get(M.CKPT_BYTES)),
            "-" if tput is None else f"{tput:,.0f} tok/s"]


def _memory_head(group) -> list[str]:
    return ["peak train (allocated)"] if group.cuda else ["train growth", "peak train (process)"]


def _header(head: list[str]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 2) + ["---"]) + "|"]


# --- the table ----------------------------------------------------------------------------------------------
def _method_table(group, n, score_head: list[str], scores, delta_head: str, delta) -> list[str]:
    """The one layout of both kinds of table: method, seeds, the scores, Δ against full, the costs, the optional
    columns, the Pareto frontier. n(row): its seed count; scores(row): its score cells; delta(row, ref): its Δ."""
    ref = group.reference
    head = (["method", "seeds", *score_head] + ([delta_head] if ref is not None else [])
            + ["trainable %", *_memory_head(group), "train time", "checkpoint", "throughput"]
            + [OPTIONAL_COLUMNS[m][0] for m in group.optional()] + ["Pareto frontier"])
    lines = _header(head)
    for row in group.rows:
        is_ref = row is ref
        rm = ref.means if ref is not None and not is_ref else {}
        cells = [f"**{row.label}**" if is_ref else row.label, f"n={n(row)} ({', '.join(row.seeds)})", *scores(row),
                 *([] if ref is None else ["reference" if is_ref else delta(row, ref)]),
                 *_cost_cells(group, row, rm), *_optional_cells(group, row), ", ".join(row.pareto) or "-"]
        lines.append("| " + " | ".join(cell(c) for c in cells) + " |")
    return lines


def _table(group: Group) -> list[str]:
    return _method_table(group, lambda row: row.accuracy.n,
                         ["test accuracy (seeds, 95 % CI)", "test sampling (Wilson 95 %)"],
                         lambda row: [acc(row), sampling(row)], "Δ test accuracy vs full",
                         lambda row, ref: pt(row.accuracy.mean - ref.accuracy.mean))


def _group_section(group: Group, plot: str | None) -> list[str]:
    figure = (f"`{M.MEM_PEAK_TRAIN}` (peak allocated)" if group.cuda
              else f"`{M.MEM_TRAIN_GROWTH}` (train growth; CPU)")
    scorer = "" if group.kind == CLASSIFICATION else f", generative, scored by {group.kind}"
    lines = [f"## {group.title}", "", f"Task `{group.task}`{scorer}, model `{group.model}`, quantization "
             f"`{group.quant}`; {sum(r.accuracy.n for r in group.rows)} finished runs in {len(group.rows)} rows; "
             f"memory figure that separates the methods: {figure}.", ""]
    if group.reference is None:
        lines += ["No full fine-tuning run (`method=full`) here, so there is no reference row and no deltas.", ""]
    lines += _table(group) + [""]
    if plot:
        lines += [f"![{group.title}: test accuracy against {memory_name(group)}, checkpoint size and train time]"
                  f"({plot})", ""]
    return lines + selection(group)


# --- the score tables (chrf_bleu runs) -------------------------------------------------------------------------
def _score(est) -> str:
    if est is None:
        return "-"
    return f"{est.mean:.1f}" + (f" ± {est.half_width:.1f}" if est.half_width is not None else "")


def _score_table(group: ScoreGroup) -> list[str]:
    return _method_table(group, lambda row: row.headline.n, [f"{SCORE_HEADS[m]} (seeds, 95 % CI)" for m in SCORES],
                         lambda row: [_score(row.scores[m]) for m in SCORES], f"Δ {SCORE_HEADS[SCORES[0]]} vs full",
                         lambda row, ref: f"{row.headline.mean - ref.headline.mean:+.1f}")


def _score_section(group: ScoreGroup) -> list[str]:
    figure = (f"`{M.MEM_PEAK_TRAIN}` (peak allocated)" if group.cuda
              else f"`{M.MEM_TRAIN_GROWTH}` (train growth; CPU)")
    chrf, bleu = SCORES
    lines = [f"## {group.title}", "",
             f"Task `{group.task}`, generative, scored by {group.kind}, model `{group.model}`, quantization "
             f"`{group.quant}`; {sum(r.headline.n for r in group.rows)} finished runs in {len(group.rows)} rows; "
             f"memory figure that separates the methods: {figure}.", "",
             f"The headline is test chrF (`{chrf}`), then BLEU (`{bleu}`): sacreBLEU's corpus scores (0–100, "
             "default settings) of each run's first generated lines against the references of the test split, "
             "scored once at the end of the run; the mean over seeds ± the half-width of its 95 % confidence "
             "interval (Student t), n=1 without one. They are corpus scores, not per-example verdicts, so this "
             "table has no test-sampling interval and no paired test, and the report makes no method-selection "
             "claim here: a gap within the seed intervals is not resolved. The other columns read as in the "
             "accuracy tables; against full fine-tuning (bold, when present) chrF differs in points and costs as "
             "ratios (×); the Pareto frontiers maximize test chrF.", ""]
    if group.reference is None:
        lines += ["No full fine-tuning run (`method=full`) here, so there is no reference row and no deltas.", ""]
    return lines + _score_table(group) + [""]


# --- sweeps -------------------------------------------------------------------------------------------------
def _sweeps_section(studies: list[Study], plots: dict[str, str]) -> list[str]:
    lines = ["## Sweeps", "", "Sweep trials (runs tagged `study`) are kept out of the method tables above: their "
             "settings are chosen by the search, so they are summarized per study instead. A study selects on its "
             f"objective (a `{M.VAL_PREFIX}*` metric, or a cost); the best trial's "
             f"`{ACCURACY}` is the one test evaluation of the chosen configuration, shown beside the objective and "
             "never used for selection.", "",
             "| study | objective | trials finished | failed | pruned / killed | running | best value | "
             f"best trial's {ACCURACY} | best trial | best configuration |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for s in studies:   # MLflow's FAILED, KILLED, RUNNING: the trial states FAIL, PRUNED, RUNNING (sweeps.py)
        if s.best is not None:
            config = " ".join(f"{k}={s.best.settings.get(k, '-')}" for k in s.searched) or "(nothing varied)"
            test = s.best.test.get(ACCURACY)
            chrf = s.best.test.get(M.TEST_CHRF)   # a chrf_bleu study has no accuracy: its test chrF instead
            shown = (f"{pct(test)} %" if test is not None else f"chrF {chrf:.1f} (`{M.TEST_CHRF}`)"
                     if chrf is not None else "-")
            best = (f"{s.best.value:.4g}", shown, str(s.best.number), f"`{config}`")
        elif s.multi and s.front:   # several objectives: the Pareto front, not one best trial
            best = (f"Pareto front of {len(s.front)}", "-", ", ".join(str(t.number) for t in s.front),
                    "; ".join(f"`{' '.join(f'{k}={t.settings.get(k, chr(45))}' for k in s.searched)}`"
                              for t in s.front))
        else:
            best = ("-", "-", "-", "no finished trial")
        objective = ", ".join(f"{d} {m}" for m, d in s.objectives) if s.multi else f"{s.direction} {s.objective}"
        lines.append("| " + " | ".join(cell(c) for c in (
            s.name, objective, str(len(s.complete)), str(s.counts["FAIL"]),
            str(s.counts["PRUNED"]), str(s.counts["RUNNING"]), *best)) + " |")
    lines.append("")
    for s in studies:
        if s.name in plots:
            what = "Pareto front" if s.multi else "objective per trial"
            lines += [f"![study {s.name}: {what}]({plots[s.name]})", ""]
    return lines


def render(data: Data, studies: list[Study], group_plots: dict[str, str], sweep_plots: dict[str, str],
           campaigns: list[Campaign] | None = None, curve_plots: dict[str, str] | None = None,
           tuned: list | None = None, tuned_plots: dict[str, str] | None = None) -> str:
    """campaigns: the learning curves (curves.campaigns(data)), curve_plots: slug -> PNG; then the claims. tuned:
    the tuned-comparison campaigns (compare.campaigns(data)), tuned_plots: name -> PNG."""
    campaigns = curves.campaigns(data) if campaigns is None else campaigns
    tuned = compare.campaigns(data) if tuned is None else tuned
    finished = (sum(r.accuracy.n for g in data.groups for r in g.rows)
                + sum(r.headline.n for g in data.score_groups for r in g.rows)
                + len({r.run_id for c in campaigns for line in c.lines for k, p in line.points.items()
                       if k != ALL for r in p.runs}))
    exps = ", ".join(f"`{e}`" for e in data.experiments)
    lines = [f"# Which PEFT method? Report on {exps}", "",
             f"Computed by `python -m bench.report` from {finished} finished runs in the MLflow store "
             f"`{data.uri}`. The same runs give the same report, byte for byte.", "", HOW_TO_READ, "",
             *_generative_note(data)]
    if not data.groups and not data.score_groups:
        lines += [f"No FINISHED runs with `{ACCURACY}` outside sweeps: there is nothing to compare yet.", ""]
    links = ([f"[{g.title}](#{_anchor(g.title)})" for g in [*data.groups, *data.score_groups]]
             + (["[Tuned comparison](#tuned-comparison)"] if tuned else [])
             + (["[Learning curves](#learning-curves)"] if campaigns else []) + ["[Claims](#claims)"]
             + (["[Sweeps](#sweeps)"] if studies else []) + ["[Provenance](#provenance)"])
    lines += ["Contents: " + ", ".join(links) + ".", ""]
    for g in data.groups:
        lines += _group_section(g, group_plots.get(g.slug))
    for g in data.score_groups:
        lines += _score_section(g)
    lines += compare.section(tuned, tuned_plots or {})
    lines += curves.section(campaigns, curve_plots or {})
    lines += claims.section(data, campaigns)
    if studies:
        lines += _sweeps_section(studies, sweep_plots)
    lines += plan_check.section(data)   # plan/* estimates against the measurements (bench/report/plan_check.py)
    lines += provenance(data)
    return "\n".join(lines).rstrip("\n") + "\n"


def _anchor(title: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    return "".join(c for c in title.lower() if c.isalnum() or c in " -_").replace(" ", "-")


def write(text: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
