#!/usr/bin/env python3
"""Fetch the public data the tests and README examples use into assets/ (../shared's layout).

    python3 scripts/fetch_data.py shakespeare hh             # public, no account needed
    HF_TOKEN=hf_... python3 scripts/fetch_data.py llama2-tokenizer

Items:
  shakespeare       data/tinyshakespeare.txt: Tiny Shakespeare (karpathy/char-rnn; public-domain
                    text), 1.1 MB.
  hh                data/hh-harmless-pairs.jsonl: 1,800 pairs of Anthropic's HH-RLHF
                    harmless-base test split (MIT licence): the 2,312 pairs shuffled by Python's
                    random.Random(70), the first 512 dropped. Red-team data: offensive by design.
  llama2-tokenizer  tokenizer/llama2/tokenizer.{model,json}: Meta's Llama 2 tokenizer, under the
                    Llama 2 Community License, so it is not in this repository: accept the licence
                    at https://huggingface.co/meta-llama/Llama-2-7b-hf with your Hugging Face
                    account, make a read token (https://huggingface.co/settings/tokens) and pass it
                    as HF_TOKEN (or log in with `hf auth login`).
  all               all three.

Every file is checked against the SHA-256 of the copy the project's tests were written against
(tokenizer.json, which Hugging Face may re-convert, is checked for its shape instead), written
atomically, and left alone when it is already there. --from takes a local copy (or another URL)
of the item's upstream repository, in that repository's layout, for machines without access.
"""

import argparse
import gzip
import hashlib
import json
import os
import random
import sys
import urllib.error
import urllib.request
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent
LLAMA2_REPO = "https://huggingface.co/meta-llama/Llama-2-7b-hf"


def hh_pairs(raw):
    """The harmless-base test split (gzipped JSONL) -> the 1,800 pairs ../shared carries."""
    rows = [json.loads(line) for line in gzip.decompress(raw).decode("utf-8").splitlines()
            if line.strip()]
    random.Random(70).shuffle(rows)
    return "".join(json.dumps({"chosen": r["chosen"], "rejected": r["rejected"]},
                              ensure_ascii=False) + "\n" for r in rows[512:]).encode("utf-8")


def llama2_tokenizer_json(raw):
    """Hugging Face's tokenizer.json for Llama 2: a byte-fallback BPE over 32,000 pieces."""
    try:
        t = json.loads(raw)
        ok = (t["model"]["type"] == "BPE" and len(t["model"]["vocab"]) == 32000
              and t["model"].get("byte_fallback") is True)
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise ValueError("not the Llama 2 tokenizer.json (expected a byte-fallback BPE with "
                         "32,000 pieces)")
    return raw


# item -> files: (path under the destination, upstream base, path under the base, SHA-256 of
# the result or None, transform of the downloaded bytes).
ITEMS = {
    "shakespeare": [
        ("data/tinyshakespeare.txt", "https://raw.githubusercontent.com/karpathy/char-rnn/master",
         "data/tinyshakespeare/input.txt",
         "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed", None)],
    "hh": [
        ("data/hh-harmless-pairs.jsonl", "https://raw.githubusercontent.com/anthropics/hh-rlhf/master",
         "harmless-base/test.jsonl.gz",
         "9403861f533c8dd7dd3baede09fedfb19a28dc13ec2ad677169b855df4c0360e", hh_pairs)],
    "llama2-tokenizer": [
        ("tokenizer/llama2/tokenizer.model", LLAMA2_REPO + "/resolve/main", "tokenizer.model",
         "9e556afd44213b6bd1be2b850ebbbd98f5481437a8021afaf58ee7fb1818d347", None),
        ("tokenizer/llama2/tokenizer.json", LLAMA2_REPO + "/resolve/main", "tokenizer.json",
         None, llama2_tokenizer_json)],
}
GATED = {"llama2-tokenizer"}


class Failed(Exception):
    pass


def sha256(b):
    return hashlib.sha256(b).hexdigest()


def hf_token():
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if os.environ.get(var):
            return os.environ[var].strip()
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    f = home / "token"
    return f.read_text().strip() if f.is_file() else None


def read(base, rel, token):
    """Bytes of `rel` under `base`: a directory, or a URL (with the token, if any)."""
    if "://" not in base:
        p = Path(base) / rel
        if not p.is_file():
            raise Failed(f"{p} not found")
        return p.read_bytes()
    url = f"{base.rstrip('/')}/{rel}"
    req = urllib.request.Request(url, headers={"User-Agent": "llama2-fetch-data"})
    if token:
        # Not passed on through redirects: Hugging Face sends files to other hosts.
        req.add_unredirected_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.read()
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            raise Failed(f"{url}: HTTP {e.code}: " + (
                f"the token was refused; has its account accepted the licence at {LLAMA2_REPO}?"
                if token else "this needs a Hugging Face token: set HF_TOKEN"))
        raise Failed(f"{url}: HTTP {e.code} {e.reason}")
    except (urllib.error.URLError, OSError) as e:
        raise Failed(f"{url}: {getattr(e, 'reason', e)} (no network? --from takes a local copy)")


def fetch(item, dest, source, force):
    """Fetches one item's files; returns the lines to print. Raises Failed."""
    token = None
    files = ITEMS[item]
    todo = []
    lines = []
    for rel, base, up, want, transform in files:
        out = dest / rel
        if out.is_file() and not force:
            data = out.read_bytes()
            try:
                # Without a checksum the file's shape is checked (its transform only validates).
                ok = sha256(data) == want if want else transform(data) is not None
            except ValueError:
                ok = False
            if ok:
                lines.append(f"{item}: already present: {out}")
                continue
            raise Failed(f"{out} is there but is not the expected file; remove it or pass "
                         "--force")
        todo.append((rel, base, up, want, transform))
    if not todo:
        return lines
    if item in GATED:
        token = hf_token()
        if not token and source is None:
            raise Failed(
                f"{item}: Meta's Llama 2 Community License covers this tokenizer, so it is fetched "
                f"from the gated {LLAMA2_REPO} with your own token: accept the licence there, "
                "create a read token at https://huggingface.co/settings/tokens, then run "
                "`HF_TOKEN=hf_... python3 scripts/fetch_data.py llama2-tokenizer` (or pass "
                "--from DIR holding tokenizer.model and tokenizer.json you already have)")
    for rel, base, up, want, transform in todo:
        raw = read(source or base, up, token)
        try:
            data = transform(raw) if transform else raw
        except (ValueError, OSError, KeyError) as e:
            raise Failed(f"{item}: {up}: {e}")
        if want is not None and sha256(data) != want:
            raise Failed(f"{item}: {rel} has sha256 {sha256(data)}, expected {want}: not the "
                         "file the tests were written against (changed upstream?); nothing written")
        out = dest / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        part = out.with_name(out.name + ".part")
        part.write_bytes(data)
        os.replace(part, out)
        lines.append(f"{item}: wrote {out} ({len(data):,} bytes)")
    return lines


def main(argv):
    p = argparse.ArgumentParser(prog="fetch_data.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("items", nargs="+", metavar="ITEM", choices=sorted(ITEMS) + ["all"],
                   help="shakespeare, hh, llama2-tokenizer or all")
    p.add_argument("--dest", type=Path, default=CHECKOUT / "assets",
                   help="where to put them (default: this checkout's assets/, where the tests "
                        "look after $LLAMA2_SHARED or ../shared)")
    p.add_argument("--from", dest="source", metavar="DIR_OR_URL",
                   help="a local copy or mirror of the item's upstream repository")
    p.add_argument("--force", action="store_true", help="fetch even what is already there")
    a = p.parse_args(argv)
    items = list(ITEMS) if "all" in a.items else list(dict.fromkeys(a.items))
    failed = 0
    for item in items:
        try:
            for line in fetch(item, a.dest, a.source, a.force):
                print(line)
        except Failed as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
