"""Byte-level tokenizers whose added tokens sit at a model family's real ids.

ms-swift's templates hard-code special-token ids (Qwen's image pad 151655, Qwen3.5's from 248044, Gemma's
image token 262144, ...) and emit the strings of the others, so a tiny checkpoint's tokenizer must put every
one of them at exactly its real id. Byte-level BPE without merges encodes any text (one token per UTF-8
byte, no unknowns) and decodes it back exactly, which is all a template and a random-init model need.

Heavy imports stay inside the functions, so importing this module does not load tokenizers or transformers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: token -> (id, special): the family's added tokens; ``special`` is the family's own flag (Qwen's think and
#: tool markers are plain added tokens, not special ones).
AddedTokens = Mapping[str, tuple[int, bool]]


class TokenizerLayoutError(RuntimeError):
    """The built tokenizer does not put the family's tokens at their ids; the message lists the misplaced."""


def byte_level(
    added: AddedTokens,
    vocab_size: int,
    *,
    filler: str = "<|reserved_{}|>",
    **special: Any,
) -> Any:
    """A ``PreTrainedTokenizerFast`` of exactly ``vocab_size`` ids with ``added`` at their ids.

    Every id below ``vocab_size`` exists (unused ones are inert ``filler`` placeholders), so decoding any id
    a random-init model samples works, as with the real tokenizer. ``special`` passes ``eos_token``,
    ``pad_token``, ``bos_token``, ... to the tokenizer.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    real_ids = {token_id: token for token, (token_id, _) in added.items()}
    vocab: dict[str, int] = {char: i for i, char in enumerate(alphabet)}
    for token_id in range(len(alphabet), vocab_size):
        vocab[real_ids.get(token_id, filler.format(token_id))] = token_id
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_tokens(
        [
            AddedToken(token, special=is_special, normalized=False)
            for token, (_, is_special) in sorted(added.items(), key=lambda item: item[1][0])
        ]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=2048, **special)
    misplaced = {
        token: (want, got)
        for token, (want, _) in added.items()
        if (got := tokenizer.convert_tokens_to_ids(token)) != want
    }
    if misplaced or len(tokenizer) != vocab_size:
        raise TokenizerLayoutError(
            f"tokenizer layout differs from the family's: misplaced={misplaced}, size={len(tokenizer)}"
            f" (want {vocab_size})"
        )
    return tokenizer
