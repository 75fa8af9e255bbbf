"""A tiny random Llama with its own tokenizer, built offline in seconds for tests.

The architecture is the real one (grouped-query attention, gated MLP, RMSNorm), only small,
so LoRA targets, 4-bit quantization and gradient checkpointing go through the same code as
for a production model. Weights are random but seeded, so every build is identical.
"""

from __future__ import annotations

import json
from pathlib import Path

from worker.assets.build_dataset import DATASET_PATH

# Bump when anything below changes what gets built; an existing build with another version
# is rebuilt.
TINY_MODEL_VERSION = 2
MARKER = "tunery_tiny_model.json"

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
VOCAB_SIZE = 1000
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<s>' + message['role'] + ': ' + message['content'] + '</s>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<s>assistant: ' }}{% endif %}"
)


def _training_texts() -> list[str]:
    texts = [
        "Below is an instruction that describes a task. Write a response that completes it.",
        "### Instruction: ### Input: ### Output: ### Response:",
    ]
    for line in DATASET_PATH.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        texts.append(" ".join(str(v) for v in row.values()))
    return texts


def _build_tokenizer():  # -> PreTrainedTokenizerFast; imported lazily to keep imports cheap
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_training_texts(), trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    # A BOS in front of every sequence, like Llama tokenizers: the pipeline must cope with
    # special tokens that have empty character offsets.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
    )


def _is_built(dest: Path) -> bool:
    marker = dest / MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text())["version"] == TINY_MODEL_VERSION
    except (ValueError, KeyError):
        return False


def build_tiny_llama(dest: Path) -> Path:
    """Build (or reuse) a tiny LlamaForCausalLM + tokenizer in `dest` and return `dest`.

    `AutoModelForCausalLM.from_pretrained(dest)` and `AutoTokenizer.from_pretrained(dest)` load
    it with no network. Pad and EOS are different tokens here; SmolLM2-style pad == EOS is
    covered by tests that set it explicitly.
    """
    dest = Path(dest)
    if _is_built(dest):
        return dest
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        # Llama's 0.02 suits 4096-wide models; at width 64 it leaves the logits nearly flat,
        # so the base model would say nothing and a few LoRA steps would barely move the loss.
        # At 0.2 the base babbles, and ~70 steps teach it the dataset's "Answer: ..." style.
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    # Written last, so an interrupted build is redone rather than half reused.
    (dest / MARKER).write_text(json.dumps({"version": TINY_MODEL_VERSION}))
    return dest
