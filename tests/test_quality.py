"""The syntax-validity measure of bench/quality.py (bench/syntax.py)."""

from sdiff_jax.bench.syntax import is_valid, prompts_from


def test_is_valid_needs_a_complete_parsable_line():
  prompt = "def f(x):"
  assert is_valid(prompt, "\n    return x\n")
  assert is_valid(prompt, "  # note\n    y = 1\n    return y\n    z = (")  # unfinished line cut
  assert not is_valid(prompt, "\n......")  # nothing complete: not counted
  assert not is_valid(prompt, " return x\n")  # only the prompt's own line
  assert not is_valid(prompt, "\n    return (\n")
  assert not is_valid(prompt, "\n     return x\n    y = 1\n")  # inconsistent indentation
  assert not is_valid(prompt, "\n\n")


def test_prompts_are_function_headers(code_corpus_dir):
  prompts = prompts_from(str(code_corpus_dir), 0.2, 3)
  assert prompts and all(p.startswith("def add_") and p.endswith("):") for p in prompts)
