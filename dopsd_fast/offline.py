"""Offline pieces for the built-in presets: a Qwen-style chat template and special tokens, a
byte-level tokenizer, and the small configs of the real encoder and VAE classes. No hub access."""

from __future__ import annotations

# A Qwen-style chat template that covers what the encoders use: string or [image, text] content,
# the generation prompt, and Qwen3's `enable_thinking=False` empty think block.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{%- endif -%}"
)

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>", "<think>", "</think>",
]

TINY_TEXT = dict(vocab_size=272, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=2048)

TINY_VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4,
                   spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=32,
                   num_position_embeddings=64, deepstack_visual_indexes=[0, 1])

# Four blocks: the VAE downsamples by 8 like the real one (128 px -> 16 x 16 latents).
TINY_VAE = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=(8, 16, 16, 16), layers_per_block=1, latent_channels=16,
                norm_num_groups=4, sample_size=128, scaling_factor=0.3611, shift_factor=0.1159)

TINY_IMAGE_PROCESSOR = dict(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=32 * 32,
                            max_pixels=64 * 64, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


def build_tokenizer():
    """A byte-level BPE tokenizer (256 byte symbols, no merges) with Qwen's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                   chat_template=CHAT_TEMPLATE, padding_side="right")
