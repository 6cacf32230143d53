"""A bitsandbytes 4-/8-bit base (on CPU, which bitsandbytes >= 0.48 supports) wraps, trains with fp32 adapters and
reloads quantised the same way from an adapter-only checkpoint."""

import pytest
import torch
from conftest import VOCAB, tiny_llama
from safetensors import safe_open
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from comigs_hf import CoMiGSForCausalLM, parameter_role

bnb = pytest.importorskip("bitsandbytes")

# 4-bit's CPU kernels repack the weights on first use (absmax kept in bf16), so the same base can differ by a few 1e-3
QUANTISATIONS = {
    "4bit": (lambda: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32), "Linear4bit", 1e-5),
    "8bit": (lambda: BitsAndBytesConfig(load_in_8bit=True), "Linear8bitLt", 1e-5),
}


@pytest.fixture(params=sorted(QUANTISATIONS))
def quantised(request, tmp_path):
    make_config, layer_class, atol = QUANTISATIONS[request.param]
    # widths of 64 and more: bitsandbytes' 4-bit CPU kernels quantise in blocks of 64 input features
    tiny_llama(hidden_size=64, intermediate_size=128).save_pretrained(tmp_path / "base")
    return tmp_path / "base", make_config, layer_class, atol


def test_a_quantised_base_trains_fp32_adapters_and_reloads_quantised(quantised, tmp_path):
    base_dir, make_config, layer_class, atol = quantised
    ids = torch.randint(1, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    plain = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=make_config())
    model = CoMiGSForCausalLM.from_base(
        base_dir, quantization_config=make_config(), num_specialists=1, top_k=2, attention_lora=True
    )
    wrapped = model.model.model.layers[0].mlp.base_mlp
    assert type(wrapped.up_proj.base_layer).__name__ == layer_class
    assert (wrapped.up_proj.in_features, wrapped.up_proj.out_features) == (64, 128)  # not the packed weight's shape
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(parameter_role(n) != "base" for n in trainable)
    assert {p.dtype for p in trainable.values()} == {torch.float32}
    # in train mode throughout: bitsandbytes repacks a 4-bit weight for its CPU kernels at the first forward in eval
    # mode, lossily (absmax in bf16), and saving unpacks it, so evaluating before saving would change the base
    model.train(), plain.train()  # (the tiny Llama has no dropout)
    with torch.no_grad():  # fresh experts (zero B) leave the quantised base's logits as they were
        torch.testing.assert_close(model(ids).logits, plain(ids).logits, atol=atol, rtol=0)

    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    losses = []
    for _ in range(4):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1

    model.save_pretrained(tmp_path / "client")
    with safe_open(str(tmp_path / "client" / "model.safetensors"), framework="pt") as handle:
        assert all(parameter_role(key) != "base" for key in handle.keys())
    reloaded = CoMiGSForCausalLM.from_pretrained(tmp_path / "client")
    assert type(reloaded.model.model.layers[0].mlp.base_mlp.up_proj.base_layer).__name__ == layer_class
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=atol, rtol=0)
