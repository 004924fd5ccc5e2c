"""A tiny random-init Florence-2 in transformers' native format, built offline and saved with
save_pretrained: loaded through a `path = <folder>` entry, as florence-community/Florence-2-base
would be (the same processor, tokenizer and config layout, at a 64-px image size)."""

from __future__ import annotations

import json
from pathlib import Path

IMAGE_SIZE = 64  # 64 px / stride 32 = 2x2 vision tokens, +1 pooled: 5 image tokens
# What the real tokenizer adds to BART's vocabulary (microsoft's processor: tokens of tasks and
# regions, and the 1000 location bins), as special tokens.
EXTRA = (["<od>", "</od>", "<ocr>", "</ocr>"] + [f"<loc_{i}>" for i in range(1000)]
         + ["<cap>", "</cap>", "<ncap>", "</ncap>", "<dcap>", "</dcap>", "<grounding>", "</grounding>",
            "<seg>", "</seg>", "<sep>", "<region_cap>", "</region_cap>", "<proposal>", "</proposal>",
            "<poly>", "</poly>", "<and>"])
# The post-processing rules the converted checkpoints' processor_config.json carries.
POST_PROCESSOR = {
    "ocr": {"pattern": r"(.+?)<loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)>",
            "area_threshold": 0.0},
    "phrase_grounding": {"banned_grounding_tokens": ["the image", "image", "the", "a", "an"]},
    "pure_text": {}, "description_with_bboxes": {}, "description_with_polygons": {}, "polygons": {},
    "bboxes": {}, "description_with_bboxes_or_polygons": {},
}


def tokenizer():
    """A BART tokenizer (byte-level BPE, 300 tokens trained here) with Florence-2's added tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AddedToken, BartTokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    corpus = ["What does the image describe? Locate the objects with category name in the image.",
              "Locate the phrases in the caption: a car on the street, a person with a red bag",
              "What is the text in the image, with regions? a dog and a cat"] * 20
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    state = json.loads(bpe.to_str())["model"]
    tok = BartTokenizer(vocab=state["vocab"], merges=[tuple(m) for m in state["merges"]],
                        extra_special_tokens={"image_token": "<image>"})
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in EXTRA], special_tokens=True)
    return tok


def florence2(folder: Path) -> Path:
    import torch
    import transformers
    from transformers import (
        BartConfig,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
        Florence2VisionConfig,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    tok = tokenizer()
    torch.manual_seed(0)
    vision = Florence2VisionConfig(
        depths=[1, 1, 1, 1], embed_dim=[16, 16, 32, 32], num_heads=[1, 1, 2, 2], num_groups=[1, 1, 2, 2],
        window_size=2, drop_path_rate=0.0, projection_dim=32, max_position_embeddings=8,
        max_temporal_embeddings=4,
    )
    text = BartConfig(
        vocab_size=len(tok), d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=512,
        bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2, forced_bos_token_id=0,
        forced_eos_token_id=2, scale_embedding=False,
    )
    config = Florence2Config(text_config=text, vision_config=vision, image_token_id=tok.image_token_id)
    model = Florence2ForConditionalGeneration(config)
    with torch.no_grad():  # wider weights than the default init: the output varies with the image
        for weight in model.parameters():
            if weight.dim() == 2:
                weight.normal_(0, 0.3)
    model.save_pretrained(folder)
    images = CLIPImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=False, image_seq_length=(IMAGE_SIZE // 32) ** 2 + 1,
    )
    Florence2Processor(image_processor=images, tokenizer=tok, post_processor_config=POST_PROCESSOR).save_pretrained(folder)
    return folder
