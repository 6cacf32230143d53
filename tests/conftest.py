"""Shared fixtures: tiny GPT-2- and Llama-shaped bases built in code; nothing is downloaded."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hub_server import local_hub_fixture
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VOCAB = 99
# tiny models: one thread is as fast, and two threads spin badly when the 2 cores are shared
torch.set_num_threads(1)


def tiny_gpt2(seed: int = 0, vocab_size: int = VOCAB) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config).eval()


def tiny_llama(seed: int = 0, hidden_size: int = 32, intermediate_size: int = 64) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


BASES = {"gpt2": tiny_gpt2, "llama": tiny_llama}


@pytest.fixture(params=sorted(BASES))
def make_base(request):
    """A factory of tiny bases of one architecture; equal seeds give equal weights."""
    return BASES[request.param]


# the real huggingface_hub client against a Hub-compatible server on 127.0.0.1 (see hub_server.py)
local_hub = pytest.fixture(local_hub_fixture)


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """`(base_dir, data_file)` of the tiny federated world (see federated_setup.py), built once per session."""
    from federated_setup import write_tiny_world

    return write_tiny_world(tmp_path_factory.mktemp("world"))


@pytest.fixture
def input_ids() -> torch.LongTensor:
    return torch.randint(1, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))


def perturb_experts(model, std: float = 0.1, seed: int = 0) -> None:
    """Give every LoRA B a non-zero value (fresh experts are a zero update) and the routers a spread."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "router" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def assert_loads_as_remote_code(model_dir, batch: dict, expected: torch.Tensor, tmp_path, atol: float = 0.0, **kwargs):
    """Load `model_dir` with `trust_remote_code=True` (and `kwargs`, given as reprs) in a fresh process where
    comigs_hf cannot be imported, and assert its logits on `batch` are `expected` (rtol 0, `atol`)."""
    torch.save({"batch": batch, "logits": expected}, tmp_path / "expected.pt")
    extra = "".join(f", {key}={value!r}" for key, value in kwargs.items())
    script = textwrap.dedent(
        f"""
        import sys, torch
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "comigs_hf" or name.startswith("comigs_hf."):
                    raise ImportError("comigs_hf is blocked in this process")
        sys.meta_path.insert(0, Block())
        sys.path = [p for p in sys.path if p not in ("", {os.getcwd()!r})]
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(model_dir)!r}, trust_remote_code=True{extra})
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert "comigs_hf" not in sys.modules
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        with torch.no_grad():
            got = model(**expected["batch"]).logits
        torch.testing.assert_close(got, expected["logits"], rtol=0, atol={atol!r})
        print("REMOTE_OK")
        """
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert "REMOTE_OK" in result.stdout, result.stderr[-3000:]


@pytest.fixture
def in_a_run(monkeypatch):
    """A ServerApp's process identity, which Flower reads to build the messages a strategy sends."""
    from flwr.supercore.task_identity import TaskIdentity

    for key in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, key, 1)
