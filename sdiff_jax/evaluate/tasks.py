"""The task testbed's functional suite: complete generated functions, run their tests.

Items: tasks of a split of the generated testbed (`data/tasks.py`), `test` (compositions
never trained on) and `combos` (pairs of pieces never seen together in training). The
prompt is the task's helper (if any), header and docstring; the completion, cut at its
first top-level line (`humaneval.trim_completion`: the body has ended there), is the
body; the program, prompt + completion + the task's asserts, runs in the sandbox and
passes or not. pass@k over `samples` completions per task (the unbiased estimator), the
completions' unigram entropy beside it (repetition tells itself apart), and the decoding
speed of the setting.

The infilling variant (`infill_rows`): one body line of each task is removed (with the
newline before it); a diffusion model sees the function before it, as many MASK tokens as
the line had, and the rest of the body and the asserts after it, fills the line
(`infill.fill`) and the program runs: a causal model cannot see the suffix, so it does
not apply.

For a diffusion model the suite also measures what one forward gets right
(`block_rows`): the body's first block masked after the prompt, the argmax accuracy per
offset and the leading run of correct tokens, the ceiling of exact tokens per forward.

A candidate the sandbox could not run (an "error" verdict after `run_until_verdict`'s
retries) has no verdict: it is left out of n, counted in the row, never a failure.
"""

import concurrent.futures
import dataclasses
import random
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from sdiff_jax.data import tasks as tasks_lib
from sdiff_jax.data import tokenizer as tokenizer_lib
from sdiff_jax.evaluate import completions, humaneval, infill, judge, sandbox, validity

SPLITS = ("test", "combos")
TIMEOUT_S = 5.0  # per program: a task's asserts run in milliseconds
MEMORY_MB = 512
WORKERS = 4  # sandbox threads (each program is its own process)


@dataclasses.dataclass(frozen=True)
class Scored:
  passed: list[bool | None]  # per candidate; None: no verdict (sandbox error)
  statuses: dict[str, int]  # verdict status -> count


def items(split: str, count: int, seed: int = 0) -> list[tasks_lib.Task]:
  """The first `count` tasks of `split` (generator seed `seed`)."""
  return [tasks_lib.generate(split, i, seed) for i in range(count)]


def prompt(task: tasks_lib.Task) -> str:
  """The text a model completes: without the docstring's last newline, which a BPE
  trained on the tasks merges with the body's indentation (a bare newline token at the
  end of a prompt is one the model rarely saw there)."""
  return task.prompt.rstrip("\n")


def run_programs(programs: Sequence[str], workers: int = WORKERS) -> Scored:
  """Runs every program in the sandbox: passed or not, None where no verdict was had."""
  statuses: dict[str, int] = {}
  passed: list[bool | None] = [None] * len(programs)
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    futures = {
      pool.submit(sandbox.run_until_verdict, program, timeout_s=TIMEOUT_S, memory_mb=MEMORY_MB): i
      for i, program in enumerate(programs)
    }
    for future in concurrent.futures.as_completed(futures):
      verdict = future.result()
      statuses[verdict.status] = statuses.get(verdict.status, 0) + 1
      if verdict.status != "error":
        passed[futures[future]] = verdict.status == "passed"
  return Scored(passed, statuses)


def fitting(loaded, split: str, count: int, max_new_tokens: int) -> list[tasks_lib.Task]:
  """The first `count` tasks of `split` whose prompt fits the context with the body."""
  return [t for t in items(split, count) if completions.fits(loaded, prompt(t), max_new_tokens)]


def run_completions(
  task_list: Sequence[tasks_lib.Task], texts: Sequence[str]
) -> tuple[list[str], Scored]:
  """Each completion cut to its body, and task i's program with body i run."""
  bodies = [humaneval.trim_completion(text) for text in texts]
  return bodies, run_programs([t.program(b) for t, b in zip(task_list, bodies)])


def pass_at_k_rows(
  passed_per_task: Sequence[Sequence[bool | None]], ks: Sequence[int]
) -> dict[int, tuple[float, float, int]]:
  """k -> (mean pass@k over tasks, its standard error, tasks counted), for the k that
  every counted task has samples for (tasks without any verdict are left out)."""
  verdicts = [[p for p in ps if p is not None] for ps in passed_per_task]
  return humaneval.mean_pass_at_k([(len(v), sum(v)) for v in verdicts if v], ks)


def rows(
  loaded,
  *,
  splits: Sequence[str] = SPLITS,
  num_tasks: int = 128,
  samples: int = 1,
  temperature: float = 0.8,
  grid: dict[str, Sequence[Any]],
  max_new_tokens: int = 96,
  batch_size: int = 16,
  seed: int = 0,
  progress=print,
) -> list[dict[str, Any]]:
  """pass@1 (and pass@k for k <= samples) per split and sampler setting."""
  out = []
  for split in splits:
    task_list = fitting(loaded, split, num_tasks, max_new_tokens)
    skipped = num_tasks - len(task_list)
    if not task_list:
      raise ValueError(f"no {split} task fits the model's context with {max_new_tokens} tokens")
    for settings in completions.settings_grid(loaded.config.attention, **grid):
      if samples > 1:
        settings = {"temperature": temperature, **settings}
      passed = [[] for _ in task_list]
      entropies, speed, statuses = [], [], {}
      for i in range(samples):
        decoded = completions.decode(
          loaded,
          [prompt(t) for t in task_list],
          {"max_new_tokens": max_new_tokens, **settings},
          batch_size=batch_size,
          seed=seed + 1000 * i,
        )
        bodies, scored = run_completions(task_list, decoded.texts)
        for p, verdict in zip(passed, scored.passed):
          p.append(verdict)
        for status, n in scored.statuses.items():
          statuses[status] = statuses.get(status, 0) + n
        entropies += [judge.unigram_entropy(loaded.tokenizer.encode(b)) for b in bodies]
        speed.append((decoded.tokens_per_forward, decoded.tokens_per_s))
      extra = dict(
        split=split,
        settings=settings,
        steps_per_block=settings.get("steps_per_block"),
        tokens_per_forward=sum(s[0] for s in speed) / len(speed),
        tokens_per_s=sum(s[1] for s in speed) / len(speed),
        completion_entropy=validity.mean_se(entropies)[0],
        samples=samples,
        statuses=statuses,
        sandbox_errors=statuses.get("error", 0),
        prompts_too_long=skipped,
      )
      summary = pass_at_k_rows(passed, sorted({1, samples}))
      for k, (value, se, n) in summary.items():
        out.append(
          {"suite": "tasks", "metric": f"pass@{k}", "value": value, "stderr": se, "n": n, **extra}
        )
      label = ", ".join(f"{k}={v}" for k, v in settings.items()) or "token by token"
      value, _, n = summary.get(1, (float("nan"), 0.0, 0))
      progress(
        f"tasks [{split}, {label}]: pass@1 {value:.3f} over {n} tasks, completion entropy "
        f"{extra['completion_entropy']:.2f} bits; {extra['tokens_per_forward']:.2f} "
        f"tokens/forward, {extra['tokens_per_s']:.0f} tokens/s"
      )
  return out


def leading_run(correct_NxK: np.ndarray, scored_NxK: np.ndarray) -> np.ndarray:
  """int[N]: how many scored positions from the first are correct in a row (a row's
  unscored tail, past its body's end, neither breaks nor extends the run)."""
  good_NxK = np.cumprod(correct_NxK | ~scored_NxK, axis=1).astype(bool) & scored_NxK
  return good_NxK.sum(axis=1)


def block_rows(
  objective,
  loaded,
  *,
  splits: Sequence[str] = SPLITS,
  num_tasks: int = 128,
  seed: int = 0,
  chunk: int = 16,
  progress=print,
) -> list[dict[str, Any]]:
  """What one forward gets right (diffusion models): per split, the body's first block
  (`diffusion.block_size` tokens, fewer for a shorter body) fully masked after the
  task's prompt, nothing after it, in the training forward. Rows: `block_accuracy`
  (argmax accuracy over the block's tokens, `by_offset` per position) and `correct_run`
  (the leading run of correct argmax tokens: how many tokens one forward could commit
  and keep the body right, the ceiling of exact tokens per forward).

  `ahead_accuracy`: the states a left-to-right sampler meets, the block's first c tokens
  known and the rest masked (c = 0 and three more cuts, every `size // 4`): argmax
  accuracy by distance d past the known tokens (`by_distance`, d = 1 is the next token);
  its value is d = 2's, the token a sampler at two tokens per forward predicts blind."""
  size = loaded.config.diffusion.block_size
  cuts = range(0, size, max(1, size // 4))
  out = []
  for split in splits:
    task_list = items(split, num_tasks, seed)
    tok = loaded.tokenizer
    pairs = [
      (
        [tokenizer_lib.BOS_ID] + tok.encode(prompt(t)),
        tok.encode(t.prompt[len(prompt(t)) :] + t.body)[:size],
      )
      for t in task_list
    ]
    pairs = [(p, b) for p, b in pairs if len(p) + len(b) <= loaded.config.data.seq_len]
    correct, scored = [], []
    ahead_right_D, ahead_seen_D = np.zeros(size), np.zeros(size)
    # block_causal: the masked block is one of the model's blocks (they start at multiples of
    # the block size): each row is left-padded to put its prompt's end on a boundary
    aligned = loaded.config.attention == "block_causal"
    for first in range(0, len(pairs), chunk):
      part = pairs[first : first + chunk]
      lead_N = [(-len(p)) % size if aligned else 0 for p, _ in part]
      length = max(lead + len(p) + size for lead, (p, _) in zip(lead_N, part))
      tokens, seg, block = (np.zeros((len(part), length), dt) for dt in (np.int32, np.int32, bool))
      positions = np.zeros((len(part), length), np.int32)
      for i, (lead, (p, b)) in enumerate(zip(lead_N, part)):
        end = lead + len(p) + len(b)
        tokens[i, lead:end] = p + b
        seg[i, lead:end] = 1
        positions[i, lead:end] = np.arange(end - lead)
        block[i, lead + len(p) : end] = True
      batch = {  # aligned, a block_causal model's masked block sees no clean copy of itself
        "tokens": jnp.asarray(tokens),
        "segment_ids": jnp.asarray(seg),
        "positions": jnp.asarray(positions),
      }
      starts_N = np.array([lead + len(p) for lead, (p, _) in zip(lead_N, part)])
      for cut in cuts:  # the block's first `cut` tokens known
        hidden = block & (np.arange(length)[None] >= (starts_N + cut)[:, None])
        noisy = jnp.where(jnp.asarray(hidden), tokenizer_lib.MASK_ID, batch["tokens"])
        predicted = np.asarray(objective.logits(loaded.params, noisy, batch).argmax(-1))
        for i, start in enumerate(starts_N):
          window = slice(start, start + size)
          right_K, seen_K = predicted[i, window] == tokens[i, window], hidden[i, window]
          if cut == 0:
            correct.append(right_K)
            scored.append(seen_K)
          ahead_right_D[: size - cut] += (right_K & seen_K)[cut:]
          ahead_seen_D[: size - cut] += seen_K[cut:]
    correct_NxK, scored_NxK = np.stack(correct), np.stack(scored)
    run_N = leading_run(correct_NxK, scored_NxK)
    per_task = (correct_NxK & scored_NxK).sum(1) / scored_NxK.sum(1)
    by_offset = (correct_NxK & scored_NxK).sum(0) / np.maximum(scored_NxK.sum(0), 1)
    by_distance = ahead_right_D / np.maximum(ahead_seen_D, 1)
    n = len(pairs)
    extra = dict(split=split, block_size=size, prompts_too_long=len(task_list) - n)
    for metric, values, more in (
      ("block_accuracy", per_task, {"by_offset": [round(float(a), 3) for a in by_offset]}),
      ("correct_run", run_N, {}),
    ):
      value, se = validity.mean_se(values)
      out.append(
        {"suite": "tasks", "metric": metric, "value": value, "stderr": se, "n": n, **extra, **more}
      )
    two = min(1, size - 1)  # distance 2's index (1-token blocks: distance 1)
    seen, ahead = ahead_seen_D[two], float(by_distance[two])
    out.append(
      {
        "suite": "tasks",
        "metric": "ahead_accuracy",
        "value": ahead,
        "stderr": float(np.sqrt(ahead * (1 - ahead) / max(seen, 1))),
        "n": n,
        **extra,
        "by_distance": [round(float(a), 3) for a in by_distance],
      }
    )
    progress(
      f"tasks [{split}]: one forward over a masked {size}-token block of the body: accuracy "
      f"{per_task.mean():.3f}, the first {run_N.mean():.2f} tokens right in a row on average "
      f"(by offset: {' '.join(f'{a:.2f}' for a in by_offset[:8])} ...); with the block's "
      f"first tokens known, the next right {by_distance[0]:.2f}, the one after {ahead:.2f}"
    )
  return out


def infill_spans(task_list: Sequence[tasks_lib.Task], seed: int = 0) -> list[infill.Span]:
  """One body line of each task removed with the newline before it (a byte-level BPE
  merges a newline with the next line's indentation: the cut keeps the tokens the model
  was trained on on both sides); the suffix holds the rest of the body and the asserts."""
  rng = random.Random(seed)
  spans = []
  for t in task_list:
    lines = t.body.splitlines()
    i = rng.randrange(len(lines))
    before = (t.prompt + "".join(line + "\n" for line in lines[:i]))[:-1]
    after = "".join("\n" + line for line in lines[i + 1 :]) + "\n\n\n" + t.tests
    spans.append(infill.Span(before, "\n" + lines[i], after))
  return spans


def infill_rows(
  objective,
  loaded,
  *,
  splits: Sequence[str] = SPLITS,
  num_tasks: int = 128,
  steps: Sequence[int] = (1, 2, 4, 8),
  seed: int = 0,
  progress=print,
) -> list[dict[str, Any]]:
  """pass@1 of the programs with one line filled, per split and denoising steps."""
  if objective.mode == "causal":
    progress("tasks infill: not applicable (a causal model cannot see the suffix)")
    return []
  out = []
  for split in splits:
    task_list = items(split, num_tasks)
    spans = infill_spans(task_list, seed)
    for n_steps in steps:
      filled = infill.fill(
        objective, loaded.params, loaded.tokenizer, spans, n_steps, loaded.config.data.seq_len
      )
      scored = run_programs(
        [sp.before + text + sp.after for sp, text in zip(spans, filled.texts) if text is not None]
      )
      values = [float(p) for p in scored.passed if p is not None]
      value, se = validity.mean_se(values)
      out.append(
        {
          "suite": "tasks_infill",
          "metric": "pass@1",
          "value": value,
          "stderr": se,
          "n": len(values),
          "split": split,
          "steps": n_steps,
          "tokens_per_forward": filled.tokens_per_forward,
          "sandbox_errors": scored.statuses.get("error", 0),
        }
      )
      progress(
        f"tasks infill [{split}, {n_steps} steps]: pass@1 {value:.3f} over {len(values)} "
        f"lines, {filled.tokens_per_forward:.2f} tokens/forward"
      )
  return out


def report(
  workdir: str,
  *,
  steps_per_block: int,
  num_tasks: int = 128,
  show: int = 3,
  max_new_tokens: int = 96,
  batch_size: int = 16,
) -> None:
  """What the main job prints: `show` test tasks completed with their verdicts, then
  pass@1 over `num_tasks` test tasks at `steps_per_block` (token by token for a causal
  model), with tokens per forward and tokens/s. Every process decodes (restoring and
  decoding are collective); process 0 runs the programs and prints."""
  import jax  # pylint: disable=g-import-not-at-top

  from sdiff_jax import inference  # pylint: disable=g-import-not-at-top

  loaded = inference.load_model(workdir)
  settings = {} if loaded.config.attention == "causal" else {"steps_per_block": steps_per_block}
  task_list = fitting(loaded, "test", num_tasks, max_new_tokens)
  decoded = completions.decode(
    loaded,
    [prompt(t) for t in task_list],
    {"max_new_tokens": max_new_tokens, **settings},
    batch_size=batch_size,
  )
  if jax.process_index() != 0:
    return
  bodies, scored = run_completions(task_list, decoded.texts)
  for t, body, passed in list(zip(task_list, bodies, scored.passed))[:show]:
    verdict = {True: "PASS", False: "FAIL", None: "no verdict (sandbox error)"}[passed]
    print(f"----- test task {t.name} ({t.composition}): {verdict}\n{prompt(t)}{body.rstrip()}\n")
  (value, se, n) = pass_at_k_rows([[p] for p in scored.passed], [1]).get(1, (0.0, 0.0, 0))
  label = f"{steps_per_block} steps per block" if settings else "token by token"
  print(
    f"----- pass@1 on {n} held-out test tasks: {value:.3f} +- {se:.3f} ({label}, "
    f"{decoded.tokens_per_forward:.2f} tokens per forward, {decoded.tokens_per_s:.0f} tokens/s)",
    flush=True,
  )
