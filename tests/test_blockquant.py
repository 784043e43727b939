"""GGUF's Q4_1 / Q8_0 blocks as a quantized base (``--quantize q4_1``, sparseft.blockquant): the storage,
the exact round trip of weights already on the grid (SmolLM2 ships as a Q4_1 GGUF), the tied head, and
refusals. No torchao needed."""

import pytest
import torch
from torch import nn

from conftest import make_tiny_llama, make_tiny_tokenizer
from sparseft.base_match import fingerprint, stored_tensors
from sparseft.blockquant import BLOCK, Q4_1Tensor, Q8_0Tensor, quantize_q4_1, quantize_q8_0
from sparseft.errors import ConfigError
from sparseft.quantize import QuantizedLinear, dequantize_base, dequantized, linear_layers, quantize_base
from test_loading import requires_smollm2


def on_q4_1_grid(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Weights as a Q4_1 GGUF dequantizes them: code · fp16 scale + fp16 min, codes 0 … 15 per block of
    32, each block using 0 and 15 (its minimum and maximum, as ggml's quantizer writes them)."""
    gen = torch.Generator().manual_seed(seed)
    blocks = rows * cols // BLOCK
    codes = torch.randint(0, 16, (blocks, BLOCK), generator=gen)
    codes[:, 0], codes[:, 1] = 0, 15
    scale = (torch.rand(blocks, generator=gen) * 0.01 + 1e-4).half().float()
    low = (-torch.rand(blocks, generator=gen) * 0.08).half().float()
    return (codes * scale[:, None] + low[:, None]).reshape(rows, cols)


def on_q8_0_grid(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    blocks = rows * cols // BLOCK
    codes = torch.randint(-127, 128, (blocks, BLOCK), generator=gen)
    codes[:, 0] = torch.where(torch.rand(blocks, generator=gen) < 0.5, 127, -127)
    scale = (torch.rand(blocks, generator=gen) * 0.001 + 1e-5).half().float()
    return (codes * scale[:, None]).reshape(rows, cols)


@pytest.fixture
def train_file(tmp_path):
    from test_training import write_train_file

    return write_train_file(tmp_path / "train.jsonl")


def stored(t: torch.Tensor) -> int:
    return sum(part.numel() * part.element_size() for part in stored_tensors(t))


@pytest.mark.parametrize("quantize, gguf_type, bits", [(quantize_q4_1, "Q4_1", 5), (quantize_q8_0, "Q8_0", 8.5)])
def test_the_blocks_are_the_bytes_of_a_gguf_file_and_dequantize_as_gguf_does(quantize, gguf_type, bits):
    from gguf import GGMLQuantizationType, quants

    weight = torch.randn(96, 64, generator=torch.Generator().manual_seed(0))
    q = quantize(weight)
    assert (q.shape, q.dtype) == (weight.shape, weight.dtype)  # the logical weight
    raw = quants.quantize(weight.numpy(), GGMLQuantizationType[gguf_type])
    assert q.blocks.dtype == torch.uint8 and torch.equal(q.blocks, torch.from_numpy(raw).reshape(-1))
    assert stored(q) == weight.numel() * bits / 8
    reference = torch.from_numpy(quants.dequantize(raw, GGMLQuantizationType[gguf_type]))
    assert torch.equal(q.dequantize(), reference)  # torch's reading of the bytes is gguf's
    assert torch.equal(q.rows(torch.tensor([[3, 0], [95, 3]])), reference[torch.tensor([[3, 0], [95, 3]])])


def test_q4_1_rounds_each_weight_to_the_nearest_of_its_blocks_16_levels():
    weight = torch.randn(96, 64, generator=torch.Generator().manual_seed(0))
    blocks = quantize_q4_1(weight).blocks.reshape(-1, 20)
    scale = blocks[:, 0:2].contiguous().view(torch.float16).float()
    error = (quantize_q4_1(weight).dequantize() - weight).abs().reshape(-1, BLOCK).amax(dim=1, keepdim=True)
    # Half a step at most, plus what storing the step and the minimum in fp16 moved (relative 2^-11 each).
    assert (error <= scale * 0.5 + 2.0**-11 * (15 * scale + weight.abs().max())).all()
    assert (error > scale * 0.4).any()  # and it does round


def test_weights_already_on_a_gguf_grid_come_back_exactly():
    q4 = on_q4_1_grid(64, 96)
    q8 = on_q8_0_grid(64, 96)
    assert torch.equal(quantize_q4_1(q4).dequantize(), q4)
    assert torch.equal(quantize_q8_0(q8).dequantize(), q8)
    # ... and other weights do not (the check can fail).
    plain = torch.randn(64, 96, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(quantize_q4_1(plain).dequantize(), plain)


def tied_llama_on_the_grid() -> nn.Module:
    """A tiny Llama whose head is tied to its embedding, its linear weights on the Q4_1 grid and its
    embedding on the Q8_0 grid: what the converted SmolLM2 looks like."""
    model = make_tiny_llama(tie_word_embeddings=True)
    with torch.no_grad():
        for i, layer in enumerate(linear_layers(model).values()):
            layer.weight.copy_(on_q4_1_grid(*layer.weight.shape, seed=i))
        embedding = model.get_input_embeddings().weight
        embedding.copy_(on_q8_0_grid(*embedding.shape, seed=99))
    return model


def test_a_q4_1_base_over_weights_on_its_grid_computes_what_the_dense_base_does():
    dense, model = tied_llama_on_the_grid(), tied_llama_on_the_grid()
    fp32_bytes = {name: p.numel() * 4 for name, p in model.named_parameters()}
    quantize_base(model, "q4_1")
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert type(embedding.weight) is Q8_0Tensor and head.weight is embedding.weight  # still tied ...
    assert type(head) is QuantizedLinear  # ... and its backward dequantizes again
    q_proj = model.model.layers[0].self_attn.q_proj
    assert type(q_proj.weight) is Q4_1Tensor and not q_proj.weight.requires_grad
    for name, p in model.named_parameters():
        if p.dim() == 2:
            assert stored(p) <= fp32_bytes[name] * (8.5 / 32), name
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, dense(input_ids=ids).logits)


def test_the_tied_head_trains_nothing_and_passes_gradients_through():
    model = quantize_base(tied_llama_on_the_grid(), "q4_1")
    hidden = torch.randn(2, 5, model.config.hidden_size, requires_grad=True)
    model.get_output_embeddings()(hidden).pow(2).sum().backward()
    assert model.get_output_embeddings().weight.grad is None
    dense = dequantized(model.get_input_embeddings().weight)
    check = hidden.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(check, dense).pow(2).sum().backward()
    torch.testing.assert_close(hidden.grad, check.grad)


def test_dequantize_base_gives_plain_layers_and_keeps_the_tie():
    model = quantize_base(tied_llama_on_the_grid(), "q4_1")
    dequantize_base(model)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert type(embedding.weight) is nn.Parameter and head.weight is embedding.weight and type(head) is nn.Linear
    assert torch.equal(embedding.weight, tied_llama_on_the_grid().get_input_embeddings().weight)
    assert all(type(p) is nn.Parameter for p in model.parameters())


def test_q4_1_quantization_is_deterministic():
    prints = []
    for seed in (0, 0, 1):
        layers = linear_layers(make_tiny_llama(seed=seed))
        model = quantize_base(make_tiny_llama(seed=seed), "q4_1")  # a fresh model each time, as a reload does
        prints.append(fingerprint({name: model.get_submodule(name).weight for name in layers}))
    assert prints[0] == prints[1] != prints[2]


def test_q4_1_refuses_rows_it_cannot_block_and_leaves_the_model_as_it_was():
    model = nn.Sequential(nn.Linear(64, 96), nn.Linear(96, 5), nn.Linear(5, 8))  # rows of 5: no blocks of 32
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ConfigError, match=r"quantize='q4_1': 2 has rows of 5 weights, which do not split into "
                                          r"GGUF blocks of 32"):
        quantize_base(model, "q4_1")
    assert all(type(m) is nn.Linear for m in model)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_an_op_the_blocks_do_not_support_says_to_dequantize_first():
    q = quantize_q4_1(torch.randn(8, 32))
    with pytest.raises(NotImplementedError, match=r"Q4_1Tensor stores GGUF blocks and does not support .*add.*"
                                                  r"dequantize\(\) it first"):
        q + 1
    assert torch.equal(q.detach().dequantize(), q.dequantize()) and torch.equal(q.clone().dequantize(), q.dequantize())
    table, rows = quantize_q8_0(torch.randn(10, 32)), torch.tensor([1, 3])
    assert torch.equal(torch.nn.functional.embedding(rows, table, 2), table.dequantize()[rows])  # padding_idx: plain
    with pytest.raises(NotImplementedError, match="Q8_0Tensor: F.embedding with max_norm/.* set"):
        torch.nn.functional.embedding(rows, table, max_norm=1.0)


@pytest.mark.real_model
@requires_smollm2
def test_smollm2_is_stored_exactly_in_its_own_gguf_blocks():
    """The shipped SmolLM2 is converted from a Q4_1 GGUF (token embedding Q8_0): q4_1 rounds nothing, and
    the blocks it stores are the file's own bytes."""
    import gguf

    from sparseft.loading import find_smollm2_gguf, load_model

    model = load_model("smollm2-135m")
    originals = {name: p.detach().clone() for name, p in model.named_parameters() if p.dim() == 2}
    quantize_base(model, "q4_1")
    quantized = {name: p for name, p in model.named_parameters() if p.dim() == 2}
    assert quantized.keys() == originals.keys() and len(quantized) == 211  # 30 layers × 7 linears + the embedding
    for name, weight in quantized.items():
        assert torch.equal(dequantized(weight), originals[name]), name
    # Byte for byte (q_proj/k_proj rows are permuted by the conversion, so the others are compared).
    in_file = {t.name: t for t in gguf.GGUFReader(find_smollm2_gguf()[0]).tensors}
    for ours, theirs in (("model.embed_tokens.weight", "token_embd.weight"),
                         ("model.layers.7.self_attn.v_proj.weight", "blk.7.attn_v.weight"),
                         ("model.layers.29.mlp.down_proj.weight", "blk.29.ffn_down.weight")):
        assert torch.equal(quantized[ours].blocks, torch.from_numpy(in_file[theirs].data.copy()).reshape(-1)), ours


def test_a_diff_on_the_tied_head_trains_over_the_q8_0_weight_it_shares(train_file, tmp_path):
    """The head the diff targets is a SparseLinear by the time the base is quantized: the tie is found
    through it, the head's entries run unmerged over the Q8_0 embedding, and the diff reloads onto it."""
    from sparseft import SparseModel
    from sparseft.diffio import read_diff
    from sparseft.training import run_training
    from test_training import quick_config

    trained = make_tiny_llama(tie_word_embeddings=True)
    cfg = quick_config(train_file, tmp_path / "run", steps=3, quantize="q4_1", target_modules=["q_proj", "lm_head"])
    run_training(cfg, model=trained, tokenizer=make_tiny_tokenizer())
    head = trained.get_output_embeddings()
    assert type(head.weight) is Q8_0Tensor and head.weight is trained.get_input_embeddings().weight
    assert head.forward_mode == "unmerged" and "lm_head" in read_diff(tmp_path / "run").masks
    reloaded = SparseModel.from_pretrained(quantize_base(make_tiny_llama(tie_word_embeddings=True), "q4_1"),
                                           tmp_path / "run")
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, trained(input_ids=ids).logits)


def test_a_linear_given_its_weight_by_keyword_dequantizes_it():
    q = quantize_q4_1(torch.randn(8, 32, generator=torch.Generator().manual_seed(0)))
    x = torch.randn(2, 32)
    assert torch.equal(torch.nn.functional.linear(x, weight=q), torch.nn.functional.linear(x, q.dequantize()))
