"""Generate CLIP's `vocab.json` and `merges.txt` from the BPE merges list that CLIP publishes.

The merges list (`bpe_simple_vocab_16e6.txt.gz`) ships inside the `open-clip-torch` wheel. CLIP builds its
vocabulary from it in a fixed order: the 256 byte symbols, the same symbols with the end-of-word marker `</w>`,
one entry per merge, then the two special tokens. We reproduce that order so token ids match CLIP's.

Usage:
    pip download --no-deps open-clip-torch==3.3.0 -d /tmp/oc
    python scripts/make_clip_tokenizer.py /tmp/oc/open_clip_torch-3.3.0-py3-none-any.whl

The output is committed under app/models/tokenizer/ so nothing is downloaded at run time.
"""

from __future__ import annotations

import gzip
import json
import sys
import zipfile
from pathlib import Path

BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
# CLIP keeps the first 49152 - 256 - 2 merges of the published list (its context-length-free vocab size).
N_MERGES = 49152 - 256 - 2
OUT_DIR = Path(__file__).resolve().parent.parent / "app" / "models" / "tokenizer"


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes used by byte-level BPE, in CLIP's order."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def read_merges(source: Path) -> list[str]:
    """Merges from a wheel or from the .txt.gz itself, without the header line."""
    if source.suffix == ".whl":
        with zipfile.ZipFile(source) as wheel:
            raw = wheel.read(BPE_MEMBER)
    else:
        raw = source.read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    return lines[1 : N_MERGES + 1]


def build_vocab(merges: list[str]) -> dict[str, int]:
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols]
    tokens += ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__)
        return 2
    merges = read_merges(Path(argv[1]))
    vocab = build_vocab(merges)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (OUT_DIR / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {OUT_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
