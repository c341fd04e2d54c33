"""Tiny Hugging Face models, built from configs in code with random weights.

They stand for the real libraries an app compiles: the suite, the examples in configs/ and
bench/ compile a `transformers` Llama and BERT without downloading anything (no
`from_pretrained`, no tokenizer; `HF_HUB_OFFLINE=1` is set unless the caller chose
otherwise). They are as small as still traces the real code paths (attention with grouped
key/value heads, rotary embeddings, the KV cache of `generate`) so that a CPU compile is
short. Weights come from a fixed seed, so two processes build the same model and their
outputs can be compared; the caller's random state is left as it was.
"""

from __future__ import annotations

import os

# Before transformers is imported: it reads the variable once. Nothing here downloads,
# but a stray hub call must fail at once rather than hang a test on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
)

SEED = 0
VOCAB = 1000  # token ids an input may hold: 0 <= id < VOCAB


def tiny_llama() -> LlamaForCausalLM:
    """A 2-layer Llama causal LM (hidden 64, 4 heads over 2 key/value heads), in eval mode."""
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        # generate() warns and guesses when no pad token is set; use eos, as Llama does.
        pad_token_id=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = LlamaForCausalLM(config)
    return model.eval()


def tiny_bert() -> BertModel:
    """A 2-layer BERT encoder (hidden 64, 4 heads) whose call returns a ModelOutput, in eval
    mode (dropout off, so compiled and eager outputs match)."""
    config = BertConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=VOCAB,
        max_position_embeddings=128,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = BertModel(config)
    return model.eval()


class LogitsOnly(torch.nn.Module):
    """The Llama behind a plain forward that returns its logits tensor, no KV cache: what an
    app compiles to use torch's precompiled entries, since the Llama's own forward is
    wrapped by a transformers decorator whose entry torch 2.13 cannot load in a new
    process (README "What the canary checks")."""

    def __init__(self) -> None:
        super().__init__()
        self.llama = tiny_llama()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.llama(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.logits


def tiny_llama_logits() -> LogitsOnly:
    """tiny_llama() behind LogitsOnly, in eval mode."""
    return LogitsOnly().eval()
