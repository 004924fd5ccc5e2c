"""Tiny random-init transformers models, built offline and saved with save_pretrained: loaded
through a `[models.<family>.<variant>] path = <folder>` entry, as a user's model would be."""

from __future__ import annotations

from pathlib import Path
from typing import Any

LABELS = {0: "cat", 1: "dog"}


def _quiet() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def detr(folder: Path, d_model: int = 32, layers: int = 1) -> Path:
    """A DETR detector; `d_model` and `layers` make it as heavy as a memory test needs."""
    _quiet()
    import torch
    from transformers import DetrConfig, DetrForObjectDetection, ResNetConfig
    from transformers.models.detr.image_processing_pil_detr import DetrImageProcessorPil

    torch.manual_seed(0)
    backbone = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1],
                            out_features=["stage4"])
    config = DetrConfig(
        use_timm_backbone=False, backbone_config=backbone, d_model=d_model, encoder_layers=layers,
        decoder_layers=layers, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=d_model, decoder_ffn_dim=d_model, num_queries=10, id2label=LABELS, label2id={v: k for k, v in LABELS.items()},
    )
    DetrForObjectDetection(config).save_pretrained(folder)
    DetrImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 96}).save_pretrained(folder)
    return folder


def rtdetr(folder: Path) -> Path:
    _quiet()
    import torch
    from transformers import RTDetrConfig, RTDetrForObjectDetection, RTDetrResNetConfig
    from transformers.models.rt_detr.image_processing_pil_rt_detr import RTDetrImageProcessorPil

    torch.manual_seed(0)
    backbone = RTDetrResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1],
                                  out_features=["stage2", "stage3", "stage4"])
    config = RTDetrConfig(
        backbone_config=backbone, d_model=32, encoder_hidden_dim=32, encoder_in_channels=[16, 16, 32],
        decoder_in_channels=[32, 32, 32], encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_layers=1,
        decoder_layers=1, num_queries=10, num_denoising=0, encoder_attention_heads=2,
        decoder_attention_heads=2, decoder_n_points=2, id2label=LABELS,
        label2id={v: k for k, v in LABELS.items()},
    )
    RTDetrForObjectDetection(config).save_pretrained(folder)
    RTDetrImageProcessorPil(size={"height": 64, "width": 64}).save_pretrained(folder)
    return folder


def depth_anything(folder: Path) -> Path:
    _quiet()
    import torch
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config
    from transformers.models.dpt.image_processing_pil_dpt import DPTImageProcessorPil

    torch.manual_seed(0)
    backbone = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                            intermediate_size=64, image_size=112, patch_size=14,
                            out_features=["stage1", "stage2", "stage3", "stage4"],
                            reshape_hidden_states=False)
    config = DepthAnythingConfig(backbone_config=backbone, neck_hidden_sizes=[8, 16, 32, 64],
                                 fusion_hidden_size=16, reassemble_hidden_size=32, patch_size=14)
    DepthAnythingForDepthEstimation(config).save_pretrained(folder)
    DPTImageProcessorPil(size={"height": 112, "width": 112}, keep_aspect_ratio=True,
                         ensure_multiple_of=14, do_pad=False).save_pretrained(folder)
    return folder


def clip_tokenizer(words: list[str]):
    """A byte-pair tokenizer that knows whole `words` (and single letters for anything else)."""
    from transformers import CLIPTokenizer

    vocab = {"!": 0}
    for c in "abcdefghijklmnopqrstuvwxyz.":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges = []
    for word in words:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merges.append((parts[0], parts[1]))
            parts = [parts[0] + parts[1]] + parts[2:]
            vocab.setdefault(parts[0], len(vocab))
    vocab["<|startoftext|>"] = len(vocab)  # OWL reads a query's first token id > 0 as "present"
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges)


def owlv2(folder: Path) -> Path:
    _quiet()
    import torch
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    torch.manual_seed(0)
    tokenizer = clip_tokenizer(["person", "car", "dog", "cat"])
    config = Owlv2Config(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 16},
        vision_config={"hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": 128, "patch_size": 16},
        projection_dim=64,
    )
    model = Owlv2ForObjectDetection(config)
    with torch.no_grad():  # each patch's box is its own grid cell (random heads put every box
        model.box_head.dense2.weight.zero_()  # outside the image, where nothing is reported)
        model.box_head.dense2.bias.zero_()
    model.save_pretrained(folder)
    processor = Owlv2Processor(image_processor=Owlv2ImageProcessor(size={"height": 128, "width": 128}),
                               tokenizer=tokenizer)
    processor.save_pretrained(folder)
    return folder


def blip(folder: Path, task: str) -> Path:
    """A tiny BLIP for captions (`task="caption"`) or questions (`task="vqa"`)."""
    _quiet()
    import torch
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipForQuestionAnswering,
        BlipProcessor,
    )
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "photo", "of", "the",
             "person", "what", "is", "in", "image", "?", "cat", "dog", "red", "car", "on", "street"]
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(words)}, bos_token="[DEC]")
    torch.manual_seed(0)
    config = BlipConfig(
        text_config={"vocab_size": len(words), "hidden_size": 32, "intermediate_size": 32,
                     "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 32,
                     "bos_token_id": 5, "pad_token_id": 0, "sep_token_id": 3, "eos_token_id": 3},
        vision_config={"hidden_size": 32, "intermediate_size": 32, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": 96, "patch_size": 16},
        projection_dim=32,
    )
    cls = BlipForQuestionAnswering if task == "vqa" else BlipForConditionalGeneration
    cls(config).save_pretrained(folder)
    BlipProcessor(image_processor=BlipImageProcessorPil(size={"height": 96, "width": 96}),
                  tokenizer=tokenizer).save_pretrained(folder)
    return folder


def _tiny_sam2_vision(fpn_hidden_size: int) -> Any:
    """A tiny Hiera image encoder for 256-pixel inputs (blocks_per_stage [1, 1, 2, 1]: a global
    block first in a stage divides by zero)."""
    from transformers.models.sam2.configuration_sam2 import Sam2HieraDetConfig, Sam2VisionConfig

    hiera = Sam2HieraDetConfig(
        hidden_size=16, num_attention_heads=1, image_size=[256, 256], blocks_per_stage=[1, 1, 2, 1],
        embed_dim_per_stage=[16, 32, 64, 128], num_attention_heads_per_stage=[1, 1, 2, 2],
        window_size_per_stage=[8, 4, 14, 7], global_attention_blocks=[3],
        window_positional_embedding_background_size=[7, 7],
    )
    return Sam2VisionConfig(backbone_config=hiera, backbone_channel_list=[128, 64, 32, 16],
                            backbone_feature_sizes=[[64, 64], [32, 32], [16, 16]],
                            fpn_hidden_size=fpn_hidden_size)


def sam2(folder: Path) -> Path:
    """A tiny SAM2 on 256-pixel inputs."""
    _quiet()
    import torch
    from transformers import Sam2Config, Sam2Model

    torch.manual_seed(0)
    vision = _tiny_sam2_vision(fpn_hidden_size=32)
    config = Sam2Config(
        vision_config=vision,
        prompt_encoder_config={"hidden_size": 32, "image_size": 256, "patch_size": 16, "mask_input_channels": 4},
        mask_decoder_config={"hidden_size": 32, "num_multimask_outputs": 3, "iou_head_depth": 2,
                             "iou_head_hidden_dim": 32, "mlp_dim": 64, "num_hidden_layers": 2,
                             "num_attention_heads": 2},
    )
    Sam2Model(config).save_pretrained(folder)
    return folder


def sam2_video(folder: Path) -> Path:
    """A tiny SAM2 for tracking: the image model above plus memory attention and encoder. The
    memory's object pointers need the hidden size to be a multiple (> 1) of the memory's 64
    channels (fixed in transformers' memory attention)."""
    _quiet()
    import torch
    from transformers import Sam2VideoConfig, Sam2VideoModel

    torch.manual_seed(0)
    vision = _tiny_sam2_vision(fpn_hidden_size=128)
    config = Sam2VideoConfig(
        vision_config=vision, image_size=256,
        prompt_encoder_config={"hidden_size": 128, "image_size": 256, "patch_size": 16, "mask_input_channels": 4},
        mask_decoder_config={"hidden_size": 128, "num_multimask_outputs": 3, "iou_head_depth": 2,
                             "iou_head_hidden_dim": 32, "mlp_dim": 64, "num_hidden_layers": 2,
                             "num_attention_heads": 2},
        memory_attention_hidden_size=128, memory_attention_num_layers=1,
        memory_attention_feed_forward_hidden_size=64, memory_attention_rope_feat_sizes=[16, 16],
        memory_encoder_hidden_size=128, memory_encoder_output_channels=64, mask_downsampler_embed_dim=128,
        memory_fuser_embed_dim=128, memory_fuser_intermediate_dim=64,
    )
    Sam2VideoModel(config).save_pretrained(folder)
    return folder


QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]


def qwen2_5_vl(folder: Path) -> Path:
    """A tiny Qwen2.5-VL with a byte-level BPE trained here (300 tokens)."""
    _quiet()
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = ["a photo of a cat on the street", "what is in the image? a dog and a person",
              "describe this image in one sentence"] * 20
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=QWEN_SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.save_pretrained(folder)
    ids = {s: tokenizer.convert_tokens_to_ids(s) for s in QWEN_SPECIALS}
    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "max_position_embeddings": 512,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                         "mrope_section": [2, 3, 3]}},
        vision_config={"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                       "out_hidden_size": 64, "window_size": 56, "fullatt_block_indexes": [1]},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(folder)
    Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112).save_pretrained(folder)
    return folder


def grounding_dino(folder: Path) -> Path:
    """A tiny Grounding DINO (Swin backbone, BERT text encoder; decoder_layers >= 2, or its
    weight tying fails)."""
    _quiet()
    import torch
    from transformers import (
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoProcessor,
        SwinConfig,
    )
    from transformers.models.grounding_dino.image_processing_pil_grounding_dino import (
        GroundingDinoImageProcessorPil,
    )

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "person", "car", "dog", "cat", "a", "red"]
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    backbone = SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4,
                          image_size=64, out_features=["stage2", "stage3", "stage4"])
    config = GroundingDinoConfig(
        backbone_config=backbone, use_timm_backbone=False,
        text_config={"vocab_size": len(words), "hidden_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 64},
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=10,
        num_feature_levels=3, encoder_n_points=2, decoder_n_points=2, max_text_len=32,
    )
    torch.manual_seed(0)
    GroundingDinoForObjectDetection(config).save_pretrained(folder)
    GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 96}),
        tokenizer=tokenizer,
    ).save_pretrained(folder)
    return folder


SAM2_PACKAGE_OVERRIDES = ["++model.image_size=256"]


def sam2_package(path: Path) -> Path:
    """A random-init checkpoint of Meta's `sam2` package (Hiera tiny at 256 pixels), saved as
    its `build_sam2` reads one: {"model": state_dict}."""
    import torch
    from sam2.build_sam import build_sam2

    torch.manual_seed(0)
    model = build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", None, device="cpu", mode="eval",
                       hydra_overrides_extra=SAM2_PACKAGE_OVERRIDES)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict()}, path)
    return path


def vit_classifier(folder: Path) -> Path:
    """A tiny ViT image classifier with three labels."""
    _quiet()
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    labels = {0: "cat", 1: "dog", 2: "bird"}
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32, id2label=labels, label2id={v: k for k, v in labels.items()})
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def convnext_classifier(folder: Path) -> Path:
    """A tiny ConvNeXt image classifier with three labels; its processor resizes the shortest
    edge and centre-crops (crop_pct), as convnext-tiny-224's does."""
    _quiet()
    import torch
    from transformers import ConvNextConfig, ConvNextForImageClassification
    from transformers.models.convnext.image_processing_pil_convnext import ConvNextImageProcessorPil

    torch.manual_seed(0)
    labels = {0: "cat", 1: "dog", 2: "bird"}
    config = ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], image_size=64, id2label=labels,
                            label2id={v: k for k, v in labels.items()})
    ConvNextForImageClassification(config).save_pretrained(folder)
    ConvNextImageProcessorPil(size={"shortest_edge": 64}, crop_pct=0.875).save_pretrained(folder)
    return folder


CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def causal_lm(folder: Path, context: int = 256, chat: bool = True) -> Path:
    """A tiny Llama causal LM with a byte-level BPE trained here; `context` positions (small, so
    a summary must be written in windows); a chat template when `chat`."""
    _quiet()
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = ["a person walks a dog on the street", "a red car parks next to a building",
              "summarise what happens in the video", "captions of frames with their times"] * 20
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                         bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder
