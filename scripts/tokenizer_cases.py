#!/usr/bin/env python3
"""The Llama 2 tokenizer's test vectors: ids SentencePiece gives a few texts (no BOS/EOS), which
engine/tests/reference.rs checks the `tokenizers`-crate tokenizer against. The ids are facts
about the tokenizer, not the tokenizer itself, so they are committed (assets/tokenizer/llama2/).

    pip install sentencepiece==0.2.3
    python3 scripts/tokenizer_cases.py PATH/tokenizer.model > assets/tokenizer/llama2/cases.json
"""

import json
import sys

TEXTS = [
    "Hello world",
    "  leading spaces and trailing  ",
    "Llama 2-Chat is optimized for dialogue use cases.",
    "[INST] <<SYS>>\nYou are a helpful assistant.\n<</SYS>>\n\nWrite a story [/INST]",
    "naïve café — 東京 🦙 \t tab\nnewline",
    "x^2 + 3x = 42; print('ok')",
    "",
    "1234567890",
    "The quick brown fox jumps over the lazy dog.",
]


def main(argv):
    if len(argv) != 1:
        sys.exit(__doc__)
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=argv[0])
    out = {
        "note": "ids = sentencepiece encode(text) with the Llama 2 tokenizer.model, no BOS/EOS "
                "added; BOS id 1, EOS id 2, UNK id 0",
        "cases": [{"text": t, "ids": sp.encode(t)} for t in TEXTS],
    }
    sys.stdout.write(json.dumps(out, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main(sys.argv[1:])
