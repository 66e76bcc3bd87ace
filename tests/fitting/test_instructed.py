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


def test_prompts_behind_the_instruction_run_it_once_and_read_as_the_full_run():
    """The instruction (~800 of Sana's ~1,100 tokens) runs once per call and its keys/values serve every
    prompt, whose own tokens run only up to the last one any prompt has: every row the cross-attention
    reads equals the full run's, and the encoder sees a fraction of the positions."""
    import torch

    from ace_diffusers.fitting.instructed import run_behind_instruction
    from ace_diffusers.fitting.text import TextEmbedder
    from ace_diffusers.testing_transformers import tiny_sana_pipeline

    pipe = tiny_sana_pipeline()
    embedder, encoder = TextEmbedder(pipe), pipe.text_encoder
    layout = embedder.instruction
    prompts = ["a painting by van gogh", "a photo of a cat", "x", "a bowl of soup on a kitchen table"]
    tokens = embedder.encoders[0][0](
        layout.texts(prompts), padding="max_length", max_length=layout.total, truncation=True,
        return_tensors="pt",
    )
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    positions = []
    hook = encoder.get_input_embeddings().register_forward_hook(lambda m, a, o: positions.append(o.shape[:2]))
    try:
        cached = run_behind_instruction(encoder, layout, ids, mask, batch_size=3)
    finally:
        hook.remove()
    with torch.no_grad():
        full = embedder.run_instructed(ids, mask)
    read = mask[:, layout.rows()].bool()  # the rows Sana's cross-attention reads
    assert cached.shape == full.shape
    torch.testing.assert_close(cached[read], full[read], atol=1e-5, rtol=0)
    assert bool((cached[:, ~read.any(0)] == 0).all())  # rows no prompt reaches are not run at all
    ran = sum(b * n for b, n in positions)
    assert ran < 0.4 * len(prompts) * layout.total, (ran, layout.total)
    # rows that do not share their beginning run in full, as before
    apart = ids.clone()
    apart[1, 1] = (apart[1, 1] + 1) % encoder.config.vocab_size
    assert run_behind_instruction(encoder, layout, apart, mask, batch_size=3) is None
