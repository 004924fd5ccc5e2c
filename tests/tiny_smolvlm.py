"""Tiny random-init SmolVLMs, built offline and saved as hub checkpoints' folders are:
- `smolvlm`: transformers' Idefics3 classes, as SmolVLM-256M/500M-Instruct are, saved with
  save_pretrained (model, Idefics3 processor: image processor, tokenizer, chat template,
  image_seq_len);
- `smolvlm2`: the SmolVLM classes, as SmolVLM2-*-Instruct are, in the hub's file layout
  (preprocessor_config.json, processor_config.json naming SmolVLMProcessor, whose video
  processor needs torchvision, and chat_template.json)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# SmolVLM's chat template (that of the hub's SmolVLM-*-Instruct processors).
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<end_of_utterance>", "<fake_token_around_image>",
            "<image>", "<global-img>"] + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
TILE, PATCH, SCALE = 64, 16, 2  # 64-px tiles of 16-px patches: 16 patches, pixel-shuffled to 4 tokens
SEQ_LEN = (TILE // PATCH) ** 2 // SCALE**2


def _tokenizer() -> Any:
    """A byte-level BPE trained here (~300 tokens) with SmolVLM's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<|endoftext|>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = ["User: what is in the image? Assistant: a dog and a person",
              "a photo of a cat on the street", "describe this image in one sentence"] * 20
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<end_of_utterance>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>")


def _config(tokenizer: Any) -> dict[str, Any]:
    """A 2-layer vision encoder on TILE-pixel tiles, pixel shuffle SCALE, a 2-layer Llama."""
    ids = {s: tokenizer.convert_tokens_to_ids(s) for s in ("<|im_start|>", "<end_of_utterance>", "<|im_end|>")}
    special = {"bos_token_id": ids["<|im_start|>"], "eos_token_id": ids["<end_of_utterance>"],
               "pad_token_id": ids["<|im_end|>"]}
    return {
        "text_config": {"model_type": "llama", "vocab_size": len(tokenizer), "hidden_size": 64,
                        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                        "num_key_value_heads": 2, "max_position_embeddings": 512, **special},
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                          "num_attention_heads": 2, "image_size": TILE, "patch_size": PATCH},
        "scale_factor": SCALE, "image_token_id": tokenizer.convert_tokens_to_ids("<image>"),
        "pad_token_id": special["pad_token_id"],
    }


def _save_model(model: Any, folder: Path, tokenizer: Any) -> None:
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)


# The image processor's sizes: frames split into tiles up to a 2 x 2 grid (longest edge
# 2 * TILE) plus the whole frame, as the real checkpoints do with up to 4 x 4 tiles of 512 px.
IMAGE_SIZES: dict[str, Any] = {"size": {"longest_edge": 2 * TILE}, "max_image_size": {"longest_edge": TILE},
                               "do_image_splitting": True}


def smolvlm(folder: Path) -> Path:
    """A tiny SmolVLM (v1): Idefics3ForConditionalGeneration and Idefics3Processor."""
    import torch
    import transformers
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    tokenizer = _tokenizer()
    torch.manual_seed(0)
    _save_model(Idefics3ForConditionalGeneration(Idefics3Config(**_config(tokenizer))), folder, tokenizer)
    Idefics3Processor(Idefics3ImageProcessorPil(**IMAGE_SIZES), tokenizer, image_seq_len=SEQ_LEN,
                      chat_template=CHAT_TEMPLATE).save_pretrained(folder)
    return folder


def smolvlm2(folder: Path) -> Path:
    """A tiny SmolVLM2: SmolVLMForConditionalGeneration, and the hub's files for a
    SmolVLMProcessor (not built here: it needs torchvision and num2words)."""
    import torch
    import transformers
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    tokenizer = _tokenizer()
    torch.manual_seed(0)
    _save_model(SmolVLMForConditionalGeneration(SmolVLMConfig(**_config(tokenizer))), folder, tokenizer)
    tokenizer.save_pretrained(folder)
    SmolVLMImageProcessorPil(**IMAGE_SIZES).save_pretrained(folder)
    preprocessor = folder / "preprocessor_config.json"
    images = json.loads(preprocessor.read_text())
    images.update(processor_class="SmolVLMProcessor",
                  video_sampling={"fps": 1, "max_frames": 8, "video_size": {"longest_edge": TILE}})
    preprocessor.write_text(json.dumps(images, indent=2))
    (folder / "processor_config.json").write_text(
        json.dumps({"image_seq_len": SEQ_LEN, "processor_class": "SmolVLMProcessor"}, indent=2))
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2))
    return folder
