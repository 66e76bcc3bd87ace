"""Sana's instruction prefix: which rows the pipeline keeps and where a phrase lands among them."""

from ace_diffusers.fitting.instructed import Instruction, instruction_of
from ace_diffusers.testing_transformers import gemma_tokenizer


def test_the_kept_rows_are_bos_then_the_tail_and_spans_follow_them():
    tokenizer = gemma_tokenizer()
    layout = Instruction.of("given a prompt:", tokenizer, kept=10)
    n_instruction = len(tokenizer.encode("given a prompt:"))
    assert layout.total == n_instruction + 10 - 2
    rows = layout.rows().tolist()
    assert rows[0] == 0 and len(rows) == 10 and rows[1] == layout.first == n_instruction - 1
    assert layout.chars((2, 5)) == (2 + len("given a prompt:"), 5 + len("given a prompt:"))
    assert layout.span((layout.first + 2, layout.first + 4)) == (3, 5)
    assert layout.span((layout.first - 1, layout.first + 1)) is None and layout.span(None) is None


def test_the_instruction_is_read_from_the_pipelines_own_default():
    class Instructed:
        def __call__(self, prompt, complex_human_instruction=("first line", "second line")):
            raise AssertionError("never called")

    class Plain:
        def __call__(self, prompt):
            raise AssertionError("never called")

    assert instruction_of(Instructed()) == "first line\nsecond line"
    assert instruction_of(Plain()) == ""
