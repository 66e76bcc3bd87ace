"""Hostile inputs: corrupted adapter files, killed saves, property-based checks of the processor math."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ace_diffusers.core.adapter import CONFIG_NAME, WEIGHTS_NAME, ACEAdapter
from ace_diffusers.core.processor import ACE_STACK_ATTR, ACEAdapterStack, ACEAttnProcessor, ACELayerDelta
from ace_diffusers.errors import ACEAdapterFormatError
from ace_diffusers.testing import random_adapter, tiny_sd_pipeline

from .conftest import generate


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapter")
    random_adapter(tiny_sd_pipeline().unet, rank=2, seed=3).save_pretrained(folder)
    return folder


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_corruption_of_the_files_loads_or_raises_a_format_error(saved_adapter, tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("corrupt")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        (folder / name).write_bytes((saved_adapter / name).read_bytes())
    victim = folder / data.draw(st.sampled_from([CONFIG_NAME, WEIGHTS_NAME]))
    raw = bytearray(victim.read_bytes())
    mode = data.draw(st.sampled_from(["truncate", "flip", "garbage"]))
    if mode == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif mode == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] = data.draw(st.integers(0, 255))
    else:
        raw = bytearray(data.draw(st.binary(max_size=256)))
    victim.write_bytes(bytes(raw))
    try:
        adapter = ACEAdapter.from_pretrained(folder)
    except ACEAdapterFormatError:
        return
    for tensor in adapter.state_dict().values():  # if it loaded, it is a valid adapter
        assert torch.isfinite(tensor).all()


def test_failed_load_leaves_the_pipeline_unchanged(tmp_path):
    pipe = tiny_sd_pipeline()
    first = random_adapter(pipe.unet, seed=1)
    pipe.load_ace_adapter(first, adapter_name="kept")
    before = generate(pipe)
    broken = tmp_path / "broken"
    random_adapter(pipe.unet, seed=2).save_pretrained(broken)
    config = json.loads((broken / CONFIG_NAME).read_text())
    config["fingerprint"]["layers"] = {}
    (broken / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ACEAdapterFormatError):
        pipe.load_ace_adapter(broken)
    assert pipe.get_list_ace_adapters() == ["kept"]
    assert torch.equal(generate(pipe), before)


KILL_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from ace_diffusers.adapter import ACEAdapter, LayerFactors
    target, = sys.argv[1:]
    def version(v):
        layers = {f"layer{i}": LayerFactors(*(torch.full(s, float(v)) for s in
                  [(64, 512), (512, 64), (64, 512), (512, 64), (512,), (1,)])) for i in range(40)}
        return ACEAdapter(layers, concepts=[f"v{v}"])
    versions = [version(1), version(2)]
    i = 0
    while True:
        versions[i % 2].save_pretrained(target)
        i += 1
        print("saved", flush=True)
    """
)


@pytest.mark.slow
def test_killing_a_save_leaves_a_loadable_adapter(tmp_path):
    target = tmp_path / "adapter"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for kill_after in (0.05, 0.13, 0.31):
        proc = subprocess.Popen(
            [sys.executable, "-c", KILL_SCRIPT, str(target)], stdout=subprocess.PIPE, env=env
        )
        assert proc.stdout.readline().strip() == b"saved"  # one complete adapter exists
        time.sleep(kill_after)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        adapter = ACEAdapter.from_pretrained(target)
        value = adapter.concepts[0]
        assert value in ("v1", "v2")
        expected = float(value[1])
        assert all(bool((t == expected).all()) for t in adapter.state_dict().values())


def make_attention(d_text, heads, dim_head, seed):
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(seed)
    return Attention(query_dim=16, cross_attention_dim=d_text, heads=heads, dim_head=dim_head)


@settings(max_examples=25, deadline=None)
@given(
    d_text=st.integers(2, 24),
    heads=st.integers(1, 3),
    rank=st.integers(1, 6),
    tokens=st.integers(1, 9),
    scale=st.floats(-3, 3, allow_nan=False),
    seed=st.integers(0, 10_000),
)
def test_processor_math_properties(d_text, heads, rank, tokens, scale, seed):
    attn = make_attention(d_text, heads, 4, seed)
    g = torch.Generator().manual_seed(seed)
    d_k = heads * 4
    delta = ACELayerDelta(
        torch.randn(rank, d_text, generator=g),
        torch.randn(d_k, rank, generator=g),
        torch.randn(rank, d_text, generator=g),
        torch.randn(d_k, rank, generator=g),
        torch.randn(d_text, generator=g) * 5,
        torch.randn(1, generator=g),
    )
    context = torch.randn(2, tokens, d_text, generator=g)
    hidden = torch.randn(2, 5, 16, generator=g)
    gate = delta.gate(context)
    assert gate.min() >= 0 and gate.max() <= 1  # the gate is a probability per token
    stock = attn(hidden, encoder_hidden_states=context)
    stack = ACEAdapterStack(attn.to_k.weight)
    stack.adapters["a"] = delta
    attn.add_module(ACE_STACK_ATTR, stack)
    attn.set_processor(ACEAttnProcessor())
    delta.scale.fill_(0.0)
    assert torch.equal(attn(hidden, encoder_hidden_states=context), stock)  # scale 0 = identity
    key = attn.to_k(context)
    delta.scale.fill_(scale)
    ks, _ = stack.add_delta(context, key, attn.to_v(context))
    delta.scale.fill_(1.0)
    k1, _ = stack.add_delta(context, key, attn.to_v(context))
    torch.testing.assert_close(ks - key, scale * (k1 - key), rtol=1e-4, atol=1e-4)  # linear in the scale


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
CONFIG_FIELDS = [
    "format_version", "concepts", "neutral", "kind", "rank", "method", "fit", "base_model",
    "fingerprint", "created_with", "extra", "weights_sha256",
]  # fmt: skip


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(CONFIG_FIELDS), value=JSON, drop=st.booleans())
def test_any_config_field_value_loads_or_raises_a_format_error(
    saved_adapter, tmp_path_factory, field, value, drop
):
    folder = tmp_path_factory.mktemp("fuzzed-config")
    (folder / WEIGHTS_NAME).write_bytes((saved_adapter / WEIGHTS_NAME).read_bytes())
    config = json.loads((saved_adapter / CONFIG_NAME).read_text())
    if drop:
        config.pop(field, None)
    else:
        config[field] = value
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    try:
        ACEAdapter.from_pretrained(folder)
    except ACEAdapterFormatError:
        pass


@settings(max_examples=120, deadline=None)
@given(value=JSON | st.floats() | st.complex_numbers(max_magnitude=2))
def test_any_scale_value_is_a_number_or_a_typed_error(value):
    from ace_diffusers.errors import ACEValueError
    from ace_diffusers.integration.attach import MAX_SCALE, check_scale

    try:
        number = check_scale(value)
    except ACEValueError:
        return
    assert isinstance(number, float) and abs(number) <= MAX_SCALE


HEADER_VALUES = st.one_of(
    st.sampled_from(["F16", "F32", "BF16", "F64", "I64", "U8", "BOOL", "F8_E4M3", "X"]),
    st.lists(st.integers(-3, 2**40), max_size=4),
    st.integers(-(2**63), 2**63),
    st.text(max_size=4),
    st.none(),
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tensor=st.integers(0, 5), field=st.sampled_from(["dtype", "shape", "data_offsets", "extra"]),
       value=HEADER_VALUES, drop=st.booleans())
def test_any_safetensors_header_loads_or_raises_a_format_error(
    saved_adapter, tmp_path_factory, tensor, field, value, drop
):
    """A well-framed safetensors file whose JSON header lies (dtype, shape, offsets, unknown keys) about
    one tensor: it loads as a valid adapter or raises ACEAdapterFormatError — never another error."""
    folder = tmp_path_factory.mktemp("fuzzed-header")
    (folder / CONFIG_NAME).write_bytes((saved_adapter / CONFIG_NAME).read_bytes())
    raw = (saved_adapter / WEIGHTS_NAME).read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header, data = json.loads(raw[8 : 8 + size]), raw[8 + size :]
    names = sorted(k for k in header if k != "__metadata__")
    entry = header[names[tensor % len(names)]]
    if drop:
        entry.pop(field, None)
    else:
        entry[field] = value
    text = json.dumps(header).encode()
    (folder / WEIGHTS_NAME).write_bytes(len(text).to_bytes(8, "little") + text + data)
    try:
        adapter = ACEAdapter.from_pretrained(folder)
    except ACEAdapterFormatError:
        return
    for t in adapter.state_dict().values():
        assert torch.isfinite(t).all()
