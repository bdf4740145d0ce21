"""Text: tokenizers (sentencepiece, tokenizer.json, GGUF vocabularies), the chat formats and
templates, and streaming detokenization. Nothing here imports MLX."""

from .chat_format import FORMATS, apply_chat_template, clean_text, detect_chat_format
from .detokenizer import StreamingDetokenizer
from .tokenizer import HFTokenizer, SentencePieceTokenizer, Tokenizer, load_folder_tokenizer

__all__ = ["FORMATS", "HFTokenizer", "SentencePieceTokenizer", "StreamingDetokenizer",
           "Tokenizer", "apply_chat_template", "clean_text", "detect_chat_format",
           "load_folder_tokenizer"]
