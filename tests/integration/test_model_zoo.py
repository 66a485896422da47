"""Gradients with STORM equal gradients without it, bit for bit, across a zoo of models.

Each case builds a small model from a seed, deep-copies it, and runs the same loss on
both copies: once plainly, once under ``offload_saved_tensors(system, min_bytes=0)`` so
that every saved tensor goes through the pool. Every parameter gradient, every input
gradient and the loss must be ``torch.equal``, and the session's pool must be empty
again after backward, and after a graph is dropped without backward. Each case runs
``REPEATS`` times, because a race between a transfer and its use shows only sometimes.

The cases aim at what a saved-tensor hook can get wrong: views and aliases of one
storage (chunk, expand, ``x`` with ``x.t()``), the conjugate and negative bits of complex
views, recurrent kernels, packed sequences, checkpointing, autocast and real models.
"""

from __future__ import annotations

import copy
import gc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence
from torch.utils.checkpoint import checkpoint

from client import StormSystem, offload_saved_tensors

REPEATS = 20


@pytest.fixture
def system(module_daemon) -> Iterator[StormSystem]:
    """A session per test, so that a graph a failed test leaves alive is not counted against the next one."""
    with StormSystem(module_daemon.endpoint) as system:
        yield system


@pytest.fixture(scope="module", autouse=True)
def one_intra_op_thread() -> Iterator[None]:
    """The models are tiny, and on a busy 2-core box OpenMP workers spinning at barriers
    beside the daemon and the transfer threads make a step up to 20 times slower.
    Autograd, and with it STORM's hooks, runs on the calling thread either way."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def frozen_heap() -> Iterator[None]:
    """Unfreezes, at the end of the file, what ``collect_then_freeze`` froze."""
    yield
    gc.unfreeze()


@pytest.fixture
def collect_then_freeze(frozen_heap: None) -> None:
    """Collect, then freeze what survives, so that a ``gc.collect()`` in the test scans only
    what the test creates: with torch and transformers loaded a full collection takes about
    0.2 s, and the dropped-graph test collects after every repeat."""
    gc.collect()
    gc.freeze()


def _energy(output: Any) -> torch.Tensor:
    """Sum of squares of every floating tensor in ``output`` (nested tuples, PackedSequence)."""
    if isinstance(output, torch.Tensor):
        return output.pow(2).sum() if output.is_floating_point() else torch.zeros(())
    return sum((_energy(part) for part in output if part is not None), torch.zeros(()))


def _output_energy(model: nn.Module, *inputs: Any) -> torch.Tensor:
    return _energy(model(*inputs))


@dataclass(frozen=True)
class Case:
    """A model, its inputs and its loss; floating and complex inputs get gradients."""

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], tuple[torch.Tensor, ...]]
    loss: Callable[..., torch.Tensor] = _output_energy
    """``(model, *inputs) -> scalar``, run as is for the reference."""
    min_bytes: int | None = 0
    """The offload floor; None runs ``offload_saved_tensors`` with its default."""
    storm_loss: Callable[..., torch.Tensor] | None = None
    """``(system, model, *inputs) -> scalar`` for a case that places the offload context
    itself; by default ``loss`` runs inside the context."""


def _storm_forward(system: StormSystem, case: Case, model: nn.Module, inputs: tuple[Any, ...]) -> torch.Tensor:
    if case.storm_loss is not None:
        return case.storm_loss(system, model, *inputs)
    offload = offload_saved_tensors(system) if case.min_bytes is None else offload_saved_tensors(system, case.min_bytes)
    with offload:
        return case.loss(model, *inputs)


def _with_grad(inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    """Fresh leaves for floating and complex inputs; integer and bool inputs are shared."""
    return tuple(x.detach().clone().requires_grad_() if x.is_floating_point() or x.is_complex() else x for x in inputs)


def _assert_bitwise_equal(what: str, want: torch.Tensor | None, got: torch.Tensor | None) -> None:
    if want is None or got is None:
        assert want is got, f"{what}: only one side has a gradient"
        return
    assert torch.equal(want, got), f"{what} differs; max abs difference {(want - got).abs().max().item():.3g}"


def _assert_gradients_equal(system: StormSystem, case: Case) -> None:
    for repeat in range(REPEATS):
        torch.manual_seed(repeat)
        reference = case.build()
        model = copy.deepcopy(reference)
        inputs = case.inputs()
        reference_inputs, storm_inputs = _with_grad(inputs), _with_grad(inputs)
        want = case.loss(reference, *reference_inputs)
        want.backward()
        got = _storm_forward(system, case, model, storm_inputs)
        got.backward()
        where = f"{case.name}, repeat {repeat}"
        _assert_bitwise_equal(f"{where}: loss", want.detach(), got.detach())
        for (name, theirs), ours in zip(reference.named_parameters(), model.parameters(), strict=True):
            _assert_bitwise_equal(f"{where}: grad of {name}", theirs.grad, ours.grad)
        for index, (theirs, ours) in enumerate(zip(reference_inputs, storm_inputs, strict=True)):
            if ours.requires_grad:
                _assert_bitwise_equal(f"{where}: grad of input {index}", theirs.grad, ours.grad)
        assert system.stats().used_bytes == 0, f"{where}: pool not empty after backward"


# -- recurrent networks ---------------------------------------------------------------


def _packed_loss(rnn: nn.RNNBase, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    return _energy(rnn(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)))


def _recurrent_cases(rnn: type[nn.RNNBase]) -> list[Case]:
    name = rnn.__name__
    return [
        Case(
            f"{name}-2layer-bidirectional-batch_first",
            lambda: rnn(12, 16, num_layers=2, bidirectional=True, batch_first=True),
            lambda: (torch.randn(3, 7, 12),),  # (batch, seq, features)
        ),
        Case(
            f"{name}-packed-unequal-lengths",
            lambda: rnn(12, 16, num_layers=2, bidirectional=True, batch_first=True),
            lambda: (torch.randn(4, 9, 12), torch.tensor([9, 4, 7, 2])),
            _packed_loss,
        ),
    ]


class _Unrolled(nn.Module):
    """A recurrent cell applied step by step in a Python loop."""

    def __init__(self, cell: nn.Module) -> None:
        super().__init__()
        self.cell = cell

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (steps, batch, features)
        state = None
        outputs = []
        for step in x:
            state = self.cell(step, state)
            outputs.append(state[0] if isinstance(state, tuple) else state)
        return torch.stack(outputs)  # (steps, batch, hidden)


RECURRENT = [
    *_recurrent_cases(nn.RNN),
    *_recurrent_cases(nn.GRU),
    *_recurrent_cases(nn.LSTM),
    Case(
        "GRU-with-initial-state",
        lambda: nn.GRU(12, 16),
        lambda: (torch.randn(7, 3, 12), torch.randn(1, 3, 16)),  # (seq, batch, features), (layers, batch, hidden)
    ),
    Case(
        "LSTM-proj_size",
        lambda: nn.LSTM(12, 16, num_layers=2, proj_size=8, bidirectional=True, batch_first=True),
        lambda: (torch.randn(3, 7, 12),),
    ),
    Case(
        "GRU-64x512-default-min_bytes",
        lambda: nn.GRU(64, 512, batch_first=True),
        lambda: (torch.randn(4, 10, 64),),
        min_bytes=None,
    ),
    *(
        Case(
            f"{cell.__name__}-unrolled-8-steps",
            lambda cell=cell: _Unrolled(cell(12, 16)),
            lambda: (torch.randn(8, 3, 12),),
        )
        for cell in (nn.RNNCell, nn.GRUCell, nn.LSTMCell)
    ),
]


# -- convolutions, normalisation, embeddings ------------------------------------------


def _conv_norm(dims: int, norm: str) -> nn.Module:
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1](4, 8, 3, padding=1)
    if norm == "BatchNorm":
        return nn.Sequential(conv, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dims - 1](8))
    if norm == "GroupNorm":
        return nn.Sequential(conv, nn.GroupNorm(4, 8))
    return nn.Sequential(conv, (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)[dims - 1](8, affine=True))


_CONV_INPUT_SHAPES = {1: (4, 4, 12), 2: (3, 4, 8, 8), 3: (2, 4, 5, 6, 6)}  # (batch, channels, *spatial)

NORMALISED = [
    *(
        Case(
            f"Conv{dims}d-{norm}",
            lambda dims=dims, norm=norm: _conv_norm(dims, norm),
            lambda dims=dims: (torch.randn(_CONV_INPUT_SHAPES[dims]),),
        )
        for dims in (1, 2, 3)
        for norm in ("BatchNorm", "GroupNorm", "InstanceNorm")
    ),
    Case("LayerNorm", lambda: nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32)), lambda: (torch.randn(3, 5, 16),)),
    Case("RMSNorm", lambda: nn.Sequential(nn.Linear(16, 32), nn.RMSNorm(32)), lambda: (torch.randn(3, 5, 16),)),
    Case("Embedding", lambda: nn.Embedding(50, 16), lambda: (torch.randint(0, 50, (3, 7)),)),
    *(
        Case(
            f"EmbeddingBag-{mode}-offsets",
            lambda mode=mode: nn.EmbeddingBag(50, 16, mode=mode),
            lambda: (torch.randint(0, 50, (12,)), torch.tensor([0, 3, 3, 8])),  # bag 1 is empty
        )
        for mode in ("sum", "mean")
    ),
]


# -- attention and transformers -------------------------------------------------------


def _padding_mask() -> torch.Tensor:
    """(batch=3, seq=6); True marks padding, and every row keeps some keys."""
    lengths = torch.tensor([6, 4, 2])
    return torch.arange(6) >= lengths[:, None]


def _self_attention(need_weights: bool) -> Callable[..., torch.Tensor]:
    def loss(attention: nn.MultiheadAttention, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return _energy(attention(x, x, x, key_padding_mask=mask, need_weights=need_weights))

    return loss


def _sdpa(projection: nn.Linear, x: torch.Tensor, **options: Any) -> torch.Tensor:
    q, k, v = projection(x).unflatten(-1, (3, 4, 8)).permute(2, 0, 3, 1, 4)  # each (batch, heads, seq, head_dim)
    return _energy(nn.functional.scaled_dot_product_attention(q, k, v, **options))


def _encoder(norm_first: bool) -> nn.Module:
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=norm_first)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


def _decoder(norm_first: bool) -> nn.Module:
    layer = nn.TransformerDecoderLayer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=norm_first)
    return nn.TransformerDecoder(layer, 2)


def _decoder_loss(decoder: nn.Module, target: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    causal = nn.Transformer.generate_square_subsequent_mask(target.shape[1])
    return _energy(decoder(target, memory, tgt_mask=causal, tgt_is_causal=True))


ATTENTION = [
    *(
        Case(
            f"MultiheadAttention-key_padding_mask-need_weights={need_weights}",
            lambda: nn.MultiheadAttention(32, 4, batch_first=True),
            lambda: (torch.randn(3, 6, 32), _padding_mask()),
            _self_attention(need_weights),
        )
        for need_weights in (True, False)
    ),
    Case(
        "sdpa-is_causal",
        lambda: nn.Linear(16, 96),
        lambda: (torch.randn(2, 6, 16),),
        lambda projection, x: _sdpa(projection, x, is_causal=True),
    ),
    Case(
        "sdpa-attn_mask",
        lambda: nn.Linear(16, 96),
        lambda: (torch.randn(2, 6, 16), (torch.rand(6, 6) > 0.5) | torch.eye(6, dtype=torch.bool)),
        lambda projection, x, mask: _sdpa(projection, x, attn_mask=mask),
    ),
    *(
        Case(
            f"TransformerEncoder-norm_first={norm_first}",
            lambda norm_first=norm_first: _encoder(norm_first),
            lambda: (torch.randn(3, 6, 32),),
        )
        for norm_first in (False, True)
    ),
    *(
        Case(
            f"TransformerDecoder-norm_first={norm_first}",
            lambda norm_first=norm_first: _decoder(norm_first),
            lambda: (torch.randn(3, 5, 32), torch.randn(3, 7, 32)),  # target, memory: (batch, seq, d_model)
            _decoder_loss,
        )
        for norm_first in (False, True)
    ),
]


# -- vision blocks --------------------------------------------------------------------


class _ResidualBlock(nn.Module):
    """conv-bn-relu-conv-bn, plus the input, then relu; both relus in place."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + x)


def _conv_then(layer: nn.Module, out_channels: int = 8) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, out_channels, 3, padding=1), layer)


VISION = [
    Case("residual-block-inplace-relu", lambda: _ResidualBlock(8), lambda: (torch.randn(2, 8, 8, 8),)),
    Case("MaxPool2d", lambda: _conv_then(nn.MaxPool2d(2)), lambda: (torch.randn(2, 3, 8, 8),)),
    Case("AvgPool2d", lambda: _conv_then(nn.AvgPool2d(2)), lambda: (torch.randn(2, 3, 8, 8),)),
    Case("AdaptiveAvgPool2d", lambda: _conv_then(nn.AdaptiveAvgPool2d(3)), lambda: (torch.randn(2, 3, 8, 8),)),
    Case("Upsample-nearest", lambda: _conv_then(nn.Upsample(scale_factor=2)), lambda: (torch.randn(2, 3, 6, 6),)),
    Case(
        "Upsample-bilinear",
        lambda: _conv_then(nn.Upsample(scale_factor=2, mode="bilinear")),
        lambda: (torch.randn(2, 3, 6, 6),),
    ),
    Case("PixelShuffle", lambda: _conv_then(nn.PixelShuffle(2), 16), lambda: (torch.randn(2, 3, 6, 6),)),
]


# -- views and aliases of one intermediate --------------------------------------------
# Each function gets h = linear(x), (batch=4, 48), and saves views of it for backward.


def _chunk(h: torch.Tensor) -> torch.Tensor:
    a, b, c = h.chunk(3, -1)
    return a.sigmoid() * b.tanh() + c.relu()


def _split(h: torch.Tensor) -> torch.Tensor:
    a, b = h.split([16, 32], -1)
    return a.exp() * b[:, ::2] + b[:, 1::2].sin()


def _unbind(h: torch.Tensor) -> torch.Tensor:
    first, *rest = h.unbind(0)
    return torch.stack([row.sin() * first for row in rest])


def _narrow(h: torch.Tensor) -> torch.Tensor:
    return h.narrow(-1, 4, 8).sin() * h.narrow(-1, 20, 8)


def _as_strided(h: torch.Tensor) -> torch.Tensor:
    windows = h.as_strided((4, 10, 8), (48, 4, 1))  # overlapping windows of each row
    return windows.sin() * windows


def _transpose(h: torch.Tensor) -> torch.Tensor:
    t = h.view(4, 6, 8).transpose(1, 2)  # (4, 8, 6), not contiguous
    return t.sin() * t


def _expand(h: torch.Tensor) -> torch.Tensor:
    column = h[:, :1].expand(-1, 48)  # stride 0 along the last dimension
    return column.sin() * h


def _saved_several_times(h: torch.Tensor) -> torch.Tensor:
    return h.sin() + h.cos() + h * h


def _with_its_transpose(h: torch.Tensor) -> torch.Tensor:
    return h @ h.t()  # mm saves h and h.t(): one storage, two geometries


VIEWS = [
    Case(
        f"views-{fn.__name__.lstrip('_')}",
        lambda: nn.Linear(16, 48),
        lambda: (torch.randn(4, 16),),
        lambda linear, x, fn=fn: _energy(fn(linear(x))),
    )
    for fn in (
        _chunk,
        _split,
        _unbind,
        _narrow,
        _as_strided,
        _transpose,
        _expand,
        _saved_several_times,
        _with_its_transpose,
    )
]


# -- complex numbers: the conjugate and negative bits must survive ---------------------


def _parameters(*tensors: torch.Tensor) -> nn.ParameterList:
    return nn.ParameterList(nn.Parameter(t) for t in tensors)


COMPLEX = [
    Case(
        "complex-conj-imag",
        lambda: _parameters(torch.randn(4, 8)),
        lambda: (torch.randn(4, 8, dtype=torch.cfloat),),
        lambda w, z: (z.conj().imag * w[0]).sum(),
    ),
    Case(
        "complex-matmul-mH",
        lambda: _parameters(torch.randn(8, 8, dtype=torch.cfloat)),
        lambda: (torch.randn(2, 5, 8, dtype=torch.cfloat), torch.randn(2, 5, 8, dtype=torch.cfloat)),
        lambda w, q, k: ((q @ w[0]) @ k.mH).abs().sum(),
    ),
    Case(
        "complex-rfft-conj",
        lambda: _parameters(torch.randn(9, dtype=torch.cfloat)),
        lambda: (torch.randn(4, 16),),
        lambda w, b: (torch.fft.rfft(b).conj() * w[0]).real.pow(2).sum(),
    ),
]


# -- checkpointing and autocast -------------------------------------------------------


def _block() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 16))


def _checkpointed(use_reentrant: bool) -> Callable[..., torch.Tensor]:
    def loss(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return _energy(checkpoint(block, x, use_reentrant=use_reentrant))

    return loss


def _offload_inside_checkpoint(system: StormSystem, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    def offloaded_block(x: torch.Tensor) -> torch.Tensor:
        with offload_saved_tensors(system, min_bytes=0):
            return block(x)

    return _energy(checkpoint(offloaded_block, x, use_reentrant=False))


def _bf16_autocast(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    return _energy(out.float())


CHECKPOINT_AND_AUTOCAST = [
    Case("checkpoint-non-reentrant-inside-offload", _block, lambda: (torch.randn(4, 16),), _checkpointed(False)),
    Case("checkpoint-reentrant-inside-offload", _block, lambda: (torch.randn(4, 16),), _checkpointed(True)),
    Case(
        "offload-inside-checkpoint",
        _block,
        lambda: (torch.randn(4, 16),),
        _checkpointed(False),
        storm_loss=_offload_inside_checkpoint,
    ),
    Case(
        "bf16-autocast-mlp",
        lambda: nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)),
        lambda: (torch.randn(4, 16),),
        _bf16_autocast,
    ),
    Case(
        "bf16-autocast-transformer-layer",
        lambda: nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True),
        lambda: (torch.randn(2, 6, 32),),
        _bf16_autocast,
    ),
]


# -- Hugging Face transformers, tiny configs, random weights (no download) ------------


def _tiny_llama() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attention_dropout=0.0,
        attn_implementation="eager",
    )
    return transformers.LlamaForCausalLM(config).train()


def _tiny_gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=100,
        n_positions=32,
        n_embd=32,
        n_layer=2,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        attn_implementation="eager",
    )
    return transformers.GPT2LMHeadModel(config).train()


def _tiny_bert() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
    )
    return transformers.BertForMaskedLM(config).train()


def _tiny_t5() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(
        vocab_size=100,
        d_model=32,
        d_ff=64,
        d_kv=8,
        num_layers=2,
        num_heads=4,
        dropout_rate=0.0,
        decoder_start_token_id=0,  # labels are shifted right behind it
        attn_implementation="eager",
    )
    return transformers.T5ForConditionalGeneration(config).train()


def _tiny_mixtral() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.MixtralConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        output_router_logits=True,  # the loss includes the router's load-balancing term
        attention_dropout=0.0,
        attn_implementation="eager",
    )
    return transformers.MixtralForCausalLM(config).train()


def _token_ids() -> tuple[torch.Tensor]:
    return (torch.randint(0, 100, (2, 8)),)  # (batch, seq)


def _language_model_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


HUGGING_FACE = [
    Case(f"hf-{build.__name__.removeprefix('_tiny_')}", build, _token_ids, _language_model_loss)
    for build in (_tiny_llama, _tiny_gpt2, _tiny_bert, _tiny_t5, _tiny_mixtral)
]


CASES = [*RECURRENT, *NORMALISED, *ATTENTION, *VISION, *VIEWS, *COMPLEX, *CHECKPOINT_AND_AUTOCAST, *HUGGING_FACE]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_gradients_equal_without_storm_and_pool_empties(system: StormSystem, case: Case) -> None:
    _assert_gradients_equal(system, case)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
@pytest.mark.usefixtures("collect_then_freeze")
def test_dropped_graph_returns_memory_to_pool(system: StormSystem, case: Case) -> None:
    for repeat in range(REPEATS):
        torch.manual_seed(repeat)
        model = case.build()
        loss = _storm_forward(system, case, model, _with_grad(case.inputs()))
        assert system.stats().used_bytes > 0, f"{case.name}, repeat {repeat}: nothing was offloaded"
        del loss
        gc.collect()
        assert system.stats().used_bytes == 0, f"{case.name}, repeat {repeat}: pool not empty after the graph died"
