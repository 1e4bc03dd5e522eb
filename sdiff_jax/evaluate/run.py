"""The evaluation suites over one trained workdir, as rows of numbers (`python -m
sdiff_jax.evaluate` prints and saves them).

Suites: nelbo (held-out bits/token and the unigram baseline, `nelbo.py`), validity
(`validity.py`), repair (`repair.py`), infill (`infill.py`), judge (`judge.py`), humaneval
(`humaneval.py` through `sandbox.py`), tasks and tasks_infill (the generated testbed's
functions completed or one line filled, their asserts run in the sandbox: `tasks.py`).
Suites that decode (validity, judge, humaneval, tasks) run once per sampler setting of the
grid (`completions.settings_grid`), and their rows carry the setting with its tokens per
forward and tokens/s: quality against speed, one curve per setting; infill and
tasks_infill run once per steps_per_block value (denoising forwards per span). Every row
has its value, standard error and sample count.
"""

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from typing import Any, Sequence

import ml_collections

from sdiff_jax import checkpointing, inference
from sdiff_jax.data import pipeline
from sdiff_jax.data import tasks as tasks_lib
from sdiff_jax.evaluate import completions, infill, judge, nelbo, repair, validity
from sdiff_jax.evaluate import tasks as tasks_suite
from sdiff_jax.objective import Objective

SUITES = ("nelbo", "validity", "repair", "infill", "judge", "humaneval", "tasks", "tasks_infill")
TASKS_DEFAULTS = {
  "samples": 1,  # completions per task (pass@k for k = 1 and samples)
  "temperature": 0.8,  # when samples > 1
  "num": 128,  # tasks per split
  "splits": ("test", "combos"),
  "max_new_tokens": 96,  # a body is at most ~80 tokens of the testbed's BPE
}
HUMANEVAL_DEFAULTS = {
  "samples": 1,  # n per problem (pass@10 needs n >= 10)
  "temperature": 0.8,  # when samples > 1
  "timeout_s": 10.0,  # per candidate, in the sandbox
  # path prefix of the resumable results files, PREFIX.step<N>.<setting>.<settings digest>.jsonl
  # (default: WORKDIR/eval/humaneval)
  "results": None,
}


@dataclasses.dataclass(frozen=True)
class Options:
  suites: Sequence[str] = ("nelbo", "validity", "repair")
  heldout_rows: int = 64
  repeats: int = 4  # noise levels per held-out row (ELBO)
  corpora: Sequence[str] = ()  # nelbo on these too: a directory, glob or JSONL (all of it)
  num_prompts: int = 32
  max_new_tokens: int = 64
  batch_size: int = 16
  grid: dict[str, Sequence[Any]] = dataclasses.field(
    default_factory=lambda: {"steps_per_block": (1, 2, 4, 8)}
  )
  repair_alpha: float = 0.05
  repair_kinds: Sequence[str] = ("edit", "substitution")
  infill_kinds: Sequence[str] = infill.KINDS
  judge_workdir: str | None = None
  humaneval: dict[str, Any] = dataclasses.field(default_factory=dict)  # HUMANEVAL_DEFAULTS keys
  tasks: dict[str, Any] = dataclasses.field(default_factory=dict)  # TASKS_DEFAULTS keys
  seed: int = 0

  def validate(self) -> None:
    unknown = sorted(set(self.suites) - set(SUITES))
    if unknown:
      raise ValueError(f"unknown suites {unknown}: valid are {SUITES}")
    if "judge" in self.suites and not self.judge_workdir:
      raise ValueError("the judge suite needs judge_workdir (a trained causal workdir)")
    if self.num_prompts < 1 or self.heldout_rows < 2:
      raise ValueError("num_prompts must be >= 1 and heldout_rows >= 2")
    t = {**TASKS_DEFAULTS, **self.tasks}
    bad = sorted(set(t["splits"]) - set(tasks_lib.SPLITS))
    if bad or t["samples"] < 1 or t["num"] < 1:
      raise ValueError(
        f"tasks: splits must be among {tasks_lib.SPLITS} (got {bad or 'ok'}), samples and num "
        f">= 1 (got {t['samples']}, {t['num']})"
      )


def _row(suite: str, metric: str, value_se, n: int, **extra) -> dict[str, Any]:
  value, se = value_se
  return {"suite": suite, "metric": metric, "value": value, "stderr": se, "n": n, **extra}


def _progress(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def _nelbo_rows(loaded, objective, o: Options) -> list[dict]:
  rows = []
  sets = [("validation", loaded.config.data, "validation")]
  for path in o.corpora:
    data = ml_collections.ConfigDict(loaded.config.data.to_dict())
    data.source, data.backend = path, "grain"
    sets.append((path, data, "all"))
  for name, data, split in sets:
    heldout = nelbo.heldout_rows(data, loaded.tokenizer, o.heldout_rows, split)
    bits = nelbo.heldout_bits(objective, loaded.params, heldout, o.repeats, o.seed)
    unigram = nelbo.unigram_bits(loaded.config.data, loaded.tokenizer, heldout)
    kind = "nll" if objective.mode == "causal" else "elbo"
    extra = dict(corpus=name, repeats=bits.repeats)
    rows.append(_row("nelbo", f"bits_{kind}", (bits.mean, bits.stderr), bits.rows, **extra))
    rows.append(_row("nelbo", "unigram_bits", (unigram, 0.0), bits.rows, **extra))
    _progress(f"nelbo [{name}]: {bits} bits/token ({kind}), unigram {unigram:.3f}")
    if objective.mode != "causal":  # what a forward that commits a whole block must guess
      block = nelbo.block_bits(objective, loaded.params, heldout)
      for metric, b in (("block_bits_first", block.first), ("block_bits_rest", block.rest)):
        rows.append(_row("nelbo", metric, (b.mean, b.stderr), b.rows, **extra))
      rows[-1]["by_offset"] = [round(b, 3) for b in block.by_offset]
      _progress(
        f"nelbo [{name}]: a fully masked block after a clean prefix: {block.first} bits at "
        f"its first token, {block.rest} at the others"
      )
  return rows


def _repair_rows(loaded, objective, o: Options) -> list[dict]:
  if objective.mode == "causal":
    _progress("repair: skipped (a causal model cannot re-predict its input)")
    return []
  heldout = nelbo.heldout_rows(loaded.config.data, loaded.tokenizer, o.heldout_rows)
  rows = []
  for kind in o.repair_kinds:
    result = repair.repair(objective, loaded.params, heldout, kind, o.repair_alpha, seed=o.seed)
    n = int(result.pop("snippets")[0])
    for metric, value_se in result.items():
      rows.append(_row("repair", metric, value_se, n, kind=kind, alpha=o.repair_alpha))
    _progress(
      f"repair [{kind}, alpha {o.repair_alpha}]: restored {result['restored'][0]:.3f}, "
      f"damaged {result['damaged'][0]:.3f}, exact {result['exact'][0]:.3f} of {n} snippets"
    )
  return rows


def _infill_rows(loaded, objective, o: Options) -> list[dict]:
  """exact / parses per span kind and denoising steps (the grid's steps_per_block)."""
  if objective.mode == "causal":
    _progress("infill: skipped (a causal model cannot see the suffix)")
    return []
  texts = pipeline.load_texts(loaded.config.data, "validation")
  items = validity.function_prompts(texts, o.num_prompts)
  rows = []
  for kind in o.infill_kinds:
    spans = infill.make_spans(items, kind, loaded.tokenizer, seed=o.seed)
    if not spans:
      _progress(f"infill [{kind}]: no held-out function is long enough")
      continue
    for steps in o.grid.get("steps_per_block") or (1,):
      result = infill.infill(
        objective, loaded.params, loaded.tokenizer, spans, steps, loaded.config.data.seq_len
      )
      n = int(result.pop("items")[0])
      tpf = result.pop("tokens_per_forward")[0]
      for metric, value_se in result.items():
        rows.append(
          _row("infill", metric, value_se, n, kind=kind, steps=steps, tokens_per_forward=tpf)
        )
      _progress(
        f"infill [{kind}, {steps} steps]: exact {result['exact'][0]:.3f}, "
        f"parses {result['parses'][0]:.3f} over {n} spans, {tpf:.2f} tokens/forward"
      )
  return rows


def _decoding_rows(loaded, o: Options) -> list[dict]:
  """validity and judge: one decoding of the validity prompts per sampler setting."""
  texts = pipeline.load_texts(loaded.config.data, "validation")
  items = [
    item
    for item in validity.function_prompts(texts, 4 * o.num_prompts)
    if completions.fits(loaded, item.prompt, o.max_new_tokens)
  ][: o.num_prompts]
  if not items:
    raise ValueError("no validation function fits the model's context with a docstring prompt")
  judge_model = inference.load_model(o.judge_workdir) if "judge" in o.suites else None
  rows = []
  for settings in completions.settings_grid(loaded.config.attention, **o.grid):
    decoded = completions.decode(
      loaded,
      [item.prompt for item in items],
      {"max_new_tokens": o.max_new_tokens, **settings},
      batch_size=o.batch_size,
      seed=o.seed,
    )
    speed = dict(
      settings=settings,
      tokens_per_forward=decoded.tokens_per_forward,
      tokens_per_s=decoded.tokens_per_s,
    )
    label = ", ".join(f"{k}={v}" for k, v in settings.items()) or "token by token"
    if "validity" in o.suites:
      scores = [
        validity.score(item, text, ended)
        for item, text, ended in zip(items, decoded.texts, decoded.ended)
      ]
      summary = validity.summarise(scores)
      # repetition parses: the completions' own token entropy tells it apart (bits; real
      # 64-token function bodies of the stdlib: ~4.9 with the quickstart BPE)
      summary["completion_entropy"] = validity.mean_se(
        [judge.unigram_entropy(loaded.tokenizer.encode(t)) for t in decoded.texts]
      )
      for metric, value_se in summary.items():
        rows.append(_row("validity", metric, value_se, len(items), **speed))
      _progress(
        f"validity [{label}]: parses {summary['parses'][0]:.3f}, exact {summary['exact'][0]:.3f},"
        f" similarity {summary['similarity'][0]:.3f}, completion entropy "
        f"{summary['completion_entropy'][0]:.2f} bits; {decoded.tokens_per_forward:.2f} "
        f"tokens/forward, {decoded.tokens_per_s:.0f} tokens/s"
      )
    if judge_model is not None:
      prompts = [item.prompt for item in items]
      result = judge.judge(judge_model, prompts, decoded.texts)
      for metric, value_se in result.items():
        rows.append(_row("judge", metric, value_se, len(items), judge=o.judge_workdir, **speed))
      _progress(
        f"judge [{label}]: gen PPL {result['gen_ppl'][0]:.1f}, "
        f"unigram entropy {result['unigram_entropy'][0]:.2f} bits"
      )
  return rows


def _humaneval_rows(loaded, o: Options, workdir: str, step: int | None) -> list[dict]:
  """pass@k per sampler setting; problems whose prompt does not fit the context are
  counted as failed (the rows say how many), so pass@k is over the 164 (less any problem
  whose every candidate the sandbox could not run: `sandbox_errors`)."""
  from sdiff_jax.evaluate import humaneval  # pylint: disable=g-import-not-at-top

  h = {**HUMANEVAL_DEFAULTS, **o.humaneval}
  # prompts without their final newline (see validity.py: a bare newline at the end is a
  # token boundary a byte-level BPE rarely shows); the program is prompt + completion
  problems = [dataclasses.replace(p, prompt=p.prompt.rstrip()) for p in humaneval.load_problems()]
  fitting = [p for p in problems if completions.fits(loaded, p.prompt, o.max_new_tokens)]
  rows = []
  for settings in completions.settings_grid(loaded.config.attention, **o.grid):
    settings = {"temperature": h["temperature"], **settings} if h["samples"] > 1 else settings
    samples: dict[str, list[str]] = {p.task_id: [""] * h["samples"] for p in problems}
    speed = {}
    if fitting:
      for i in range(h["samples"]):
        decoded = completions.decode(
          loaded,
          [p.prompt for p in fitting],
          {"max_new_tokens": o.max_new_tokens, **settings},
          batch_size=o.batch_size,
          seed=o.seed + 1000 * i,
        )
        for p, text in zip(fitting, decoded.texts):
          samples[p.task_id][i] = humaneval.trim_completion(text)
        speed = dict(
          tokens_per_forward=decoded.tokens_per_forward, tokens_per_s=decoded.tokens_per_s
        )
    run_settings = {
      "workdir": workdir,
      "step": step,
      "sampler": settings,
      "max_new_tokens": o.max_new_tokens,
      "samples": h["samples"],
      "seed": o.seed,
      "timeout_s": h["timeout_s"],
    }
    # one results file per distinct settings: a rerun resumes its own, never another's
    digest = hashlib.sha256(json.dumps(run_settings, sort_keys=True).encode()).hexdigest()[:10]
    tag = "-".join(f"{k}{v}" for k, v in sorted(settings.items())) or "ar"
    prefix = h["results"] or os.path.join(workdir, "eval", "humaneval")
    path = f"{prefix}.step{step}.{tag}.{digest}.jsonl"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    result = humaneval.evaluate_completions(
      problems, samples, timeout_s=h["timeout_s"], results_path=path, settings=run_settings
    )
    extra = dict(
      settings=settings,
      prompts_too_long=len(problems) - len(fitting),
      sandbox_errors=len(result.errors),  # candidates without a verdict, left out of n
      **speed,
    )
    n = len(result.counts)
    for k, value in result.pass_at_k.items():
      rows.append(_row("humaneval", f"pass@{k}", (value, _binomial_se(value, n)), n, **extra))
    _progress(f"humaneval [{tag}]: pass@k {result.pass_at_k} ({result.new_runs} candidates run)")
  return rows


def _tasks_rows(loaded, objective, o: Options, fill_lines: bool) -> list[dict]:
  """tasks: pass@k per split and sampler setting; tasks_infill (fill_lines): pass@1 with
  one body line filled, per split and steps (the grid's steps_per_block)."""
  t = {**TASKS_DEFAULTS, **o.tasks}
  common = dict(splits=t["splits"], num_tasks=t["num"], seed=o.seed, progress=_progress)
  if fill_lines:
    steps = o.grid.get("steps_per_block") or (1,)
    return tasks_suite.infill_rows(objective, loaded, steps=steps, **common)
  blocks = []
  if objective.mode != "causal":
    blocks = tasks_suite.block_rows(objective, loaded, **common)
  return blocks + tasks_suite.rows(
    loaded,
    samples=t["samples"],
    temperature=t["temperature"],
    grid=o.grid,
    max_new_tokens=t["max_new_tokens"],
    batch_size=o.batch_size,
    **common,
  )


def canonical_rows(timeout_s: float = 10.0) -> list[dict[str, Any]]:
  """HumanEval's canonical solutions through the harness (no model): all 164 must pass."""
  from sdiff_jax.evaluate import humaneval  # pylint: disable=g-import-not-at-top

  passed, total, seconds = humaneval.check_canonical(timeout_s)
  _progress(f"humaneval canonical solutions: {passed}/{total} pass ({seconds:.0f} s)")
  return [_row("humaneval", "canonical_pass", (passed / total, 0.0), total, seconds=seconds)]


def _binomial_se(p: float, n: int) -> float:
  return math.sqrt(p * (1 - p) / n) if n else float("nan")


def evaluate(workdir: str, options: Options, step: int | None = None) -> list[dict[str, Any]]:
  """Every requested suite's rows for `workdir` at checkpoint `step` (default: latest)."""
  options.validate()
  paths = checkpointing.Workdir(workdir)
  paths.read_config()  # a clear error for a missing workdir before anything else
  step = checkpointing.latest_step(paths) if step is None else step
  loaded = inference.load_model(workdir, step)
  objective = Objective(loaded.config, loaded.tokenizer.vocab_size)
  rows = []
  for suite, fn in (
    ("nelbo", lambda: _nelbo_rows(loaded, objective, options)),
    ("repair", lambda: _repair_rows(loaded, objective, options)),
    ("infill", lambda: _infill_rows(loaded, objective, options)),
    ("validity", lambda: _decoding_rows(loaded, options)),
    ("humaneval", lambda: _humaneval_rows(loaded, options, workdir, step)),
    ("tasks", lambda: _tasks_rows(loaded, objective, options, fill_lines=False)),
    ("tasks_infill", lambda: _tasks_rows(loaded, objective, options, fill_lines=True)),
  ):
    runs = suite in options.suites or (suite == "validity" and "judge" in options.suites)
    if runs:
      start = time.perf_counter()
      rows += fn()
      _progress(f"{suite}: done in {time.perf_counter() - start:.0f} s")
  return rows


def table(rows: Sequence[dict[str, Any]]) -> str:
  """A markdown table of the rows."""
  lines = [
    "| suite | setting | metric | value | n | tokens/forward | tokens/s |",
    "|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    setting = r.get("settings")
    if setting is None:
      setting = ", ".join(f"{k}={r[k]}" for k in ("corpus", "kind", "alpha", "steps") if k in r)
    else:
      setting = ", ".join(f"{k}={v}" for k, v in setting.items()) or "token by token"
    if "split" in r:
      setting = f"{r['split']}: {setting}"
    tpf = f"{r['tokens_per_forward']:.2f}" if "tokens_per_forward" in r else ""
    tps = f"{r['tokens_per_s']:.0f}" if "tokens_per_s" in r else ""
    lines.append(
      f"| {r['suite']} | {setting} | {r['metric']} | {r['value']:.4g} +- {r['stderr']:.2g} "
      f"| {r['n']} | {tpf} | {tps} |"
    )
  return "\n".join(lines)
