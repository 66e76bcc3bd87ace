from ace_diffusers.bench.ops import ADAPTER_COUNTS, MAX_ADDED_OPS, format_ops, op_counts, ops_markdown


def test_ace_adds_at_most_a_dozen_operations_whatever_the_number_of_adapters():
    result = op_counts(latent=8)
    rows = {r["configuration"]: r for r in result["rows"]}
    assert rows["stock"]["added_top_level"] == 0 and rows["stock"]["top_level"] > 0
    added = [r["added_top_level"] for r in result["rows"][1:]]
    assert len(added) == len(ADAPTER_COUNTS)
    assert 0 < max(added) <= MAX_ADDED_OPS
    assert len(set(added[1:])) == 1  # 2 adapters cost what 10 cost
    text = format_ops(result)
    assert ": met (added: 1 adapter" in text and "NOT MET" not in text
    lines = ops_markdown(result)
    assert lines[2] == "| configuration | top-level | added | all aten | added |" and len(lines) == 4 + 1 + 4
    assert ops_markdown(None) == []
