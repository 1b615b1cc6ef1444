"""Model leaves: vector quantizer, conv and 1D ViT tokenizers, GPT prior, its sampler and
static-shape (CUDA graph) decoder.

`TOKENIZERS` maps a tokenizer config's `name` to its (config class, model class).
"""
from wartok.models.conv_tokenizer import (
    PRESETS as CONV_TOKENIZER_PRESETS,
    ConvTokenizer,
    ConvTokenizerConfig,
    TokenizerOutput,
    conv_tokenizer_config,
)
from wartok.models.gpt import GPT, PRESETS as GPT_PRESETS, GPTConfig, KVCache, gpt_config
from wartok.models.quantizer import QuantizerConfig, QuantizerOutput, VectorQuantizer, code_histogram_stats
from wartok.models.sample import filter_logits, generate
from wartok.models.static_decode import StaticDecoder
from wartok.models.vit1d import (
    PRESETS as VIT1D_TOKENIZER_PRESETS,
    ViT1DTokenizer,
    ViT1DTokenizerConfig,
    vit1d_tokenizer_config,
)

TOKENIZERS = {"conv": (ConvTokenizerConfig, ConvTokenizer), "vit1d": (ViT1DTokenizerConfig, ViT1DTokenizer)}

__all__ = [
    "CONV_TOKENIZER_PRESETS", "ConvTokenizer", "ConvTokenizerConfig", "TokenizerOutput", "conv_tokenizer_config",
    "GPT", "GPT_PRESETS", "GPTConfig", "KVCache", "gpt_config",
    "QuantizerConfig", "QuantizerOutput", "VectorQuantizer", "code_histogram_stats",
    "VIT1D_TOKENIZER_PRESETS", "ViT1DTokenizer", "ViT1DTokenizerConfig", "vit1d_tokenizer_config",
    "filter_logits", "generate", "StaticDecoder", "TOKENIZERS",
]
