"""Build a tiny random OLMoE checkpoint with an offline tokenizer and a chat template.

Used by the ops tests only when the bundled model (phds_serve/assets/tiny-olmoe) is absent: the ops
tests measure the serving stack (load test, metrics, Prometheus), not model quality, so random
weights are enough. Nothing is downloaded.
"""
from __future__ import annotations

import sys
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build(out: Path, num_experts: int = 8, top_k: int = 4) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import OlmoeConfig, OlmoeForCausalLM, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["the quick brown fox jumps over the lazy dog. " * 4, "hello world, how are you today?"]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", pad_token="<|pad|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)

    torch.manual_seed(0)
    cfg = OlmoeConfig(vocab_size=len(fast), hidden_size=128, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2,  # head_dim 64: CPU attention rejects 16 num_experts=num_experts,
                      num_experts_per_tok=top_k, max_position_embeddings=1024,
                      eos_token_id=fast.eos_token_id, bos_token_id=fast.bos_token_id,
                      pad_token_id=fast.pad_token_id, tie_word_embeddings=False)
    OlmoeForCausalLM(cfg).to(torch.float32).save_pretrained(out)
    return out


if __name__ == "__main__":
    print(build(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/ops-tiny-olmoe")))
