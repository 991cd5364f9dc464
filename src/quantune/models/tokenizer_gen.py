"""Generate the small CLIP-style BPE tokenizer that the built-in models ship (vocab.json + merges.txt).

CLIP's tokenizer (Radford et al. 2021) is byte-level BPE where the last symbol of each word carries "</w>". The
built-in models (zoo:tiny, zoo:emoji) need a tokenizer without a download, so quantune learns one here from the
lower-cased Unicode character names (which are the OpenMoji captions) plus a few prompt words, with the `tokenizers`
library's BPE trainer, then writes the files in CLIP's layout (256 bytes, 256 bytes + "</w>", the merges in order,
then <|startoftext|> and <|endoftext|>) so that `transformers.CLIPTokenizer` loads them as it loads SD's.

The result is committed under models/assets/tokenizer/; run `python -m quantune.models.tokenizer_gen` to remake it.
"""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

ASSET_DIR = Path(__file__).parent / "assets" / "tokenizer"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible map from bytes to printable unicode characters."""
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(range(ord("\xae"), 256))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


_BYTE_TO_CHAR = _bytes_to_unicode()
EXTRA_WORDS = "a photo of sks dog cat person emoji icon style drawing picture in the with and on red blue green"


def _corpus() -> list[str]:
    lines = [EXTRA_WORDS]
    for cp in range(0x2000, 0x1FB00):
        name = unicodedata.name(chr(cp), "")
        if name:
            lines.append(name.lower())
    return lines


def generate(out_dir: Path = ASSET_DIR, vocab_size: int = 2048) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from tokenizers.pre_tokenizers import ByteLevel

    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    byte_chars = [_BYTE_TO_CHAR[b] for b in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=byte_chars, end_of_word_suffix="</w>", show_progress=False
    )
    tok.train_from_iterator(_corpus(), trainer)
    merges = [tuple(m) for m in json.loads(tok.to_str())["model"]["merges"]]
    vocab: dict[str, int] = {}
    for token in byte_chars + [c + "</w>" for c in byte_chars] + [a + b for a, b in merges]:
        vocab.setdefault(token, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


if __name__ == "__main__":
    generate()
